"""The configs of `ctrl-ray baseline` (classifier-free guidance, classifier guidance, DPS),
without torch: read and checked before any heavy import (`ctrl_ray.baselines.run` runs them,
`ctrl_ray.baselines.cfg` and `.classifier_guidance` train from their training sections)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ctrl_ray.config import load_config
from ctrl_ray.errors import InputError
from ctrl_ray.evaluation_config import EvaluationConfig
from ctrl_ray.finetune_config import RewardSpec
from ctrl_ray.models.adapter_config import AdapterConfig

BASELINE_KINDS = ("cfg", "cg", "dps")


@dataclass
class CFGTrainingConfig:
    """DDPM noise-prediction training of the conditional network on the triplets."""

    steps: int = 2000
    batch_size: int = 64
    lr_embedding: float = 1e-2
    lr_adapter: float = 1e-3
    weight_decay: float = 0.0
    p_uncond: float = 0.15
    max_grad_norm: float = 1.0
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise InputError(f"training.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.p_uncond < 1.0:
            raise InputError(f"training.p_uncond must be in (0, 1), got {self.p_uncond}")
        for name in ("lr_embedding", "lr_adapter", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise InputError(f"training.{name} must be > 0, got {getattr(self, name)}")


@dataclass
class NoisyClassifierTrainingConfig:
    """Training of p(y | x_t, t) on noised pairs (a fresh t and noise for every draw)."""

    steps: int = 3000
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    channels: tuple[int, ...] = (16, 32)
    time_embedding_dim: int = 64
    val_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self):
        self.channels = tuple(int(width) for width in self.channels)
        for name in ("steps", "batch_size", "time_embedding_dim"):
            if getattr(self, name) < 1:
                raise InputError(f"training.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise InputError(f"training.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise InputError(f"training.val_fraction must be in [0, 1), got {self.val_fraction}")


@dataclass
class PairsConfig:
    """One offline pair set; drawn from the dataset's train split when the file is missing
    (the dataset itself must exist: `ctrl-ray data build-digits`)."""

    label: str = "compress_class"
    num_pairs: int = 1000
    path: str = "data/pairs-compress-1000.parquet"
    seed: int = 0


@dataclass
class BaselineConfig:
    """What every baseline shares: base model, guidance scale, evaluation protocol, outputs."""

    base_model: str = "outputs/base-digits16"
    guidance_scale: float = 1.0
    judge: str = "outputs/judge-digits16"
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    evaluate_base: bool = True
    output_dir: str = "outputs/baseline"
    experiment: str = "ctrl-ray-baselines"

    def __post_init__(self):
        if not 0.0 <= self.guidance_scale < float("inf"):
            raise InputError(f"guidance_scale must be a finite number >= 0, "
                             f"got {self.guidance_scale}")


@dataclass
class CFGBaselineConfig(BaselineConfig):
    """Classifier-free guidance: a conditional network trained on triplets from the pairs."""

    guidance_scale: float = 3.0
    dataset: str = "data/digits16.parquet"
    pairs: list[PairsConfig] = field(default_factory=lambda: [PairsConfig()])
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    training: CFGTrainingConfig = field(default_factory=CFGTrainingConfig)
    model: str | None = None  # a saved CFG model directory: load it instead of training
    output_dir: str = "outputs/baseline-cfg"

    def __post_init__(self):
        super().__post_init__()
        self.adapter.kind = self.adapter.kind or "lora"
        if self.adapter.kind == "value":
            raise InputError("adapter.kind: CFG trains a conditional network (lora, full or "
                             "none); the value head is CTRL's (mode value)")


@dataclass
class CGBaselineConfig(BaselineConfig):
    """Classifier guidance: time-dependent classifiers p(y | x_t, t) trained on noised pairs."""

    guidance_scale: float = 10.0
    dataset: str = "data/digits16.parquet"
    pairs: list[PairsConfig] = field(default_factory=lambda: [PairsConfig()])
    training: NoisyClassifierTrainingConfig = field(default_factory=NoisyClassifierTrainingConfig)
    classifiers: list[str] | None = None  # saved noisy classifiers: load them instead of training
    output_dir: str = "outputs/baseline-cg"


@dataclass
class DPSBaselineConfig(BaselineConfig):
    """DPS / reconstruction guidance with CTRL's own reward classifier(s) on x0_hat(x_t)."""

    guidance_scale: float = 10.0
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec()])
    output_dir: str = "outputs/baseline-dps"


BASELINE_CONFIGS: dict[str, type[BaselineConfig]] = {
    "cfg": CFGBaselineConfig, "cg": CGBaselineConfig, "dps": DPSBaselineConfig,
}


def config_class(kind: str) -> type[BaselineConfig]:
    if kind not in BASELINE_CONFIGS:
        raise InputError(f"baseline kind must be one of {list(BASELINE_KINDS)}, got {kind!r}")
    return BASELINE_CONFIGS[kind]


def load_baseline_config(kind: str, path: str | Path | None = None,
                         overrides: list[str] = ()) -> BaselineConfig:
    """The typed config of baseline ``kind`` from an optional YAML file plus overrides."""
    return load_config(config_class(kind), path, list(overrides))
