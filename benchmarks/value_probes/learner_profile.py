"""Probe: the value learner on the demo's run, in one process. Prints, over 60 learner steps
on fresh base rollouts of 32, after how many head steps each update kept its weights
(`kept_steps`; 0 = the weights it came in with), then one learner step's profile by torch op
and 30 head steps with the default and the channels_last memory layout.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/value_probes/learner_profile.py [THREADS]
"""

import collections
import copy
import sys
import time

import torch
from check_bf16 import payload
from torch.profiler import profile

from ctrl_ray.config import from_dict, read_yaml
from ctrl_ray.finetune import FinetuneConfig, build_setup
from ctrl_ray.models.soft_value import value_loss
from ctrl_ray.objectives import value as value_rule

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
raw = copy.deepcopy(read_yaml("configs/demo.yaml")["finetune"])
raw.update(base_model="outputs/base-digits16-demo", output_dir="outputs/probe-learner",
           evaluate=False)
config = from_dict(FinetuneConfig, raw)
setup, objective = build_setup(config), config.objective
generator, kept = torch.Generator().manual_seed(0), []
for version in range(60):
    metrics = value_rule.learner_step(setup.model, setup.optimizer,
                                      [payload(setup, objective, version, 32)], objective,
                                      generator, version)
    kept.append(int(metrics["kept_steps"]))
print("kept_steps per update:", kept)
print("updates by kept_steps:", dict(collections.Counter(kept)))

shard = payload(setup, objective, 60, 32)
with profile() as profiled:
    value_rule.learner_step(setup.model, setup.optimizer, [shard], objective, generator, 60)
print(profiled.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))

head, states = setup.model.value_head, shard["states"]
x, t = states[5][:32].repeat(4, 1, 1, 1), torch.full((128,), 500)
contexts = setup.model.head_context(shard["contexts"][:32].repeat(4))
targets = shard["log_targets"][:32].repeat(4, 1)
for layout in (torch.contiguous_format, torch.channels_last):
    head.to(memory_format=layout)
    inputs = x.contiguous(memory_format=layout)
    start = time.perf_counter()
    for _ in range(30):
        setup.optimizer.zero_grad()
        value_loss(head, inputs, t, contexts, targets).backward()
        setup.optimizer.step()
    print(f"30 head steps, {layout}: {time.perf_counter() - start:.3f} s")
