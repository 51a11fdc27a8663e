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
config = load_config(FinetuneConfig, "configs/ctrl_digits_ink.yaml", ["base_model=outputs/base-digits16-demo"])
setup = build_setup(config); judge = DigitJudge.load("outputs/judge-digits16")
loaded = load_any(sys.argv[1]); model = loaded.model.eval()
orig = model.mean_shift
state = {"mult": 1.0, "upto": 951}
def shifted(mean, sigma, t, next_t, context, labels, offsets=None):
    out = orig(mean, sigma, t, next_t, context, labels, offsets)
    if out is not None and int(t) >= state["upto"]:
        out = out * state["mult"]
    return out
model.mean_shift = shifted
for upto in (951, 901):
  for mult in (1.0, 2.0, 3.0, 5.0):
    state.update(mult=mult, upto=upto)
    c = dataclasses.replace(config.objective, step_scales=[1.2], calibration_rollouts=128)
    r = calibrate_step_scale(model, setup.reward_fn, c, 0)["table"][0]
    rep = evaluate(model, loaded.label_info, judge, EvaluationConfig(samples_per_target=4, num_inference_steps=20, seed=10000))
    print(f"t>={upto} x{mult}: J {r['objective']:.3f} logp {r['log_likelihood']:.3f} KL {r['kl']:.2f} | val F1 {rep['macro_f1']:.3f} KL {rep['mean_kl']:.2f}", flush=True)
