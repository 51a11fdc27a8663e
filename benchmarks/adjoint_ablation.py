"""What limits Adjoint Matching on ink: one knob changed at a time, next to the exact optimum.

Each variant is `configs/ctrl_digits_ink.yaml` (ink, gamma/alpha 1, N = 1000, 20-step sampler)
at a 60-update budget with one or two `--set` overrides, evaluated by the protocol (oracle
macro-F1, mean path KL, the exact optimum from 100 base samples per digit). A variant already
finished in the MLflow store (same output_dir) is read back instead of re-run, so the table can
be rebuilt from runs made with `ctrl-ray finetune --config configs/ctrl_digits_ink.yaml --set
...` (the overrides below) or resumed after an interruption.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/adjoint_ablation.py [--variants full bs64]

Writes benchmarks/results/adjoint_ablation.{json,md}. About 10 minutes per variant on one core
(20 for batch 64).
"""

from __future__ import annotations

import sys
from pathlib import Path

import mlflow

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, publish  # noqa: E402

from ctrl_ray import tracking  # noqa: E402
from ctrl_ray.config import load_config  # noqa: E402
from ctrl_ray.finetune import FinetuneConfig, finetune  # noqa: E402

CONFIG = "configs/ctrl_digits_ink.yaml"
# The config's default rule is now the value rule: these are the adjoint settings it had.
ADJOINT = ["mode=adjoint", "adapter.kind=lora", "adapter.rank=4", "adapter.min_timestep=200",
           "objective.lr_embedding=0.03", "objective.lr_adapter=0.003"]
BUDGET = [*ADJOINT, "iterations=60", "checkpoint_every=20", "evaluation.samples_per_target=4",
          "optimum_samples_per_context=100", "distributed.workers=0"]
# name -> (what changes, overrides); "demo" is the demo's own CTRL step (2 Ray workers, the
# same updates as one process).
VARIANTS = {
    "lora4": ("LoRA rank 4, batch 32 (the default)", []),
    "cosine": ("cosine learning-rate decay to 10%", ["objective.lr_schedule=cosine"]),
    "embedding": ("label embedding only (no LoRA)", ["adapter.kind=none"]),
    "lora16": ("LoRA rank 16", ["adapter.rank=16"]),
    "full": ("full fine-tuning, lr 3e-4", ["adapter.kind=full", "objective.lr_adapter=0.0003"]),
    "full-1e-4": ("full fine-tuning, lr 1e-4",
                  ["adapter.kind=full", "objective.lr_adapter=0.0001"]),
    "bs64": ("batch 64 (twice the trajectories)", ["objective.batch_size=64"]),
    "gate300": ("policy = base below t = 300 (not 200)", ["adapter.min_timestep=300"]),
    "buckets10": ("a label vector per band of 100 timesteps",
                  ["adapter.time_buckets=10"]),
    "reward-noise": ("a reward trained with pixel-noise augmentation (`training.augment: "
                     "[noise]`, outputs/reward-ink-noise)",
                     ["rewards=[{path: outputs/reward-ink-noise}]"]),
    "bs128k4": ("batch 128, 4 regression steps per rollout, 15 updates",
                ["objective.batch_size=128", "objective.regression_steps=4", "iterations=15",
                 "checkpoint_every=5"]),
}
OUTPUT_DIRS = {"cosine": "outputs/probe/cos", "embedding": "outputs/probe/none",
               "lora16": "outputs/probe/r16", "full-1e-4": "outputs/probe/full1e-4"}
# Finished runs of the same settings elsewhere that are read, never written: the demo's step 6
# is the default variant (configs/demo.yaml: the same config, on 2 Ray workers).
ALSO_READ = {"lora4": ["outputs/demo/ctrl"]}


def output_dir(name: str) -> str:
    return OUTPUT_DIRS.get(name, f"outputs/probe/{name}")


def variant_run(name: str) -> dict | None:
    for directory in [output_dir(name), *ALSO_READ.get(name, [])]:
        run = finished_run(directory, "adjoint")
        if run is not None:
            return run
    return None


def finished_run(directory: str, mode: str) -> dict | None:
    """The metrics and params of the newest finished, evaluated run of update rule ``mode``
    that wrote ``directory``."""
    runs = mlflow.search_runs(search_all_experiments=True, order_by=["start_time DESC"],
                              filter_string=f"params.output_dir = '{directory}' "
                                            f"and params.mode = '{mode}' "
                                            "and attributes.status = 'FINISHED'")
    runs = runs[runs["metrics.eval_ctrl_mean_kl"].notna()] if len(runs) else runs
    return None if not len(runs) else runs.iloc[0].to_dict()


def run_or_read(config: str, overrides: list[str], directory: str, mode: str) -> dict:
    """The finished run of ``config`` + ``overrides`` in ``directory``: read back from MLflow,
    or fine-tuned now (in one process) when the store has none."""
    run = finished_run(directory, mode)
    if run is None:
        finetune(load_config(FinetuneConfig, config, [*overrides, f"output_dir={directory}"]),
                 progress=False)
        run = finished_run(directory, mode)
    return run


def row(name: str, run: dict) -> dict:
    return {"variant": name, "change": VARIANTS[name][0], "overrides": VARIANTS[name][1],
            "output_dir": run["params.output_dir"], "run_id": run["run_id"],
            "iterations": int(run["params.iterations"]),
            "batch_size": int(run["params.objective.batch_size"]),
            "macro_f1": run["metrics.eval_ctrl_ink_class_macro_f1"],
            "kl": run["metrics.eval_ctrl_mean_kl"],
            "fidelity": run["metrics.eval_ctrl_fidelity"],
            "base_macro_f1": run["metrics.eval_base_ink_class_macro_f1"],
            "optimum_macro_f1": run["metrics.eval_optimum_ink_class_macro_f1"],
            "optimum_kl": run["metrics.eval_optimum_kl"]}


def chosen_variants(doc: str, variants: dict) -> list[str]:
    """The --variants of an ablation script's command line (all by default)."""
    import argparse

    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(variants), choices=list(variants))
    return parser.parse_args().variants


def main() -> None:
    names = chosen_variants(__doc__, VARIANTS)
    tracking.configure()
    rows = []
    for name in names:
        run = variant_run(name) or run_or_read(CONFIG, [*BUDGET, *VARIANTS[name][1]],
                                               output_dir(name), "adjoint")
        rows.append(row(name, run))
    first = rows[0]
    optimum_rate = (first["optimum_macro_f1"] - first["base_macro_f1"]) / first["optimum_kl"]
    lines = ["# Adjoint Matching on ink: what limits it", "",
             f"Generated by `benchmarks/adjoint_ablation.py` on {machine()['date']}: "
             f"`{CONFIG}` (gamma/alpha 1, N = 1000, 20 steps) with one change per row, 4 "
             "samples per (y, c) target, oracle macro-F1; 'per nat' is the macro-F1 gained over "
             "the base per nat of mean path KL. The exact optimum gains "
             f"{optimum_rate:.2f} per nat.", "",
             "| variant | updates x batch | macro-F1 | x optimum | KL (nats) | per nat | "
             "fidelity |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['change']} | {r['iterations']} x {r['batch_size']} | "
                     f"{r['macro_f1']:.3f} | {r['macro_f1'] / r['optimum_macro_f1']:.2f} | "
                     f"{r['kl']:.2f} | {(r['macro_f1'] - r['base_macro_f1']) / r['kl']:.2f} | "
                     f"{r['fidelity']:.3f} |")
    lines += ["", f"Base model {first['base_macro_f1']:.3f}; exact optimum "
              f"{first['optimum_macro_f1']:.3f} at {first['optimum_kl']:.2f} nats."]
    publish("adjoint_ablation", {"machine": machine(), "config": CONFIG, "budget": BUDGET,
                                 "rows": rows}, lines)


if __name__ == "__main__":
    main()
