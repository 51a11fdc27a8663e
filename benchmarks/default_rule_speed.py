"""Updates per second of the default (value) rule on the demo's CTRL run, against the default
when issue 25 was filed, at the same control: every setting trains the same seeds and is
evaluated on the same evaluation seed, next to the exact optimum.

The run is configs/ctrl_digits_ink.yaml as the demo runs it (its base model, 60 updates of 32,
4 evaluation samples per target), one process and one torch thread unless `--workers`. The
settings differ only in how the run is executed and checked, never in its objective:

- the filing-time default: the first-order step, the policy sampled every update (for the
  reported reward and KL only) and every held-out state read at every check;
- `report_every: 5` (the policy sampled every 5th update, its numbers shown with their age);
- `heldout_pairs: 1024` (each early-stopping check reads 1,024 held-out (state, timestep) pairs
  of the up to 5,376 it read before);
- the same for today's tilted step (8 candidates), with and without the smaller check;
- `check_bf16`: the check's forward passes in bf16 where the CPU has it natively;
- `report_every: 10` (today's default, with the bf16 check).

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/default_rule_speed.py [--seeds 0 1 2]

Writes benchmarks/results/default_rule_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, publish  # noqa: E402
from text2image_control import TEST_SEED, interval  # noqa: E402

from ctrl_ray import finetune  # noqa: E402

FP32_CHECK, EVERY_5 = "objective.check_bf16=false", "objective.report_every=5"
SETTINGS = {   # the index names a run's directory: append, never reorder
    "first-order, report every update, full check (filing-time default)":
        ["adapter.value_head.step_candidates=0", "objective.report_every=1",
         "objective.heldout_pairs=0", FP32_CHECK],
    "first-order, report_every 5, full check":
        ["adapter.value_head.step_candidates=0", "objective.heldout_pairs=0", FP32_CHECK,
         EVERY_5],
    "first-order, report_every 5, heldout_pairs 1024":
        ["adapter.value_head.step_candidates=0", FP32_CHECK, EVERY_5],
    "tilted, report_every 5, full check": ["objective.heldout_pairs=0", FP32_CHECK, EVERY_5],
    "tilted, report_every 5, heldout_pairs 1024, fp32 check": [FP32_CHECK, EVERY_5],
    # the demo's execution: Ray, 2 rollout workers (both cores), synchronous unless said
    "Ray 2 workers: filing-time default":
        ["adapter.value_head.step_candidates=0", "objective.report_every=1",
         "objective.heldout_pairs=0", "distributed.workers=2", FP32_CHECK],
    "Ray 2 workers: tilted, heldout_pairs 1024, fp32 check":
        ["distributed.workers=2", FP32_CHECK, EVERY_5],
    "Ray 2 workers, max_staleness 1: tilted, heldout_pairs 1024, fp32 check":
        ["distributed.workers=2", "distributed.max_staleness=1", FP32_CHECK, EVERY_5],
    "Ray 1 worker, max_staleness 1: tilted, heldout_pairs 1024, fp32 check":
        ["distributed.workers=1", "distributed.max_staleness=1", FP32_CHECK, EVERY_5],
    "tilted, report_every 5, heldout_pairs 1024, bf16 check": [EVERY_5],
    "Ray 2 workers: report_every 5, bf16 check": ["distributed.workers=2", EVERY_5],
    "the default (report_every 10, bf16 check)": ["objective.report_every=10"],
    "Ray 2 workers: the default (report_every 10, bf16 check)":
        ["distributed.workers=2", "objective.report_every=10"],
    "the default, check_patience 1": ["objective.check_patience=1"],
    "the default, check_patience 2": ["objective.check_patience=2"],
    "Ray 2 workers: the default, check_patience 1":
        ["distributed.workers=2", "objective.check_patience=1"],
    "Ray 2 workers: the default, check_patience 2":
        ["distributed.workers=2", "objective.check_patience=2"],
    "the default, 128 base rollouts per update (replay 16,384)":
        ["objective.batch_size=128", "objective.replay_rollouts=16384",
         f"objective.replay_bytes={2**30}"],
    # since 2026-12-06 the default draws half of the fit's states by the forward process
    "the default, chain states only (forward_noise_fraction 0)":
        ["objective.forward_noise_fraction=0"],
    "the default, final fit 3,000 steps": ["objective.final_fit_steps=3000"],
}
RAY = "Ray 2 workers: filing-time default"


def baseline_of(name: str) -> str:
    """The filing-time setting a setting's speed is compared with: same execution (one process,
    or Ray)."""
    return RAY if name.startswith("Ray") else next(iter(SETTINGS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--settings", nargs="+", type=int, default=list(range(len(SETTINGS))),
                        help="indices into the settings (default all)")
    parser.add_argument("--no-evaluate", action="store_true",
                        help="time the training only (nothing else may run on the machine)")
    parser.add_argument("--results-name", default="default_rule_speed")
    args = parser.parse_args()
    names = [list(SETTINGS)[i] for i in args.settings]
    command = " ".join(["python", *sys.argv])
    rows, optimum = [], None
    for seed in args.seeds:
        for name in names:
            out = Path("outputs/default-rule-speed") / f"s{seed}-{list(SETTINGS).index(name)}"
            start = time.perf_counter()
            result = finetune.run("configs/ctrl_digits_ink.yaml", [
                "base_model=outputs/base-digits16-demo", f"distributed.workers={args.workers}",
                *SETTINGS[name], f"iterations={args.iterations}", f"seed={seed}",
                "checkpoint_every=0", "evaluation.samples_per_target=4",
                f"evaluation.seed={TEST_SEED}", "evaluate_base=false",
                f"evaluate={not args.no_evaluate}",
                f"optimum_samples_per_context={200 if optimum is None else 0}",
                "optimum_max_samples_per_context=1500", f"output_dir={out}",
            ], overwrite=True, progress=False)
            optimum = optimum or result.get("optimum")
            ctrl = result.get("ctrl", {})
            rows.append({"setting": name, "seed": seed, "macro_f1": ctrl.get("macro_f1"),
                         "kl": ctrl.get("mean_kl"),
                         "train_seconds": result["train_seconds"],
                         "step_scale": result.get("step_calibration", {}).get("step_scale"),
                         "updates_per_second": args.iterations / result["train_seconds"],
                         "wall_seconds": time.perf_counter() - start})
            print(rows[-1], flush=True)
    optimum = optimum and {"macro_f1": optimum["macro_f1"], "kl": optimum["kl"],
                           "ess_min": optimum["ess_min"]}
    publish(args.results_name, {"machine": machine(), "command": command,
                                   "settings": SETTINGS, "rows": rows, "optimum": optimum},
            markdown(rows, optimum, names, command, args))


def markdown(rows: list[dict], optimum: dict | None, names: list[str], command: str,
             args) -> list[str]:
    """The results page: per setting, updates/s (median over seeds, min-max) against the
    filing-time default and, when evaluated, the control (mean over seeds, 95% interval) next
    to the optimum."""
    def rate(name: str) -> float | None:
        rates = [r["updates_per_second"] for r in rows if r["setting"] == name]
        return statistics.median(rates) if rates else None
    where = "one process (Ray settings: as named)" if args.workers == 0 else \
        f"Ray, {args.workers} workers"
    lines = [
        "# The default rule's updates per second, at the same control", "",
        f"`{command}` on {machine()['date']} (1-minute load average at the end "
        f"{machine()['load_average_1min']:.1f}): configs/ctrl_digits_ink.yaml on the demo's "
        f"base (outputs/base-digits16-demo), {args.iterations} updates of 32, {where}, one "
        f"torch thread; seeds {args.seeds}. Updates/s = updates / training seconds (evaluation "
        "excluded), median (min-max) over the seeds; each setting against the filing-time "
        "default of the same execution."]
    header = "| setting | updates/s (min-max) | vs filing-time |"
    if optimum:
        lines[-1] += (f" Evaluated on TEST evaluation seed {TEST_SEED}, 4 samples per (ink "
                      f"class, digit); macro-F1 and KL: mean +- 95% t-interval over the seeds. "
                      f"Exact optimum: macro-F1 {optimum['macro_f1']:.3f} at "
                      f"{optimum['kl']:.2f} nats (ESS min {optimum['ess_min']:.0f}).")
        header += " macro-F1 | KL (nats) | score ratio | KL ratio |"
    lines += ["", header, "|---" * (header.count("|") - 1) + "|"]
    for name in names:
        runs = [r for r in rows if r["setting"] == name]
        rates = [r["updates_per_second"] for r in runs]
        baseline = rate(baseline_of(name))
        speed = f"{statistics.median(rates) / baseline:.2f}x" if baseline else "-"
        line = (f"| {name} | {statistics.median(rates):.3f} "
                f"({min(rates):.3f}-{max(rates):.3f}) | {speed} |")
        if optimum:
            f1, kl = [r["macro_f1"] for r in runs], [r["kl"] for r in runs]
            line += (f" {statistics.mean(f1):.3f} +- {interval(f1)[1]:.3f} | "
                     f"{statistics.mean(kl):.2f} +- {interval(kl)[1]:.2f} | "
                     f"{statistics.mean(f1) / optimum['macro_f1']:.2f}x | "
                     f"{statistics.mean(kl) / optimum['kl']:.2f}x |")
        lines.append(line)
    lines += ["", "Per seed (macro-F1 at KL when evaluated; training seconds):", ""]
    for name in names:
        cells = [(f"seed {r['seed']}: " + (f"{r['macro_f1']:.3f} at {r['kl']:.2f}, "
                                          if optimum else "") + f"{r['train_seconds']:.0f} s")
                 for r in rows if r["setting"] == name]
        lines.append(f"- {name}: " + "; ".join(cells))
    return lines


if __name__ == "__main__":
    main()
