"""The config of `ctrl-ray reward train`, without torch: where the pairs come from, how the
reward classifier and a label's held-out judge are trained, where the reward goes. Read and
checked before any heavy import (`ctrl_ray.reward_training` trains from it)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ctrl_ray.errors import InputError


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
