"""Prototype: the soft value h(y | x_k, t) = E_pre[p(y | x0) | x_k] fit offline on base rollouts
(a NoisyClassifier, soft cross-entropy), saved to outputs/probe/value_net, then scored as
classifier guidance through the noise prediction at the given scales.

    .venv/bin/python benchmarks/value_probes/value_proto.py 3000 3000 1,2
"""

import math
import sys
import time

import torch

from ctrl_ray.baselines.classifier_guidance import (
    ClassifierGuidedModel,
    NoisyClassifier,
    NoisyClassifierSpec,
)
from ctrl_ray.config import load_config
from ctrl_ray.evaluation import evaluate, format_report
from ctrl_ray.finetune_setup import FinetuneConfig, build_setup
from ctrl_ray.models.judge import DigitJudge
from ctrl_ray.sampling.sampler import DenoisingSchedule, RolloutInputs, sample

torch.manual_seed(0)
cfg = load_config(
    FinetuneConfig,
    "configs/ctrl_digits_ink.yaml",
    ["mode=adjoint", "adapter.kind=lora", "evaluation.samples_per_target=8"],
)
setup = build_setup(cfg)
model = setup.model.eval()
N = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
steps_train = int(sys.argv[2]) if len(sys.argv) > 2 else 3000
S = 20
t0 = time.time()
states, x0s, ctxs = [], [], []
for i in range(0, N, 500):
    inp = RolloutInputs.draw(
        i + 1, 500, S, model.sample_shape, model.label_classes, num_contexts=model.num_contexts
    )
    tr = sample(model, inp, eta=1.0, compute_kl=False, from_reference=True)
    states.append(tr.states)
    x0s.append(tr.x0)
    ctxs.append(tr.contexts)
states = torch.cat(states, 1)
x0 = torch.cat(x0s)
ctx = torch.cat(ctxs)
sched = DenoisingSchedule.create(model.alphas_cumprod, S, 1.0)
print("rollouts", time.time() - t0, states.shape, sched.timesteps.tolist())
name = "ink_class"
K = model.label_classes[name]
with torch.no_grad():
    logp = torch.stack(
        [setup.image_log_likelihood(x0, {name: torch.full((len(x0),), k)}, ctx) for k in range(K)],
        1,
    )
target = logp.softmax(1)  # lambda = 1
print("reward entropy", -(target * logp).sum(1).mean().item())
# state timesteps: states[j] is x at timesteps[j] for j<S, states[S] is x0 (t=0)
state_t = torch.cat([sched.timesteps, torch.zeros(1, dtype=sched.timesteps.dtype)]).long()
spec = NoisyClassifierSpec(
    label_name=name, num_classes=K, image_size=16, num_train_timesteps=len(model.alphas_cumprod)
)
net = NoisyClassifier(spec)
opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
lr = torch.optim.lr_scheduler.LambdaLR(
    opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps_train))
)
g = torch.Generator().manual_seed(0)
ntr = int(0.9 * N)
t0 = time.time()
run = 0
for s in range(steps_train):
    rows = torch.randint(0, ntr, (128,), generator=g)
    j = torch.randint(0, S + 1, (128,), generator=g)
    x = states[j, rows]
    t = state_t[j]
    loss = -(target[rows] * net.log_probs(x, t)).sum(1).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    lr.step()
    run += loss.item()
    if (s + 1) % 500 == 0:
        print(s + 1, run / 500, time.time() - t0)
        run = 0
net.eval().requires_grad_(False)
with torch.no_grad():
    for j in [0, 5, 10, 15, 18, 20]:
        rows = torch.arange(ntr, N)
        lp = net.log_probs(states[j, rows], state_t[j].expand(len(rows)))
        print(
            "val step",
            j,
            "t",
            int(state_t[j]),
            "CE",
            -(target[rows] * lp).sum(1).mean().item(),
            "entropy-floor",
            -(target[rows] * logp[rows]).sum(1).mean().item(),
        )
net.save("outputs/probe/value_net")
judge = DigitJudge.load(cfg.judge)
for scale in [float(a) for a in (sys.argv[3].split(",") if len(sys.argv) > 3 else ["1"])]:
    guided = ClassifierGuidedModel(model, [net], scale)
    rep = evaluate(guided, setup.label_info, judge, cfg.evaluation)
    print("SCALE", scale, format_report(rep, f"value guidance {scale}"))
