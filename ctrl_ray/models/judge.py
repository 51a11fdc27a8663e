"""Judges: classifiers that score generated samples where no exact function does.

`DigitJudge` is the digit fidelity judge: a 10-class classifier on real digits that checks
whether a generated sample shows the digit c it was asked for (fidelity = accuracy against the
requested digits). `LabelJudge` scores a user's own label y that has no built-in oracle: it is
trained on the pair set's held-out rows only (never on the reward's training rows), so the
policy is not graded by the same data its reward learned from.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctrl_ray.errors import InputError
from ctrl_ray.models.classifier import (
    ImageClassifier,
    TrainingReport,
    check_images,
    check_indices,
    load_classifier,
    save_classifier,
    train_classifier,
)

JUDGE_KIND = "digit_judge"
LABEL_JUDGE_KIND = "label_judge"
NUM_DIGITS = 10


class DigitJudge:
    """Predicts digits 0..9 from (N, 1, H, H) images in [-1, 1] (numpy or torch in, numpy out)."""

    def __init__(self, classifier: ImageClassifier, meta: dict[str, Any] | None = None) -> None:
        self.classifier = classifier.eval().requires_grad_(False)
        self.meta = dict(meta or {})

    @property
    def image_size(self) -> int:
        return self.classifier.config.image_size

    def to(self, device: str | torch.device) -> DigitJudge:
        self.classifier.to(device)
        return self

    @torch.no_grad()
    def probabilities(self, images: Any, batch_size: int = 512) -> np.ndarray:
        """Calibrated class probabilities (N, 10)."""
        images = check_images(images)
        if images.shape[-1] != self.image_size:
            raise InputError(
                f"images: the judge was trained on {self.image_size}x{self.image_size} images, "
                f"got shape {tuple(images.shape)}"
            )
        device = next(self.classifier.parameters()).device
        chunks = [
            self.classifier.log_probs(images[start:start + batch_size].to(device)).exp().cpu()
            for start in range(0, images.shape[0], batch_size)
        ]
        return torch.cat(chunks).numpy()

    def predict(self, images: Any, batch_size: int = 512) -> np.ndarray:
        """Predicted digit per image, int64 array (N,)."""
        return self.probabilities(images, batch_size).argmax(axis=1).astype(np.int64)

    def fidelity(self, images: Any, target_digits: Any) -> float:
        """Fraction of images whose predicted digit equals the requested one."""
        predicted = self.predict(images)
        targets = check_indices(target_digits, NUM_DIGITS, "target_digits", predicted.shape[0])
        return float((predicted == targets.numpy()).mean())

    def save(self, path_dir: str | os.PathLike) -> Path:
        meta = dict(self.meta)
        meta.update(kind=JUDGE_KIND, num_classes=NUM_DIGITS)
        return save_classifier(self.classifier, None, path_dir, meta)

    @classmethod
    def load(cls, path_dir: str | os.PathLike) -> DigitJudge:
        classifier, meta = load_classifier(path_dir)
        if meta.get("kind") != JUDGE_KIND or classifier.num_classes != NUM_DIGITS:
            raise InputError(
                f"judge directory: {str(path_dir)!r} holds a classifier of kind "
                f"{meta.get('kind')!r} with {classifier.num_classes} classes, not a digit judge"
            )
        return cls(classifier, meta)


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


@dataclass
class LabelJudgeConfig:
    """How the judge of a label without an oracle is trained on the held-out pairs."""

    enabled: bool = True
    epochs: int = 40
    channels: tuple[int, ...] = (16, 32)
    lr: float = 3e-3
    val_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        self.channels = tuple(int(width) for width in self.channels)
        if int(self.epochs) < 1:
            raise InputError(f"judge.epochs: need an integer >= 1, got {self.epochs}")
        if not 0.0 < float(self.val_fraction) < 1.0:
            raise InputError(f"judge.val_fraction: need a value in (0, 1), got "
                             f"{self.val_fraction}")


class LabelJudge:
    """Predicts the classes of a user's label from (N, C, H, H) images in [-1, 1]."""

    def __init__(self, classifier: ImageClassifier, label_name: str,
                 class_names: Sequence[str] | None = None,
                 meta: dict[str, Any] | None = None) -> None:
        self.classifier = classifier.eval().requires_grad_(False)
        self.label_name = label_name
        self.class_names = list(class_names or [])
        self.meta = dict(meta or {})

    @property
    def num_classes(self) -> int:
        return self.classifier.num_classes

    @property
    def image_size(self) -> int:
        return self.classifier.config.image_size

    @property
    def in_channels(self) -> int:
        return self.classifier.config.in_channels

    @torch.no_grad()
    def predict(self, images: Any, batch_size: int = 512) -> np.ndarray:
        """Predicted class per image, int64 (N,); images are resized / converted to luma to
        the judge's own size and channels like the reward's view of them."""
        from ctrl_ray.models.text_to_image import reward_view

        images = reward_view(check_images(images), self.in_channels, self.image_size)
        device = next(self.classifier.parameters()).device
        chunks = [self.classifier(images[start:start + batch_size].to(device)).argmax(1).cpu()
                  for start in range(0, images.shape[0], batch_size)]
        return torch.cat(chunks).numpy().astype(np.int64)

    def save(self, path_dir: str | os.PathLike) -> Path:
        meta = dict(self.meta)
        meta.update(kind=LABEL_JUDGE_KIND, label_name=self.label_name,
                    num_classes=self.num_classes, class_names=self.class_names)
        return save_classifier(self.classifier, None, path_dir, meta)

    @classmethod
    def load(cls, path_dir: str | os.PathLike) -> LabelJudge:
        classifier, meta = load_classifier(path_dir)
        if meta.get("kind") != LABEL_JUDGE_KIND or not isinstance(meta.get("label_name"), str):
            raise InputError(f"judge directory: {str(path_dir)!r} holds a classifier of kind "
                             f"{meta.get('kind')!r}, not a label judge")
        return cls(classifier, meta["label_name"], meta.get("class_names"), meta)


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
