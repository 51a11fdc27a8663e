"""Benchmark CTRL on the digits testbed: compressibility control from N = 1000 pairs.

Trains the reward, fine-tunes with CTRL for each guidance level (gamma / kl_weight) and
scores base and CTRL by the evaluation protocol (oracle accuracy, macro-F1, per-class F1,
fidelity, mean path KL), plus the training curve. Writes benchmarks/results/control_quality.*.

    .venv/bin/python benchmarks/control_quality.py --base outputs/base-digits16 \
        --judge outputs/judge-digits16 --dataset data/digits16.parquet [--gammas 1 10]
"""

from __future__ import annotations

import sys
from pathlib import Path

import mlflow

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, publish, testbed_parser  # noqa: E402

from ctrl_ray.config import load_config, to_dict  # noqa: E402
from ctrl_ray.finetune import FinetuneConfig, finetune  # noqa: E402
from ctrl_ray.reward_training import RewardJobConfig, train_reward_job  # noqa: E402


def main() -> None:
    parser = testbed_parser(__doc__, "base", "judge", "dataset", "config")
    parser.add_argument("--num-pairs", type=int, default=1000)
    parser.add_argument("--gammas", type=float, nargs="+", default=[1.0, 10.0],
                        help="gamma values at kl_weight = 1 (the guidance level)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", default="outputs/bench-control")
    args = parser.parse_args()

    out = Path(args.out)
    reward = train_reward_job(load_config(RewardJobConfig, overrides=[
        f"dataset={args.dataset}", f"num_pairs={args.num_pairs}",
        f"pairs={out}/pairs-{args.num_pairs}.parquet", f"output_dir={out}/reward",
    ]), progress=False)
    print(f"reward test accuracy {reward['test_accuracy']:.3f}")

    runs = []
    for gamma in args.gammas:
        config = load_config(FinetuneConfig, args.config, [
            f"base_model={args.base}", f"judge={args.judge}", f"rewards=[{{path: {out}/reward}}]",
            f"objective.gamma={gamma}", f"output_dir={out}/gamma-{gamma:g}", *args.overrides,
        ])
        result = finetune(config)
        client = mlflow.MlflowClient()
        curve = {key: [round(m.value, 4) for m in sorted(
            client.get_metric_history(result["mlflow_run_id"], key), key=lambda m: m.step)]
            for key in ("reward", "kl", "iteration_seconds")}
        runs.append({"gamma": gamma, "kl_weight": config.objective.kl_weight,
                     "config": to_dict(config), "train_seconds": result["train_seconds"],
                     "base": result["base"], "ctrl": result["ctrl"], "curve": curve})

    data = {"machine": machine(), "reward": reward, "runs": runs}
    label = "compress_class"
    lines = ["# CTRL control quality: JPEG compressibility on 16x16 digits", "",
             f"`python benchmarks/control_quality.py` on {data['machine']['date']}; "
             f"reward from N = {args.num_pairs} pairs (test accuracy "
             f"{reward['test_accuracy']:.3f}, chance 0.25).", "",
             "| model | gamma / kl_weight | accuracy | macro-F1 | per-class F1 | fidelity | "
             "mean KL (nats) | train time |", "|---|---|---|---|---|---|---|---|"]
    base = runs[0]["base"]
    lines.append(_row("base", "-", base, label, "-"))
    for run in runs:
        lines.append(_row("CTRL", f"{run['gamma']:g} / {run['kl_weight']:g}", run["ctrl"], label,
                          f"{run['train_seconds']:.0f} s"))
    lines += ["", "Training curves (mean reward log p(y | x0) and path KL, every 10th update):",
              ""]
    for run in runs:
        lines.append(f"- gamma {run['gamma']:g}: reward "
                     f"{run['curve']['reward'][::10]}, KL {run['curve']['kl'][::10]}")
    lines += ["", "Goal: macro-F1 at least 0.7 (chance 0.25) with fidelity at least 0.85."]
    publish("control_quality", data, lines)


def _row(name: str, level: str, report: dict, label: str, seconds: str) -> str:
    scores = report["labels"][label]
    per_class = " / ".join(f"{f:.2f}" for f in scores["per_class_f1"])
    return (f"| {name} | {level} | {scores['accuracy']:.3f} | {scores['macro_f1']:.3f} | "
            f"{per_class} | {report.get('fidelity', float('nan')):.3f} | "
            f"{report['mean_kl']:.1f} | {seconds} |")


if __name__ == "__main__":
    main()
