"""Tiny SD3-format flow folders with random weights, built offline for tests/test_flow.py:
a real Stable-Diffusion-3 layout (two CLIP text encoders with projection, no T5) and ctrl-ray's
own layout (one MiniLM encoder, written by `save_flow_pipeline`). Latents 4x4x4, images 8x8 RGB."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

from ctrl_ray.models.tiny_pipeline import write_tokenizer_files

CLIP_MAX_LENGTH = 12


def tiny_transformer(joint_attention_dim: int, pooled_projection_dim: int) -> SD3Transformer2DModel:
    """Two joint blocks of width 16 over 4x4 latent tokens (patch size 1)."""
    return SD3Transformer2DModel(
        sample_size=4, patch_size=1, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=joint_attention_dim,
        caption_projection_dim=16, pooled_projection_dim=pooled_projection_dim,
        pos_embed_max_size=4)


def tiny_vae() -> AutoencoderKL:
    """8x8 RGB images to 4x4x4 latents, with SD3's latent normalisation (scale and shift)."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=8, scaling_factor=1.5,
        shift_factor=0.1)


def build_tiny_sd3(out: Path, shift: float = 3.0) -> Path:
    """A Stable-Diffusion-3-format folder as diffusers writes it: text_encoder and text_encoder_2
    (CLIPTextModelWithProjection, 16- and 24-wide, 8-d projections), text_encoder_3 null; no
    ctrl_ray.json, so nothing but diffusers' own files is read."""
    from diffusers import StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    vocab_size = write_tokenizer_files(out.parent / "clip-vocab")
    tokenizer = CLIPTokenizer.from_pretrained(out.parent / "clip-vocab",
                                              model_max_length=CLIP_MAX_LENGTH)
    torch.manual_seed(0)
    encoders = [CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=8, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1)) for width in (16, 24)]
    pipeline = StableDiffusion3Pipeline(
        transformer=tiny_transformer(joint_attention_dim=48, pooled_projection_dim=16),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), vae=tiny_vae(),
        text_encoder=encoders[0], tokenizer=tokenizer, text_encoder_2=encoders[1],
        tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None)
    pipeline.save_pretrained(out)
    return out


def build_tiny_flow_testbed(out: Path, prompts: list[str]) -> Path:
    """ctrl-ray's own flow layout: one MiniLM encoder (8 tokens), metadata as the testbeds
    write it."""
    from ctrl_ray.models.flow import save_flow_pipeline
    from ctrl_ray.models.text_encoder import load_minilm
    from ctrl_ray.models.text_to_image_options import MINILM

    torch.manual_seed(0)
    transformer = tiny_transformer(joint_attention_dim=384, pooled_projection_dim=384)
    return save_flow_pipeline(out, transformer, FlowMatchEulerDiscreteScheduler(shift=3.0),
                              tiny_vae(), load_minilm(8),
                              {"prompts": prompts, "built_by": "tests/flow_fixtures.py",
                               "context_name": "prompt", "text_encoder": MINILM})
