"""The config of `ctrl-ray pretrain` (the digits base model), without torch: read and checked
before any heavy import (`ctrl_ray.pretrain` trains from it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ctrl_ray.config import SEED, ConfigValueError, check_bounds
from ctrl_ray.data.digits import NUM_DIGITS, SIZES, digit_prompts
from ctrl_ray.models.text_to_image_options import MINILM
from ctrl_ray.models.unet_config import ScheduleConfig, UNetConfig


@dataclass
class DigitsDataConfig:
    """Where the digits Parquet file lives (`ctrl-ray data build-digits` writes it; only the
    demo builds it itself when missing) and the image size it must hold."""

    path: str = "data/digits16.parquet"
    size: int = 16
    seed: int = 0

    def __post_init__(self):
        check_bounds(self, size=SIZES, seed=SEED)
        if not self.path:
            raise ConfigValueError("path", self.path, "is empty: give a digits Parquet file")


@dataclass
class PretrainTrainingConfig:
    steps: int = 3000
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0
    ema_decay: float = 0.995
    seed: int = 0
    log_every: int = 50

    def __post_init__(self):
        check_bounds(self, steps="[1, 100000000]", batch_size="[1, 65536]", lr="(0, 10]",
                     warmup_steps=">= 0", weight_decay="[0, 10]", ema_decay="[0, 1)", seed=SEED,
                     log_every=">= 1")


@dataclass
class TextConditioningConfig:
    """The prompts of `conditioning: text`: prompt i = `prompt_template` with digit i's name."""

    encoder: str = MINILM
    max_length: int = 16
    prompt_template: str = "a handwritten {}"
    prompt_dropout: float = 0.1

    def __post_init__(self):
        check_bounds(self, max_length="[1, 512]", prompt_dropout="[0, 1)")
        try:
            digit_prompts(self.prompt_template)
        except (IndexError, KeyError, ValueError):
            raise ConfigValueError("prompt_template", self.prompt_template,
                                   "is not a template with one {} for the digit's name") from None


@dataclass
class PretrainConfig:
    data: DigitsDataConfig = field(default_factory=DigitsDataConfig)
    model: UNetConfig = field(default_factory=UNetConfig)
    conditioning: Literal["class", "text"] = "class"
    text: TextConditioningConfig = field(default_factory=TextConditioningConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    training: PretrainTrainingConfig = field(default_factory=PretrainTrainingConfig)
    output_dir: str = "outputs/base-digits16"
    experiment: str = "ctrl-ray-pretrain"
    registered_model: str = "ctrl-base-digits"

    def __post_init__(self):
        if self.model.image_size != self.data.size:
            raise ConfigValueError("model.image_size", self.model.image_size,
                                   f"does not match data.size {self.data.size}")
        if self.conditioning == "class" and self.model.num_contexts < NUM_DIGITS:
            raise ConfigValueError("model.num_contexts", self.model.num_contexts,
                                   f"is fewer than the {NUM_DIGITS} digits of the data")
        for name in ("output_dir", "experiment"):
            if not getattr(self, name):
                raise ConfigValueError(name, getattr(self, name), "is empty")
