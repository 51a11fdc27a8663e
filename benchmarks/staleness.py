"""Rollouts that overlap the update, on the digits: the control of `max_staleness: 1` against the
synchronous loop (same seeds, same evaluation seeds), next to the exact optimum, and the wall
time of each.

The run is configs/ctrl_digits_ink.yaml on the demo's base model for 60 updates, on Ray with one
rollout worker (the learner and the worker each take one core), evaluated on the TEST evaluation
seed. The value rule learns from base rollouts, which no policy version changes, so its overlap
should cost nothing; adjoint matching regresses on the policy's own rollouts, which arrive one
version old, uncorrected.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/staleness.py [--rules value adjoint]

Writes benchmarks/results/staleness.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, publish  # noqa: E402
from text2image_control import TEST_SEED  # noqa: E402

from ctrl_ray import finetune  # noqa: E402

RULE_SETTINGS = {
    "value": [],
    "adjoint": ["objective.lr_adapter=0.001", "objective.regression_steps=1",
                "adapter.kind=lora"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", nargs="+", default=list(RULE_SETTINGS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--iterations", type=int, default=60)
    args = parser.parse_args()
    rows = []
    for rule in args.rules:
        for seed in args.seeds:
            for staleness in (0, 1):
                out = Path("outputs/staleness") / f"{rule}-s{seed}-k{staleness}"
                start = time.perf_counter()
                result = finetune.run("configs/ctrl_digits_ink.yaml", [
                    "base_model=outputs/base-digits16-demo", f"mode={rule}",
                    *RULE_SETTINGS[rule], f"iterations={args.iterations}", f"seed={seed}",
                    "distributed.workers=1", f"distributed.max_staleness={staleness}",
                    f"evaluation.seed={TEST_SEED}", "evaluate_base=false",
                    "optimum_max_samples_per_context=1500", f"output_dir={out}",
                ], overwrite=True, progress=False)
                ctrl, optimum = result["ctrl"], result["optimum"]
                rows.append({
                    "rule": rule, "seed": seed, "max_staleness": staleness,
                    "macro_f1": ctrl["macro_f1"], "kl": ctrl["mean_kl"],
                    "optimum_macro_f1": optimum["macro_f1"], "optimum_kl": optimum["kl"],
                    "optimum_min_ess": optimum["ess_min"],
                    "train_seconds": result["train_seconds"],
                    "wall_seconds": time.perf_counter() - start,
                })
                print(rows[-1], flush=True)
    write(rows, args)


def write(rows: list[dict], args) -> None:
    lines = [
        "# Rollouts one version ahead of the learner (max_staleness 1) against the synchronous "
        "loop",
        "",
        f"configs/ctrl_digits_ink.yaml on outputs/base-digits16-demo, {args.iterations} "
        f"updates, Ray with 1 rollout worker, TEST evaluation seed {TEST_SEED}.",
        "Command: `OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/staleness.py`",
        "",
        "| rule | seed | max_staleness | macro-F1 | KL (nats) | optimum macro-F1 | optimum KL "
        "| optimum min ESS | training (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['rule']} | {r['seed']} | {r['max_staleness']} | "
                     f"{r['macro_f1']:.3f} | {r['kl']:.2f} | {r['optimum_macro_f1']:.3f} | "
                     f"{r['optimum_kl']:.2f} | {r['optimum_min_ess']:.0f} | "
                     f"{r['train_seconds']:.0f} |")
    lines += [""]
    for rule in args.rules:
        for seed in args.seeds:
            pair = {r["max_staleness"]: r for r in rows
                    if r["rule"] == rule and r["seed"] == seed}
            if len(pair) == 2:
                lines.append(
                    f"- {rule}, seed {seed}: macro-F1 difference (1 - 0) "
                    f"{pair[1]['macro_f1'] - pair[0]['macro_f1']:+.3f}, KL difference "
                    f"{pair[1]['kl'] - pair[0]['kl']:+.2f}, training time "
                    f"{pair[1]['train_seconds'] / pair[0]['train_seconds']:.2f}x")
    publish("staleness", {"machine": machine(), "settings": vars(args), "rows": rows}, lines)


if __name__ == "__main__":
    main()
