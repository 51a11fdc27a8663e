"""The benchmarks' figures, drawn with matplotlib (Agg: no display needed)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

MARKERS = {"ctrl": "o", "dps": "s", "cg": "^", "cfg": "D"}


def _save(fig, path: str | Path, dpi: int = 110) -> Path:
    """Write `fig` as a PNG (parent folders created) and close it."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def frontier_plot(tasks: dict, path: str | Path) -> Path:
    """One panel per task: score against mean path KL (log scale) for the exact optimum's
    curve over gamma/alpha, each guided baseline's curve over its guidance scale, and every
    CTRL rule (mean over seeds, 95% intervals)."""
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.4), squeeze=False)
    for ax, (task, result) in zip(axes[0], tasks.items(), strict=True):
        levels = result["optimum"]["levels"]
        ax.plot([max(level["kl"], 1e-2) for level in levels], [level["score"] for level in levels],
                "k-", marker=".", label="exact optimum")
        for level in levels:
            ax.annotate(f"{level['gamma_over_alpha']:g}", (max(level["kl"], 1e-2),
                                                          level["score"]),
                        textcoords="offset points", xytext=(3, -10), fontsize=7)
        ax.axhline(result["optimum"]["base"]["score"], color="grey", ls=":", label="base model")
        rows = result["methods"]
        for kind in dict.fromkeys(row["kind"] for row in rows if row["kind"] != "ctrl"):
            curve = sorted((max(row["kl"], 1e-2), row["score"], row["guidance_scale"])
                           for row in rows if row["kind"] == kind)
            ax.plot([c[0] for c in curve], [c[1] for c in curve], marker=MARKERS.get(kind, "x"),
                    ms=5, lw=1, label=f"{kind} (scale {', '.join(f'{c[2]:g}' for c in curve)})")
        for row in (row for row in rows if row["kind"] == "ctrl"):
            ax.errorbar(max(row["kl"], 1e-2), row["score"],
                        xerr=None if math.isnan(row["kl_half"]) else row["kl_half"],
                        yerr=None if math.isnan(row["score_half"]) else row["score_half"],
                        fmt=MARKERS["ctrl"], ms=7, capsize=3, zorder=3,
                        label=f"{row['method']} ({row['rule']})")
        ax.set_xscale("log")
        ax.set_xlabel("mean path KL to the base model (nats)")
        ax.set_ylabel("joint accuracy" if task == "multi" else "macro-F1")
        ax.set_title(f"{task} (runs at gamma/alpha = {result['tilt']:g})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def line_plot(path: str | Path, series: list[tuple[str, list[float], list[float], list[float]]],
              xlabel: str, ylabel: str, title: str, log_x: bool = False,
              x_ticks: list[float] | None = None) -> Path:
    """One line per (name, xs, means, spreads), with +-spread error bars, for scores in [0, 1]
    (the y axis starts at 0 and ends a little above the highest bar, at most 1)."""
    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    for name, xs, ys, spreads in series:
        ax.errorbar(xs, ys, yerr=spreads, marker="o", capsize=3, label=name)
    if log_x:
        ax.set_xscale("log")
    ticks = x_ticks or sorted({x for _, xs, _, _ in series for x in xs})
    ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
    ax.minorticks_off()
    highest = max((y + e for _, _, ys, es in series for y, e in zip(ys, es, strict=True)
                   if not math.isnan(y)), default=1.0)
    ax.set_ylim(0.0, min(1.0, max(0.2, math.ceil(highest * 10 + 0.5) / 10)))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _save(fig, path)


def image_row(path: str | Path, images: list[tuple[str, str | Path | None]]) -> Path | None:
    """The PNGs of `images` (name, file) side by side under their names; None if none exists."""
    tiles = [(name, Image.open(file).convert("L")) for name, file in images
             if file and Path(file).is_file()]
    if not tiles:
        return None
    widths = [tile.width for _, tile in tiles]
    fig, axes = plt.subplots(1, len(tiles), squeeze=False, gridspec_kw={"width_ratios": widths},
                             figsize=(sum(widths) / 80 + 0.3 * len(tiles),
                                      max(tile.height for _, tile in tiles) / 80 + 0.5))
    for ax, (name, tile) in zip(axes[0], tiles, strict=True):
        ax.imshow(tile, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    return _save(fig, path)
