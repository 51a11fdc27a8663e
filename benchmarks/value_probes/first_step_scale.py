"""Probe: scale only the first reverse step(s) of a digits ink value policy (on top of x 1.2)
and print CTRL's objective J on 128 calibration rollouts and validation macro-F1 and KL
(docs/update_rules.md, section 10: larger first steps lower J).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/value_probes/first_step_scale.py POLICY_DIR
"""

import dataclasses
import sys

import torch

from ctrl_ray.config import load_config
from ctrl_ray.evaluation import EvaluationConfig, evaluate
from ctrl_ray.finetune import FinetuneConfig, build_setup
from ctrl_ray.models.judge import DigitJudge
from ctrl_ray.objectives.step_scale import calibrate_step_scale
from ctrl_ray.policy import load_any

torch.set_num_threads(1)
config = load_config(FinetuneConfig, "configs/ctrl_digits_ink.yaml",
                     ["base_model=outputs/base-digits16-demo"])
setup = build_setup(config)
judge = DigitJudge.load("outputs/judge-digits16")
loaded = load_any(sys.argv[1])
model = loaded.model.eval()
unscaled = model.mean_shift
first = {"multiple": 1.0, "from_t": 951}   # steps whose t >= from_t are multiplied


def scaled_first_steps(mean, sigma, t, next_t, context, labels, offsets=None):
    shift = unscaled(mean, sigma, t, next_t, context, labels, offsets)
    if shift is not None and int(t) >= first["from_t"]:
        shift = shift * first["multiple"]
    return shift


model.mean_shift = scaled_first_steps
objective = dataclasses.replace(config.objective, step_scales=[1.2], calibration_rollouts=128)
validation = EvaluationConfig(samples_per_target=4, num_inference_steps=20, seed=10000)
for from_t in (951, 901):
    for multiple in (1.0, 2.0, 3.0, 5.0):
        first.update(multiple=multiple, from_t=from_t)
        row = calibrate_step_scale(model, setup.reward_fn, objective, 0)["table"][0]
        report = evaluate(model, loaded.label_info, judge, validation)
        print(f"t >= {from_t} x{multiple}: J {row['objective']:.3f} log p "
              f"{row['log_likelihood']:.3f} KL {row['kl']:.2f} | validation macro-F1 "
              f"{report['macro_f1']:.3f} KL {report['mean_kl']:.2f}", flush=True)
