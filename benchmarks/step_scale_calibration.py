"""The default rule's step scale chosen by CTRL's objective after training, against the fixed
scale 1, on the digits labels, next to the exact optimum.

Each run's final policy (trained earlier with the default rule and scale 1; the fit does not
depend on the scale) is calibrated exactly as a run's last stage does it
(`ctrl_ray.objectives.step_scale`: J = gamma E[log p] - kl_weight KL on 128 rollouts of the
training distribution, drawn from the run's seed, for each scale of the default list), then
evaluated at the chosen scale on the TEST evaluation seed with the protocol its benchmark used.
The optimum is read from those benchmarks' results (same evaluation; the scale-1 numbers
are evaluated again here and match theirs):

- ink: the demo's run (configs/ctrl_digits_ink.yaml on the demo's base, 60 updates of 32),
  benchmarks/results/default_rule_speed_bf16check.json, 4 samples per (y, digit), the judge;
- centre_x, slant: two labels no config was tuned on, benchmarks/results/new_labels.json, 4
  samples per (y, digit), the labeller.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/step_scale_calibration.py [--tasks ink ...]

Writes benchmarks/results/step_scale_calibration.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, publish  # noqa: E402
from text2image_control import TEST_SEED, interval  # noqa: E402

from ctrl_ray.config import load_config  # noqa: E402
from ctrl_ray.evaluation import EvaluationConfig, evaluate  # noqa: E402
from ctrl_ray.finetune import FinetuneConfig, build_setup  # noqa: E402
from ctrl_ray.models.judge import DigitJudge  # noqa: E402
from ctrl_ray.objectives.step_scale import calibrate_step_scale  # noqa: E402
from ctrl_ray.policy import load_any  # noqa: E402

RESULTS = Path(__file__).with_name("results")
SEEDS = (0, 1, 2)


def ink_task() -> dict:
    data = json.loads((RESULTS / "default_rule_speed_bf16check.json").read_text())
    return {"config": "configs/ctrl_digits_ink.yaml",
            "overrides": ["base_model=outputs/base-digits16-demo"],
            "policies": [f"outputs/default-rule-speed/s{seed}-9/policy" for seed in SEEDS],
            "optimum": {k: data["optimum"][k] for k in ("macro_f1", "kl", "ess_min")}}


def new_label_task(label: str) -> dict:
    data = json.loads((RESULTS / "new_labels.json").read_text())["labels"][label]
    return {"config": f"outputs/new-labels/ctrl_{label}.yaml", "overrides": [],
            "policies": [f"outputs/new-labels/ctrl-{label}-seed{seed}/policy" for seed in SEEDS],
            "optimum": {"macro_f1": data["optimum"]["score"], "kl": data["optimum"]["kl"],
                        "ess_min": data["optimum"]["ess_min"]}}


TASKS = {"ink": ink_task, "centre_x": lambda: new_label_task("centre_x"),
         "slant": lambda: new_label_task("slant")}


def run_task(name: str) -> dict:
    task = TASKS[name]()
    config = load_config(FinetuneConfig, task["config"], task["overrides"])
    setup = build_setup(config)
    judge = DigitJudge.load(config.judge) if config.judge else None
    evaluation = EvaluationConfig(samples_per_target=4, num_inference_steps=20, seed=TEST_SEED)
    runs = []
    for seed, path in zip(SEEDS, task["policies"], strict=True):
        loaded = load_any(path)
        model = loaded.model.eval()
        model.value_head.spec.step_scale = 1.0
        fixed = evaluate(model, loaded.label_info, judge, evaluation)
        calibration = calibrate_step_scale(model, setup.reward_fn, config.objective, seed)
        report = evaluate(model, loaded.label_info, judge, evaluation)
        runs.append({"seed": seed, "calibration": calibration,
                     "macro_f1": report["macro_f1"], "kl": report["mean_kl"],
                     "fixed_macro_f1": fixed["macro_f1"], "fixed_kl": fixed["mean_kl"]})
        print(name, seed, calibration["step_scale"], round(report["macro_f1"], 3),
              round(report["mean_kl"], 2), flush=True)
    return {**task, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {name: run_task(name) for name in args.tasks}
    publish("step_scale_calibration", {"machine": machine(), "tasks": results},
            markdown(results))


def markdown(results: dict) -> list[str]:
    lines = ["# The step scale chosen by the objective, against scale 1", "",
             f"`python benchmarks/step_scale_calibration.py` on {machine()['date']}: each run's "
             "final policy (the default rule, trained at scale 1) calibrated as a run's last "
             "stage does it (J = gamma E[log p] - kl_weight KL on 128 rollouts of the training "
             "distribution, from the run's seed, scales 0.7-1.7), then evaluated on TEST "
             f"evaluation seed {TEST_SEED}, 4 samples per (y, digit). 3 seeds, mean +- 95% "
             "t-interval. The exact optimum (ESS min) from the benchmark each task comes from "
             "(its scale-1 numbers there match the re-evaluation here).", "",
             "| label | step scale | chosen per seed | macro-F1 | KL (nats) | optimum @ KL (ESS) "
             "| score ratio | KL ratio |", "|---|---|---|---|---|---|---|---|"]
    for name, task in results.items():
        optimum = task["optimum"]
        best = f"{optimum['macro_f1']:.3f} @ {optimum['kl']:.2f} ({optimum['ess_min']:.0f})"
        rows = [("1 (fixed)", "-", [r["fixed_macro_f1"] for r in task["runs"]],
                 [r["fixed_kl"] for r in task["runs"]]),
                ("by the objective", ", ".join(f"{r['calibration']['step_scale']:g}"
                                               for r in task["runs"]),
                 [r["macro_f1"] for r in task["runs"]], [r["kl"] for r in task["runs"]])]
        for label, chosen, scores, kls in rows:
            score, kl = statistics.mean(scores), statistics.mean(kls)
            lines.append(f"| {name} | {label} | {chosen} | {score:.3f} +- "
                         f"{interval(scores)[1]:.3f} | {kl:.2f} +- {interval(kls)[1]:.2f} | "
                         f"{best} | {score / optimum['macro_f1']:.2f}x | "
                         f"{kl / optimum['kl']:.2f}x |")
    lines += ["", "The objective per scale (mean over the 128 calibration rollouts; seed 0):", ""]
    for name, task in results.items():
        table = task["runs"][0]["calibration"]["table"]
        lines.append(f"- {name}: " + ", ".join(
            f"x{row['step_scale']:g}: J {row['objective']:.3f} (log p {row['log_likelihood']:.2f},"
            f" KL {row['kl']:.2f})" for row in table))
    return lines


if __name__ == "__main__":
    main()
