"""The config of `ctrl-ray demo` (every stage's config, the judge and the base model's
sampling), without torch: read and checked before any heavy import (`ctrl_ray.demo` runs it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ctrl_ray.config import SEED, check_bounds
from ctrl_ray.finetune_config import FinetuneConfig
from ctrl_ray.pretrain_config import PretrainConfig
from ctrl_ray.reward_config import RewardJobConfig


@dataclass
class JudgeConfig:
    """The fidelity judge: a digit classifier trained on the real train split."""

    path: str = "outputs/judge-digits16"
    epochs: int = 20
    seed: int = 0

    def __post_init__(self):
        check_bounds(self, epochs="[1, 100000]", seed=SEED)


@dataclass
class DemoSamplingConfig:
    samples_per_digit: int = 10
    num_inference_steps: int = 50
    eta: float = 1.0
    seed: int = 1234

    def __post_init__(self):
        check_bounds(self, samples_per_digit="[1, 10000]", num_inference_steps="[1, 10000]",
                     eta="[0, 100]", seed=SEED)


@dataclass
class DemoConfig:
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    sampling: DemoSamplingConfig = field(default_factory=DemoSamplingConfig)
    reward: RewardJobConfig = field(default_factory=RewardJobConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    reuse_registered_base: bool = True
    registered_model: str = "ctrl-digits"
    output_dir: str = "outputs/demo"
