"""How fast a bad input is refused: 24 typical bad inputs, each run as `ctrl-ray ...` in its own
process, one at a time; and how long a valid `finetune` takes until its run could start.

Every bad input must exit 2 with one line on stderr. The refusal time is the wall time of the
whole process (interpreter start included). The valid start is the wall time of a fresh
interpreter that loads a valid config, passes `preflight.finetune` and imports the training
entry point (what `ctrl-ray finetune` does before its first step); with `--before DIR` (another
checkout of ctrl-ray, e.g. a `git worktree` of an older commit) it is measured there too.

    python benchmarks/refusal.py                      # writes benchmarks/results/refusal.*
    python benchmarks/refusal.py --before /tmp/ctrl-orig --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CTRL_RAY = Path(sys.executable).parent / "ctrl-ray"

FINETUNE = ["finetune", "--config", "finetune.yaml"]
CASES = [
    ("sample --n 0", ["sample", "--model", "base", "--c", "1", "--n", "0", "--out", "s.png"]),
    ("sample model missing", ["sample", "--model", "missing", "--c", "1", "--out", "s.png"]),
    ("sample --out .txt", ["sample", "--model", "base", "--c", "1", "--out", "grid.txt"]),
    ("finetune iterations=-1", [*FINETUNE, "--set", "iterations=-1"]),
    ("finetune batch_size=0", [*FINETUNE, "--set", "objective.batch_size=0"]),
    ("finetune --workers -1", [*FINETUNE, "--workers", "-1"]),
    ("finetune output under /proc", [*FINETUNE, "--set", "output_dir=/proc/ctrl"]),
    ("finetune base model missing", [*FINETUNE, "--set", "base_model=missing"]),
    ("finetune duplicate key", ["finetune", "--config", "duplicate.yaml"]),
    ("finetune config missing", ["finetune", "--config", "missing.yaml"]),
    ("evaluate model missing", ["evaluate", "--model", "missing", "--config", "finetune.yaml"]),
    ("pretrain steps=0", ["pretrain", "--config", "empty.yaml", "--set", "training.steps=0"]),
    ("pretrain data missing", ["pretrain", "--config", "empty.yaml", "--set",
                               "data.path=missing.parquet"]),
    ("reward epochs=0", ["reward", "train", "--config", "empty.yaml", "--set",
                         "training.epochs=0"]),
    ("reward own pairs missing", ["reward", "train", "--config", "empty.yaml", "--set",
                                  "pairs=missing.parquet", "--set", "label=own"]),
    ("tune num_samples=0", ["tune", "--config", "empty.yaml", "--set",
                            "search.num_samples=0"]),
    ("build-digits under /proc", ["data", "build-digits", "--out", "/proc/d.parquet"]),
    ("pairs dataset missing", ["data", "pairs", "--dataset", "missing.parquet", "--label",
                               "compress_class", "--n", "10", "--out", "p.parquet"]),
    ("import folder missing", ["data", "import", "--images", "missing", "--labels", "x.csv",
                               "--out", "p.parquet"]),
    ("registry list, no store", ["registry", "list"]),
    ("demo output under /proc", ["demo", "--set", "output_dir=/proc/ctrl"]),
    ("audit base missing", ["reward", "audit", "--base", "missing"]),
    ("text2image build data missing", ["text2image", "build", "--config", "empty.yaml",
                                       "--set", "data.path=missing.parquet"]),
    ("tiny-pipeline under /proc", ["text2image", "tiny-pipeline", "--out", "/proc/t"]),
]

VALID_START = """
import sys
from ctrl_ray import preflight
from ctrl_ray.config import load_config
from ctrl_ray.finetune_setup import FinetuneConfig
config = load_config(FinetuneConfig, sys.argv[1], [])
preflight.finetune(config, False)
import ctrl_ray.finetune  # the training entry point: what the run imports next
"""


def workspace(root: Path) -> None:
    """The user's folder of the bad inputs: configs, an empty base folder, no MLflow store."""
    (root / "base").mkdir()
    (root / "empty.yaml").write_text("")
    (root / "duplicate.yaml").write_text("output_dir: outputs/a\noutput_dir: outputs/b\n")
    (root / "finetune.yaml").write_text("base_model: base\nrewards: [{path: reward}]\n"
                                        "output_dir: outputs/ctrl\n")


def refusal_seconds(argv: list[str], root: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run([str(CTRL_RAY), *argv], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)
    seconds = time.perf_counter() - start
    if done.returncode != 2 or done.stderr.count("\n") != 1:
        raise SystemExit(f"{argv}: expected exit 2 and one line, got {done.returncode}: "
                         f"{done.stderr[-500:]}")
    return seconds


def valid_start_seconds(checkout: Path, config: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", VALID_START, str(config)], cwd=config.parent,
                          env={**env, "PYTHONPATH": str(checkout)}, capture_output=True,
                          text=True, timeout=600)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"valid start in {checkout} failed: {done.stderr[-1000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1, help="runs per case (median kept)")
    parser.add_argument("--before", type=Path, help="another ctrl-ray checkout to compare the "
                        "valid start with")
    parser.add_argument("--base", type=Path, default=ROOT / "outputs" / "base-digits16-demo")
    parser.add_argument("--reward", type=Path, default=ROOT / "outputs" / "reward-compress32")
    parser.add_argument("--judge", type=Path, default=ROOT / "outputs" / "judge-digits16")
    parser.add_argument("--out", type=Path, default=RESULTS / "refusal")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="ctrl-refusal-"))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root}/no-store/mlflow.db",
           "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    load_average = round(os.getloadavg()[0], 1)  # other work on the CPUs slows every case
    try:
        workspace(root)
        rows = []
        for name, argv in CASES:
            runs = [refusal_seconds(argv, root, env) for _ in range(args.repeat)]
            rows.append({"case": name, "argv": argv, "seconds": statistics.median(runs)})
            print(f"{name:<30} {rows[-1]['seconds']:.2f} s", flush=True)
        seconds = [row["seconds"] for row in rows]
        result = {"cases": rows, "median_s": statistics.median(seconds), "max_s": max(seconds),
                  "repeat": args.repeat, "cpus": os.cpu_count(), "load_average": load_average}
        if args.base.is_dir() and args.reward.is_dir():
            config = root / "valid.yaml"
            config.write_text(f"base_model: {args.base}\nrewards: [{{path: {args.reward}}}]\n"
                              f"judge: {args.judge}\noutput_dir: {root}/outputs/valid\n")
            checkouts = {"this": ROOT, **({"before": args.before} if args.before else {})}
            starts: dict[str, list[float]] = {label: [] for label in checkouts}
            for _ in range(args.repeat):  # interleaved: a busy spell hits both alike
                for label, path in checkouts.items():
                    starts[label].append(valid_start_seconds(path, config, env))
            result["valid_start_s"] = {label: statistics.median(runs)
                                       for label, runs in starts.items()}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Refusal time", "",
             f"{len(rows)} bad inputs, each `ctrl-ray ...` in its own process (median of "
             f"{args.repeat} run(s) per case, {os.cpu_count()} CPUs, load average "
             f"{load_average} at the start): median "
             f"**{result['median_s']:.2f} s**, max {result['max_s']:.2f} s.", "",
             "| bad input | seconds |", "|---|---|"]
    lines += [f"| {row['case']} | {row['seconds']:.2f} |" for row in rows]
    if "valid_start_s" in result:
        lines += ["", "Valid `finetune` until its run could start (config, preflight, "
                  "the training imports), seconds: " + ", ".join(
                      f"{label} {value:.2f}" for label, value in result["valid_start_s"].items())]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
