"""The config of `ctrl-ray text2image tiny-pipeline` (the sizes of a small SD-format pipeline),
without torch: read and checked before any heavy import (`ctrl_ray.models.tiny_pipeline`
builds from it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ctrl_ray.data.digits import digit_prompts
from ctrl_ray.errors import InputError


@dataclass
class TinyPipelineConfig:
    """Sizes of the pipeline; the VAE downsamples by 2 ** (len(vae_channels) - 1)."""

    image_size: int = 16
    image_channels: int = 3
    latent_channels: int = 4
    vae_channels: list[int] = field(default_factory=lambda: [8, 16, 16])
    unet_channels: list[int] = field(default_factory=lambda: [16, 32])
    layers_per_block: int = 1
    attention_head_dim: int = 8
    norm_num_groups: int = 8
    text_hidden_size: int = 32
    text_layers: int = 2
    text_heads: int = 2
    max_length: int = 32
    num_train_timesteps: int = 1000
    prompts: list[str] = field(default_factory=digit_prompts)
    seed: int = 0

    def __post_init__(self):
        factor = 2 ** (len(self.vae_channels) - 1)
        if self.image_size % factor or self.image_size // factor < 2 ** (
                len(self.unet_channels) - 1):
            raise InputError(f"image_size {self.image_size} does not fit a VAE that downsamples "
                             f"{factor}x and a UNet with {len(self.unet_channels)} levels")
        if self.image_channels not in (1, 3):
            raise InputError(f"image_channels must be 1 or 3, got {self.image_channels}")
