"""The shapes of the digits testbed's pixel UNets and their noise schedule, without diffusers:
read and checked before any heavy import (`ctrl_ray.models.unet` builds them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class UNetConfig:
    """Shape of a small class-conditional `UNet2DModel`; the last down block has self-attention."""

    image_size: int = 16
    in_channels: int = 1
    num_contexts: int = 10
    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    norm_num_groups: int = 8
    attention_head_dim: int = 8


@dataclass
class ScheduleConfig:
    """DDPM training noise schedule; stored as the scheduler config next to the UNet."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    clip_sample: bool = True
