"""Adjoint Matching CTRL (Domingo-Enrich et al., arXiv 2409.08861): regress the control onto
the lean adjoint instead of back-propagating through the sampler.

The policy's reverse step is the base step plus a mean shift, x_{k+1} ~ N(mu_pre(x_k) +
delta_k(x_k), sigma_k^2 I), and J = E[gamma log p(y | x0, c)] - alpha sum_k KL_k with
KL_k = ||delta_k||^2 / (2 sigma_k^2). Its optimum is p_pre(x | c) p(y | x, c)^(gamma / alpha),
with soft value V_k(x) = alpha log E_pre[exp(gamma log p(y | x0) / alpha) | x_k = x], and the
best Gaussian step (moment matching, by Stein's lemma) shifts the mean by

    delta*_k(x_k) = sigma_k^2 E*[ grad V_{k+1}(x_{k+1}) / alpha | x_k ].

Differentiating V through the base step (x_{k+1} = mu_pre(x_k) + sigma_k eps) gives the lean
adjoint, a vector-Jacobian product of the frozen base per step along a rollout:

    a_S = (gamma / alpha) grad_x0 log p(y | x0, c),    a_k = (d mu_pre(x_k) / d x_k)^T a_{k+1},

whose conditional mean is grad V_k / alpha. So each step's control is fit by least squares,

    L = sum_k || mu_theta(x_k) - mu_pre(x_k) - sigma_k^2 a_{k+1} ||^2 / (2 sigma_k^2),

on states from the current policy (no gradient through the sampler). Its fixed point is the
optimum; where the reward is flat the target is exactly the base (a = 0), so noise in the
regression never drifts the policy away from p_pre. At theta = pre the gradient of L equals
the full-horizon pathwise reward gradient; unlike pathwise it stays a well-conditioned
regression as the policy moves. The loss is weighted in the KL's metric (1 / (2 sigma_k^2)),
so the residual is measured in nats, like the objective.

A rollout worker runs the rollout, the adjoint pass and the regression gradient of its shard;
the learner sums the shards' gradients and steps. The targets do not depend on theta, so with
``regression_steps`` > 1 the workers also ship their regression batch and the learner takes the
further steps on the pooled batch (the rollout is then slightly off-policy; each extra step
costs a third of an update, since the rollout and the adjoint pass are not repeated).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ctrl_ray import data_parallel
from ctrl_ray.errors import InputError
from ctrl_ray.objectives.base import (
    apply_gradients,
    clip_and_step,
    parameter_gradients,
)
from ctrl_ray.objectives.configs import AdjointConfig
from ctrl_ray.objectives.pathwise import RewardFn
from ctrl_ray.sampling.sampler import (
    DenoisingSchedule,
    RolloutInputs,
    gaussian_kl,
    sample,
    step_mean,
)


@dataclass
class AdjointRollout:
    """A rollout of the current policy with its regression targets (all detached).

    states (S+1, B, ...): x_T .. x_0; reference_means (S, B, ...): mu_pre(x_k); targets
    (S, B, ...): sigma_k^2 a_{k+1}; kl (S, B): KL_k of the rollout; log_likelihood (B,).
    """

    states: Tensor
    reference_means: Tensor
    targets: Tensor
    kl: Tensor
    log_likelihood: Tensor
    adjoint_norms: Tensor   # (S,) mean ||a_{k+1}|| per step: where the reward's signal lives


def adjoint_rollout(model, reward_fn: RewardFn, inputs: RolloutInputs,
                    config: AdjointConfig) -> AdjointRollout:
    """Sample ``inputs`` with the policy (no gradients), then run the lean adjoint backward."""
    if inputs.num_steps != config.num_inference_steps:
        raise InputError(f"inputs have {inputs.num_steps} steps of noise but "
                         f"num_inference_steps is {config.num_inference_steps}")
    trajectory = sample(model, inputs, eta=config.eta, compute_kl=False)
    schedule = DenoisingSchedule.create(model.alphas_cumprod, inputs.num_steps, config.eta)
    contexts, clip = trajectory.contexts, model.clip_sample
    tilt = config.tilt_exponent(trajectory.x0[0].numel())

    with torch.enable_grad():
        x0 = trajectory.x0.detach().requires_grad_(True)
        log_likelihood = reward_fn(x0, trajectory.labels, contexts)
        (adjoint,) = torch.autograd.grad(log_likelihood.sum(), x0)
    adjoint = tilt * adjoint
    reference_means, targets, kls, norms = [], [], [], []
    for step in reversed(range(inputs.num_steps)):
        sigma = schedule.sigmas[step]
        targets.append(sigma**2 * adjoint)
        norms.append(adjoint.flatten(1).norm(dim=1).mean())
        with torch.enable_grad():
            x_k = trajectory.states[step].detach().requires_grad_(True)
            reference = step_mean(schedule, step, model.reference_noise, x_k, contexts, clip)
            (adjoint,) = torch.autograd.grad(reference, x_k, grad_outputs=adjoint)
        reference_means.append(reference.detach())
        kls.append(gaussian_kl(trajectory.means[step], reference.detach(), sigma,
                               config.kl_reduction))
    return AdjointRollout(
        states=trajectory.states,
        reference_means=torch.stack(reference_means[::-1]),
        targets=torch.stack(targets[::-1]),
        kl=torch.stack(kls[::-1]),
        log_likelihood=log_likelihood.detach(),
        adjoint_norms=torch.stack(norms[::-1]),
    )


@dataclass
class RegressionBatch:
    """What the regression needs of a rollout (detached): the states x_T .. x_1, mu_pre(x_k),
    the targets sigma_k^2 a_{k+1}, each (S, B, ...), and the batch's labels and contexts."""

    states: Tensor
    reference_means: Tensor
    targets: Tensor
    labels: dict[str, Tensor]
    contexts: Tensor | None

    @classmethod
    def of(cls, rollout: AdjointRollout, inputs: RolloutInputs) -> RegressionBatch:
        device = rollout.states.device
        return cls(rollout.states[:-1], rollout.reference_means, rollout.targets,
                   {name: values.to(device) for name, values in inputs.labels.items()},
                   None if inputs.contexts is None else inputs.contexts.to(device))

    @classmethod
    def concatenate(cls, batches: list[RegressionBatch]) -> RegressionBatch:
        contexts = [b.contexts for b in batches]
        return cls(torch.cat([b.states for b in batches], 1),
                   torch.cat([b.reference_means for b in batches], 1),
                   torch.cat([b.targets for b in batches], 1),
                   {name: torch.cat([b.labels[name] for b in batches])
                    for name in batches[0].labels},
                   None if contexts[0] is None else torch.cat(contexts))

    def rows(self, start: int, stop: int) -> RegressionBatch:
        """Samples start:stop of the batch."""
        return RegressionBatch(
            self.states[:, start:stop], self.reference_means[:, start:stop],
            self.targets[:, start:stop],
            {name: values[start:stop] for name, values in self.labels.items()},
            None if self.contexts is None else self.contexts[start:stop])

    def to(self, device: torch.device | str) -> RegressionBatch:
        return RegressionBatch(
            self.states.to(device), self.reference_means.to(device), self.targets.to(device),
            {name: values.to(device) for name, values in self.labels.items()},
            None if self.contexts is None else self.contexts.to(device))


def regression_backward(model, batch: RegressionBatch, config: AdjointConfig,
                        normaliser: int) -> float:
    """Accumulate into ``.grad`` the gradient of the regression loss / ``normaliser`` (one
    backward per step, so memory stays that of one network call); returns the loss."""
    num_steps = batch.states.shape[0]
    schedule = DenoisingSchedule.create(model.alphas_cumprod, num_steps, config.eta)
    min_timestep = getattr(model, "min_timestep", 0)
    total = 0.0
    for step in range(num_steps):
        if schedule.timesteps[step] < min_timestep:
            continue  # the policy is the base here: nothing to fit
        sigma = schedule.sigmas[step]
        mean = step_mean(schedule, step,
                         lambda x, t, c: model.predict_noise(x, t, c, batch.labels),
                         batch.states[step], batch.contexts, model.clip_sample)
        residual = mean - batch.reference_means[step] - batch.targets[step]
        loss = (residual**2).flatten(1).sum(1).sum() / (2 * sigma**2) / normaliser
        loss.backward()
        total += loss.item()
    return total


def adjoint_matching_loss(model, reward_fn: RewardFn, inputs: RolloutInputs,
                          config: AdjointConfig, normaliser: int
                          ) -> tuple[RegressionBatch, dict[str, float]]:
    """Roll out, run the adjoint pass and accumulate this shard's regression gradient /
    ``normaliser`` into ``.grad``; returns the regression batch and the metrics.

    With ``normaliser`` = the full batch size, the shards of a batch add up to the full batch.
    """
    rollout = adjoint_rollout(model, reward_fn, inputs, config)
    batch = RegressionBatch.of(rollout, inputs)
    loss = regression_backward(model, batch, config, normaliser)
    path_kl = rollout.kl.sum(0)
    return batch, {
        "loss": loss,
        "reward": rollout.log_likelihood.mean().item(),
        "kl": path_kl.mean().item(),
        "objective": (config.gamma * rollout.log_likelihood
                      - config.kl_weight * path_kl).mean().item(),
        "adjoint_norm_first": rollout.adjoint_norms[0].item(),
        "adjoint_norm_last": rollout.adjoint_norms[-1].item(),
        "num_samples": float(inputs.batch_size),
    }


# -- the update rule's two halves (see ctrl_ray.objectives) ---------------------------------
Config = AdjointConfig


def worker_step(model, reward_fn: RewardFn, inputs: RolloutInputs, config: AdjointConfig,
                normaliser: int, version: int) -> tuple[dict, dict]:
    """Roll out a shard and run its adjoint pass; the payload holds the regression gradients of
    loss_shard / normaliser and, for ``regression_steps`` > 1, the regression batch (on CPU)."""
    model.zero_grad(set_to_none=True)
    batch, metrics = adjoint_matching_loss(model, reward_fn, inputs, config, normaliser)
    payload = {"gradients": parameter_gradients(model)}
    if config.regression_steps > 1:
        payload["batch"] = batch.to("cpu")
    return payload, metrics


def learner_step(model, optimizer: torch.optim.Optimizer, payloads: list[dict],
                 config: AdjointConfig, generator: torch.Generator, version: int) -> dict:
    """Sum the shards' gradients and step; then the further regression steps on the pooled
    batch."""
    metrics = apply_gradients(model, optimizer, [p["gradients"] for p in payloads],
                              config.max_grad_norm)
    if config.regression_steps > 1:
        device = next(model.parameters()).device
        batch = RegressionBatch.concatenate([p["batch"] for p in payloads])
        size = batch.states.shape[1]   # the normaliser: each learner rank fits its share
        batch = batch.rows(*data_parallel.share_bounds(size)).to(device)
        for _ in range(config.regression_steps - 1):
            optimizer.zero_grad(set_to_none=True)
            metrics["loss_last"] = data_parallel.total(
                regression_backward(model, batch, config, size))
            clip_and_step(optimizer, config.max_grad_norm)
    return metrics


def train_step(model, optimizer: torch.optim.Optimizer, reward_fn: RewardFn,
               inputs: RolloutInputs, config: AdjointConfig) -> dict[str, float]:
    """One in-process adjoint-matching update on a full batch."""
    payload, metrics = worker_step(model, reward_fn, inputs, config, inputs.batch_size, 0)
    metrics.update(learner_step(model, optimizer, [payload], config, None, 0))
    return metrics
