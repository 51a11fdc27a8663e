"""Benchmark training throughput: the single-process loop against Ray with 1 and 2 rollout
workers (same total threads), for each update rule; weight-sync bytes and time.

Writes benchmarks/results/throughput.{json,md} (throughput-MODES.* for a subset of --modes).

    .venv/bin/python benchmarks/throughput.py --base outputs/base-digits16 \
        --reward outputs/reward-compress [--iterations 6] [--modes adjoint pathwise ppo]
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import mlflow
import ray
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, publish, testbed_parser  # noqa: E402

from ctrl_ray import tracking  # noqa: E402
from ctrl_ray.config import load_config  # noqa: E402
from ctrl_ray.distributed.driver import train  # noqa: E402
from ctrl_ray.finetune import FinetuneConfig  # noqa: E402

MODES = ("adjoint", "pathwise", "ppo")
SETTINGS = [  # (name, Ray workers, threads per worker): 2 threads in total for each
    ("single process", 0, 2),
    ("Ray, 1 worker", 1, 2),
    ("Ray, 2 workers", 2, 1),
]


def main() -> None:
    parser = testbed_parser(__doc__, "base", "reward", "config")
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--out", default="outputs/bench-throughput")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    args = parser.parse_args()

    ray.init(num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"MLFLOW_TRACKING_URI": tracking.tracking_uri()}})
    rows = []
    for mode in args.modes:
        for name, workers, threads in SETTINGS:
            torch.set_num_threads(threads if workers == 0 else 1)
            config = load_config(FinetuneConfig, args.config, [
                f"base_model={args.base}", f"rewards=[{{path: {args.reward}}}]",
                f"mode={mode}", f"iterations={args.iterations}", "evaluate=false",
                "checkpoint_every=0", f"distributed.workers={workers}",
                f"distributed.cpus_per_worker={threads}",
                "objective.batch_size=32", "objective.num_inference_steps=20",
                f"output_dir={args.out}/{mode}-{workers}", "experiment=ctrl-ray-throughput",
            ])
            result = train(config, progress=False)
            rows.append(_summarise(name, mode, workers, config, result["mlflow_run_id"]))
            print(rows[-1])
    ray.shutdown()

    for row in rows:
        single = next(r for r in rows if r["mode"] == row["mode"] and r["workers"] == 0)
        row["relative_to_single_process"] = row["trajectories_per_second"] / \
            single["trajectories_per_second"]
    data = {"machine": machine(), "iterations": args.iterations, "rows": rows}
    lines = ["# Training throughput", "",
             f"`python benchmarks/throughput.py` on {data['machine']['date']}: 16x16 digits, "
             "LoRA rank 4; every rule: batch 32, 20 DDPM steps (`--config`'s other keys); "
             "2 CPU threads in total per setting; the first iteration "
             "(actor start-up, warm-up) is excluded.", "",
             "| mode | setting | trajectories/s | updates/s | vs single process | "
             "sync bytes | sync time / iteration | sync share |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['mode']} | {row['setting']} | {row['trajectories_per_second']:.2f} | "
            f"{row['updates_per_second']:.3f} | {row['relative_to_single_process']:.2f}x | "
            f"{row['sync_bytes']:,.0f} | {1000 * row['sync_seconds']:.1f} ms | "
            f"{100 * row['sync_fraction']:.2f}% |")
    lines += ["", "Goals: Ray with 1 worker at least 0.85x the single-process throughput; "
              "sync at most 5% of an iteration."]
    publish("throughput" if set(args.modes) == set(MODES) else
            "throughput-" + "-".join(args.modes), data, lines)


def _summarise(name: str, mode: str, workers: int, config, run_id: str) -> dict:
    client = mlflow.MlflowClient()

    def series(key: str) -> list[float]:
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        return [m.value for m in history][1:]  # drop the warm-up iteration

    seconds = statistics.mean(series("iteration_seconds"))
    batch = config.objective.batch_size
    sync = [p + s for p, s in zip(series("publish_seconds"), series("sync_seconds"),
                                  strict=True)]
    return {"setting": name, "mode": mode, "workers": workers,
            "iteration_seconds": seconds, "trajectories_per_second": batch / seconds,
            "updates_per_second": 1 / seconds, "sync_bytes": series("sync_bytes")[-1],
            "sync_seconds": statistics.mean(sync),
            "sync_fraction": statistics.mean(series("sync_fraction"))}


if __name__ == "__main__":
    main()
