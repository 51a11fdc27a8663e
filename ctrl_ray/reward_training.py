"""`ctrl-ray reward train`: N offline pairs -> calibrated reward classifier p(y | x0), logged.

Any pair set works: one drawn from the digits testbed (built here when missing, for the
built-in labels), or one imported from a user's own files (`ctrl-ray data import`). The reward
trains on the pair set's train rows; its test accuracy is measured on the pair set's held-out
rows (or, for a digits pair set without them, on the digits test split). A label without a
built-in oracle also gets its judge, trained on the held-out rows only (see
`train_reward_from_pairs`), unless the config names an exact `labeller`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import torch

from ctrl_ray import tracking
from ctrl_ray.config import flatten, to_dict
from ctrl_ray.data.oracles import ORACLES
from ctrl_ray.errors import InputError
from ctrl_ray.models.judge import LabelJudgeConfig
from ctrl_ray.models.reward import RewardTrainingConfig, train_reward_from_pairs


@dataclass
class RewardJobConfig:
    """Where the pairs come from and where the reward goes.

    `pairs` is any pair-set file; when it is missing and `label` is a built-in digits label,
    `num_pairs` pairs are drawn from the digits train split of `dataset` (built if missing).
    `labeller` ("module:function" or "file.py:function") is an exact labeller of the label,
    used to score samples instead of the held-out judge. `heldout_fraction` is drawn
    (stratified) only for a pair set that records no held-out split and has no oracle.
    """

    dataset: str = "data/digits16.parquet"
    size: int = 16
    label: str = "compress_class"
    num_pairs: int = 1000
    pairs: str = "data/pairs-compress-1000.parquet"
    pairs_seed: int = 0
    training: RewardTrainingConfig = field(default_factory=RewardTrainingConfig)
    judge: LabelJudgeConfig = field(default_factory=LabelJudgeConfig)
    labeller: str = ""
    heldout_fraction: float = 0.2
    output_dir: str = "outputs/reward-compress"
    experiment: str = "ctrl-ray-reward"


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
