"""PPO CTRL (the paper's appendix): the same objective J as pathwise, solved as an MDP.

State s_k = (x^(k), y, c) with x^(0) = x_T, action x^(k+1) ~ pi_theta(. | s_k) =
N(mu_theta(x^(k)), sigma_k^2 I), k = 0..S-1, x^(S) = x_0. The objective is

    J(theta) = E_{P_theta}[ gamma R(x_0) - alpha sum_k KL_k(x^(k); theta) ],
    R = log p(y | x_0, c),   KL_k(x; theta) = KL(pi_theta(. | x) || pi_pre(. | x))
                                            = || mu_theta(x) - mu_pre(x) ||^2 / (2 sigma_k^2),

whose KL sum is the path KL(P_theta || P_pre) (chain rule), so J is exactly pathwise's J.
Differentiating the expectation over the trajectory AND the integrand:

    grad J = E[ sum_k grad log pi_theta(x^(k+1) | x^(k)) (G_k - b_k) ]            (score part)
             - alpha E[ sum_k grad_theta KL_k(x^(k); theta) |_{x^(k) fixed} ]      (direct part)
    G_k    = gamma R(x_0) - alpha sum_{j > k} KL_j(x^(j))                        (return-to-go)

KL_j is a reward of the state x^(j) it is evaluated at, so it enters twice: through the
distribution of x^(j), i.e. the actions before step j (the score part: -alpha KL_j is a reward
received after action j-1, counted in the return-to-go of every action k < j), and through
mu_theta at a fixed x^(j) (the direct part: the closed-form gradient of KL_j). Causality drops
the KL_j with j <= k from the return of action k (they are fixed before it), and b_k is a
baseline independent of action k: a leave-one-out mean of G_k over the OTHER trajectories of
the batch (independent of this one, so no bias). This estimator and pathwise's
reparameterisation are both unbiased for grad J (tests/test_ppo.py checks they agree, and that
dropping the future KL from G_k does not).

The learner optimises, per (k, b) pair of the stored rollouts,

    L = - min(rho A, clip(rho) A) + (alpha / s) KL_k(x^(k); theta),
    rho = pi_theta(x^(k+1) | x^(k)) / pi_old(x^(k+1) | x^(k)),   A = (G_k - b_k) / s,

averaged over the pairs of a minibatch. At theta = theta_old (the first minibatch of fresh
rollouts) rho = 1 and grad rho = grad log pi, so the gradient of L averaged over all pairs is
the estimator above times -1 / (S s). ``s`` (``advantage_scale="std"``) is ONE scalar per
batch, the RMS of G - b, dividing the score part and the direct part alike: it rescales the
step, never the balance between reward and KL, so the fixed point stays that of J (per-label
or per-step scales would reweight the labels and move it). After the first minibatch the
update is the usual PPO approximation: states come from theta_old (no importance weights on
the state distribution) and clipping bounds the move away from theta_old. The KL term is not
clipped: it pulls towards the reference, not towards theta_old.

Design choices: log-probabilities are the true Gaussian densities, summed over dimensions
(``sample``'s), so rho is the true importance ratio and the score part is on the scale of the
direct part (DDPO averages log-probs over dimensions, which would shrink the score part by
the dimension D against the KL). ``clip_range`` keeps DDPO's meaning anyway: it bounds the
per-dimension (geometric-mean) ratio to [1 - eps, 1 + eps], i.e. the true ratio to
[(1 - eps)^D, (1 + eps)^D], so DDPO's 1e-4 is the same trust region at every image size.
The reference means mu_pre(x^(k)) do not depend on theta, so the rollout computes them once
(with the rollout KL) and the learner never calls the reference network. A minibatch mixes
steps; its policy means come from ONE network call, each row at its own timestep.

Staleness: every trajectory carries the policy version that sampled it; ``ppo_update`` drops
(logs and counts) trajectories more than ``max_staleness`` versions behind the learner and
skips the update when none is left, rather than raising: a slow worker must not stop training.
A version AHEAD of the learner is a protocol bug and raises ``ValueError``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from functools import partial

import torch
from torch import Tensor

from ctrl_ray import data_parallel
from ctrl_ray.errors import InputError
from ctrl_ray.models.augmented import AugmentedModel
from ctrl_ray.objectives.base import clip_and_step, draw_inputs
from ctrl_ray.objectives.configs import PPOConfig
from ctrl_ray.objectives.pathwise import RewardFn
from ctrl_ray.sampling.sampler import (
    DenoisingSchedule,
    RolloutInputs,
    gaussian_kl,
    gaussian_log_prob,
    sample,
    step_mean,
)

logger = logging.getLogger(__name__)


@dataclass
class RolloutBatch:
    """Trajectories sampled without gradients, as a rollout worker returns them (plain tensors).

    states (S+1, B, *shape): x_T .. x_0 (``x_t``/``x_prev`` are the (S, B, ...) views);
    log_probs (S, B): log pi_old(x_{t-1} | x_t), summed over dimensions; reference_means
    (S, B, *shape): mu_pre(x_t); kl (S, B): KL_t at collection, summed over dimensions (nats);
    timesteps, sigmas (S,); labels name -> (B,) long; contexts (B, ...) or None;
    log_likelihood (B,): log p(y | x_0, c) (gamma not applied); versions (B,) long: the policy
    version that sampled each trajectory.
    """

    states: Tensor
    log_probs: Tensor
    reference_means: Tensor
    kl: Tensor
    timesteps: Tensor
    sigmas: Tensor
    labels: dict[str, Tensor]
    contexts: Tensor | None
    log_likelihood: Tensor
    versions: Tensor

    def __post_init__(self):
        steps, size = self.num_steps, self.batch_size
        shape = tuple(self.states.shape[2:])
        expected = {
            "log_probs": (steps, size), "kl": (steps, size),
            "reference_means": (steps, size, *shape), "timesteps": (steps,),
            "sigmas": (steps,), "log_likelihood": (size,), "versions": (size,),
        }
        for name, want in expected.items():
            if tuple(getattr(self, name).shape) != want:
                raise InputError(f"RolloutBatch.{name} must have shape {want}, "
                                 f"got {tuple(getattr(self, name).shape)}")
        for name, values in self.labels.items():
            if tuple(values.shape) != (size,):
                raise InputError(f"RolloutBatch.labels[{name!r}] must have shape ({size},), "
                                 f"got {tuple(values.shape)}")
        if self.contexts is not None and self.contexts.shape[0] != size:
            raise InputError(f"RolloutBatch.contexts must have {size} rows, "
                             f"got {self.contexts.shape[0]}")

    @property
    def num_steps(self) -> int:
        return self.states.shape[0] - 1

    @property
    def batch_size(self) -> int:
        return self.states.shape[1]

    @property
    def x_t(self) -> Tensor:
        """The state each step starts from, (S, B, ...)."""
        return self.states[:-1]

    @property
    def x_prev(self) -> Tensor:
        """The state each step samples (x_{t-1}), (S, B, ...)."""
        return self.states[1:]

    @property
    def x0(self) -> Tensor:
        return self.states[-1]

    @property
    def path_kl(self) -> Tensor:
        """KL(P_old || P_pre) of each path at collection, summed over dimensions, (B,)."""
        return self.kl.sum(0)

    @classmethod
    def cat(cls, batches: Sequence[RolloutBatch]) -> RolloutBatch:
        """Concatenate along the batch (e.g. the shards of several workers, in order)."""
        if not batches:
            raise InputError("RolloutBatch.cat needs at least one batch")
        first = batches[0]
        for other in batches[1:]:
            if set(other.labels) != set(first.labels):
                raise InputError(f"cannot concatenate batches with labels {sorted(first.labels)} "
                                 f"and {sorted(other.labels)}")
            if (other.contexts is None) != (first.contexts is None):
                raise InputError("cannot concatenate batches with and without contexts")
            if not (torch.equal(other.timesteps, first.timesteps)
                    and torch.equal(other.sigmas, first.sigmas)):
                raise InputError("cannot concatenate batches sampled on different schedules")
        by_step = ("states", "log_probs", "reference_means", "kl")
        by_sample = ("log_likelihood", "versions")
        values = {name: torch.cat([getattr(b, name) for b in batches], dim=1) for name in by_step}
        values.update({name: torch.cat([getattr(b, name) for b in batches]) for name in by_sample})
        return cls(
            **values,
            timesteps=first.timesteps,
            sigmas=first.sigmas,
            labels={name: torch.cat([b.labels[name] for b in batches]) for name in first.labels},
            contexts=None if first.contexts is None else torch.cat([b.contexts for b in batches]),
        )

    def select(self, indices: Tensor) -> RolloutBatch:
        """The trajectories at ``indices`` (a (n,) long tensor or boolean mask over B)."""
        return RolloutBatch(
            states=self.states[:, indices],
            log_probs=self.log_probs[:, indices],
            reference_means=self.reference_means[:, indices],
            kl=self.kl[:, indices],
            timesteps=self.timesteps,
            sigmas=self.sigmas,
            labels={name: values[indices] for name, values in self.labels.items()},
            contexts=None if self.contexts is None else self.contexts[indices],
            log_likelihood=self.log_likelihood[indices],
            versions=self.versions[indices],
        )

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> RolloutBatch:
        """Move to ``device``; ``dtype`` applies to the floating-point tensors."""
        def move(value: Tensor) -> Tensor:
            floating = dtype is not None and value.is_floating_point()
            return value.to(device, dtype) if floating else value.to(device)

        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["labels"] = {name: move(v) for name, v in self.labels.items()}
        values["contexts"] = None if self.contexts is None else move(self.contexts)
        return RolloutBatch(**{name: value if name in ("labels", "contexts") else move(value)
                               for name, value in values.items()})


@torch.no_grad()
def collect_rollouts(
    model: AugmentedModel,
    reward_fn: RewardFn,
    inputs: RolloutInputs,
    config: PPOConfig,
    version: int,
) -> RolloutBatch:
    """Sample ``inputs`` with the current policy (no gradients) and score them, on CPU.

    The policy pass records the log-probs; one reference pass per step gives mu_pre(x_t), from
    which the rollout KL follows (the reference network runs once per state, as in ``sample``
    with ``compute_kl``, and never again in the learner).
    """
    if inputs.num_steps != config.num_inference_steps:
        raise InputError(f"inputs have {inputs.num_steps} steps of noise but "
                         f"num_inference_steps is {config.num_inference_steps}")
    trajectory = sample(model, inputs, eta=config.eta, compute_kl=False, differentiable=False)
    schedule = DenoisingSchedule.create(model.alphas_cumprod, inputs.num_steps, config.eta)
    reference_means, kl = [], []
    for step in range(inputs.num_steps):
        reference = step_mean(schedule, step, model.reference_noise, trajectory.states[step],
                              trajectory.contexts, model.clip_sample)
        reference_means.append(reference)
        kl.append(gaussian_kl(trajectory.means[step], reference, schedule.sigmas[step], "sum"))
    log_likelihood = reward_fn(trajectory.x0, trajectory.labels, trajectory.contexts)
    batch = RolloutBatch(
        states=trajectory.states,
        log_probs=trajectory.log_probs,
        reference_means=torch.stack(reference_means),
        kl=torch.stack(kl),
        timesteps=trajectory.timesteps,
        sigmas=trajectory.sigmas,
        labels=trajectory.labels,
        contexts=trajectory.contexts,
        log_likelihood=log_likelihood.detach(),
        versions=torch.full((inputs.batch_size,), int(version), dtype=torch.long),
    )
    return batch.to("cpu")


def staleness_ok(batch_version: int, current_version: int, max_staleness: int) -> bool:
    """Whether rollouts of policy ``batch_version`` may update policy ``current_version``.

    Raises ``ValueError`` for a version newer than the learner's (a protocol bug, not staleness).
    """
    batch_version, current_version = int(batch_version), int(current_version)
    if batch_version > current_version:
        raise ValueError(f"rollouts of policy version {batch_version} are newer than the "
                         f"learner's version {current_version}")
    return current_version - batch_version <= max_staleness


def fresh_mask(versions: Tensor, current_version: int, max_staleness: int) -> Tensor:
    """(B,) bool: which trajectories ``staleness_ok`` accepts."""
    mask = torch.zeros(versions.shape, dtype=torch.bool, device=versions.device)
    for version in versions.unique().tolist():
        if staleness_ok(version, current_version, max_staleness):
            mask |= versions == version
    return mask


def _kl_per_step(batch: RolloutBatch, reduction: str) -> Tensor:
    """The stored rollout KL (S, B) in ``reduction`` (it is stored summed over dimensions)."""
    return batch.kl if reduction == "sum" else batch.kl / batch.states[0, 0].numel()


def _group_ids(batch: RolloutBatch) -> Tensor:
    """(B,) ids of the distinct (labels..., class context) combinations."""
    columns = [batch.labels[name] for name in sorted(batch.labels)]
    contexts = batch.contexts
    if contexts is not None and contexts.ndim == 1 and not contexts.is_floating_point():
        columns.append(contexts)
    if not columns:
        return torch.zeros(batch.batch_size, dtype=torch.long, device=batch.states.device)
    return torch.unique(torch.stack(columns, dim=1), dim=0, return_inverse=True)[1]


def returns_to_go(batch: RolloutBatch, config: PPOConfig) -> Tensor:
    """G_k = gamma log p(y | x_0, c) - kl_weight sum_{j > k} KL_j, shape (S, B)."""
    kl = _kl_per_step(batch, config.kl_reduction)
    after = kl.flip(0).cumsum(0).flip(0) - kl  # sum_{j > k}
    return config.gamma * batch.log_likelihood[None] - config.kl_weight * after


def compute_advantages(batch: RolloutBatch, config: PPOConfig) -> tuple[Tensor, float]:
    """Advantages (S, B) = (G - b) / s and the scale s (1.0 when not scaled).

    b is the leave-one-out mean of G at the same step over the other samples of the group
    (``per_label``: same labels and class context; a group of one falls back to the batch),
    so b_k(b) does not depend on trajectory b and the gradient stays unbiased.
    """
    returns = returns_to_go(batch, config).double()
    size = batch.batch_size
    if config.advantage_baseline == "none" or size < 2:
        centred = returns
    else:
        total = returns.sum(1, keepdim=True)
        baseline = (total - returns) / (size - 1)
        if config.advantage_baseline == "per_label":
            groups = _group_ids(batch)
            count = torch.bincount(groups).to(returns.dtype)
            sums = torch.zeros(returns.shape[0], len(count), dtype=returns.dtype,
                               device=returns.device).index_add_(1, groups, returns)
            group_count = count[groups]
            within = (sums[:, groups] - returns) / (group_count - 1).clamp(min=1)
            baseline = torch.where(group_count > 1, within, baseline)
        centred = returns - baseline
    scale = 1.0
    if config.advantage_scale == "std":
        rms = centred.pow(2).mean().sqrt().item()
        scale = rms if rms > 1e-8 else 1.0
    return (centred / scale).to(batch.log_probs.dtype), scale


def schedule_rows(schedule: DenoisingSchedule, steps: Tensor, sample_ndim: int
                  ) -> DenoisingSchedule:
    """The schedule gathered at per-row step indices (n,), shaped (n, 1, ...) to broadcast over
    samples of ``sample_ndim`` dimensions: ``step_mean(rows, slice(None), ...)`` then evaluates
    the reverse-step mean of every row at its own step in ONE network call."""
    shape = (-1,) + (1,) * sample_ndim
    return DenoisingSchedule(
        timesteps=schedule.timesteps[steps],
        alphas=schedule.alphas[steps].view(shape),
        alphas_prev=schedule.alphas_prev[steps].view(shape),
        sigmas=schedule.sigmas[steps].view(shape),
    )


def policy_log_probs_and_kl(
    model: AugmentedModel,
    batch: RolloutBatch,
    schedule: DenoisingSchedule,
    flat_indices: Tensor,
    kl_reduction: str = "sum",
) -> tuple[Tensor, Tensor]:
    """log pi_theta(x_{t-1} | x_t) and KL_t(x_t; theta), with gradients, for (step, sample)
    pairs given as flat indices step * B + sample into (S, B); both (n,), in that order.

    One policy call for all pairs (each row at its own timestep, through ``step_mean`` on the
    gathered schedule); the reference mean is the stored one.
    """
    size = batch.batch_size
    steps, samples = flat_indices // size, flat_indices % size
    sample_ndim = batch.states.ndim - 2
    rows = schedule_rows(schedule, steps, sample_ndim)
    labels = {name: values[samples] for name, values in batch.labels.items()}
    contexts = None if batch.contexts is None else batch.contexts[samples]
    policy_noise = partial(model.predict_noise, labels=labels)
    mean = step_mean(rows, slice(None), policy_noise, batch.states[steps, samples], contexts,
                     model.clip_sample)
    sigma = schedule.sigmas[steps]
    log_probs = gaussian_log_prob(batch.states[steps + 1, samples], mean, sigma)
    kl = gaussian_kl(mean, batch.reference_means[steps, samples], sigma[:, None], kl_reduction)
    return log_probs, kl


def _check_schedule(model: AugmentedModel, batch: RolloutBatch, config: PPOConfig):
    if batch.num_steps != config.num_inference_steps:
        raise InputError(f"the rollouts have {batch.num_steps} steps but num_inference_steps "
                         f"is {config.num_inference_steps}")
    schedule = DenoisingSchedule.create(model.alphas_cumprod, batch.num_steps, config.eta)
    same = torch.equal(schedule.timesteps, batch.timesteps) and torch.allclose(
        schedule.sigmas, batch.sigmas, rtol=1e-5, atol=0)
    if not same:
        raise InputError(f"the rollouts were sampled on another schedule than the learner's "
                         f"(num_inference_steps={config.num_inference_steps}, eta={config.eta})")
    return schedule


def ppo_loss(
    model: AugmentedModel,
    batch: RolloutBatch,
    schedule: DenoisingSchedule,
    flat_indices: Tensor,
    advantages: Tensor,
    scale: float,
    config: PPOConfig,
) -> tuple[Tensor, dict[str, float]]:
    """The clipped surrogate plus the direct KL penalty, averaged over the (step, sample) pairs
    ``flat_indices``; ``advantages`` (S, B) and ``scale`` from ``compute_advantages``.

    At the rollout's parameters its gradient is -(grad J) / (S * scale) for that share of pairs
    (module docstring). Also returns the minibatch's statistics.
    """
    log_probs, kl = policy_log_probs_and_kl(model, batch, schedule, flat_indices,
                                            config.kl_reduction)
    log_ratio = log_probs - batch.log_probs.flatten()[flat_indices]
    dims = batch.states[0, 0].numel()  # clip_range bounds the per-dimension ratio (DDPO)
    log_high = dims * math.log1p(config.clip_range)
    log_low = dims * math.log1p(-config.clip_range) if config.clip_range < 1 else -math.inf
    ratio = log_ratio.exp()
    clipped_ratio = log_ratio.clamp(log_low, log_high).exp()
    advantage = advantages.flatten()[flat_indices]
    policy_loss = -torch.minimum(ratio * advantage, clipped_ratio * advantage).mean()
    kl_loss = config.kl_weight / scale * kl.mean()
    with torch.no_grad():
        stats = {
            "policy_loss": policy_loss.item(),
            "kl_loss": kl_loss.item(),
            "kl_policy": kl.mean().item() * batch.num_steps,
            "clip_fraction": ((log_ratio < log_low) | (log_ratio > log_high)).double()
            .mean().item(),
            "approx_kl": (ratio - 1 - log_ratio).double().mean().item(),
            "ratio_max_deviation": (ratio - 1).abs().max().item(),
        }
    return policy_loss + kl_loss, stats


def ppo_update(
    model: AugmentedModel,
    optimizer: torch.optim.Optimizer,
    batch: RolloutBatch,
    config: PPOConfig,
    generator: torch.Generator,
    *,
    current_version: int,
) -> dict[str, float]:
    """``ppo_epochs`` epochs of clipped policy-gradient minibatch steps on ``batch``.

    Trajectories staler than ``config.max_staleness`` versions are dropped (counted in
    ``num_stale_dropped``, logged); when none is left the update is skipped (``skipped`` = 1,
    no optimizer step). Each epoch shuffles the S * B (step, sample) pairs with ``generator``
    and takes one clipped, gradient-clipped optimizer step per ``minibatch_size`` pairs.
    """
    staleness = (current_version - batch.versions).double()
    keep = fresh_mask(batch.versions, current_version, config.max_staleness)
    dropped = int((~keep).sum())
    metrics = {
        "reward": batch.log_likelihood.double().mean().item(),
        "kl": _kl_per_step(batch, config.kl_reduction).sum(0).double().mean().item(),
        "staleness_mean": staleness.mean().item(),
        "staleness_max": staleness.max().item(),
        "num_samples": float(batch.batch_size),
        "num_stale_dropped": float(dropped),
        "skipped": 0.0,
    }
    metrics["objective"] = config.gamma * metrics["reward"] - config.kl_weight * metrics["kl"]
    if dropped:
        logger.warning("ppo_update: dropped %d of %d trajectories staler than %d versions "
                       "(learner at version %d)", dropped, batch.batch_size,
                       config.max_staleness, current_version)
    if dropped == batch.batch_size:
        metrics["skipped"] = 1.0
        return metrics
    if dropped:
        batch = batch.select(keep)

    reference = model.alphas_cumprod
    batch = batch.to(reference.device, reference.dtype)
    schedule = _check_schedule(model, batch, config)
    advantages, scale = compute_advantages(batch, config)
    num_pairs = batch.num_steps * batch.batch_size

    totals = {"policy_loss": 0.0, "kl_loss": 0.0, "kl_policy": 0.0, "clip_fraction": 0.0,
              "approx_kl": 0.0, "grad_norm": 0.0}
    ratio_deviation, count, num_steps = 0.0, 0, 0
    for _ in range(config.ppo_epochs):
        permutation = torch.randperm(num_pairs, generator=generator).to(advantages.device)
        for start in range(0, num_pairs, config.minibatch_size):
            (indices,), weight = data_parallel.share(permutation[start:start
                                                                 + config.minibatch_size])
            optimizer.zero_grad(set_to_none=True)
            stats = {}
            if len(indices):   # a learner rank's share of a last, small minibatch can be empty
                loss, stats = ppo_loss(model, batch, schedule, indices, advantages, scale,
                                       config)
                (loss * weight).backward()
            grad_norm = clip_and_step(optimizer, config.max_grad_norm)

            n = len(indices)
            for name, value in stats.items():
                if name == "ratio_max_deviation":
                    ratio_deviation = max(ratio_deviation, value)
                else:
                    totals[name] += value * n
            totals["grad_norm"] += grad_norm * n
            count += n
            num_steps += 1
    totals = {name: data_parallel.total(value) for name, value in totals.items()}
    count = data_parallel.total(count)
    metrics.update({name: value / count for name, value in totals.items()})
    metrics.update(ratio_max_deviation=data_parallel.largest(ratio_deviation),
                   advantage_scale=scale,
                   num_optimizer_steps=float(num_steps))
    return metrics


def train_iteration(
    model: AugmentedModel,
    optimizer: torch.optim.Optimizer,
    reward_fn: RewardFn,
    config: PPOConfig,
    generator: torch.Generator,
    version: int,
) -> dict[str, float]:
    """One single-process PPO iteration: draw, collect with policy ``version``, update."""
    inputs = draw_inputs(model, config, generator)
    batch = collect_rollouts(model, reward_fn, inputs, config, version)
    return ppo_update(model, optimizer, batch, config, generator, current_version=version)


# -- the update rule's two halves (see ctrl_ray.objectives) ---------------------------------
Config = PPOConfig


def worker_step(model: AugmentedModel, reward_fn: RewardFn, inputs: RolloutInputs,
                config: PPOConfig, normaliser: int, version: int) -> tuple[RolloutBatch, dict]:
    """Roll out a shard without gradients, tagged with the policy version that sampled it."""
    batch = collect_rollouts(model, reward_fn, inputs, config, version)
    return batch, {"num_samples": float(inputs.batch_size)}


def learner_step(model: AugmentedModel, optimizer: torch.optim.Optimizer,
                 payloads: list[RolloutBatch], config: PPOConfig, generator: torch.Generator,
                 version: int) -> dict:
    """Clipped policy-gradient epochs on the shards' rollouts (``skipped`` when all stale)."""
    return ppo_update(model, optimizer, RolloutBatch.cat(payloads), config, generator,
                      current_version=version)
