"""`ctrl-ray reward train`: N offline pairs -> calibrated reward classifier p(y | x0), logged."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import torch

from ctrl_ray import tracking
from ctrl_ray.config import flatten, to_dict
from ctrl_ray.data.digits import ensure_digits
from ctrl_ray.data.pairs import make_pairs
from ctrl_ray.models.reward import RewardTrainingConfig, train_reward_from_pairs


@dataclass
class RewardJobConfig:
    """Where the pairs come from (built from the digits train split if missing) and go."""

    dataset: str = "data/digits16.parquet"
    size: int = 16
    label: str = "compress_class"
    num_pairs: int = 1000
    pairs: str = "data/pairs-compress-1000.parquet"
    pairs_seed: int = 0
    training: RewardTrainingConfig = field(default_factory=RewardTrainingConfig)
    output_dir: str = "outputs/reward-compress"
    experiment: str = "ctrl-ray-reward"


def train_reward_job(config: RewardJobConfig, progress: bool = True) -> dict[str, Any]:
    """Make the pair set if needed, train + calibrate the reward, score it on the test split."""
    dataset = ensure_digits(config.dataset, size=config.size)
    if not Path(config.pairs).exists():
        make_pairs(config.dataset, config.label, config.num_pairs, config.pairs,
                   seed=config.pairs_seed)
    with tracking.run(config.experiment, f"reward-{config.label}", flatten(to_dict(config))):
        reward, report = train_reward_from_pairs(config.pairs, config.output_dir, config.training,
                                                 progress=progress)
        test = dataset.subset("test")
        predicted = reward.log_probs(torch.from_numpy(test.images)).argmax(1).numpy()
        test_accuracy = float((predicted == test.labels[reward.label_name]).mean())
        metrics = {"test_accuracy": test_accuracy, "val_accuracy": report.val_accuracy or 0.0,
                   "temperature": report.temperature,
                   "val_nll_calibrated": report.val_nll_calibrated or 0.0}
        mlflow.log_metrics(metrics)
        mlflow.log_artifacts(config.output_dir, artifact_path="reward")
    return {"output_dir": config.output_dir, "num_pairs": report.num_train + report.num_val,
            **metrics}
