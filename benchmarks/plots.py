"""The benchmarks' figures, drawn with matplotlib (Agg: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MARKERS = {"ctrl": "o", "dps": "s", "cg": "^", "cfg": "D"}


def frontier_plot(tasks: dict, path: str | Path) -> Path:
    """One panel per task: score against mean path KL (log scale) for the exact optimum's
    curve over gamma/alpha, every CTRL update rule and every guided baseline."""
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
        for run in result["runs"]:
            ax.scatter(max(run["kl"], 1e-2), run["score"], marker=MARKERS.get(run["kind"], "x"),
                       s=45, label=run["method"], zorder=3)
        ax.set_xscale("log")
        ax.set_xlabel("mean path KL to the base model (nats)")
        ax.set_ylabel("joint accuracy" if task == "multi" else "macro-F1")
        ax.set_title(f"{task} (runs at gamma/alpha = {result['tilt']:g})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
