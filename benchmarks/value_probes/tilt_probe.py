"""Does the value head learn h at a given tilt? Fit `SoftValueNet` offline on N base rollouts
(the value rule's own data and loss) for a config's labels, then report, on held-out rollouts,
the value loss, how well log q_0 matches the reward at t = 0 (where h is exact), and the
oracle macro-F1 / joint accuracy and mean path KL of sampling with the fitted head.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/value_probes/tilt_probe.py \
        configs/ctrl_digits_compress.yaml 10 2048 3000 [key=value ...]

Extra ``key=value`` pairs after the four positional arguments set the probe's ``lr``,
``batch``, ``sampler_steps`` (20) and ``steps`` (the sampling steps to score, e.g.
``next,mean:8,mode:8``), or
override the config (e.g. ``rewards=[...]`` for the multi-task pair).
"""

import math
import sys
import time

import torch

from ctrl_ray.config import load_config
from ctrl_ray.evaluation import evaluate
from ctrl_ray.finetune_setup import FinetuneConfig, build_setup
from ctrl_ray.models.judge import DigitJudge
from ctrl_ray.models.soft_value import value_loss
from ctrl_ray.objectives.value import target_log_likelihoods
from ctrl_ray.sampling.sampler import DenoisingSchedule, RolloutInputs, sample

config_path, tilt, rollouts, steps = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), \
    int(sys.argv[4])
knobs = {"lr": 3e-3, "batch": 128, "steps": "next", "sampler_steps": 20}
extra = dict(kv.split("=", 1) for kv in sys.argv[5:])
overrides = [f"{k}={v}" for k, v in extra.items() if k not in knobs]
knobs.update({k: v for k, v in extra.items() if k in knobs})
torch.manual_seed(0)
cfg = load_config(FinetuneConfig, config_path, [
    "mode=value", "adapter.kind=value", "adapter.min_timestep=0",
    f"objective.gamma={tilt}", "objective.kl_weight=1.0", "evaluation.samples_per_target=8",
    f"evaluation.num_inference_steps={knobs['sampler_steps']}", *overrides])
setup = build_setup(cfg)
model = setup.model.eval()
head = model.value_head
S = int(knobs["sampler_steps"])   # DDPM steps of the rollouts and of the scored samples
start = time.time()
states, log_targets, contexts = [], [], []
for i in range(0, rollouts, 256):
    inputs = RolloutInputs.draw(i + 1, 256, S, model.sample_shape, model.label_classes,
                                num_contexts=model.num_contexts)
    with torch.no_grad():
        base = sample(model, inputs, eta=1.0, compute_kl=False, from_reference=True)
        log_targets.append(tilt * target_log_likelihoods(model, setup.image_log_likelihood,
                                                         base.x0, base.contexts))
    states.append(base.states)
    contexts.append(base.contexts)
states, log_targets, contexts = torch.cat(states, 1), torch.cat(log_targets), torch.cat(contexts)
schedule = DenoisingSchedule.create(model.alphas_cumprod, S, 1.0)
timesteps = torch.cat([schedule.timesteps, schedule.timesteps.new_zeros(1)]).long()
log_mass = torch.logsumexp(log_targets, 1)
print(f"rollouts {time.time() - start:.0f} s; log mass: mean {log_mass.mean():.2f} "
      f"std {log_mass.std():.2f} range {log_mass.min():.2f}..{log_mass.max():.2f}", flush=True)
train = int(0.9 * states.shape[1])
optimizer = torch.optim.AdamW(head.parameters(), lr=float(knobs["lr"]), weight_decay=1e-4)
schedule_lr = torch.optim.lr_scheduler.LambdaLR(
    optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
generator = torch.Generator().manual_seed(0)
batch = int(knobs["batch"])


def held_out_loss() -> float:
    rows = torch.arange(train, states.shape[1])
    with torch.no_grad():
        return sum(value_loss(head, states[j, rows], timesteps[j].expand(len(rows)),
                              contexts[rows], log_targets[rows]).item()
                   for j in range(S + 1)) / (S + 1)


start = time.time()
for step in range(steps):
    rows = torch.randint(0, train, (batch,), generator=generator)
    which = torch.randint(0, S + 1, (batch,), generator=generator)
    loss = value_loss(head, states[which, rows], timesteps[which], contexts[rows],
                      log_targets[rows])
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
    optimizer.step()
    schedule_lr.step()
    if (step + 1) % max(1, steps // 5) == 0:
        print(f"step {step + 1}: held-out value loss {held_out_loss():.4f} "
              f"({time.time() - start:.0f} s)", flush=True)
rows = torch.arange(train, states.shape[1])
with torch.no_grad():
    log_q, log_m = head(states[-1, rows], timesteps[-1].expand(len(rows)), contexts[rows])
    exact = log_targets[rows] - log_mass[rows, None]
    kl_t0 = (exact.exp() * (exact - log_q)).sum(1).mean().item()
    prior = torch.logsumexp(exact, 0) - math.log(len(rows))
    kl_prior = (exact.exp() * (exact - prior)).sum(1).mean().item()
    mass_corr = torch.corrcoef(torch.stack([log_m, log_mass[rows]]))[0, 1].item()
print(f"t=0: KL(target || q) {kl_t0:.3f} (prior {kl_prior:.3f}); corr(log m, target) "
      f"{mass_corr:.3f}", flush=True)


def log_value(x, t, context, labels):
    """log h_t(x; y) of each row's own target, differentiable in x."""
    names = list(head.spec.label_classes)
    targets = torch.tensor(head.spec.targets)
    rows = torch.stack([labels[name].long() for name in names], 1)
    index = (targets[None] == rows[:, None]).all(-1).float().argmax(1)
    log_q, log_m = head(x, t, context)
    return log_q.gather(1, index[:, None])[:, 0] + log_m


def smoothed_shift(kind: str, samples: int):
    """A mean shift from h_{k+1} smoothed over the step's own noise: ``mean`` = the tilted
    Gaussian's exact mean, mu + sigma^2 grad log E_eps h(mu + sigma eps) (self-normalised Monte
    Carlo); ``mode`` = the reverse-KL fixed point sigma^2 E_eps grad log h(mu + delta + sigma eps)
    started at the first-order step."""
    def repeat(v):
        return None if v is None else v.repeat(samples, *[1] * (v.dim() - 1))

    def shift(mean, sigma, t, next_t, context, labels):
        size = mean.shape[0]
        first = sigma**2 * head.grad_log_value(mean, next_t, context, labels)
        centre = mean if kind == "mean" else mean + first
        noise = torch.randn((samples, *mean.shape), generator=noise_generator)
        with torch.enable_grad():
            points = (centre[None] + sigma * noise).flatten(0, 1).detach().requires_grad_(True)
            values = log_value(points, next_t, repeat(context),
                               {k: repeat(v) for k, v in labels.items()}).view(samples, size)
            (gradient,) = torch.autograd.grad(values.sum(), points)
        gradient = gradient.view(samples, *mean.shape).detach()
        weights = values.detach().softmax(0) if kind == "mean" else \
            torch.full_like(values, 1 / samples)
        return sigma**2 * (weights.view(samples, size, *[1] * (mean.dim() - 1))
                           * gradient).sum(0)
    return shift


noise_generator = torch.Generator().manual_seed(7)
first_order = model.mean_shift
for variant in knobs["steps"].split(","):
    kind, _, samples = variant.partition(":")
    model.mean_shift = first_order if kind == "next" else smoothed_shift(kind, int(samples))
    start = time.time()
    report = evaluate(model, setup.label_info, DigitJudge.load(cfg.judge), cfg.evaluation)
    scores = {name: round(report["labels"][name]["macro_f1"], 3) for name in model.label_classes}
    print(f"step {variant}: macro-F1 {scores} joint {report['joint_accuracy']:.3f} "
          f"KL {report['mean_kl']:.2f} fidelity {report.get('fidelity', float('nan')):.3f} "
          f"({time.time() - start:.0f} s)", flush=True)
