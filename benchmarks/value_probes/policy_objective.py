"""Probe: CTRL's objective J = gamma E[log p(y | x0, c)] - kl_weight KL of saved policies of any
rule, on the same rollouts of a config's training distribution (the step-scale calibration's
inputs and seed), so rules can be ranked by how close they come to the exact optimum
(J(pi*) - J(pi) = kl_weight KL(pi || pi*)).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/value_probes/policy_objective.py \
        outputs/new-labels/ctrl_centre_x.yaml 0 \
        outputs/new-labels/{ctrl,adjoint}-centre_x-seed0/checkpoints/0000{2,6}0
"""

import math
import sys
import time

import torch

from ctrl_ray.config import load_config
from ctrl_ray.finetune import FinetuneConfig, build_setup
from ctrl_ray.objectives.base import draw_inputs
from ctrl_ray.objectives.step_scale import CALIBRATION_SEED
from ctrl_ray.policy import load_any
from ctrl_ray.sampling.sampler import sample

ROLLOUTS, BATCH = 128, 32

torch.set_num_threads(1)
config_path, seed, policies = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
config = load_config(FinetuneConfig, config_path, ["mode=value"])
setup = build_setup(config)
objective = config.objective
for policy_dir in policies:
    start = time.perf_counter()
    model = load_any(policy_dir).model.eval()
    inputs = draw_inputs(model, type(objective)(**{**objective.__dict__,
                                                   "batch_size": ROLLOUTS}),
                         seed + CALIBRATION_SEED)
    log_likelihood, kl = [], []
    for first in range(0, ROLLOUTS, BATCH):
        with torch.no_grad():
            rollout = sample(model, inputs.slice(first, first + BATCH), eta=objective.eta,
                             kl_reduction=objective.kl_reduction)
            log_likelihood.append(setup.reward_fn(rollout.x0, rollout.labels,
                                                  rollout.contexts).float())
        kl.append(rollout.path_kl.float())
    log_likelihood, kl = torch.cat(log_likelihood), torch.cat(kl)
    j = objective.gamma * log_likelihood - objective.kl_weight * kl
    print(f"{policy_dir}: J {j.mean():.3f} +- {j.std() / math.sqrt(len(j)):.3f}, "
          f"E[log p] {log_likelihood.mean():.3f}, KL {kl.mean():.3f} "
          f"({time.perf_counter() - start:.0f} s)", flush=True)
