"""Pathwise CTRL (the paper's Algorithm 1): back-propagate reward and KL through the sampler.

For a batch of labels y, contexts c and noise, sample x_T -> x_0 with gradients and minimise

    loss = mean_b [ -gamma * log p(y_b | x0_b, c_b) + kl_weight * sum_t KL_t(b) ],

the negative of J = E[gamma log p(y | x0, c)] - kl_weight KL(P_theta || P_pre), whose optimum
samples from p_pre(x | c) p(y | x, c)^(gamma / kl_weight).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from ctrl_ray.errors import InputError
from ctrl_ray.models.augmented import AugmentedModel
from ctrl_ray.objectives.base import (
    apply_gradients,
    clip_and_step,
    draw_inputs,
    make_optimizer,
    parameter_gradients,
)
from ctrl_ray.objectives.configs import PathwiseConfig
from ctrl_ray.sampling.sampler import RolloutInputs, sample

__all__ = ["PathwiseConfig", "RewardFn", "clip_and_step", "draw_inputs", "make_optimizer",
           "pathwise_loss", "train_step"]

# reward_fn(x0, labels, contexts) -> log p(y | x0, c), shape (B,), differentiable in x0.
RewardFn = Callable[[Tensor, Mapping[str, Tensor], Tensor | None], Tensor]



def pathwise_loss(
    model: AugmentedModel,
    reward_fn: RewardFn,
    inputs: RolloutInputs,
    config: PathwiseConfig,
    normaliser: int,
) -> tuple[Tensor, dict[str, float]]:
    """The loss of one shard, summed over its samples and divided by ``normaliser``.

    With ``normaliser`` = the full batch size, the gradients of the shards of a batch add up
    to the gradient of the full-batch mean loss exactly.
    """
    if inputs.num_steps != config.num_inference_steps:
        raise InputError(
            f"inputs have {inputs.num_steps} steps of noise but num_inference_steps is "
            f"{config.num_inference_steps}"
        )
    gradient_steps = inputs.gradient_steps
    if gradient_steps is None:  # inputs drawn without a window: shards must then share a fixed one
        gradient_steps = config.truncation.gradient_steps(inputs.num_steps)
    trajectory = sample(
        model,
        inputs,
        eta=config.eta,
        kl_reduction=config.kl_reduction,
        differentiable=True,
        gradient_steps=gradient_steps,
        checkpoint=config.checkpoint,
    )
    log_likelihood = reward_fn(trajectory.x0, trajectory.labels, trajectory.contexts)
    path_kl = trajectory.path_kl
    loss = (-config.gamma * log_likelihood + config.kl_weight * path_kl).sum() / normaliser
    metrics = {
        "loss": loss.item(),
        "reward": log_likelihood.mean().item(),
        "kl": path_kl.mean().item(),
        "num_samples": float(inputs.batch_size),
    }
    return loss, metrics


def train_step(
    model: AugmentedModel,
    optimizer: torch.optim.Optimizer,
    reward_fn: RewardFn,
    inputs: RolloutInputs,
    config: PathwiseConfig,
) -> dict[str, float]:
    """One pathwise update on a full batch: zero_grad, backward, clip, step."""
    optimizer.zero_grad(set_to_none=True)
    loss, metrics = pathwise_loss(model, reward_fn, inputs, config, normaliser=inputs.batch_size)
    loss.backward()
    metrics["grad_norm"] = clip_and_step(optimizer, config.max_grad_norm)
    return metrics


# -- the update rule's two halves (see ctrl_ray.objectives) ---------------------------------
Config = PathwiseConfig


def worker_step(model: AugmentedModel, reward_fn: RewardFn, inputs: RolloutInputs,
                config: PathwiseConfig, normaliser: int, version: int) -> tuple[dict, dict]:
    """Sample a shard with gradients; its adapter gradients (of loss_shard / normaliser)."""
    model.zero_grad(set_to_none=True)
    loss, metrics = pathwise_loss(model, reward_fn, inputs, config, normaliser)
    loss.backward()
    return parameter_gradients(model), metrics


def learner_step(model: AugmentedModel, optimizer: torch.optim.Optimizer, payloads: list[dict],
                 config: PathwiseConfig, generator: torch.Generator, version: int) -> dict:
    """Sum the shards' gradients and step."""
    return apply_gradients(model, optimizer, payloads, config.max_grad_norm)
