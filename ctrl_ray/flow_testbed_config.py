"""The config of `ctrl-ray flow build` (the flow-matching testbed: which latent testbed it reuses,
the SD3 transformer, its flow-matching training, the prompts, the scheduler's shift), without
torch: read and checked before any heavy import (`ctrl_ray.flow_testbed` trains from it)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ctrl_ray.config import SEED, ConfigValueError, check_bounds
from ctrl_ray.errors import InputError
from ctrl_ray.latent_testbed_config import TestbedTextConfig

LATENT_TESTBED_BUILDER = "ctrl_ray.latent_testbed"  # `built_by` in the reused folder


@dataclass
class FlowTransformerConfig:
    """The `SD3Transformer2DModel` and its flow-matching training, with an EMA of the weights as
    `ctrl_ray.pretrain` keeps.

    patch_size 1 makes one token per latent pixel (64 tokens for 8x8 latents); the width is
    num_attention_heads x attention_head_dim. timestep_sampling draws the training time s in
    (0, 1): `logit_normal` (SD3's choice: sigmoid of N(logit_mean, logit_std^2), most weight on
    the middle times where the prompt decides the digit) or `uniform`.
    """

    patch_size: int = 1
    num_layers: int = 4
    num_attention_heads: int = 4
    attention_head_dim: int = 24
    qk_norm: Literal["rms_norm"] | None = None
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 150
    ema_decay: float = 0.998
    timestep_sampling: Literal["logit_normal", "uniform"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    seed: int = 0
    log_every: int = 50

    def __post_init__(self):
        check_bounds(self, patch_size="[1, 64]", num_layers="[1, 64]",
                     num_attention_heads="[1, 256]", attention_head_dim="[1, 1024]",
                     steps="[1, 100000000]", batch_size="[1, 65536]", lr="(0, 10]",
                     warmup_steps=">= 0", ema_decay="[0, 1)", logit_mean="[-10, 10]",
                     logit_std="(0, 10]", seed=SEED, log_every=">= 1")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


@dataclass
class FlowSchedulerConfig:
    """The `FlowMatchEulerDiscreteScheduler` saved beside the transformer: sigma = shift * s /
    (1 + (shift - 1) s). SD3 shifts (3.0) towards noise because 128x128x16 latents keep the image
    legible at high noise; 4x8x8 latents lose it early, so the default is no shift (1.0)."""

    num_train_timesteps: int = 1000
    shift: float = 1.0

    def __post_init__(self):
        check_bounds(self, num_train_timesteps="[1, 100000]", shift="(0, 100]")


@dataclass
class FlowTestbedConfig:
    """latent_testbed: the folder `ctrl-ray text2image build` wrote; its VAE, text encoder,
    tokenizer and dataset are reused unchanged (`text.encoder` and `text.max_length` must be
    its own)."""

    latent_testbed: str = "outputs/base-text2image"
    transformer: FlowTransformerConfig = field(default_factory=FlowTransformerConfig)
    text: TestbedTextConfig = field(default_factory=TestbedTextConfig)
    scheduler: FlowSchedulerConfig = field(default_factory=FlowSchedulerConfig)
    output_dir: str = "outputs/base-flow"
    experiment: str = "ctrl-ray-pretrain"
    registered_model: str = "ctrl-base-flow"

    def __post_init__(self):
        for name in ("latent_testbed", "output_dir", "experiment"):
            if not getattr(self, name):
                raise ConfigValueError(name, getattr(self, name), "is empty")


@dataclass
class LatentTestbedFacts:
    """What the flow testbed needs to know of the latent testbed it reuses, read from JSON."""

    image_size: int
    latent_channels: int
    latent_size: int
    metadata: dict


def read_latent_testbed(config: FlowTestbedConfig) -> LatentTestbedFacts:
    """Read the reused folder's `ctrl_ray.json` and `vae/config.json` (no torch) and check that it
    is a latent testbed whose latents the transformer's patches tile and whose text encoder is
    the configured one."""
    root = Path(config.latent_testbed)
    key = "latent_testbed"
    for part in ("ctrl_ray.json", "vae/config.json", "text_encoder", "tokenizer"):
        if not (root / part).exists():
            raise InputError(f"{key}: {str(root)!r} has no {part} (build the latent testbed "
                             f"first: ctrl-ray text2image build --config "
                             f"configs/pretrain_text2image.yaml)")
    try:
        metadata = json.loads((root / "ctrl_ray.json").read_text())
        vae = json.loads((root / "vae/config.json").read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"{key}: {str(root)!r} could not be read: {err}") from None
    if metadata.get("built_by") != LATENT_TESTBED_BUILDER:
        raise InputError(f"{key}: {str(root)!r} was not built by `ctrl-ray text2image build` "
                         f"(built_by {metadata.get('built_by')!r})")
    for name in ("encoder", "max_length"):
        theirs = metadata.get("text_encoder" if name == "encoder" else name)
        if getattr(config.text, name) != theirs:
            raise ConfigValueError(f"text.{name}", getattr(config.text, name),
                                   f"differs from the latent testbed's {theirs!r}")
    image_size = int(vae["sample_size"])
    latent_size = image_size // 2 ** (len(vae["block_out_channels"]) - 1)
    if latent_size % config.transformer.patch_size:
        raise ConfigValueError("transformer.patch_size", config.transformer.patch_size,
                               f"does not tile the {latent_size}x{latent_size} latents")
    return LatentTestbedFacts(image_size=image_size, latent_channels=int(vae["latent_channels"]),
                              latent_size=latent_size, metadata=metadata)
