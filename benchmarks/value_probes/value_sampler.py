"""Which Gaussian step: sample ink with the base plus a mean shift from the value net of
value_proto.py, for variants kind:scale:iterations:gate (kind next = sigma_k^2 grad log
h_{k+1}(mu_pre), cur = sigma_k^2 grad log h_k(x_k)); prints oracle macro-F1 and mean path KL.

    .venv/bin/python benchmarks/value_probes/value_sampler.py outputs/probe/value_net \
        next:1:1:0,next:1:1:200,cur:1:1:0
"""

import sys

import numpy as np
import torch
from sklearn.metrics import f1_score

from ctrl_ray.baselines.classifier_guidance import NoisyClassifier
from ctrl_ray.config import load_config
from ctrl_ray.finetune_setup import FinetuneConfig, build_setup
from ctrl_ray.sampling.sampler import DenoisingSchedule, step_mean
from ctrl_ray.scoring import get_scorer

cfg = load_config(FinetuneConfig, "configs/ctrl_digits_ink.yaml", [])
setup = build_setup(cfg)
model = setup.model.eval()
net = NoisyClassifier.load(sys.argv[1] if len(sys.argv) > 1 else "outputs/probe/value_net")
S = 20
sched = DenoisingSchedule.create(model.alphas_cumprod, S, 1.0)
next_t = torch.cat([sched.timesteps[1:], torch.zeros(1, dtype=sched.timesteps.dtype)])
name = "ink_class"
K = 4
labels = torch.arange(K).repeat_interleave(80)
ctx = torch.arange(10).repeat(32)
B = len(labels)
scorer = get_scorer(name, setup.label_info[name])


def grad_log_h(x, t, y):
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        lp = net.log_probs(x, t.expand(len(x))).gather(1, y[:, None]).sum()
        return torch.autograd.grad(lp, x)[0]


for variant in sys.argv[2].split(","):
    kind, scale, iters, gate = variant.split(":")
    scale = float(scale)
    iters = int(iters)
    gate = int(gate)
    g = torch.Generator().manual_seed(123)
    x = torch.randn((B, *model.sample_shape), generator=g)
    kl = torch.zeros(B)
    with torch.no_grad():
        for k in range(S):
            sig = sched.sigmas[k]
            mu = step_mean(sched, k, model.reference_noise, x, ctx, model.clip_sample)
            delta = torch.zeros_like(mu)
            if sched.timesteps[k] >= gate:
                if kind == "next":
                    for _ in range(iters):
                        delta = scale * sig**2 * grad_log_h(mu + delta, next_t[k], labels)
                else:  # cg-style at current state, current t, scaled by sigma^2
                    delta = scale * sig**2 * grad_log_h(x, sched.timesteps[k], labels)
            kl += (delta**2).flatten(1).sum(1) / (2 * sig**2)
            x = mu + delta + sig * torch.randn(x.shape, generator=g)
    pred = np.asarray(scorer.label(x))
    print(
        variant,
        "F1 {:.3f}  KL {:.2f}".format(f1_score(labels.numpy(), pred, average="macro"), kl.mean()),
        flush=True,
    )
