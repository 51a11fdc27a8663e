"""The CTRL reward: calibrated log p(y | x0[, c]) from frozen classifiers, differentiable in x0.

`Reward` is the one reward type: weighted log-likelihoods of one or more labels, conditionally
independent given x, each label a `RewardTerm` (one calibrated classifier). It takes the labels
as a dict {label_name: (B,) long}, so a single label is simply a reward with one term.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ctrl_ray.errors import InputError
from ctrl_ray.models.classifier import (
    ImageClassifier,
    check_indices,
    load_classifier,
    save_classifier,
)
from ctrl_ray.models.text_to_image import reward_view
from ctrl_ray.storage import load_artifact, save_artifact

REWARD_KIND = "reward"
JUDGE_DIR = "judge"  # inside a reward directory: the held-out judge of a label without an oracle
MULTITASK_FILE = "multitask.json"
MULTITASK_FORMAT = "ctrl_ray.multitask_reward"


def _labels_for(ys: Any, label_names: Sequence[str]) -> dict[str, Any]:
    """Normalise labels to {name: labels}; a bare tensor is allowed only for a single label."""
    if isinstance(ys, Mapping):
        unknown = sorted(set(ys) - set(label_names))
        missing = [name for name in label_names if name not in ys]
        if unknown or missing:
            raise InputError(
                f"ys: expected label key(s) {list(label_names)}, "
                f"got {sorted(ys)} (unknown {unknown}, missing {missing})"
            )
        return dict(ys)
    if len(label_names) != 1:
        raise InputError(
            f"ys: a multi-task reward needs a dict keyed by {list(label_names)}, "
            f"got {type(ys).__name__}"
        )
    return {label_names[0]: ys}


class RewardTerm(nn.Module):
    """One label's frozen calibrated classifier: `log_likelihood(x0, y, c) = log p(y | x0[, c])`.

    A term of a `Reward`, and what reward training makes and saves (the classifier format, with
    the label's name, classes and edges in its meta). Parameters never require grad and the
    module stays in eval mode (`train()` is a no-op), so gradients reach x0 only. A classifier
    without context input ignores `c`.
    """

    def __init__(self, classifier: ImageClassifier, label_name: str,
                 edges: Sequence[float] | None = None, meta: dict[str, Any] | None = None) -> None:
        super().__init__()
        if not label_name or not isinstance(label_name, str):
            raise InputError(f"label_name: need a non-empty string, got {label_name!r}")
        self.classifier = classifier
        self.label_name = label_name
        self.edges = None if edges is None else [float(edge) for edge in edges]
        self.meta = dict(meta or {})
        self.path: Path | None = None  # the directory it was loaded from
        self.classifier.requires_grad_(False)
        for parameter in self.classifier.parameters():
            parameter.grad = None  # left over from training; a frozen model carries none
        super().train(False)

    def train(self, mode: bool = True) -> RewardTerm:
        return super().train(False)

    @property
    def num_classes(self) -> int:
        return self.classifier.num_classes

    @property
    def uses_context(self) -> bool:
        return self.classifier.uses_context

    @property
    def temperature(self) -> float:
        return float(self.classifier.temperature)

    @property
    def class_names(self) -> list[str]:
        """The label's class names (stored at training time), else "0", "1", ..."""
        names = self.meta.get("class_names")
        if isinstance(names, list) and len(names) == self.classifier.num_classes:
            return [str(name) for name in names]
        return [str(k) for k in range(self.classifier.num_classes)]

    def label_info(self) -> dict[str, Any]:
        """What evaluation needs about this label: classes, names, edges and its scorer (the
        user's labeller, the held-out judge saved with this reward, or the built-in oracle)."""
        from ctrl_ray.data.oracles import ORACLES

        info: dict[str, Any] = {"num_classes": self.classifier.num_classes, "edges": self.edges,
                                "class_names": self.class_names}
        judge = None if self.path is None else self.path / JUDGE_DIR
        if self.meta.get("labeller"):
            info["scorer"] = {"kind": "labeller", "function": str(self.meta["labeller"])}
        elif judge is not None and judge.is_dir():
            info["scorer"] = {"kind": "judge", "path": str(judge)}
        elif self.label_name in ORACLES and self.edges:
            info["scorer"] = {"kind": "oracle"}
        return info

    def log_probs(self, x0: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        """Calibrated log p(. | x0[, c]) over all classes, shape (B, K)."""
        return self.classifier.log_probs(x0, c if self.uses_context else None)

    def log_likelihood(self, x0: torch.Tensor, y: Any,
                       c: torch.Tensor | None = None) -> torch.Tensor:
        """Calibrated log p(y | x0[, c]), shape (B,); `y` is (B,) long class indices."""
        labels = check_indices(y, self.classifier.num_classes, f"ys[{self.label_name!r}]",
                               x0.shape[0]).to(x0.device)
        return self.log_probs(x0, c).gather(1, labels[:, None]).squeeze(1)

    def view(self, images: torch.Tensor) -> torch.Tensor:
        """Decoded images as this classifier reads them (its size and channels)."""
        config = self.classifier.config
        return reward_view(images, channels=config.in_channels, image_size=config.image_size)

    def save(self, path_dir: str | os.PathLike) -> Path:
        """Atomic directory in the classifier format, with label name, classes and edges in meta."""
        meta = dict(self.meta)
        meta.update(
            kind=REWARD_KIND,
            label_name=self.label_name,
            num_classes=self.classifier.num_classes,
            edges=self.edges,
        )
        return save_classifier(self.classifier, None, path_dir, meta)

    @classmethod
    def load(cls, path_dir: str | os.PathLike) -> RewardTerm:
        classifier, meta = load_classifier(path_dir, kind=REWARD_KIND, what="reward model")
        if not isinstance(meta.get("label_name"), str):
            raise InputError(f"reward directory: {str(path_dir)!r} names no label")
        if meta.get("num_classes") != classifier.num_classes:
            raise InputError(
                f"reward directory: {str(path_dir)!r} declares num_classes "
                f"{meta.get('num_classes')!r} but its classifier has {classifier.num_classes}"
            )
        reward = cls(classifier, meta["label_name"], meta.get("edges"), meta)
        reward.path = Path(path_dir).resolve()
        return reward


class Reward(nn.Module):
    """The CTRL reward: sum_i w_i log p(y_i | x0[, c]) over one or more labels.

    A single label is a reward with one term of weight 1. Correct as a joint log-likelihood
    when the labels are conditionally independent given x (and all weights are 1); other
    weights trade the labels off against each other.
    """

    def __init__(self, terms: Sequence[tuple[RewardTerm, float]]) -> None:
        super().__init__()
        if not terms:
            raise InputError("terms: a reward needs at least one (reward term, weight)")
        names = [term.label_name for term, _ in terms]
        if len(set(names)) != len(names):
            raise InputError(f"terms: label names must be unique, got {names}")
        for name, (_, weight) in zip(names, terms, strict=True):
            if not math.isfinite(float(weight)):
                raise InputError(f"weight of {name!r}: need a finite number, got {weight}")
        self.terms = nn.ModuleList([term for term, _ in terms])
        self.weights = [float(weight) for _, weight in terms]
        super().train(False)

    def train(self, mode: bool = True) -> Reward:
        return super().train(False)

    @property
    def label_names(self) -> list[str]:
        return [term.label_name for term in self.terms]

    @property
    def num_classes(self) -> dict[str, int]:
        return {term.label_name: term.num_classes for term in self.terms}

    @property
    def uses_context(self) -> bool:
        return any(term.uses_context for term in self.terms)

    def weighted_terms(self) -> list[tuple[RewardTerm, float]]:
        return list(zip(self.terms, self.weights, strict=True))

    def label_info(self) -> dict[str, dict[str, Any]]:
        """Label name -> {num_classes, edges, class_names, scorer}: what evaluation needs to
        label the samples (the oracle, the user's labeller, or the judge saved with the term)."""
        return {term.label_name: term.label_info() for term in self.terms}

    def log_likelihood(self, x0: torch.Tensor, ys: Any,
                       c: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted sum over labels of log p(y_i | x0[, c]), shape (B,); `ys` is
        {label_name: (B,) long} (a bare tensor for a one-label reward)."""
        labels = _labels_for(ys, self.label_names)
        total = None
        for term, weight in self.weighted_terms():
            part = weight * term.log_likelihood(x0, labels[term.label_name], c)
            total = part if total is None else total + part
        return total

    def forward(self, x0: torch.Tensor, ys: Any, c: torch.Tensor | None = None) -> torch.Tensor:
        return self.log_likelihood(x0, ys, c)

    def term_log_likelihoods(self, images: torch.Tensor, ys: Mapping[str, torch.Tensor],
                             c: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Unweighted log p(y_i | x[, c]) (B,) of decoded images, for each label given in `ys`,
        every term reading the images at its own size and channels (`reward_view`)."""
        unknown = sorted(set(ys) - set(self.label_names))
        if unknown:
            raise InputError(f"ys: unknown label key(s) {unknown}; known: {self.label_names}")
        return {term.label_name: term.log_likelihood(term.view(images), ys[term.label_name], c)
                for term in self.terms if term.label_name in ys}

    def image_log_likelihood(self, images: torch.Tensor, ys: Any,
                             c: torch.Tensor | None = None) -> torch.Tensor:
        """`log_likelihood` of decoded images, each term seeing them at its size and channels."""
        parts = self.term_log_likelihoods(images, _labels_for(ys, self.label_names), c)
        return sum(weight * parts[term.label_name] for term, weight in self.weighted_terms())

    def save(self, path_dir: str | os.PathLike) -> Path:
        """Atomic directory: a one-label reward of weight 1 in its term's own format, else one
        directory per label plus `multitask.json` with the weights."""
        if len(self.terms) == 1 and self.weights == [1.0]:
            return self.terms[0].save(path_dir)
        entries = [{"label_name": term.label_name, "weight": weight, "dir": f"label_{index}"}
                   for index, (term, weight) in enumerate(self.weighted_terms())]

        def write_terms(staging: Path) -> None:
            for term, entry in zip(self.terms, entries, strict=True):
                term.save(staging / entry["dir"])

        return save_artifact(path_dir, MULTITASK_FORMAT, {"terms": entries},
                             index=MULTITASK_FILE, write=write_terms)

    @classmethod
    def load(cls, path_dir: str | os.PathLike) -> Reward:
        """Either layout: a single reward directory (one term, weight 1) or a multi-task one."""
        directory = Path(path_dir)
        if not (directory / MULTITASK_FILE).is_file():
            return cls([(RewardTerm.load(directory), 1.0)])
        document, _ = load_artifact(directory, MULTITASK_FORMAT, "multi-task reward",
                                    index=MULTITASK_FILE, tensors=False)
        try:
            terms = [(RewardTerm.load(directory / entry["dir"]), float(entry["weight"]))
                     for entry in document["terms"]]
        except (KeyError, TypeError, ValueError) as error:
            raise InputError(f"{str(directory / MULTITASK_FILE)!r}: malformed ({error!r})") \
                from error
        return cls(terms)


def load_reward(path_dir: str | os.PathLike) -> Reward:
    """The reward saved in `path_dir` (a single-label or a multi-task directory)."""
    return Reward.load(path_dir)
