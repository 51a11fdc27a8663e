"""Classifier-free guidance (Ho & Salimans): one conditional network trained on triplets.

The network is CTRL's augmented model (zero-started label embeddings + LoRA on the frozen base,
null label = K), but trained with the DDPM noise-prediction loss on triplets (x, c, y) instead
of RL: the pairs only store (x, y), so c (the digit) is looked up in the dataset the pairs were
drawn from. Each label is replaced by null with probability ``p_uncond``, so the same network
learns eps(x_t, c, y) and eps(x_t, c, null); sampling uses eps_u + w (eps_c - eps_u).
Several pair sets (one label each) give rows whose other labels are null.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ctrl_ray.baseline_config import CFGTrainingConfig
from ctrl_ray.baselines import GuidedModel
from ctrl_ray.data.digits import DigitsDataset
from ctrl_ray.data.pairs import PairSet
from ctrl_ray.errors import InputError
from ctrl_ray.models.augmented import AugmentedModel


@dataclass
class Triplets:
    """Images (N, 1, H, W), contexts c (N,) and labels name -> (N,) long (value K = null)."""

    images: Tensor
    contexts: Tensor
    labels: dict[str, Tensor]
    label_classes: dict[str, int]

    def __len__(self) -> int:
        return self.images.shape[0]

    def label_counts(self) -> dict[str, int]:
        """How many rows carry each label (not null): the y-labels CFG was given."""
        return {name: int((values != self.label_classes[name]).sum())
                for name, values in self.labels.items()}


def build_triplets(pair_sets: Sequence[PairSet], dataset: DigitsDataset) -> Triplets:
    """Stack the pair sets into triplets, looking up each image's digit in the train split.

    A pair image is matched by its exact pixels (the pairs are rows of the train split); a row
    of one pair set has the labels of the other sets set to null.
    """
    if not pair_sets:
        raise InputError("pairs: CFG needs at least one pair set")
    train = dataset.subset("train")
    digit_of = {image.tobytes(): int(digit) for image, digit in zip(train.images, train.digits,
                                                                      strict=True)}
    label_classes: dict[str, int] = {}
    for pairs in pair_sets:
        known = label_classes.setdefault(pairs.label_name, pairs.num_classes)
        if known != pairs.num_classes:
            raise InputError(f"pairs: label {pairs.label_name!r} has {known} classes in one set "
                             f"and {pairs.num_classes} in another")
    images, contexts = [], []
    labels: dict[str, list[np.ndarray]] = {name: [] for name in label_classes}
    for index, pairs in enumerate(pair_sets):
        if tuple(pairs.image_shape) != tuple(dataset.image_shape):
            raise InputError(f"pairs[{index}]: images of shape {pairs.image_shape} do not match "
                             f"the dataset's {dataset.image_shape}")
        for row, image in enumerate(pairs.images):
            digit = digit_of.get(np.ascontiguousarray(image, np.float32).tobytes())
            if digit is None:
                raise InputError(f"pairs[{index}]: image {row} is not in the train split of the "
                                 f"dataset, so its digit c is unknown")
            contexts.append(digit)
        images.append(pairs.images)
        for name, num_classes in label_classes.items():
            values = pairs.labels if name == pairs.label_name else np.full(len(pairs), num_classes)
            labels[name].append(np.asarray(values, np.int64))
    return Triplets(
        images=torch.from_numpy(np.concatenate(images)).float(),
        contexts=torch.tensor(contexts, dtype=torch.long),
        labels={name: torch.from_numpy(np.concatenate(parts)) for name, parts in labels.items()},
        label_classes=label_classes,
    )


def train_cfg(model: AugmentedModel, triplets: Triplets, config: CFGTrainingConfig,
              progress: bool = False, log_fn=None) -> dict:
    """Fit the label embeddings and adapters of ``model`` with the DDPM loss and label dropout.

    Each step draws a batch of triplets, a timestep t ~ U{0..T-1} and noise, drops every label
    to null with probability p_uncond, and regresses the noise. ``log_fn(metrics, step)`` is
    called every 50 steps (e.g. ``mlflow.log_metrics``). Returns the loss history and seconds.
    """
    if set(triplets.label_classes) != set(model.label_classes):
        raise InputError(f"the CFG model has labels {sorted(model.label_classes)}, the triplets "
                         f"{sorted(triplets.label_classes)}")
    generator = torch.Generator().manual_seed(config.seed)
    groups = model.trainable_parameter_groups()
    optimizer = torch.optim.AdamW(
        [{"params": groups["embedding"], "lr": config.lr_embedding},
         {"params": groups["adapter"], "lr": config.lr_adapter}],
        weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / config.steps)))
    parameters = [p for group in groups.values() for p in group]
    alphas = model.alphas_cumprod
    device = alphas.device
    num_rows, num_timesteps = len(triplets), len(alphas)
    start = time.perf_counter()
    history, running = [], 0.0
    steps = range(config.steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="cfg", unit="step")
    for step in steps:
        rows = torch.randint(0, num_rows, (config.batch_size,), generator=generator)
        x0 = triplets.images[rows]
        labels = {}
        for name, values in triplets.labels.items():
            drop = torch.rand(config.batch_size, generator=generator) < config.p_uncond
            null = torch.full_like(values[rows], triplets.label_classes[name])
            labels[name] = torch.where(drop, null, values[rows]).to(device)
        t = torch.randint(0, num_timesteps, (config.batch_size,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        alpha = alphas.cpu()[t].view(-1, 1, 1, 1)
        x_t = alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise
        prediction = model.predict_noise(x_t.to(device), t.to(device),
                                         triplets.contexts[rows].to(device), labels)
        loss = F.mse_loss(prediction, noise.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
        optimizer.step()
        schedule.step()
        running += loss.item()
        if (step + 1) % 50 == 0 or step + 1 == config.steps:
            count = (step % 50) + 1
            record = {"cfg_loss": running / count}
            history.append({"step": step + 1, **record})
            if log_fn is not None:
                log_fn(record, step + 1)
            running = 0.0
    optimizer.zero_grad(set_to_none=True)
    model.eval()
    return {"history": history, "seconds": time.perf_counter() - start,
            "final_loss": history[-1]["cfg_loss"] if history else float("nan")}


class CFGModel(GuidedModel):
    """eps = eps(x_t, c, null) + w (eps(x_t, c, y) - eps(x_t, c, null)), one batched call.

    w = 1 is the conditional network alone, w = 0 its unconditional half; rows whose labels
    are all null get eps(x_t, c, null). The KL the sampler reports is to the pre-trained model
    (adapters off), not to the fine-tuned unconditional network.
    """

    def __init__(self, model: AugmentedModel, guidance_scale: float):
        super().__init__(model, model.label_classes, guidance_scale)

    def guided_noise(self, x_t: Tensor, t: Tensor, context: Tensor | None,
                     labels: dict[str, Tensor]) -> Tensor:
        if not labels:
            return self.model.predict_noise(x_t, t, context, None)
        batch = x_t.shape[0]
        null = {name: torch.full_like(values, self.label_classes[name])
                for name, values in labels.items()}
        both = {name: torch.cat([labels[name], null[name]]) for name in labels}
        doubled_context = None if context is None else torch.cat([context, context])
        eps = self.model.predict_noise(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                       doubled_context, both)
        conditional, unconditional = eps[:batch], eps[batch:]
        return unconditional + self.guidance_scale * (conditional - unconditional)
