"""Share of the value target's energy on pixels whose x0_hat is clamped (clip_sample), per step
of a base-like rollout (needs outputs/probe/value_net from value_proto.py)."""

import torch

from ctrl_ray.baselines.classifier_guidance import NoisyClassifier
from ctrl_ray.config import load_config
from ctrl_ray.finetune_setup import FinetuneConfig, build_setup
from ctrl_ray.objectives.base import draw_inputs
from ctrl_ray.sampling.sampler import DenoisingSchedule, sample

cfg = load_config(FinetuneConfig, "configs/ctrl_digits_ink.yaml", ["objective.batch_size=64"])
setup = build_setup(cfg)
model = setup.model.eval()
conf = setup.objective
net = NoisyClassifier.load("outputs/probe/value_net")
S = 20
sched = DenoisingSchedule.create(model.alphas_cumprod, S, 1.0)
next_t = torch.cat([sched.timesteps[1:], torch.zeros(1, dtype=sched.timesteps.dtype)])
inputs = draw_inputs(model, conf, torch.Generator().manual_seed(0))
y = inputs.labels["ink_class"]
tr = sample(model, inputs, eta=1.0, compute_kl=False)
for k in range(S):
    x = tr.states[k]
    t = sched.timesteps[k].expand(len(x))
    with torch.no_grad():
        eps = model.reference_noise(x, t, inputs.contexts)
        a = sched.alphas[k]
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        mu = sched.mean(k, x, eps, True)
    clamped = x0.abs() > 1
    with torch.enable_grad():
        xx = mu.detach().requires_grad_(True)
        g = torch.autograd.grad(
            net.log_probs(xx, next_t[k].expand(len(xx))).gather(1, y[:, None]).sum(), xx
        )[0]
    frac = ((g**2) * clamped).sum() / (g**2).sum()
    print(
        k,
        int(sched.timesteps[k]),
        f"clamped pixels {clamped.float().mean():.2f}  target energy on clamped {frac:.2f}",
    )
