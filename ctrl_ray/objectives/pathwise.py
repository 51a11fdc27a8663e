"""Pathwise CTRL (the paper's Algorithm 1): back-propagate reward and KL through the sampler.

For a batch of labels y, contexts c and noise, sample x_T -> x_0 with gradients and minimise

    loss = mean_b [ -gamma * log p(y_b | x0_b, c_b) + kl_weight * sum_t KL_t(b) ],

the negative of J = E[gamma log p(y | x0, c)] - kl_weight KL(P_theta || P_pre), whose optimum
samples from p_pre(x | c) p(y | x, c)^(gamma / kl_weight).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ctrl_ray.errors import InputError
from ctrl_ray.models.augmented import AugmentedModel
from ctrl_ray.sampling.sampler import KL_REDUCTIONS, RolloutInputs, Truncation, sample

# reward_fn(x0, labels, contexts) -> log p(y | x0, c), shape (B,), differentiable in x0.
RewardFn = Callable[[Tensor, Mapping[str, Tensor], Tensor | None], Tensor]


@dataclass
class PathwiseConfig:
    """Hyper-parameters of pathwise CTRL fine-tuning."""

    gamma: float = 1.0
    kl_weight: float = 1.0
    kl_reduction: str = "sum"
    batch_size: int = 64
    num_inference_steps: int = 50
    eta: float = 1.0
    truncation: Truncation = field(default_factory=Truncation)
    checkpoint: bool = True
    lr_embedding: float = 1e-3
    lr_adapter: float = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    label_distribution: Sequence[float] | Mapping[str, Sequence[float]] | None = None
    context_distribution: Sequence[float] | None = None

    def __post_init__(self):
        if isinstance(self.truncation, Mapping):
            self.truncation = Truncation(**self.truncation)
        if self.kl_reduction not in KL_REDUCTIONS:
            raise InputError(
                f"kl_reduction must be one of {KL_REDUCTIONS}, got {self.kl_reduction!r}"
            )
        for name in ("batch_size", "num_inference_steps"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("kl_weight", "lr_embedding", "lr_adapter", "weight_decay"):
            if getattr(self, name) < 0:
                raise InputError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.eta <= 0:
            raise InputError(f"eta must be > 0 for the per-step KL, got {self.eta}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise InputError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")


def draw_inputs(model, config, generator: torch.Generator | int) -> RolloutInputs:
    """One training batch's randomness (labels, contexts, noise, truncation window), on CPU.

    `model` needs `sample_shape`, `label_classes`, `num_contexts`; `config` is a pathwise or
    PPO config (PPO has no truncation window).
    """
    return RolloutInputs.draw(
        generator,
        batch_size=config.batch_size,
        num_steps=config.num_inference_steps,
        sample_shape=model.sample_shape,
        label_classes=model.label_classes,
        label_distribution=config.label_distribution,
        num_contexts=model.num_contexts,
        context_distribution=config.context_distribution,
        truncation=getattr(config, "truncation", None),
    )


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


def make_optimizer(model: AugmentedModel, config: PathwiseConfig) -> torch.optim.AdamW:
    """AdamW with one learning rate for the label embeddings and one for the adapters."""
    groups = model.trainable_parameter_groups()
    learning_rates = {"embedding": config.lr_embedding, "adapter": config.lr_adapter}
    param_groups = [
        {"params": groups[name], "lr": learning_rates[name], "name": name}
        for name in ("embedding", "adapter")
        if groups[name]
    ]
    return torch.optim.AdamW(param_groups, weight_decay=config.weight_decay)


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


def clip_and_step(optimizer: torch.optim.Optimizer, max_grad_norm: float | None) -> float:
    """Clip the gradients of the optimizer's parameters, step, and return the pre-clip norm."""
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    max_norm = max_grad_norm if max_grad_norm is not None else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm).item()
    optimizer.step()
    return norm
