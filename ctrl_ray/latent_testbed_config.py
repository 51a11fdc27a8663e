"""The config of `ctrl-ray text2image build` (the latent text-to-image testbed: data, VAE,
latent UNet, prompts, schedule), without torch: read and checked before any heavy import
(`ctrl_ray.latent_testbed` trains from it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ctrl_ray.config import SEED, ConfigValueError, check_bounds
from ctrl_ray.data.digits import HELDOUT_TEMPLATES, TRAINING_TEMPLATES, digit_prompts
from ctrl_ray.models.text_to_image_options import MINILM
from ctrl_ray.models.unet_config import ScheduleConfig
from ctrl_ray.pretrain_config import DigitsDataConfig


def _check_levels(config) -> None:
    """One width per resolution level, each a multiple of the group-norm groups (what diffusers
    would reject only once training starts)."""
    if not config.block_out_channels:
        raise ConfigValueError("block_out_channels", config.block_out_channels,
                               "is empty: give one width per resolution level")
    if any(width % config.norm_num_groups for width in config.block_out_channels):
        raise ConfigValueError("block_out_channels", config.block_out_channels,
                               f"are not all multiples of norm_num_groups "
                               f"{config.norm_num_groups}")


@dataclass
class TestbedDataConfig(DigitsDataConfig):
    """The digits Parquet file the testbed trains on: 32x32 by default (`ctrl-ray data
    build-digits --size 32 --out data/digits32.parquet` writes it)."""

    path: str = "data/digits32.parquet"
    size: int = 32


@dataclass
class TestbedVAEConfig:
    """The `AutoencoderKL` and its training: images downsample 2 ** (levels - 1) times.

    kl_weight multiplies the KL to N(0, I) per latent element against the per-pixel MSE."""

    block_out_channels: list[int] = field(default_factory=lambda: [16, 32, 32])
    latent_channels: int = 4
    layers_per_block: int = 1
    norm_num_groups: int = 8
    kl_weight: float = 1e-3
    steps: int = 600
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0
    log_every: int = 50

    def __post_init__(self):
        check_bounds(self, block_out_channels="[1, 4096]", latent_channels="[1, 64]",
                     layers_per_block="[1, 16]", norm_num_groups="[1, 4096]",
                     kl_weight="[0, 100]", steps="[1, 100000000]", batch_size="[1, 65536]",
                     lr="(0, 10]", seed=SEED, log_every=">= 1")
        _check_levels(self)


@dataclass
class TestbedUNetConfig:
    """The latent `UNet2DConditionModel` (its last level and middle block cross-attend to the
    prompt) and its DDPM training, with an EMA of the weights as `ctrl_ray.pretrain` keeps."""

    block_out_channels: list[int] = field(default_factory=lambda: [32, 64])
    layers_per_block: int = 1
    norm_num_groups: int = 8
    attention_head_dim: int = 8
    steps: int = 3000
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 100
    ema_decay: float = 0.995
    seed: int = 0
    log_every: int = 50

    def __post_init__(self):
        check_bounds(self, block_out_channels="[1, 4096]", layers_per_block="[1, 16]",
                     norm_num_groups="[1, 4096]", attention_head_dim="[1, 4096]",
                     steps="[1, 100000000]", batch_size="[1, 65536]", lr="(0, 10]",
                     warmup_steps=">= 0", ema_decay="[0, 1)", seed=SEED, log_every=">= 1")
        _check_levels(self)


@dataclass
class TestbedTextConfig:
    """The prompts: every template with every digit's name (and numeral, with `numerals`)."""

    encoder: str = MINILM
    max_length: int = 16
    templates: list[str] = field(default_factory=lambda: list(TRAINING_TEMPLATES))
    numerals: bool = True
    prompt_dropout: float = 0.1

    def __post_init__(self):
        check_bounds(self, max_length="[1, 512]", prompt_dropout="[0, 1)")
        if self.encoder != MINILM:
            raise ConfigValueError("encoder", self.encoder, f"is not a known encoder ({MINILM!r})")
        if not self.templates:
            raise ConfigValueError("templates", self.templates, "is empty: give a template")
        for template in self.templates:
            if not isinstance(template, str) or template.count("{}") != 1:
                raise ConfigValueError("templates", template,
                                       "is not a template with one {} for the digit")
            if template in HELDOUT_TEMPLATES:
                raise ConfigValueError("templates", template,
                                       "is a held-out paraphrase: it must stay unseen")
        try:
            digit_prompts(self.templates[0])
        except (IndexError, KeyError, ValueError):
            raise ConfigValueError("templates", self.templates[0],
                                   "is not a template with one {} for the digit") from None


@dataclass
class LatentTestbedConfig:
    data: TestbedDataConfig = field(default_factory=TestbedDataConfig)
    vae: TestbedVAEConfig = field(default_factory=TestbedVAEConfig)
    unet: TestbedUNetConfig = field(default_factory=TestbedUNetConfig)
    text: TestbedTextConfig = field(default_factory=TestbedTextConfig)
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(clip_sample=False))
    output_dir: str = "outputs/base-text2image"
    experiment: str = "ctrl-ray-pretrain"
    registered_model: str = "ctrl-base-text2image"

    def __post_init__(self):
        factor = 2 ** (len(self.vae.block_out_channels) - 1)
        if self.data.size % factor:
            raise ConfigValueError("vae.block_out_channels", self.vae.block_out_channels,
                                   f"downsample {factor}x, which does not divide data.size "
                                   f"{self.data.size}")
        latent_size = self.data.size // factor
        unet_factor = 2 ** (len(self.unet.block_out_channels) - 1)
        if latent_size % unet_factor:
            raise ConfigValueError("unet.block_out_channels", self.unet.block_out_channels,
                                   f"downsample {unet_factor}x, which does not divide the "
                                   f"{latent_size}x{latent_size} latents")
        if self.schedule.clip_sample:
            raise ConfigValueError("schedule.clip_sample", self.schedule.clip_sample,
                                   "must be false: latents are not bounded to [-1, 1]")
        for name in ("output_dir", "experiment"):
            if not getattr(self, name):
                raise ConfigValueError(name, getattr(self, name), "is empty")

    @property
    def latent_size(self) -> int:
        return self.data.size // 2 ** (len(self.vae.block_out_channels) - 1)
