"""The CTRL reward: calibrated log p(y | x0[, c]) from a frozen classifier, differentiable in x0.

`RewardModel` wraps one classifier for one new label y; `MultiTaskReward` sums weighted
log-likelihoods of several labels that are conditionally independent given x. Both take the
labels as a dict {label_name: (B,) long}, so callers treat single- and multi-task alike.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ctrl_ray.errors import InputError
from ctrl_ray.models.classifier import (
    ImageClassifier,
    TrainingReport,
    check_indices,
    load_classifier,
    save_classifier,
    train_classifier,
)
from ctrl_ray.models.judge import LabelJudgeConfig
from ctrl_ray.storage import atomic_directory

REWARD_KIND = "reward"
JUDGE_DIR = "judge"  # inside a reward directory: the held-out judge of a label without an oracle
MULTITASK_FILE = "multitask.json"
MULTITASK_FORMAT = "ctrl_ray.multitask_reward"


@dataclass
class RewardTrainingConfig:
    """How the reward classifier is trained from N offline pairs.

    No augmentation by default: shifts and noise change JPEG compressibility, so a transform
    belongs in `augment` only when it is known to keep the label.
    """

    epochs: int = 60
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.2
    seed: int = 0
    # Two stages measured best for JPEG compressibility at 16x16 (accuracy 0.53 vs 0.47 for three).
    channels: tuple[int, ...] = (16, 32)
    dropout: float = 0.0
    use_context: bool = False
    augment: tuple[str, ...] = ()
    temperature_prior_std: float = 0.25

    def __post_init__(self) -> None:
        self.channels = tuple(int(width) for width in self.channels)
        self.augment = (self.augment,) if isinstance(self.augment, str) else tuple(self.augment)
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"reward.{name}: need an integer >= 1, got {getattr(self, name)}")
        if not (math.isfinite(float(self.lr)) and float(self.lr) > 0):
            raise InputError(f"reward.lr: need a finite value > 0, got {self.lr}")
        if not (math.isfinite(float(self.weight_decay)) and float(self.weight_decay) >= 0):
            raise InputError(
                f"reward.weight_decay: need a finite value >= 0, got {self.weight_decay}"
            )
        if not (math.isfinite(float(self.temperature_prior_std))
                and float(self.temperature_prior_std) > 0):
            raise InputError(
                f"reward.temperature_prior_std: need a finite value > 0, "
                f"got {self.temperature_prior_std}"
            )
        if not 0.0 < float(self.val_fraction) < 1.0:
            raise InputError(
                f"reward.val_fraction: need a value in (0, 1) for calibration, "
                f"got {self.val_fraction}"
            )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["channels"] = list(self.channels)
        data["augment"] = list(self.augment)
        return data


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


class RewardModel(nn.Module):
    """Frozen calibrated classifier for one label: `log_likelihood(x0, y, c) = log p(y | x0[, c])`.

    Parameters never require grad and the module stays in eval mode (`train()` is a no-op), so
    gradients reach x0 only. A classifier without context input ignores `c`.
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

    def train(self, mode: bool = True) -> RewardModel:
        return super().train(False)

    @property
    def label_names(self) -> list[str]:
        return [self.label_name]

    @property
    def num_classes(self) -> dict[str, int]:
        return {self.label_name: self.classifier.num_classes}

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
        """Calibrated log p(y | x0[, c]), shape (B,); `y` is (B,) long or {label_name: (B,)}."""
        labels = _labels_for(y, self.label_names)[self.label_name]
        labels = check_indices(labels, self.classifier.num_classes, f"ys[{self.label_name!r}]",
                               x0.shape[0]).to(x0.device)
        return self.log_probs(x0, c).gather(1, labels[:, None]).squeeze(1)

    def forward(self, x0: torch.Tensor, y: Any, c: torch.Tensor | None = None) -> torch.Tensor:
        return self.log_likelihood(x0, y, c)

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
    def load(cls, path_dir: str | os.PathLike) -> RewardModel:
        classifier, meta = load_classifier(path_dir)
        if meta.get("kind") != REWARD_KIND or not isinstance(meta.get("label_name"), str):
            raise InputError(
                f"reward directory: {str(path_dir)!r} holds a classifier of kind "
                f"{meta.get('kind')!r}, not a reward model"
            )
        if meta.get("num_classes") != classifier.num_classes:
            raise InputError(
                f"reward directory: {str(path_dir)!r} declares num_classes "
                f"{meta.get('num_classes')!r} but its classifier has {classifier.num_classes}"
            )
        reward = cls(classifier, meta["label_name"], meta.get("edges"), meta)
        reward.path = Path(path_dir).resolve()
        return reward


class MultiTaskReward(nn.Module):
    """Weighted sum of single-label rewards: sum_i w_i log p(y_i | x0[, c]).

    Correct as a joint log-likelihood when the labels are conditionally independent given x
    (and all weights are 1); other weights trade the labels off against each other.
    """

    def __init__(self, terms: Sequence[tuple[RewardModel, float]]) -> None:
        super().__init__()
        if not terms:
            raise InputError("terms: a multi-task reward needs at least one (reward, weight)")
        names = [reward.label_name for reward, _ in terms]
        if len(set(names)) != len(names):
            raise InputError(f"terms: label names must be unique, got {names}")
        for name, (_, weight) in zip(names, terms, strict=True):
            if not math.isfinite(float(weight)):
                raise InputError(f"weight of {name!r}: need a finite number, got {weight}")
        self.rewards = nn.ModuleList([reward for reward, _ in terms])
        self.weights = [float(weight) for _, weight in terms]
        super().train(False)

    def train(self, mode: bool = True) -> MultiTaskReward:
        return super().train(False)

    @property
    def label_names(self) -> list[str]:
        return [reward.label_name for reward in self.rewards]

    @property
    def num_classes(self) -> dict[str, int]:
        return {reward.label_name: reward.classifier.num_classes for reward in self.rewards}

    @property
    def uses_context(self) -> bool:
        return any(reward.uses_context for reward in self.rewards)

    def log_likelihood(self, x0: torch.Tensor, ys: Any,
                       c: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted sum over labels of log p(y_i | x0[, c]), shape (B,)."""
        labels = _labels_for(ys, self.label_names)
        total = None
        for reward, weight in zip(self.rewards, self.weights, strict=True):
            term = weight * reward.log_likelihood(x0, labels[reward.label_name], c)
            total = term if total is None else total + term
        return total

    def forward(self, x0: torch.Tensor, ys: Any, c: torch.Tensor | None = None) -> torch.Tensor:
        return self.log_likelihood(x0, ys, c)

    def save(self, path_dir: str | os.PathLike) -> Path:
        """Atomic directory: one reward directory per label plus `multitask.json` with weights."""
        with atomic_directory(path_dir) as staging:
            entries = []
            for index, (reward, weight) in enumerate(zip(self.rewards, self.weights, strict=True)):
                subdir = f"label_{index}"
                reward.save(staging / subdir)
                entries.append({"label_name": reward.label_name, "weight": weight, "dir": subdir})
            (staging / MULTITASK_FILE).write_text(
                json.dumps({"format": MULTITASK_FORMAT, "terms": entries}, indent=2)
            )
        return Path(path_dir)

    @classmethod
    def load(cls, path_dir: str | os.PathLike) -> MultiTaskReward:
        directory = Path(path_dir)
        index_path = directory / MULTITASK_FILE
        if not index_path.is_file():
            raise InputError(f"multi-task reward: {str(index_path)!r} is missing")
        try:
            document = json.loads(index_path.read_text())
            terms = [
                (RewardModel.load(directory / entry["dir"]), float(entry["weight"]))
                for entry in document["terms"]
            ]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
            raise InputError(f"{str(index_path)!r}: malformed ({error!r})") from error
        return cls(terms)


def load_reward(path_dir: str | os.PathLike) -> RewardModel | MultiTaskReward:
    """Load either a single reward directory or a multi-task one, whichever `path_dir` holds."""
    directory = Path(path_dir)
    if (directory / MULTITASK_FILE).is_file():
        return MultiTaskReward.load(directory)
    return RewardModel.load(directory)


def train_reward(
    images: Any,
    labels: Any,
    *,
    num_classes: int,
    label_name: str,
    edges: Sequence[float] | None = None,
    config: RewardTrainingConfig | None = None,
    contexts: Any = None,
    num_contexts: int | None = None,
    progress: bool = False,
) -> tuple[RewardModel, TrainingReport]:
    """Fit and calibrate the reward classifier p(y | x0[, c]) on N offline pairs."""
    config = config or RewardTrainingConfig()
    if config.use_context and contexts is None:
        raise InputError("reward.use_context: true, but the training data has no contexts")
    if not config.use_context:
        contexts, num_contexts = None, None
    elif num_contexts is None:
        raise InputError("num_contexts: required when reward.use_context is true")
    classifier, report = train_classifier(
        images,
        labels,
        num_classes=num_classes,
        contexts=contexts,
        num_contexts=num_contexts,
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        weight_decay=config.weight_decay,
        seed=config.seed,
        val_fraction=config.val_fraction,
        augment=config.augment,
        temperature_prior_std=config.temperature_prior_std,
        channels=config.channels,
        dropout=config.dropout,
        progress=progress,
    )
    meta = {"report": report.to_dict(), "training_config": config.to_dict()}
    return RewardModel(classifier, label_name, edges, meta), report


def train_reward_from_pairs(
    pairs_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: RewardTrainingConfig | None = None,
    progress: bool = False,
    *,
    judge: LabelJudgeConfig | None = None,
    labeller: str = "",
    heldout_fraction: float = 0.2,
) -> tuple[RewardModel, TrainingReport]:
    """Train the reward on the train rows of a pair-set file; save it to `out_dir` (atomic).

    The held-out rows (the file's split; for a label without a built-in oracle and a file
    without a split, a stratified `heldout_fraction` drawn here) never reach the reward: its
    accuracy, NLL and calibration error on them go to its meta (`heldout`), and for a label
    without an oracle a `LabelJudge` trained on them alone is saved in `out_dir/judge` (unless
    `judge.enabled` is false). `labeller` ("module:function" or "file.py:function") names the
    label's exact labeller: it is checked against the pairs' labels and stored as the scorer.
    """
    from ctrl_ray.data.oracles import ORACLES
    from ctrl_ray.data.pairs import load_pairs
    from ctrl_ray.scoring import label_images_for, parse_scorer

    pairs = load_pairs(pairs_path)
    config = config or RewardTrainingConfig()
    judge = judge or LabelJudgeConfig()
    built_in = pairs.label_name in ORACLES and bool(pairs.edges)
    heldout_drawn = False
    if pairs.heldout is None and not built_in:
        from ctrl_ray.data.importing import stratified_heldout

        pairs.heldout = stratified_heldout(pairs.labels, pairs.names, heldout_fraction,
                                           config.seed)
        heldout_drawn = True
    train, heldout = pairs.subset("train"), pairs.subset("heldout")
    info = {"num_classes": pairs.num_classes, "edges": pairs.edges,
            "class_names": pairs.names}
    agreement = None
    if labeller:
        entry = parse_scorer(labeller, pairs.label_name)
        if entry["kind"] != "labeller":
            raise InputError(f"labeller: expected module:function or file.py:function, "
                             f"got {labeller!r}")
        labeller = entry["function"]
        found = label_images_for(pairs.images, pairs.label_name, info, override=labeller)
        agreement = float((found == pairs.labels).mean())
    contexts = getattr(pairs, "contexts", None)
    reward, report = train_reward(
        train.images,
        train.labels,
        num_classes=int(pairs.num_classes),
        label_name=pairs.label_name,
        edges=list(pairs.edges) if pairs.edges is not None else None,
        config=config,
        contexts=contexts,
        num_contexts=getattr(pairs, "num_contexts", None) if contexts is not None else None,
        progress=progress,
    )
    reward.meta.update(attribute=getattr(pairs, "attribute", None), pairs_path=str(pairs_path),
                       class_names=pairs.names, num_pairs_train=len(train),
                       num_pairs_heldout=len(heldout), heldout_drawn=heldout_drawn)
    if labeller:
        reward.meta.update(labeller=labeller, labeller_agreement=agreement)
    if len(heldout):
        reward.meta["heldout"] = heldout_metrics(reward, heldout.images, heldout.labels)
    label_judge = None
    if not built_in and len(heldout) and judge.enabled:
        from ctrl_ray.models.judge import train_label_judge

        label_judge, _ = train_label_judge(heldout.images, heldout.labels,
                                           label_name=pairs.label_name,
                                           num_classes=pairs.num_classes,
                                           class_names=pairs.names, config=judge,
                                           progress=progress)
        # The judge never saw the reward's train rows, so they measure it.
        label_judge.meta.update(
            pairs_path=str(pairs_path), num_rows=len(heldout),
            train_rows_accuracy=float((label_judge.predict(train.images) == train.labels).mean()))
        reward.meta["judge"] = {"train_rows_accuracy": label_judge.meta["train_rows_accuracy"],
                                "num_rows": len(heldout)}
    with atomic_directory(out_dir) as staging:
        reward.save(staging)
        if label_judge is not None:
            label_judge.save(staging / JUDGE_DIR)
    reward.path = Path(out_dir).resolve()
    return reward, report


@torch.no_grad()
def heldout_metrics(reward: RewardModel, images: Any, labels: Any) -> dict[str, float]:
    """The calibrated reward on rows it never saw: accuracy, NLL and expected calibration
    error (10 bins)."""
    from ctrl_ray.models.classifier import check_images, expected_calibration_error

    images = check_images(images)
    labels = torch.as_tensor(labels, dtype=torch.long)
    log_probs = torch.cat([reward.log_probs(images[i:i + 512])
                           for i in range(0, len(images), 512)])
    return {
        "accuracy": float((log_probs.argmax(1) == labels).float().mean()),
        "nll": float(torch.nn.functional.nll_loss(log_probs, labels)),
        "ece": float(expected_calibration_error(log_probs, labels)),
        "num_rows": int(len(labels)),
    }
