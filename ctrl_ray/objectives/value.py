"""Value CTRL: learn the soft value of the pre-trained chain by regression on its own rollouts,
and steer every reverse step by its gradient (the policy's adapter ``value``).

The optimum of J = E[gamma log p(y | x0, c)] - kl_weight KL(P_theta || P_pre) is the base chain
tilted by h_t(x; y, c) = E_pre[p(y | x0, c)^lambda | x_t = x, c], lambda = gamma / kl_weight:
its step from x_k draws x_{k+1} from N(mu_pre(x_k), sigma_k^2 I) h_{k+1}(x_{k+1}) / h_k(x_k),
whose best Gaussian approximation with the base's variance shifts the mean by
sigma_k^2 grad log h_{k+1}(mu_pre(x_k)) (first order in sigma_k). The policy is that step with a
learned h (`ctrl_ray.models.soft_value`), so fine-tuning is learning h, and h is a conditional
expectation under the *base* chain: a regression of lambda log p(y | x0) of base rollouts onto
every state x_k of the rollout (`value_loss`), for every target y at once. No gradient passes
through the sampler or the reward classifier, the targets are exact (not one-trajectory
estimates), and nothing drifts where the reward is flat (there h is constant and the control
zero). `docs/update_rules.md` says why this reaches the optimum where Adjoint Matching's
adapter lags it.

A rollout worker samples its shard twice with the batch's noise: the base model (the
regression data: states, contexts and lambda log p(y | x0) for every y) and the current policy
(the reward and KL the run reports). The learner pools the shards and takes
``regression_steps`` AdamW steps on random (state, timestep) pairs of the pool.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ctrl_ray.errors import InputError
from ctrl_ray.models.soft_value import value_loss
from ctrl_ray.objectives.base import ObjectiveConfig, clip_and_step
from ctrl_ray.objectives.pathwise import RewardFn
from ctrl_ray.sampling.sampler import DenoisingSchedule, RolloutInputs, sample


@dataclass
class ValueConfig(ObjectiveConfig):
    """Value CTRL: the shared objective (``kl_weight`` > 0: the tilt is gamma / kl_weight) and
    the regression of the value head (``lr_adapter``; the label embeddings are not used)."""

    lr_embedding: float = 0.0
    lr_adapter: float = 2e-3
    lr_schedule: str = "cosine"
    weight_decay: float = 1e-4
    regression_steps: int = 30          # value-head steps per batch of rollouts
    regression_batch_size: int = 128    # (state, timestep) pairs per step

    def __post_init__(self):
        super().__post_init__()
        if self.regression_steps < 1 or self.regression_batch_size < 1:
            raise InputError(f"regression_steps and regression_batch_size must be >= 1, got "
                             f"{self.regression_steps} and {self.regression_batch_size}")
        if not self.kl_weight > 0:
            raise InputError(f"kl_weight must be > 0 for the value rule (the optimum tilts "
                             f"by gamma / kl_weight), got {self.kl_weight}")


def target_log_likelihoods(model, reward_fn: RewardFn, x0: torch.Tensor,
                           contexts: torch.Tensor | None) -> torch.Tensor:
    """log p(y | x0, c) of every sample for every target y of the value head, (B, J)."""
    names = list(model.label_classes)
    size = x0.shape[0]
    return torch.stack([
        reward_fn(x0, {name: torch.full((size,), k, dtype=torch.long, device=x0.device)
                       for name, k in zip(names, target, strict=True)}, contexts)
        for target in model.value_head.spec.targets], dim=1)


# -- the update rule's two halves (see ctrl_ray.objectives) ---------------------------------
Config = ValueConfig


def worker_step(model, reward_fn: RewardFn, inputs: RolloutInputs, config: ValueConfig,
                normaliser: int, version: int) -> tuple[dict, dict]:
    """Sample the shard with the base model (the regression data, on CPU) and with the policy
    (its reward and KL)."""
    if getattr(model, "value_head", None) is None:
        raise InputError("mode value trains a value head: set adapter.kind: value")
    if inputs.num_steps != config.num_inference_steps:
        raise InputError(f"inputs have {inputs.num_steps} steps of noise but "
                         f"num_inference_steps is {config.num_inference_steps}")
    tilt = config.tilt_exponent(math.prod(model.sample_shape))
    with torch.no_grad():
        base = sample(model, inputs, eta=config.eta, compute_kl=False, from_reference=True)
        log_targets = tilt * target_log_likelihoods(model, reward_fn, base.x0, base.contexts)
        policy = sample(model, inputs, eta=config.eta, kl_reduction=config.kl_reduction)
        log_likelihood = reward_fn(policy.x0, policy.labels, policy.contexts)
    path_kl = policy.path_kl
    payload = {"states": base.states.cpu(), "log_targets": log_targets.float().cpu(),
               "contexts": None if base.contexts is None else base.contexts.cpu()}
    return payload, {
        "reward": log_likelihood.mean().item(),
        "kl": path_kl.mean().item(),
        "objective": (config.gamma * log_likelihood - config.kl_weight * path_kl).mean().item(),
        "num_samples": float(inputs.batch_size),
    }


def learner_step(model, optimizer: torch.optim.Optimizer, payloads: list[dict],
                 config: ValueConfig, generator: torch.Generator, version: int) -> dict:
    """``regression_steps`` steps of the value loss on random (state, timestep) pairs of the
    pooled base rollouts (x_T .. x_0 of every trajectory)."""
    head = model.value_head
    device = next(head.parameters()).device
    states = torch.cat([p["states"] for p in payloads], 1)           # (S+1, N, ...)
    log_targets = torch.cat([p["log_targets"] for p in payloads])    # (N, J)
    contexts = None if payloads[0]["contexts"] is None else \
        torch.cat([p["contexts"] for p in payloads])
    schedule = DenoisingSchedule.create(model.alphas_cumprod.cpu(), states.shape[0] - 1,
                                        config.eta)
    timesteps = torch.cat([schedule.timesteps, schedule.timesteps.new_zeros(1)]).long()
    total, norms = 0.0, 0.0
    for _ in range(config.regression_steps):
        rows = torch.randint(0, states.shape[1], (config.regression_batch_size,),
                             generator=generator)
        which = torch.randint(0, states.shape[0], (config.regression_batch_size,),
                              generator=generator)
        loss = value_loss(head, states[which, rows].to(device), timesteps[which].to(device),
                          None if contexts is None else contexts[rows].to(device),
                          log_targets[rows].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norms += clip_and_step(optimizer, config.max_grad_norm)
        total += loss.item()
    return {"loss": total / config.regression_steps,
            "grad_norm": norms / config.regression_steps}


def train_step(model, optimizer: torch.optim.Optimizer, reward_fn: RewardFn,
               inputs: RolloutInputs, config: ValueConfig,
               generator: torch.Generator | None = None) -> dict[str, float]:
    """One in-process value update on a full batch."""
    payload, metrics = worker_step(model, reward_fn, inputs, config, inputs.batch_size, 0)
    generator = generator or torch.Generator().manual_seed(0)
    metrics.update(learner_step(model, optimizer, [payload], config, generator, 0))
    return metrics
