"""Probe: a value policy with and without its tilt of x_T (`adapter.value_head.
initial_candidates`), at the policy's own step scale: CTRL's objective J on 128 calibration
rollouts, validation macro-F1 and KL, and the KL of step 1 (the tilt's included).
docs/update_rules.md, section 13.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/value_probes/initial_tilt.py CONFIG POLICY_DIR \
        [CANDIDATES ...] [--set key=value ...]
"""

import argparse
import dataclasses

import torch

from ctrl_ray.config import load_config
from ctrl_ray.evaluation import EvaluationConfig, evaluate
from ctrl_ray.finetune import FinetuneConfig, build_setup
from ctrl_ray.models.judge import DigitJudge
from ctrl_ray.objectives.step_scale import calibrate_step_scale
from ctrl_ray.policy import load_any
from ctrl_ray.sampling import RolloutInputs, sample

parser = argparse.ArgumentParser()
parser.add_argument("config")
parser.add_argument("policy")
parser.add_argument("candidates", nargs="*", type=int, default=[0, 8, 32, 128])
parser.add_argument("--set", action="append", default=[])
parser.add_argument("--initial-scales", nargs="+", type=float, default=[1.0],
                    help="multiples of the tilt of x_T alone")
args = parser.parse_args()
torch.set_num_threads(1)
config = load_config(FinetuneConfig, args.config, args.set)
setup = build_setup(config)
judge = DigitJudge.load(config.judge)
loaded = load_any(args.policy)
model = loaded.model.eval()
scale = model.value_head.spec.step_scale
objective = dataclasses.replace(config.objective, step_scales=[scale], calibration_rollouts=128)
validation = EvaluationConfig(samples_per_target=8, num_inference_steps=20, seed=10000)
inputs = RolloutInputs.draw(5, 256, 20, model.sample_shape, model.label_classes,
                            num_contexts=model.num_contexts)
unscaled = model.initial_shift
initial_scale = {"value": 1.0}


def scaled_initial_shift(*args, **kwargs):
    shift = unscaled(*args, **kwargs)
    return None if shift is None else shift * initial_scale["value"]


model.initial_shift = scaled_initial_shift
for candidates, multiple in [(c, m) for c in args.candidates
                             for m in (args.initial_scales if c else [1.0])]:
    model.value_head.spec.initial_candidates = candidates
    initial_scale["value"] = multiple
    row = calibrate_step_scale(model, setup.reward_fn, objective, 0)["table"][0]
    report = evaluate(model, loaded.label_info, judge, validation)
    with torch.no_grad():
        kl = sample(model, inputs).kl.mean(1)
    print(f"x{scale} initial_candidates {candidates} x{multiple}: J {row['objective']:.3f} log p "
          f"{row['log_likelihood']:.3f} KL {row['kl']:.2f} | validation macro-F1 "
          f"{report['macro_f1']:.3f} KL {report['mean_kl']:.2f} | KL of steps 1, 2, 3, rest "
          f"{kl[0]:.3f} {kl[1]:.3f} {kl[2]:.3f} {kl[3:].sum():.3f}", flush=True)
