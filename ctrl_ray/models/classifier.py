"""A small calibrated CNN classifier for (B, C, H, W) images in [-1, 1] (C = 1 grayscale, the
default, or 3 RGB): the model, its input checks and its storage.

It is the shared body of the CTRL reward model p(y | x0[, c]) and of the judges. Calibration is
temperature scaling: a single scalar T > 0 (fitted on a held-out slice by
`ctrl_ray.classifier_training`), so that `log_probs = log_softmax(logits / T)` can be a reward.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ctrl_ray.errors import InputError
from ctrl_ray.storage import WEIGHTS_FILE, load_artifact, save_artifact

CONFIG_FILE = "config.json"
FORMAT_NAME = "ctrl_ray.classifier"
FORMAT_VERSION = 1
IMAGE_CHANNELS = (1, 3)


@dataclass
class ClassifierConfig:
    """Architecture of an `ImageClassifier`; one resolution stage per entry of `channels`."""

    num_classes: int
    image_size: int = 16
    channels: tuple[int, ...] = (16, 32, 64)
    num_contexts: int | None = None
    dropout: float = 0.0
    in_channels: int = 1

    def __post_init__(self) -> None:
        self.channels = tuple(int(width) for width in self.channels)
        if int(self.num_classes) < 2:
            raise InputError(f"num_classes: need at least 2 classes, got {self.num_classes}")
        if int(self.image_size) < 4:
            raise InputError(f"image_size: need at least 4 pixels, got {self.image_size}")
        if not self.channels or min(self.channels) < 1:
            raise InputError(f"channels: need positive widths, got {list(self.channels)}")
        if self.num_contexts is not None and int(self.num_contexts) < 1:
            raise InputError(f"num_contexts: need None or >= 1, got {self.num_contexts}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise InputError(f"dropout: need a value in [0, 1), got {self.dropout}")
        if self.in_channels not in IMAGE_CHANNELS:
            raise InputError(f"in_channels: need 1 or 3, got {self.in_channels!r}")
        self.num_classes = int(self.num_classes)
        self.image_size = int(self.image_size)
        self.num_contexts = None if self.num_contexts is None else int(self.num_contexts)
        self.dropout = float(self.dropout)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["channels"] = list(self.channels)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClassifierConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"classifier config: unknown key(s) {unknown}")
        return cls(**data)


def _num_groups(width: int) -> int:
    return next(groups for groups in (8, 4, 2, 1) if width % groups == 0)


def _conv_block(in_width: int, out_width: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_width, out_width, kernel_size=3, stride=stride, padding=1),
        nn.GroupNorm(_num_groups(out_width), out_width),
        nn.SiLU(),
    )


def conv_stages(in_channels: int, channels: tuple[int, ...] | list[int]) -> nn.Sequential:
    """Two conv blocks per width (stride 2 into every stage after the first), for any number of
    input channels: the classifiers' body and the value head's (latents have 4 or 16)."""
    blocks: list[nn.Module] = []
    in_width = in_channels
    for index, width in enumerate(channels):
        blocks.append(_conv_block(in_width, width, stride=1 if index == 0 else 2))
        blocks.append(_conv_block(width, width, stride=1))
        in_width = width
    return nn.Sequential(*blocks)


class ImageClassifier(nn.Module):
    """Conv3x3 + GroupNorm + SiLU stages (stride 2 between them), global average pool, linear head.

    With `num_contexts` set, an embedding of the context c (e.g. the digit) is added to the pooled
    features, followed by SiLU, before the head, which models p(y | x, c). The calibration
    temperature is a non-persistent buffer: it is stored in `config.json`, not among the weights.
    """

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        self.features = conv_stages(config.in_channels, config.channels)
        in_width = config.channels[-1]
        self.context_embedding = (
            nn.Embedding(config.num_contexts, in_width) if config.num_contexts is not None else None
        )
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(in_width, config.num_classes)
        self.register_buffer("temperature", torch.ones(()), persistent=False)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def uses_context(self) -> bool:
        return self.config.num_contexts is not None

    def set_temperature(self, temperature: float) -> None:
        temperature = float(temperature)
        if not (math.isfinite(temperature) and temperature > 0):
            raise InputError(f"temperature: need a finite value > 0, got {temperature}")
        self.temperature.fill_(temperature)

    def forward(self, images: torch.Tensor, contexts: torch.Tensor | None = None) -> torch.Tensor:
        """Uncalibrated logits (B, K)."""
        size, channels = self.config.image_size, self.config.in_channels
        if images.ndim != 4 or images.shape[1] != channels or \
                tuple(images.shape[2:]) != (size, size):
            raise InputError(
                f"images: expected shape (B, {channels}, {size}, {size}), "
                f"got {tuple(images.shape)}"
            )
        pooled = self.features(images).mean(dim=(2, 3))
        if self.context_embedding is not None:
            if contexts is None:
                raise InputError("contexts: this classifier is conditional on c; got None")
            embedded = self.context_embedding(check_indices(
                contexts, self.config.num_contexts, "contexts", images.shape[0]
            ).to(images.device))
            # The nonlinearity lets c interact with the image features, not just shift the logits.
            pooled = F.silu(pooled + embedded)
        elif contexts is not None:
            raise InputError("contexts: this classifier takes no context; pass contexts=None")
        return self.head(self.dropout(pooled))

    def log_probs(self, images: torch.Tensor, contexts: torch.Tensor | None = None) -> torch.Tensor:
        """Calibrated log-probabilities (B, K): log_softmax(logits / T)."""
        return F.log_softmax(self(images, contexts) / self.temperature, dim=-1)


# ----------------------------------------------------------------------------- input checks


def check_images(images: Any, field_name: str = "images") -> torch.Tensor:
    """Return `images` as a float32 tensor (N, C, H, H), C = 1 or 3, rejecting NaN and bad
    shapes."""
    if isinstance(images, np.ndarray):
        if images.dtype.kind not in "fiu":
            raise InputError(f"{field_name}: expected a numeric array, got dtype {images.dtype}")
        images = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    elif not isinstance(images, torch.Tensor):
        raise InputError(
            f"{field_name}: expected a numpy array or torch tensor, got {type(images).__name__}"
        )
    if images.ndim != 4 or images.shape[1] not in IMAGE_CHANNELS or \
            images.shape[2] != images.shape[3]:
        raise InputError(
            f"{field_name}: expected shape (N, 1, H, H) or (N, 3, H, H), "
            f"got {tuple(images.shape)}"
        )
    if images.shape[0] == 0:
        raise InputError(f"{field_name}: got an empty batch")
    images = images.float()
    if not torch.isfinite(images).all():
        bad = int(torch.nonzero(~torch.isfinite(images.flatten(1)).all(dim=1))[0])
        raise InputError(f"{field_name}: image {bad} contains NaN or infinite values")
    return images


def check_indices(values: Any, upper: int, field_name: str,
                  length: int | None = None) -> torch.Tensor:
    """Integer class indices (N,) in [0, upper) as a long tensor; `length` pins N when given."""
    if isinstance(values, np.ndarray) or not isinstance(values, torch.Tensor):
        array = np.asarray(values)
        if array.dtype.kind not in "iu":
            raise InputError(
                f"{field_name}: expected integer class indices, got dtype {array.dtype}"
            )
        values = torch.from_numpy(array.astype(np.int64))
    elif values.dtype.is_floating_point or values.dtype == torch.bool or values.is_complex():
        raise InputError(f"{field_name}: expected integer class indices, got dtype {values.dtype}")
    values = values.long()
    if values.ndim != 1 or (length is not None and values.shape[0] != length):
        raise InputError(
            f"{field_name}: expected shape ({length if length is not None else 'N'},), "
            f"got {tuple(values.shape)}"
        )
    if values.numel():
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= upper:
            bad = low if low < 0 else high
            raise InputError(f"{field_name}: value {bad} is outside the classes 0..{upper - 1}")
    return values


# ----------------------------------------------------------------------------- storage


def save_classifier(model: ImageClassifier, temperature: float | None, path_dir: str | os.PathLike,
                    extra_meta: dict[str, Any] | None = None) -> Path:
    """Write `model.safetensors` + `config.json` into `path_dir` atomically (`save_artifact`).

    `temperature` defaults to the model's own; `extra_meta` (JSON-serialisable: label name,
    class edges, training report, ...) is stored under "meta" in `config.json`.
    """
    temperature = float(model.temperature) if temperature is None else float(temperature)
    if not (math.isfinite(temperature) and temperature > 0):
        raise InputError(f"temperature: need a finite value > 0, got {temperature}")
    document = {"format_version": FORMAT_VERSION, "config": model.config.to_dict(),
                "temperature": temperature, "meta": extra_meta or {}}
    return save_artifact(path_dir, FORMAT_NAME, document, model.state_dict(), index=CONFIG_FILE)


def load_classifier(path_dir: str | os.PathLike, kind: str | None = None,
                    what: str = "classifier") -> tuple[ImageClassifier, dict[str, Any]]:
    """Load what `save_classifier` wrote: (eval-mode model with its temperature, meta).

    With `kind`, the meta must name that kind (a reward, a judge, ...): else an InputError
    saying the folder is not a `what`.
    """
    directory = Path(path_dir)
    config_path = directory / CONFIG_FILE
    document, tensors = load_artifact(directory, FORMAT_NAME, "classifier", index=CONFIG_FILE)
    if document.get("format_version") != FORMAT_VERSION:
        raise InputError(
            f"{str(config_path)!r}: format_version {document.get('format_version')!r} "
            f"is not supported (expected {FORMAT_VERSION})"
        )
    for key in ("config", "temperature"):
        if key not in document:
            raise InputError(f"{str(config_path)!r}: key {key!r} is missing")
    if not isinstance(document["config"], dict):
        raise InputError(f"{str(config_path)!r}: 'config' is not a mapping")
    meta = document.get("meta") or {}
    if kind is not None and meta.get("kind") != kind:
        raise InputError(f"{what} directory: {str(directory)!r} holds a classifier of kind "
                         f"{meta.get('kind')!r}, not a {what}")
    model = ImageClassifier(ClassifierConfig.from_dict(document["config"]))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise InputError(
            f"classifier weights: {str(directory / WEIGHTS_FILE)!r} does not match its config "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise InputError(
                f"classifier weights: {name!r} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(expected[name].shape)}"
            )
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise InputError(f"classifier weights: {name!r} contains NaN or infinite values")
    model.load_state_dict(tensors)
    try:
        model.set_temperature(float(document["temperature"]))
    except (TypeError, ValueError) as error:
        raise InputError(
            f"temperature: {document['temperature']!r} in {str(config_path)!r} "
            "is not a finite value > 0"
        ) from error
    model.eval()
    return model, meta
