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
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctrl_ray.errors import InputError
from ctrl_ray.models.classifier import (
    ImageClassifier,
    check_images,
    check_indices,
    load_classifier,
    save_classifier,
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
        classifier, meta = load_classifier(path_dir, kind=JUDGE_KIND, what="digit judge")
        if classifier.num_classes != NUM_DIGITS:
            raise InputError(f"digit judge directory: {str(path_dir)!r} holds a classifier with "
                             f"{classifier.num_classes} classes, not {NUM_DIGITS} digits")
        return cls(classifier, meta)


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
        classifier, meta = load_classifier(path_dir, kind=LABEL_JUDGE_KIND, what="label judge")
        if not isinstance(meta.get("label_name"), str):
            raise InputError(f"label judge directory: {str(path_dir)!r} names no label")
        return cls(classifier, meta["label_name"], meta.get("class_names"), meta)
