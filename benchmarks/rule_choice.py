"""Which rule a label needs: what `ctrl_ray.rule_choice` measures before training on every task
(the ESS per base rollout of the value targets' mass at the run's tilt, and the rule it picks), and
Adjoint Matching on the two labels no config was tuned on, next to the default (value) rule's
numbers from `benchmarks/new_labels.py` and the exact optimum.

`--choices`: each task's config with its `mode:` line removed, on the demo's base
(outputs/base-digits16-demo), measured as `ctrl-ray finetune` does before training.

Adjoint runs with the settings of configs/ctrl_digits_compress.yaml (LoRA rank 4 above
timestep 200, lr_embedding 0.03, lr_adapter 0.003), gamma = kl_weight = 1 as the value runs,
the demo's base, batch 32, 20 steps, 60 updates (the value runs' budget), checkpoints every 20,
one process. Updates chosen on VALIDATION evaluation seed 10000 (the most macro-F1 within 1.5x
the optimum's KL, else the least KL), reported on TEST seed 30000, 95% t-intervals over seeds.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rule_choice.py --choices
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rule_choice.py [--labels slant] [--seeds 0]

Needs `benchmarks/new_labels.py` to have run (rewards, optimum, value rows). Writes
benchmarks/results/rule_choice.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, publish  # noqa: E402
from new_labels import (  # noqa: E402
    BASE,
    CTRL_SETTINGS,
    JUDGE,
    LABELS,
    OUT,
    choose_iteration,
    cli,
    evaluation,
    optimum,
)
from text2image_control import TEST_SEED, interval  # noqa: E402

from ctrl_ray import tracking  # noqa: E402
from ctrl_ray.config import load_raw  # noqa: E402
from ctrl_ray.models.judge import DigitJudge  # noqa: E402
from ctrl_ray.rule_choice import (  # noqa: E402
    MIN_MASS_ESS_PER_SAMPLE,
    decide,
    measure,
    value_config,
)

DEMO_BASE = "outputs/base-digits16-demo"
# Each task as a user would write it with no `mode:` (the rule-specific keys left as they are:
# the measurement reads only the objective's gamma / kl_weight and the optimum's settings).
TASKS = {
    "ink": ("configs/ctrl_digits_ink.yaml", []),
    "compressibility, gamma/alpha 10": ("configs/ctrl_digits_compress.yaml", []),
    "compress x ink, gamma/alpha 1": (
        "configs/ctrl_digits_ink.yaml",
        ["rewards=[{path: outputs/reward-compress}, {path: outputs/reward-ink}]"]),
    "centre_x": (str(OUT / "ctrl_centre_x.yaml"), []),
    "slant": (str(OUT / "ctrl_slant.yaml"), []),
}


def choices() -> dict:
    """What the product measures and picks on every task, as `ctrl-ray finetune` does."""
    rows = {}
    for task, (path, extra) in TASKS.items():
        raw = load_raw(path, [f"base_model={DEMO_BASE}", *extra])
        raw.pop("mode", None)
        measured = measure(value_config(raw))
        choice = decide(measured["mass_ess_per_sample"], measured["gamma_over_alpha"],
                        exact=not measured["rollouts"])
        rows[task] = {**choice, "rollouts": measured["rollouts"], "groups": measured["groups"]}
        print(task, rows[task]["reason"], flush=True)
    return rows

ADJOINT_SETTINGS = {
    **{k: v for k, v in CTRL_SETTINGS.items() if k not in ("adapter", "objective")},
    "base_model": BASE,
    "mode": "adjoint",
    "adapter": {"kind": "lora", "rank": 4, "min_timestep": 200},
    "objective": {"gamma": 1.0, "kl_weight": 1.0, "kl_reduction": "sum", "batch_size": 32,
                  "num_inference_steps": 20, "eta": 1.0, "lr_embedding": 0.03,
                  "lr_adapter": 0.003, "max_grad_norm": 1.0},
}


def adjoint_config(label: str) -> Path:
    path = OUT / f"ctrl_adjoint_{label}.yaml"
    settings = {**ADJOINT_SETTINGS, "rewards": [{"path": str(OUT / f"reward-{label}")}],
                "output_dir": str(OUT / f"adjoint-{label}")}
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


def train(label: str, seed: int) -> Path:
    out = OUT / f"adjoint-{label}-seed{seed}"
    if not (out / "policy").is_dir():
        cli("finetune", "--config", str(adjoint_config(label)), "--set", f"seed={seed}",
            "--set", f"output_dir={out}", "--set", "evaluate=false",
            "--set", "optimum_samples_per_context=0", "--resume-if-present")
    return out / "checkpoints"


def run_label(label: str, seeds: list[int], judge) -> dict:
    runs = {seed: train(label, seed) for seed in seeds}
    opt = optimum(label, judge)
    level = next(lv for lv in opt["levels"] if math.isclose(lv["gamma_over_alpha"], opt["tilt"]))
    chosen, validation = choose_iteration(runs, judge, level["kl"])
    reports = [evaluation(runs[seed] / f"{chosen:06d}", TEST_SEED, judge) for seed in seeds]
    scores, kls = [r["macro_f1"] for r in reports], [r["mean_kl"] for r in reports]
    return {"chosen_iteration": chosen, "validation": {str(k): v for k, v in validation.items()},
            "adjoint": {"score": interval(scores), "kl": interval(kls),
                        "per_seed": [{"seed": s, "score": f, "kl": k}
                                     for s, f, k in zip(seeds, scores, kls, strict=True)]},
            "base": opt["base"]["macro_f1"],
            "optimum": {"score": level["macro_f1"], "kl": level["kl"],
                        "ess_min": level["ess_min"]}}


def value_row(label: str, results: str = "new_labels") -> dict:
    """The value rule's numbers on `label` as `benchmarks/new_labels.py` last wrote them to
    `results` (.json): its saved policies (final fit, step scale by J) where the runs have them,
    with the optimum and base of that run (its base model may be a newer build than the adjoint
    runs')."""
    value = json.loads((Path(__file__).with_name("results") / f"{results}.json").read_text())
    value = value["labels"][label]
    return {"score": value.get("saved_policy", value)["score"],
            "kl": value.get("saved_policy", value)["kl"],
            "per_seed": value.get("saved_policy", value)["per_seed"],
            "saved_policy": "saved_policy" in value, "base": value["base"]["score"],
            "optimum": {key: value["optimum"][key] for key in ("score", "kl", "ess_min")}}


def markdown(data: dict, command: str) -> list[str]:
    lines = ["# Which rule a label needs", "", f"On {data['machine']['date']}.", ""]
    if data.get("choices"):
        lines += ["## What the product measures before training, and picks", "",
                  f"`{data.get('choices_command', command)}`: each task's config with no "
                  "`mode:` on the demo's base, measured as `ctrl-ray finetune` does "
                  "(`ctrl_ray.rule_choice`: the value rule's targets lambda log p(y | x0, c) on "
                  "base rollouts of the training distribution, 300 per context; the smallest "
                  "ESS per rollout of their mass sum_y p(y | x0, c)^lambda over the contexts; "
                  f"the value rule at {MIN_MASS_ESS_PER_SAMPLE:g} or more).", "",
                  "| task | gamma/alpha | base rollouts (contexts) | the mass's ESS per "
                  "rollout, min | rule picked |", "|---|---|---|---|---|"]
        for task, row in data["choices"].items():
            lines.append(f"| {task} | {row['gamma_over_alpha']:g} | {row['rollouts']} "
                         f"({row['groups']}) | {row['mass_ess_per_sample']:.3f} | "
                         f"{row['mode']} |")
        lines.append("")
    commands = sorted({r.get("command", command) for r in data["labels"].values()})
    lines += ["## Adjoint against the default (value) rule", "",
              ", ".join(f"`{c}`" for c in commands) + ". " +
              __doc__.split("\n\n")[2].replace("\n", " "), "",
             "| label | optimum F1 @ KL (ESS min) | base | rule | seeds | "
             "macro-F1 | KL | score ratio | KL ratio | per nat |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, result in data["labels"].items():
        rows = {"value": value_row(label),
                "adjoint": {**result["adjoint"], "base": result["base"],
                            "optimum": result["optimum"]}}
        for rule in ("value", "adjoint"):
            opt, base = rows[rule]["optimum"], rows[rule]["base"]
            cell = f"{opt['score']:.3f} @ {opt['kl']:.2f} ({opt['ess_min']:.0f})"
            score, kl = rows[rule]["score"], rows[rule]["kl"]
            seeds = len(rows[rule].get("per_seed", [])) or 3
            name = "value (saved policy)" if rows[rule].get("saved_policy") else rule
            lines.append(
                f"| {label} | {cell} | {base:.3f} | {name} | {seeds} | "
                f"{score[0]:.3f} +- {score[1]:.3f} | {kl[0]:.2f} +- {kl[1]:.2f} | "
                f"{score[0] / opt['score']:.2f}x | {kl[0] / opt['kl']:.2f}x | "
                f"{(score[0] - base) / kl[0]:.3f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", nargs="+", default=list(LABELS), choices=list(LABELS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--choices", action="store_true",
                        help="measure what the product picks on every task (no training)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tracking.configure()
    results = Path(__file__).with_name("results") / "rule_choice.json"
    data = {"machine": machine(), "seeds": args.seeds, "labels": {}, "choices": {}}
    if results.is_file():   # keep what other invocations wrote (they may run in parallel)
        data.update({k: v for k, v in json.loads(results.read_text()).items()
                     if k in ("labels", "choices", "choices_command")})
    command = " ".join(["python", *sys.argv])
    if args.choices:
        measured = choices()
        if results.is_file():
            data.update({k: v for k, v in json.loads(results.read_text()).items()
                         if k in ("labels", "choices", "choices_command")})
        data["choices"], data["choices_command"] = measured, command
        publish("rule_choice", data, markdown(data, command))
        return
    judge = DigitJudge.load(JUDGE)
    for label in args.labels:
        result = run_label(label, args.seeds, judge)
        if results.is_file():
            data.update({k: v for k, v in json.loads(results.read_text()).items()
                         if k in ("labels", "choices", "choices_command")})
        data["labels"][label] = {**result, "command": command}
        publish("rule_choice", data, markdown(data, command))
    print(np.round([r["adjoint"]["score"][0] for r in data["labels"].values()], 3))


if __name__ == "__main__":
    main()
