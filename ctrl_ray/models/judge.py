"""The digit fidelity judge: a 10-class classifier on real digits that checks whether a generated
sample shows the digit c it was asked for (fidelity = accuracy against the requested digits)."""

from __future__ import annotations

import os
from collections.abc import Sequence
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
