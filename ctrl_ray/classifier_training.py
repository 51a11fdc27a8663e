"""Training and calibration of the classifiers ctrl-ray uses: the CNN body
(`train_classifier`: AdamW, best held-out epoch, temperature scaling) and the judges trained
from it (the digit fidelity judge, the judge of a label without an oracle).

The models themselves and their storage live in `ctrl_ray.models` (classifier, judge); this
module sits above them, as `ctrl_ray.reward_training` does for the reward.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ctrl_ray.errors import InputError
from ctrl_ray.models.classifier import (
    ClassifierConfig,
    ImageClassifier,
    check_images,
    check_indices,
)
from ctrl_ray.models.judge import NUM_DIGITS, DigitJudge, LabelJudge
from ctrl_ray.reward_config import LabelJudgeConfig

AUGMENTATIONS = ("shift", "hflip", "vflip", "noise")
ECE_BINS = 10
SELECTIONS = ("nll", "accuracy", "last")


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
    """Random label-preserving transforms; `shift` moves each image by up to 1 pixel (fill -1);
    `noise` adds Gaussian pixel noise of a per-image scale drawn from U(0, 0.3), so the
    classifier's gradient follows the data rather than non-robust pixel patterns."""
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
    if "noise" in augment:
        scale = 0.3 * torch.rand(batch, 1, 1, 1, generator=generator)
        noise = scale * torch.randn(images.shape, generator=generator)
        images = images + noise.to(images.device)
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


# ----------------------------------------------------------------------------- judges


def train_digit_judge(
    images: Any,
    digits: Any,
    *,
    seed: int = 0,
    epochs: int = 20,
    batch_size: int = 64,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    val_fraction: float = 0.15,
    channels: Sequence[int] = (16, 32, 64),
    augment: bool = True,
    progress: bool = False,
) -> tuple[DigitJudge, TrainingReport]:
    """Train the judge on real digits with random 1-pixel shifts (flips would change digits)."""
    classifier, report = train_classifier(
        images,
        digits,
        num_classes=NUM_DIGITS,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        seed=seed,
        val_fraction=val_fraction,
        augment=("shift",) if augment else (),
        channels=channels,
        progress=progress,
    )
    return DigitJudge(classifier, {"report": report.to_dict()}), report


def train_label_judge(images: Any, labels: Any, *, label_name: str, num_classes: int,
                      class_names: Sequence[str] | None = None,
                      config: LabelJudgeConfig | None = None,
                      progress: bool = False) -> tuple[LabelJudge, TrainingReport]:
    """Train the judge of a label without an oracle on held-out pairs (no augmentation: which
    transforms keep a user's label is unknown)."""
    config = config or LabelJudgeConfig()
    labels = np.asarray(labels)
    counts = np.bincount(labels, minlength=num_classes)
    if (counts == 0).any():
        missing = int(np.argmin(counts))
        name = class_names[missing] if class_names else str(missing)
        raise InputError(f"judge: the held-out rows have no image of class {name!r}; a judge "
                         f"needs every class (import with a larger --heldout)")
    classifier, report = train_classifier(
        images, labels, num_classes=num_classes, epochs=config.epochs,
        lr=config.lr, seed=config.seed, val_fraction=config.val_fraction, augment=False,
        channels=config.channels, selection="accuracy", progress=progress,
    )
    judge = LabelJudge(classifier, label_name, class_names, {"report": report.to_dict()})
    return judge, report
