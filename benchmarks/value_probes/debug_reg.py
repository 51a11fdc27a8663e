"""Can an adapter fit the value targets? 30 AdamW steps on one fixed batch of 64 ink rollouts
regressing the mean shift onto sigma_k^2 grad log h_{k+1}(mu_pre) (the value net of
value_proto.py); prints the cosine and norms of fitted shift vs target per step, and the reward
before/after. Adapter settings come from the command line, e.g.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/value_probes/debug_reg.py adapter.kind=full \
        objective.lr_adapter=0.0001
"""

import sys

import torch

from ctrl_ray.baselines.classifier_guidance import NoisyClassifier
from ctrl_ray.config import load_config
from ctrl_ray.finetune_setup import FinetuneConfig, build_setup
from ctrl_ray.objectives.adjoint import RegressionBatch, regression_backward
from ctrl_ray.objectives.base import clip_and_step, draw_inputs
from ctrl_ray.sampling.sampler import DenoisingSchedule, sample, step_mean

cfg = load_config(
    FinetuneConfig,
    "configs/ctrl_digits_ink.yaml",
    [
        "mode=adjoint",
        "adapter.kind=lora",
        "adapter.min_timestep=0",
        "objective.batch_size=64",
        "objective.lr_adapter=0.001",
        "objective.lr_embedding=0.01",
        *sys.argv[1:],
    ],
)
setup = build_setup(cfg)
model = setup.model.eval()
conf = setup.objective
net = NoisyClassifier.load("outputs/probe/value_net")
S = 20
sched = DenoisingSchedule.create(model.alphas_cumprod, S, 1.0)
next_t = torch.cat([sched.timesteps[1:], torch.zeros(1, dtype=sched.timesteps.dtype)])
inputs = draw_inputs(model, conf, torch.Generator().manual_seed(0))
y = inputs.labels["ink_class"]


def batch_for():
    tr = sample(model, inputs, eta=1.0, compute_kl=True)
    refs, targets = [], []
    for k in range(S):
        with torch.no_grad():
            mu = step_mean(
                sched, k, model.reference_noise, tr.states[k], inputs.contexts, model.clip_sample
            )
        with torch.enable_grad():
            x = mu.detach().requires_grad_(True)
            g = torch.autograd.grad(
                net.log_probs(x, next_t[k].expand(len(x))).gather(1, y[:, None]).sum(), x
            )[0]
        refs.append(mu)
        targets.append(sched.sigmas[k] ** 2 * g)
    return tr, RegressionBatch(
        tr.states[:-1], torch.stack(refs), torch.stack(targets), inputs.labels, inputs.contexts
    )


tr, batch = batch_for()
with torch.no_grad():
    print("reward base", setup.reward_fn(tr.x0, inputs.labels, inputs.contexts).mean().item())
for it in range(31):
    setup.optimizer.zero_grad(set_to_none=True)
    loss = regression_backward(model, batch, conf, 64)
    clip_and_step(setup.optimizer, conf.max_grad_norm)
    if it % 10 == 0:
        # per-step alignment
        with torch.no_grad():
            al = []
            for k in [0, 5, 10, 15, 18, 19]:
                mu_t = step_mean(
                    sched,
                    k,
                    lambda x, t, c: model.predict_noise(x, t, c, batch.labels),
                    batch.states[k],
                    batch.contexts,
                    model.clip_sample,
                )
                d = (mu_t - batch.reference_means[k]).flatten(1)
                tg = batch.targets[k].flatten(1)
                cosine = torch.nn.functional.cosine_similarity(d, tg).mean()
                al.append(f"{k}: cos {cosine:.2f} |d| {d.norm(dim=1).mean():.3f} "
                          f"|tg| {tg.norm(dim=1).mean():.3f}")
        print(it, f"loss {loss:.3f}", " | ".join(al), flush=True)
tr2, _ = batch_for()
with torch.no_grad():
    print(
        "reward after",
        setup.reward_fn(tr2.x0, inputs.labels, inputs.contexts).mean().item(),
        "kl",
        tr2.kl.sum(0).mean().item(),
    )
