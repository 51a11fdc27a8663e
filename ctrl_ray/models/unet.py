"""The pixel UNets of the digits testbed (class- or text-conditional) and their noise schedule."""

from __future__ import annotations

from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel

from ctrl_ray.models.unet_config import ScheduleConfig, UNetConfig


def _shared_arguments(config: UNetConfig) -> dict:
    """The diffusers arguments both testbed UNets take from `config`."""
    return {
        "sample_size": config.image_size,
        "in_channels": config.in_channels,
        "out_channels": config.in_channels,
        "block_out_channels": tuple(config.block_out_channels),
        "layers_per_block": config.layers_per_block,
        "norm_num_groups": config.norm_num_groups,
        "attention_head_dim": config.attention_head_dim,
    }


def build_unet(config: UNetConfig) -> UNet2DModel:
    """A fresh, randomly initialised `UNet2DModel` with one class embedding row per context."""
    depth = len(config.block_out_channels)
    return UNet2DModel(
        down_block_types=("DownBlock2D",) * (depth - 1) + ("AttnDownBlock2D",),
        up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (depth - 1),
        num_class_embeds=config.num_contexts,
        **_shared_arguments(config),
    )


def build_text_unet(config: UNetConfig, cross_attention_dim: int) -> UNet2DConditionModel:
    """A fresh `UNet2DConditionModel` of the same shape whose last level (and middle block)
    cross-attends to prompt token states of `cross_attention_dim` (MiniLM: 384)."""
    depth = len(config.block_out_channels)
    return UNet2DConditionModel(
        down_block_types=("DownBlock2D",) * (depth - 1) + ("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",) + ("UpBlock2D",) * (depth - 1),
        cross_attention_dim=cross_attention_dim,
        **_shared_arguments(config),
    )


def build_scheduler(config: ScheduleConfig) -> DDPMScheduler:
    """The DDPM scheduler whose `alphas_cumprod` defines the forward process."""
    return DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        clip_sample=config.clip_sample,
        prediction_type="epsilon",
    )
