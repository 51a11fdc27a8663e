"""Does the value head need to see where a pixel is? Fit `SoftValueNet` offline on the same
base rollouts with and without coordinate channels (`adapter.value_head.coordinates`), keep
each fit's best weights on held-out rollouts, and print the held-out value loss by band of
timesteps, then macro-F1 and KL of sampling with each head (the default tilted step).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/value_probes/head_inputs.py \
        outputs/new-labels/ctrl_centre_x.yaml 2048 3000 [key=value config overrides ...]

A conv stack with a global average pool sees position only through its zero padding; a label
of where the ink sits (centre_x) needs it, and the optimum's first step tilts x_T's low
frequencies, which is position too (docs/update_rules.md, section 10).
"""

import copy
import math
import sys
import time

import torch

from ctrl_ray.config import load_config
from ctrl_ray.evaluation import evaluate
from ctrl_ray.finetune_setup import FinetuneConfig, build_setup
from ctrl_ray.models.judge import DigitJudge
from ctrl_ray.models.soft_value import value_loss
from ctrl_ray.objectives.value import worker_step
from ctrl_ray.sampling.sampler import DenoisingSchedule, RolloutInputs

config_path, rollouts, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
overrides = ["mode=value", "adapter.kind=value", "evaluation.seed=10000",
             "evaluation.samples_per_target=8", *sys.argv[4:]]
BANDS = {"steps 1-3 (t >= 851)": (0, 3), "steps 4-10": (3, 10), "steps 11-20 and x0": (10, 21)}


def setup_for(coordinates: bool):
    cfg = load_config(FinetuneConfig, config_path,
                      [*overrides, f"adapter.value_head.coordinates={str(coordinates).lower()}"])
    return cfg, build_setup(cfg)


cfg, setup = setup_for(False)
model = setup.model.eval()
S = cfg.objective.num_inference_steps
start = time.time()
payloads = [worker_step(model, setup.reward_fn,
                        RolloutInputs.draw(i + 1, 256, S, model.sample_shape, model.label_classes,
                                           num_contexts=model.num_contexts),
                        cfg.objective, 256, 0, report=False)[0]
            for i in range(0, rollouts, 256)]
states, log_targets = (torch.cat([p[key] for p in payloads], dim) for key, dim in
                       (("states", 1), ("log_targets", 0)))
contexts = None if payloads[0]["contexts"] is None else torch.cat([p["contexts"]
                                                                   for p in payloads])
schedule = DenoisingSchedule.create(model.alphas_cumprod, S, cfg.objective.eta)
timesteps = torch.cat([schedule.timesteps, schedule.timesteps.new_zeros(1)]).long()
train = int(0.9 * states.shape[1])
held_out = torch.arange(train, states.shape[1])
print(f"{rollouts} base rollouts in {time.time() - start:.0f} s", flush=True)


def losses(head) -> torch.Tensor:
    """Held-out value loss at each of the S + 1 states (x_T first)."""
    with torch.no_grad():
        return torch.tensor([value_loss(head, states[j, held_out],
                                        timesteps[j].expand(len(held_out)),
                                        contexts[held_out], log_targets[held_out]).item()
                             for j in range(S + 1)])


judge = DigitJudge.load(cfg.judge)
for coordinates in (False, True):
    cfg, setup = setup_for(coordinates)
    model = setup.model.eval()
    head = model.value_head
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.objective.lr_adapter,
                                  weight_decay=1e-4)
    schedule_lr = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    generator = torch.Generator().manual_seed(0)
    best, best_state = losses(head).mean().item(), copy.deepcopy(head.state_dict())
    start = time.time()
    for step in range(steps):
        rows = torch.randint(0, train, (128,), generator=generator)
        which = torch.randint(0, S + 1, (128,), generator=generator)
        loss = value_loss(head, states[which, rows], timesteps[which], contexts[rows],
                          log_targets[rows])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        optimizer.step()
        schedule_lr.step()
        if (step + 1) % 100 == 0:
            current = losses(head).mean().item()
            if current < best:
                best, best_state = current, copy.deepcopy(head.state_dict())
    head.load_state_dict(best_state)
    per_state = losses(head)
    bands = ", ".join(f"{name} {per_state[a:b].mean():.4f}" for name, (a, b) in BANDS.items())
    print(f"coordinates={coordinates}: held-out loss {per_state.mean():.4f} ({bands}); "
          f"fit {time.time() - start:.0f} s", flush=True)
    start = time.time()
    report = evaluate(model, setup.label_info, judge, cfg.evaluation)
    scores = {name: round(report["labels"][name]["macro_f1"], 3) for name in model.label_classes}
    print(f"coordinates={coordinates}: macro-F1 {scores} joint {report['joint_accuracy']:.3f} "
          f"KL {report['mean_kl']:.2f} ({time.time() - start:.0f} s)", flush=True)
