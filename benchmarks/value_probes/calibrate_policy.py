"""Probe: calibrate a saved value policy's step scale as a run's last stage does it
(`ctrl_ray.objectives.step_scale`) and print J per scale, e.g. the text testbed's batch-128
ink head (docs/update_rules.md, section 10: x 1.35, J -2.270).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/value_probes/calibrate_policy.py \
        configs/ctrl_text2image_ink.yaml outputs/probe-head/batch128/policy 0
"""

import sys
import time

import torch

from ctrl_ray.config import load_config
from ctrl_ray.finetune import FinetuneConfig, build_setup
from ctrl_ray.objectives.step_scale import calibrate_step_scale, describe
from ctrl_ray.policy import load_any

torch.set_num_threads(1)
config_path, policy_dir, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
config = load_config(FinetuneConfig, config_path, [])
setup = build_setup(config)
model = load_any(policy_dir).model.eval()
start = time.perf_counter()
calibration = calibrate_step_scale(model, setup.reward_fn, config.objective, seed)
print(describe(calibration))
print(f"{time.perf_counter() - start:.0f} s")
