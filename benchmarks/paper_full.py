"""The paper table at full budget: the default (a config with no `mode:`) against DPS,
classifier guidance and CFG at matched KL, for N = 100, 300 and 1000 labelled pairs on
compressibility (gamma/alpha 10), and the compress x ink pair and ink at N = 1000.

Reads the frontier runs, nothing is re-run. Compressibility at N = 100 and 300:

    .venv/bin/python benchmarks/frontier.py --base outputs/base-digits16-demo --tasks compress \
        --rules default --baselines dps cg cfg --num-pairs N --seeds 0 1 2 \
        --out outputs/bench-paper-nN --name paper_full_nN

(then again with `--baselines dps cg --baseline-seeds 0 1 2`: classifier guidance's seeds 1
and 2; CFG keeps seed 0: its training takes 20 min a seed); at N = 1000 the default's frontier
(frontier_default, CFG's in frontier_cfg_compress); the default on the pair and on ink from
frontier_default_fit3000 (today's value rule), their baselines from frontier_default, with
classifier guidance's seeds 1 and 2 from

    .venv/bin/python benchmarks/frontier.py --base outputs/base-digits16-demo \
        --tasks ink multi compress --rules --baselines cg --baseline-seeds 1 2 \
        --out outputs/bench-frontier3 --name frontier_cg_seeds

Each baseline's frontier over its guidance scale is read at the default's KL for each of its
training seeds (linear between its two nearest points, the base model at 0 nats), mean and 95%
t-interval over the seeds; where the default's KL lies below half of every scale's, there is
nothing to read and the cell gives the nearest point.
The optimum is each run's own (its rewards), at the task's gamma/alpha, or goal_yardstick's
estimate of it where that one has a higher ESS.

    .venv/bin/python benchmarks/paper_full.py

Writes benchmarks/results/paper_full.{json,md} and docs/paper_full.png.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine, write_results  # noqa: E402
from default_goal import against_optimum  # noqa: E402
from frontier import at_kl  # noqa: E402
from goal_yardstick import entry  # noqa: E402
from plots import line_plot  # noqa: E402
from text2image_control import interval  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BASELINES = {"dps": "DPS", "cg": "classifier guidance", "cfg": "CFG"}
ROWS = [   # (task, N, the default's results, the baselines' results)
    ("compress", 100, "paper_full_n100", ["paper_full_n100"]),
    ("compress", 300, "paper_full_n300", ["paper_full_n300"]),
    ("compress", 1000, "frontier_default",
     ["frontier_default", "frontier_cfg_compress", "frontier_cg_seeds"]),
    ("multi", 1000, "frontier_default_fit3000", ["frontier_default", "frontier_cg_seeds"]),
    ("ink", 1000, "frontier_default_fit3000", ["frontier_default", "frontier_cg_seeds"]),
]
NAMES = {"compress": "compressibility, gamma/alpha 10", "multi": "compress x ink, gamma/alpha 1",
         "ink": "ink, gamma/alpha 1"}


def main() -> None:
    yardstick_file = RESULTS / "goal_yardstick.json"
    yardstick = (json.loads(yardstick_file.read_text())["tasks"] if yardstick_file.exists()
                 else {})
    rows = [_row(task, n, ctrl_from, baselines_from, yardstick)
            for task, n, ctrl_from, baselines_from in ROWS
            if all((RESULTS / f"{name}.json").exists() for name in [ctrl_from, *baselines_from])]
    data = {"machine": machine(), "rows": rows}
    write_results("paper_full", data, _markdown(data))
    compress = [row for row in rows if row["task"] == "compress"]
    if len(compress) > 1:
        _plot(compress, ROOT / "docs" / "paper_full.png")


def _row(task: str, n: int, ctrl_from: str, baselines_from: list[str],
         yardstick: dict) -> dict:
    """The default's mean over seeds, its optimum, and each baseline read at its KL."""
    ctrl_result = _task(ctrl_from, task)
    ctrl = next(row for row in ctrl_result["methods"] if row["method"] == "ctrl-default")
    config = next(run["config"] for run in ctrl_result["runs"] if run["method"] == "ctrl-default")
    level = next(level for level in ctrl_result["optimum"]["levels"]
                 if level["gamma_over_alpha"] == ctrl_result["tilt"])
    optimum_source = ctrl_from
    own = yardstick.get(entry(task, n))
    if own is not None and own["levels"][0]["ess_min"] > level["ess_min"]:
        level, optimum_source = own["levels"][0], "goal_yardstick"
    base = ctrl_result["optimum"]["base"]["score"]
    runs = [run for name in baselines_from for run in _task(name, task)["runs"]
            if run.get("kind") in BASELINES]
    baselines = {kind: _baseline(kind, [run for run in runs if run["kind"] == kind], base,
                                 ctrl["kl"])
                 for kind in BASELINES if any(run["kind"] == kind for run in runs)}
    return {"task": task, "n": n, "rule": ctrl["rule"], "seeds": ctrl["seeds"],
            "budget": (config["iterations"], config["objective"]["batch_size"]),
            "score": (ctrl["score"], ctrl["score_half"]), "kl": (ctrl["kl"], ctrl["kl_half"]),
            "base": base, "optimum": {"score": level["score"], "kl": level["kl"],
                                      "ess_min": level["ess_min"], "from": optimum_source},
            "score_ratio": ctrl["score"] / level["score"], "kl_ratio": ctrl["kl"] / level["kl"],
            "baselines": baselines,
            "from": [ctrl_from, *(name for name in baselines_from if name != ctrl_from)]}


def _baseline(kind: str, runs: list[dict], base: float, kl: float) -> dict:
    """One baseline's frontier over its guidance scales, read at `kl` for each training seed
    (runs before seeds were recorded are seed 0), with the mean +- 95% interval over seeds."""
    by_seed: dict[int, list[tuple[float, float]]] = {}
    for run in runs:
        by_seed.setdefault(run.get("seed") or 0, []).append((run["kl"], run["score"]))
    readings = []
    for points in by_seed.values():
        # From the base model across a gap of more than twice the default's KL is a guess.
        reading = at_kl([(0.0, base), *points], kl) if min(points)[0] <= 2 * kl else None
        if reading is not None:
            readings.append(reading)
    scales = sorted({run["guidance_scale"] for run in runs})
    points = sorted(tuple(map(float, np.mean([(run["kl"], run["score"]) for run in runs
                                              if run["guidance_scale"] == scale], 0)))
                    for scale in scales)
    nearest = min(points, key=lambda point: abs(point[0] - kl))
    return {"at_kl": interval(readings) if len(readings) == len(by_seed) else None,
            "seeds": sorted(by_seed), "nearest": {"kl": nearest[0], "score": nearest[1]},
            "points": points}


def _task(name: str, task: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())["tasks"][task]


def _baseline_cell(entry: dict | None) -> str:
    if entry is None:
        return "not run"
    if entry["at_kl"] is not None:
        mean, half = entry["at_kl"]
        return f"{mean:.3f}" if math.isnan(half) else f"{mean:.3f} +- {half:.3f}"
    return f"- ({entry['nearest']['score']:.3f} at {entry['nearest']['kl']:.0f} nats)"


def _markdown(data: dict) -> str:
    lines = ["# The paper table at full budget", "",
             f"Generated by `benchmarks/paper_full.py` on {data['machine']['date']} from the "
             "frontier runs' results (nothing re-run; the commands are in its docstring). The "
             "default is each task's config with no `mode:` at its full budget (updates x batch "
             "below), mean +- 95% t-interval over training seeds 0-2 "
             "on the test evaluation seed 30000, the demo's base model, the reward and every "
             "baseline trained on the same N pairs. Each baseline's frontier over its guidance "
             "scale is read at the default's KL, linear between its two nearest points with "
             "the base model at 0 nats, for each training seed of its classifiers (CG) or "
             "network (CFG), mean +- 95% t-interval over those seeds (DPS trains nothing: one "
             "run per scale); '-' where the default's KL lies below half of every scale's (the "
             "nearest point, averaged over seeds, in brackets). Score: macro-F1, joint accuracy "
             "for the pair.", "",
             "| task | N | rule chosen (updates x batch) | the default (CTRL) | KL | "
             "exact optimum (ESS min) | score ratio | KL ratio | DPS | classifier guidance | CFG "
             "| base |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in data["rows"]:
        lines.append(
            f"| {NAMES[row['task']]} | {row['n']} | {row['rule']} ({row['budget'][0]} x "
            f"{row['budget'][1]}) | {against_optimum(row)} | "
            + " | ".join(_baseline_cell(row["baselines"].get(kind)) for kind in BASELINES)
            + f" | {row['base']:.3f} |")
    lines += ["", "Each baseline's best score at any of its scales, at that scale's KL (means "
              "over its seeds); the smallest KL at which it scores above the default, as a "
              "multiple of the default's KL; and its training seeds:", "",
              "| task | N | " + " | ".join(BASELINES.values()) + " |",
              "|---|---|" + "---|" * len(BASELINES)]
    for row in data["rows"]:
        cells = []
        for kind in BASELINES:
            entry = row["baselines"].get(kind)
            if entry is None:
                cells.append("not run")
                continue
            best = max(entry["points"], key=lambda point: point[1])
            above = [kl for kl, score in entry["points"] if score > row["score"][0]]
            cells.append(f"{best[1]:.3f} at {best[0]:.1f} nats; "
                         + (f"above from {min(above) / row['kl'][0]:.1f}x" if above
                            else "never above") + f" ({len(entry['seeds'])} seed"
                         + ("s)" if len(entry["seeds"]) > 1 else ")"))
        lines.append(f"| {NAMES[row['task']]} | {row['n']} | " + " | ".join(cells) + " |")
    lines += ["", "Sources: " + "; ".join(
        f"N = {row['n']} {row['task']}: " + ", ".join(f"{name}.md" for name in row["from"])
        + (", goal_yardstick.md" if row["optimum"]["from"] == "goal_yardstick" else "")
        for row in data["rows"]) + "."]
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], path: Path) -> Path:
    """Compressibility's macro-F1 against N: the default, its optimum, and each baseline at the
    default's KL."""
    ns = [row["n"] for row in rows]
    series = [("the default (CTRL), 95% interval", ns, [row["score"][0] for row in rows],
               [row["score"][1] for row in rows]),
              ("exact optimum, gamma/alpha 10", ns, [row["optimum"]["score"] for row in rows],
               [0.0] * len(rows)),
              ("base model", ns, [row["base"] for row in rows], [0.0] * len(rows))]
    for kind, name in BASELINES.items():
        readings = [(row["baselines"].get(kind) or {}).get("at_kl") for row in rows]
        if all(reading is not None for reading in readings):
            series.append((f"{name} at the default's KL", ns,
                           [mean for mean, _ in readings],
                           [0.0 if math.isnan(half) else half for _, half in readings]))
    return line_plot(path, series, "labelled pairs N", "macro-F1",
                     "Compressibility at full budget, at matched KL", log_x=True)


if __name__ == "__main__":
    main()
