"""`ctrl-ray reward train`: N offline pairs -> calibrated reward classifier p(y | x0), logged.

The training of a reward term (`train_reward`, `train_reward_from_pairs`) lives here, above
`ctrl_ray.models.reward`, which holds the reward type and its storage only.

Any pair set works: one drawn from the digits testbed (built here when missing, for the
built-in labels), or one imported from a user's own files (`ctrl-ray data import`). The reward
trains on the pair set's train rows; its test accuracy is measured on the pair set's held-out
rows (or, for a digits pair set without them, on the digits test split). A label without a
built-in oracle also gets its judge, trained on the held-out rows only (see
`train_reward_from_pairs`), unless the config names an exact `labeller`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow
import torch

from ctrl_ray import tracking
from ctrl_ray.classifier_training import (
    TrainingReport,
    expected_calibration_error,
    train_classifier,
    train_label_judge,
)
from ctrl_ray.config import flatten, to_dict
from ctrl_ray.data.oracles import ORACLES
from ctrl_ray.errors import InputError
from ctrl_ray.models.classifier import check_images
from ctrl_ray.models.reward import JUDGE_DIR, RewardTerm
from ctrl_ray.reward_config import LabelJudgeConfig, RewardJobConfig, RewardTrainingConfig
from ctrl_ray.storage import atomic_directory

__all__ = ["LabelJudgeConfig", "RewardJobConfig", "RewardTrainingConfig", "digits_test_accuracy",
           "ensure_pairs", "heldout_metrics", "train_reward", "train_reward_from_pairs",
           "train_reward_job"]


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
) -> tuple[RewardTerm, TrainingReport]:
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
    return RewardTerm(classifier, label_name, edges, meta), report


def train_reward_from_pairs(
    pairs_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: RewardTrainingConfig | None = None,
    progress: bool = False,
    *,
    judge: LabelJudgeConfig | None = None,
    labeller: str = "",
    heldout_fraction: float = 0.2,
) -> tuple[RewardTerm, TrainingReport]:
    """Train the reward on the train rows of a pair-set file; save it to `out_dir` (atomic).

    The held-out rows (the file's split; for a label without a built-in oracle and a file
    without a split, a stratified `heldout_fraction` drawn here) never reach the reward: its
    accuracy, NLL and calibration error on them go to its meta (`heldout`), and for a label
    without an oracle a `LabelJudge` trained on them alone is saved in `out_dir/judge` (unless
    `judge.enabled` is false). `labeller` ("module:function" or "file.py:function") names the
    label's exact labeller: it is checked against the pairs' labels and stored as the scorer.
    """
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
def heldout_metrics(reward: RewardTerm, images: Any, labels: Any) -> dict[str, float]:
    """The calibrated reward on rows it never saw: accuracy, NLL and expected calibration
    error (10 bins)."""
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


def ensure_pairs(config: RewardJobConfig) -> None:
    """Draw the digits pairs if `config.pairs` is missing (built-in labels only; the digits
    file must exist: `ctrl-ray data build-digits`)."""
    if Path(config.pairs).exists():
        return
    if config.label not in ORACLES:
        raise InputError(f"pairs: file not found: {config.pairs!r} (label {config.label!r} is "
                         f"not a digits-testbed label; import your own pairs with "
                         f"`ctrl-ray data import`)")
    from ctrl_ray.data.digits import require_digits
    from ctrl_ray.data.pairs import make_pairs

    require_digits(config.dataset, config.size)
    make_pairs(config.dataset, config.label, config.num_pairs, config.pairs,
               seed=config.pairs_seed)


def digits_test_accuracy(config: RewardJobConfig, reward) -> float | None:
    """Accuracy on the digits test split, for a built-in label whose pairs hold nothing out."""
    from ctrl_ray.data.digits import require_digits

    if not Path(config.dataset).is_file():
        return None
    dataset = require_digits(config.dataset, config.size)
    if reward.label_name not in dataset.label_info:
        return None
    test = dataset.subset("test")
    with torch.no_grad():
        predicted = reward.log_probs(torch.from_numpy(test.images)).argmax(1).numpy()
    return float((predicted == test.labels[reward.label_name]).mean())


def train_reward_job(config: RewardJobConfig, progress: bool = True) -> dict[str, Any]:
    """Make the pair set if needed, train + calibrate the reward, score it on held-out rows."""
    if not 0.0 < float(config.heldout_fraction) < 1.0:
        raise InputError(f"heldout_fraction: need a value in (0, 1), got "
                         f"{config.heldout_fraction}")
    ensure_pairs(config)
    from ctrl_ray.data.pairs import load_pairs

    label = load_pairs(config.pairs).label_name  # checks the file before a run starts
    with tracking.run(config.experiment, f"reward-{label}", flatten(to_dict(config))):
        reward, report = train_reward_from_pairs(
            config.pairs, config.output_dir, config.training, progress=progress,
            judge=config.judge, labeller=config.labeller,
            heldout_fraction=config.heldout_fraction)
        heldout = reward.meta.get("heldout")
        if heldout is not None:
            test_accuracy, test_on = heldout["accuracy"], "the pair set's held-out rows"
            if reward.meta.get("heldout_drawn"):
                test_on = (f"{heldout['num_rows']} rows held out here (stratified; the pair set "
                           f"records no split)")
        else:
            test_accuracy, test_on = digits_test_accuracy(config, reward), "the digits test split"
        metrics = {"val_accuracy": report.val_accuracy or 0.0,
                   "temperature": report.temperature,
                   "val_nll_calibrated": report.val_nll_calibrated or 0.0,
                   "val_ece_calibrated": report.ece_calibrated or 0.0}
        if test_accuracy is not None:
            metrics["test_accuracy"] = test_accuracy
        if heldout is not None:
            metrics.update(heldout_nll=heldout["nll"], heldout_ece=heldout["ece"])
        if "judge" in reward.meta:
            metrics["judge_accuracy"] = reward.meta["judge"]["train_rows_accuracy"]
        if reward.meta.get("labeller_agreement") is not None:
            metrics["labeller_agreement"] = reward.meta["labeller_agreement"]
        mlflow.log_metrics(metrics)
        mlflow.log_artifacts(config.output_dir, artifact_path="reward")
    scorer = reward.label_info().get("scorer", {}).get("kind", "none")
    return {"output_dir": config.output_dir, "label": label,
            "class_names": reward.class_names, "test_on": test_on if test_accuracy is not None
            else None, "scorer": scorer,
            "num_pairs": report.num_train + report.num_val, **metrics,
            "test_accuracy": test_accuracy}
