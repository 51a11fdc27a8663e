"""What every CTRL update rule shares: the objective's hyper-parameters and the optimizer.

Every rule maximises the same J = E[gamma log p(y | x0, c)] - kl_weight KL(P_theta || P_pre);
they differ only in how they estimate the step. A rule's config is a small subclass of
``ObjectiveConfig`` that adds its own knobs.
"""

from __future__ import annotations

import math

import torch

from ctrl_ray import data_parallel
from ctrl_ray.objectives.configs import ObjectiveConfig
from ctrl_ray.sampling.sampler import RolloutInputs


def draw_inputs(model, config: ObjectiveConfig, generator: torch.Generator | int,
                rows: tuple[int, int] | None = None) -> RolloutInputs:
    """One training batch's randomness (labels, contexts, noise, truncation window), on CPU;
    ``rows=(start, stop)``: only those rows (`RolloutInputs.draw`).

    `model` needs `sample_shape`, `label_classes`, `num_contexts`.
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
        rows=rows,
    )


def _learning_rates(config: ObjectiveConfig) -> dict[str, float]:
    """The configured rate of each parameter group (the optimizer's group names)."""
    return {"embedding": config.lr_embedding, "adapter": config.lr_adapter}


def make_optimizer(model, config: ObjectiveConfig) -> torch.optim.AdamW:
    """AdamW with one learning rate for the label embeddings and one for the adapters."""
    groups = model.trainable_parameter_groups()
    learning_rates = _learning_rates(config)
    param_groups = [
        {"params": groups[name], "lr": learning_rates[name], "name": name}
        for name in ("embedding", "adapter")
        if groups[name]
    ]
    return torch.optim.AdamW(param_groups, weight_decay=config.weight_decay)


def schedule_learning_rates(optimizer: torch.optim.Optimizer, config: ObjectiveConfig,
                            progress: float) -> float:
    """Set each group's rate for a run ``progress`` (0..1) of the way through; returns the
    factor. Stateless (a function of progress), so a resumed run continues the same schedule."""
    factor = 1.0
    if config.lr_schedule == "cosine":
        cosine = 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
        factor = config.lr_final_fraction + (1 - config.lr_final_fraction) * cosine
    rates = _learning_rates(config)
    for group in optimizer.param_groups:
        group["lr"] = rates[group["name"]] * factor
    return factor


def clip_and_step(optimizer: torch.optim.Optimizer, max_grad_norm: float | None) -> float:
    """Sum the gradients over the learner's ranks (`ctrl_ray.data_parallel`; nothing on one),
    clip them, step, and return the pre-clip norm."""
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    data_parallel.sum_gradients(parameters)
    max_norm = max_grad_norm if max_grad_norm is not None else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm).item()
    optimizer.step()
    return norm


def parameter_gradients(model) -> dict[str, torch.Tensor]:
    """The trainable parameters' ``.grad`` on CPU, by name (what a worker ships to the learner)."""
    return {name: p.grad.detach().cpu() for name, p in model.named_parameters()
            if p.requires_grad and p.grad is not None}


def apply_gradients(model, optimizer: torch.optim.Optimizer,
                    shards: list[dict[str, torch.Tensor]], max_grad_norm: float | None) -> dict:
    """Sum the shards' gradients (each already divided by the full batch size), clip, step;
    each learner rank sums its share of the shards."""
    optimizer.zero_grad(set_to_none=True)
    parameters = dict(model.named_parameters())
    (mine,), _ = data_parallel.share(shards)
    for gradients in mine:
        for name, gradient in gradients.items():
            parameter = parameters[name]
            gradient = gradient.to(parameter.device)
            parameter.grad = gradient if parameter.grad is None else parameter.grad + gradient
    return {"grad_norm": clip_and_step(optimizer, max_grad_norm)}
