"""Probe: is the online head under-fit? Take a value run's last checkpoint and its replay, fit
the head further on the whole replay (the rule's loss, best held-out weights kept), calibrate
the step scale by J as the run does, and print validation macro-F1 and KL before and after.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/value_probes/final_fit.py CONFIG CHECKPOINT \
        [--steps 1000 3000] [--lr 1e-3] [--set key=value ...]
"""

import argparse
import copy
import dataclasses
from pathlib import Path

import torch

from ctrl_ray.checkpoint import load_policy, read_tensors
from ctrl_ray.config import load_config
from ctrl_ray.evaluation import EvaluationConfig, evaluate
from ctrl_ray.finetune import FinetuneConfig, build_setup
from ctrl_ray.models.judge import DigitJudge
from ctrl_ray.models.loading import load_base_model_dir
from ctrl_ray.objectives.step_scale import calibrate_step_scale
from ctrl_ray.objectives.value import learner_step, restore_learner_state

parser = argparse.ArgumentParser()
parser.add_argument("config")
parser.add_argument("checkpoint")
parser.add_argument("--steps", nargs="+", type=int, default=[1000, 3000])
parser.add_argument("--lr", type=float, default=1e-3)
parser.add_argument("--set", action="append", default=[])
args = parser.parse_args()
torch.set_num_threads(1)
config = load_config(FinetuneConfig, args.config, args.set)
setup = build_setup(config)
judge = DigitJudge.load(config.judge)
model, _ = load_policy(load_base_model_dir(Path(config.base_model)), args.checkpoint)
label_info = setup.label_info
restore_learner_state(model, config.objective, read_tensors(
    Path(args.checkpoint) / "learner_state.safetensors", "learner state"))
print(f"replay: {model.value_head.replay.count} rollouts", flush=True)
validation = EvaluationConfig(samples_per_target=8, num_inference_steps=20, seed=10000)
trained = copy.deepcopy(model.value_head.state_dict())


def report(name: str) -> None:
    choice = calibrate_step_scale(model, setup.reward_fn, config.objective, config.seed)
    best = next(r for r in choice["table"] if r["step_scale"] == choice["step_scale"])
    result = evaluate(model, label_info, judge, validation)
    print(f"{name}: x{choice['step_scale']} J {best['objective']:.3f} | validation macro-F1 "
          f"{result['macro_f1']:.3f} KL {result['mean_kl']:.2f}", flush=True)


report("as trained")
for steps in args.steps:
    model.value_head.load_state_dict(trained)
    model.value_head.spec.step_scale = 1.0
    optimizer = torch.optim.AdamW(model.value_head.parameters(), lr=args.lr, weight_decay=1e-4)
    fit = dataclasses.replace(config.objective, regression_steps=steps, check_every=50)
    metrics = learner_step(model, optimizer, [], fit, torch.Generator().manual_seed(1), 0)
    print(f"final fit {steps} steps at lr {args.lr}: kept {metrics.get('kept_steps')} "
          f"held-out loss {metrics.get('heldout_loss'):.4f}", flush=True)
    report(f"final fit {steps}")
