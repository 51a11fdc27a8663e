"""A small calibrated CNN classifier for (B, C, H, W) images in [-1, 1] (C = 1 grayscale, the
default, or 3 RGB): training and storage.

It is the shared body of the CTRL reward model p(y | x0[, c]) and of the digit fidelity judge.
Calibration is temperature scaling: a single scalar T > 0 fitted on a held-out slice, so that
`log_probs = log_softmax(logits / T)` can be used as a reward.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ctrl_ray.errors import InputError
from ctrl_ray.storage import atomic_directory

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT_NAME = "ctrl_ray.classifier"
FORMAT_VERSION = 1
AUGMENTATIONS = ("shift", "hflip", "vflip")
ECE_BINS = 10
SELECTIONS = ("nll", "accuracy", "last")
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


class ImageClassifier(nn.Module):
    """Conv3x3 + GroupNorm + SiLU stages (stride 2 between them), global average pool, linear head.

    With `num_contexts` set, an embedding of the context c (e.g. the digit) is added to the pooled
    features, followed by SiLU, before the head, which models p(y | x, c). The calibration
    temperature is a non-persistent buffer: it is stored in `config.json`, not among the weights.
    """

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        stages: list[nn.Module] = []
        in_width = config.in_channels
        for index, width in enumerate(config.channels):
            stages.append(_conv_block(in_width, width, stride=1 if index == 0 else 2))
            stages.append(_conv_block(width, width, stride=1))
            in_width = width
        self.features = nn.Sequential(*stages)
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


# ----------------------------------------------------------------------------- training


@dataclass
class TrainingReport:
    """What `train_classifier` measured: accuracy, held-out NLL and ECE before/after calibration."""

    num_train: int
    num_val: int
    epochs: int
    best_epoch: int
    train_accuracy: float
    val_accuracy: float | None
    val_nll_uncalibrated: float | None
    val_nll_calibrated: float | None
    ece_uncalibrated: float | None
    ece_calibrated: float | None
    temperature: float
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def expected_calibration_error(log_probs: torch.Tensor, labels: torch.Tensor,
                               bins: int = ECE_BINS) -> float:
    """ECE with equal-width confidence bins: sum_b |B_b|/N * |accuracy_b - confidence_b|."""
    confidence, predicted = log_probs.exp().max(dim=1)
    correct = (predicted == labels).float()
    edges = torch.linspace(0.0, 1.0, bins + 1)
    bin_index = torch.bucketize(confidence, edges[1:-1], right=True)
    total = 0.0
    for index in range(bins):
        members = bin_index == index
        if members.any():
            gap = (correct[members].mean() - confidence[members].mean()).abs()
            total += float(members.float().mean() * gap)
    return total


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor,
                    prior_std: float | None = None) -> float:
    """The scalar T > 0 minimising NLL(log_softmax(logits / T), labels); LBFGS on log T.

    With `prior_std`, a Gaussian prior N(0, prior_std^2) on log T (MAP): on a held-out slice of
    tens of examples the plain fit is noisy and measured to hurt test NLL; the prior shrinks
    T towards 1 there and is negligible for hundreds. The fitted NLL never exceeds that at T = 1.
    """
    logits, labels = logits.detach().float(), labels.detach()
    log_temperature = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [log_temperature], lr=0.5, max_iter=100, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_temperature.exp(), labels, reduction="sum")
        if prior_std:
            loss = loss + log_temperature**2 / (2 * prior_std**2)
        loss.backward()
        return loss

    optimizer.step(closure)
    # Bounds keep a degenerate slice (e.g. all correct with huge margins) from yielding T -> 0.
    return float(log_temperature.detach().clamp(math.log(1e-2), math.log(1e2)).exp())


def _augment_batch(images: torch.Tensor, augment: Sequence[str],
                   generator: torch.Generator) -> torch.Tensor:
    """Random label-preserving transforms; `shift` moves each image by up to 1 pixel (fill -1)."""
    batch = images.shape[0]
    if "hflip" in augment:
        flip = torch.rand(batch, generator=generator) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(3), images)
    if "vflip" in augment:
        flip = torch.rand(batch, generator=generator) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(2), images)
    if "shift" in augment:
        size = images.shape[-1]
        padded = F.pad(images, (1, 1, 1, 1), value=-1.0)
        offsets = torch.randint(0, 3, (batch, 2), generator=generator)
        shifted = torch.empty_like(images)
        for dy in range(3):
            for dx in range(3):
                members = (offsets[:, 0] == dy) & (offsets[:, 1] == dx)
                if members.any():
                    shifted[members] = padded[members, :, dy:dy + size, dx:dx + size]
        images = shifted
    return images


def _normalise_augment(augment: bool | str | Sequence[str] | None) -> tuple[str, ...]:
    if augment is None or augment is False:
        return ()
    if augment is True:
        return ("shift",)
    names = (augment,) if isinstance(augment, str) else tuple(augment)
    unknown = [name for name in names if name not in AUGMENTATIONS]
    if unknown:
        raise InputError(
            f"augment: unknown augmentation(s) {unknown}; known: {list(AUGMENTATIONS)}"
        )
    return names


def _split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/val index split (plain random when a class is too rare to stratify)."""
    count = labels.shape[0]
    num_val = int(round(count * val_fraction))
    rng = np.random.default_rng(seed)
    if num_val == 0:
        return rng.permutation(count), np.zeros(0, dtype=np.int64)
    classes, class_counts = np.unique(labels, return_counts=True)
    if class_counts.min() < 2 or num_val < len(classes):
        order = rng.permutation(count)
        return np.sort(order[num_val:]), np.sort(order[:num_val])
    val_parts = []
    remaining = num_val
    # Largest-remainder allocation of the val slice across classes, at least one per class.
    shares = class_counts * num_val / count
    quotas = np.maximum(np.floor(shares).astype(int), 1)
    for index in np.argsort(-(shares - np.floor(shares))):
        if quotas.sum() >= num_val:
            break
        quotas[index] += 1
    for cls, quota in zip(classes, quotas, strict=True):
        members = rng.permutation(np.flatnonzero(labels == cls))
        take = int(min(quota, len(members) - 1, remaining))
        val_parts.append(members[:take])
        remaining -= take
    val_index = np.sort(np.concatenate(val_parts))
    train_index = np.setdiff1d(np.arange(count), val_index)
    return train_index, val_index


@torch.no_grad()
def _logits(model: ImageClassifier, images: torch.Tensor, contexts: torch.Tensor | None,
            device: torch.device, batch_size: int = 1024) -> torch.Tensor:
    model.eval()
    outputs = []
    for start in range(0, images.shape[0], batch_size):
        batch_contexts = None if contexts is None else contexts[start:start + batch_size].to(device)
        outputs.append(model(images[start:start + batch_size].to(device), batch_contexts).cpu())
    return torch.cat(outputs)


def train_classifier(
    images: Any,
    labels: Any,
    *,
    num_classes: int,
    contexts: Any = None,
    num_contexts: int | None = None,
    epochs: int = 40,
    batch_size: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    val_fraction: float = 0.2,
    augment: bool | str | Sequence[str] | None = True,
    channels: Sequence[int] = (16, 32, 64),
    dropout: float = 0.0,
    selection: str = "nll",
    temperature_prior_std: float | None = 0.25,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> tuple[ImageClassifier, TrainingReport]:
    """Train a calibrated `ImageClassifier` on (N, C, H, H) images in [-1, 1] and labels (N,).

    AdamW with a cosine learning rate; the epoch with the best held-out score (`selection`:
    lowest NLL, highest accuracy, or simply the last) is kept; then the temperature is fitted
    on the same held-out slice (see `fit_temperature` for `temperature_prior_std`).
    `augment` is True (= 1-pixel shifts), False, or a list of names from {shift, hflip, vflip}:
    choose only transforms that keep the label.
    The run is deterministic given `seed` and does not touch the global RNG state.
    """
    started = time.perf_counter()
    images = check_images(images)
    labels = check_indices(labels, int(num_classes), "labels", images.shape[0])
    if (contexts is None) != (num_contexts is None):
        raise InputError(
            f"contexts: give both contexts and num_contexts or neither "
            f"(num_contexts={num_contexts}, contexts {'missing' if contexts is None else 'given'})"
        )
    if contexts is not None:
        contexts = check_indices(contexts, int(num_contexts), "contexts", images.shape[0])
    for name, value, low in (("epochs", epochs, 1), ("batch_size", batch_size, 1)):
        if int(value) < low:
            raise InputError(f"{name}: need an integer >= {low}, got {value}")
    if not 0.0 <= float(val_fraction) < 1.0:
        raise InputError(f"val_fraction: need a value in [0, 1), got {val_fraction}")
    if not (float(lr) > 0 and math.isfinite(float(lr))):
        raise InputError(f"lr: need a finite value > 0, got {lr}")
    if selection not in SELECTIONS:
        raise InputError(f"selection: expected one of {list(SELECTIONS)}, got {selection!r}")
    if temperature_prior_std is not None and not float(temperature_prior_std) > 0:
        raise InputError(
            f"temperature_prior_std: need None or a value > 0, got {temperature_prior_std}"
        )
    augment = _normalise_augment(augment)
    config = ClassifierConfig(
        num_classes=int(num_classes),
        image_size=images.shape[-1],
        in_channels=images.shape[1],
        channels=tuple(channels),
        num_contexts=num_contexts,
        dropout=dropout,
    )
    device = torch.device(device)

    train_index, val_index = _split(labels.numpy(), float(val_fraction), seed)
    if train_index.size == 0:
        raise InputError(f"images: {images.shape[0]} examples leave nothing to train on")
    train_images, train_labels = images[train_index], labels[train_index]
    val_images, val_labels = images[val_index], labels[val_index]
    train_contexts = None if contexts is None else contexts[train_index]
    val_contexts = None if contexts is None else contexts[val_index]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ImageClassifier(config).to(device)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(train_index.size / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)

    best_state, best_score, best_epoch = None, math.inf, epochs
    history: list[dict[str, float]] = []
    epoch_range = range(1, epochs + 1)
    if progress:
        from tqdm.auto import tqdm

        epoch_range = tqdm(epoch_range, desc="classifier", unit="epoch")
    for epoch in epoch_range:
        model.train()
        order = torch.randperm(train_index.size, generator=generator)
        total_loss = 0.0
        for start in range(0, order.numel(), batch_size):
            batch = order[start:start + batch_size]
            inputs = train_images[batch]
            if augment:
                inputs = _augment_batch(inputs, augment, generator)
            batch_contexts = None if train_contexts is None else train_contexts[batch].to(device)
            loss = F.cross_entropy(model(inputs.to(device), batch_contexts),
                                   train_labels[batch].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += float(loss.detach()) * batch.numel()
        record = {"epoch": epoch, "train_loss": total_loss / train_index.size}
        if val_index.size:
            val_logits = _logits(model, val_images, val_contexts, device)
            val_nll = float(F.cross_entropy(val_logits, val_labels))
            record["val_nll"] = val_nll
            record["val_accuracy"] = float((val_logits.argmax(1) == val_labels).float().mean())
            score = {"nll": val_nll, "accuracy": -record["val_accuracy"], "last": -epoch}[selection]
            if score <= best_score:
                best_score, best_epoch = score, epoch
                best_state = copy.deepcopy(model.state_dict())
        history.append(record)
        if progress:
            epoch_range.set_postfix({k: round(v, 4) for k, v in record.items() if k != "epoch"})
    optimizer.zero_grad(set_to_none=True)
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()

    train_logits = _logits(model, train_images, train_contexts, device)
    train_accuracy = float((train_logits.argmax(1) == train_labels).float().mean())
    val_accuracy = nll_before = nll_after = ece_before = ece_after = None
    temperature = 1.0
    if val_index.size:
        val_logits = _logits(model, val_images, val_contexts, device)
        temperature = fit_temperature(val_logits, val_labels, temperature_prior_std)
        before = F.log_softmax(val_logits, dim=1)
        after = F.log_softmax(val_logits / temperature, dim=1)
        val_accuracy = float((val_logits.argmax(1) == val_labels).float().mean())
        nll_before = float(F.nll_loss(before, val_labels))
        nll_after = float(F.nll_loss(after, val_labels))
        ece_before = expected_calibration_error(before, val_labels)
        ece_after = expected_calibration_error(after, val_labels)
    model.set_temperature(temperature)
    report = TrainingReport(
        num_train=int(train_index.size),
        num_val=int(val_index.size),
        epochs=int(epochs),
        best_epoch=int(best_epoch),
        train_accuracy=train_accuracy,
        val_accuracy=val_accuracy,
        val_nll_uncalibrated=nll_before,
        val_nll_calibrated=nll_after,
        ece_uncalibrated=ece_before,
        ece_calibrated=ece_after,
        temperature=temperature,
        seconds=time.perf_counter() - started,
        history=history,
    )
    return model, report


# ----------------------------------------------------------------------------- storage


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def save_classifier(model: ImageClassifier, temperature: float | None, path_dir: str | os.PathLike,
                    extra_meta: dict[str, Any] | None = None) -> Path:
    """Write `model.safetensors` + `config.json` into `path_dir` atomically (tmp dir, rename).

    `temperature` defaults to the model's own; `extra_meta` (JSON-serialisable: label name,
    class edges, training report, ...) is stored under "meta" in `config.json`.
    """
    temperature = float(model.temperature) if temperature is None else float(temperature)
    if not (math.isfinite(temperature) and temperature > 0):
        raise InputError(f"temperature: need a finite value > 0, got {temperature}")
    document = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "temperature": temperature,
        "meta": extra_meta or {},
    }
    try:
        text = json.dumps(document, indent=2, default=_json_default, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise InputError(f"extra_meta: not JSON-serialisable ({error})") from error
    tensors = {
        name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()
    }
    with atomic_directory(path_dir) as staging:
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": FORMAT_NAME})
        (staging / CONFIG_FILE).write_text(text)
    return Path(path_dir)


def read_classifier_document(path_dir: str | os.PathLike) -> dict[str, Any]:
    """The parsed and checked `config.json` of a saved classifier directory."""
    directory = Path(path_dir)
    if not directory.is_dir():
        raise InputError(f"classifier directory: {str(directory)!r} does not exist")
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise InputError(f"classifier directory: {str(config_path)!r} is missing")
    try:
        document = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{str(config_path)!r}: not valid JSON ({error})") from error
    if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
        raise InputError(f"{str(config_path)!r}: format is not {FORMAT_NAME!r}")
    if document.get("format_version") != FORMAT_VERSION:
        raise InputError(
            f"{str(config_path)!r}: format_version {document.get('format_version')!r} "
            f"is not supported (expected {FORMAT_VERSION})"
        )
    for key in ("config", "temperature"):
        if key not in document:
            raise InputError(f"{str(config_path)!r}: key {key!r} is missing")
    return document


def load_classifier(path_dir: str | os.PathLike) -> tuple[ImageClassifier, dict[str, Any]]:
    """Load what `save_classifier` wrote: (eval-mode model with its temperature, meta)."""
    directory = Path(path_dir)
    document = read_classifier_document(directory)
    if not isinstance(document["config"], dict):
        raise InputError(f"{str(directory / CONFIG_FILE)!r}: 'config' is not a mapping")
    config = ClassifierConfig.from_dict(document["config"])
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise InputError(f"classifier weights: {str(weights_path)!r} is missing")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise InputError(
            f"classifier weights: {str(weights_path)!r} is corrupted ({error})"
        ) from error
    model = ImageClassifier(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise InputError(
            f"classifier weights: {str(weights_path)!r} does not match its config "
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
            f"temperature: {document['temperature']!r} in {str(directory / CONFIG_FILE)!r} "
            "is not a finite value > 0"
        ) from error
    model.eval()
    meta = document.get("meta") or {}
    return model, meta
