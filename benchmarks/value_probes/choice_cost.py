"""Probe: what the rule choice costs and picks on the demo's CTRL config, as `ctrl-ray finetune`
runs it for a config with no `mode:` (docs/update_rules.md, section 15).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/value_probes/choice_cost.py
"""

import time

import torch

from ctrl_ray.config import load_raw
from ctrl_ray.rule_choice import choose_rule

torch.set_num_threads(1)
raw = {**load_raw("configs/demo.yaml")["finetune"], "base_model": "outputs/base-digits16-demo",
       "mode": "auto"}
start = time.perf_counter()
config, choice = choose_rule(raw)
print(f"demo's finetune section, mode auto: {choice['mode']}, mass ESS per rollout "
      f"{choice['mass_ess_per_sample']:.3f}, {time.perf_counter() - start:.0f} s on "
      f"{choice['rollouts']} base rollouts")
