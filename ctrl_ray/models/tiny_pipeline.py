"""Write a small Stable-Diffusion-format pipeline from configs (random weights, offline).

For tests, benchmarks and trying the text-to-image path without a model hub: a CLIP-style text
encoder with a character-level BPE tokenizer (its `vocab.json` and `merges.txt` are written
here: every byte and byte-at-word-end is a token, with no merges), an `AutoencoderKL`, a
`UNet2DConditionModel` with cross-attention, and an SD-style DDIM scheduler, saved with
`StableDiffusionPipeline.save_pretrained` so the directory has the layout of a real one
(`model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`). A
`ctrl_ray.json` beside them lists default prompts. The weights are random: the samples are
noise-like, but every code path (CFG, VAE decode, LoRA, KL) runs as with a real model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ctrl_ray.models.tiny_pipeline_config import TinyPipelineConfig
from ctrl_ray.storage import atomic_directory, write_json


def _byte_tokens() -> list[str]:
    """The byte-level BPE alphabet of GPT-2 / CLIP: one printable character per byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    shifted, extra = [], 0
    for byte in range(256):
        if byte in printable:
            shifted.append(chr(byte))
        else:
            shifted.append(chr(256 + extra))
            extra += 1
    return shifted


def write_tokenizer_files(directory: Path) -> int:
    """A character-level CLIP BPE vocabulary; returns its size."""
    alphabet = _byte_tokens()
    vocab = alphabet + [f"{c}</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return len(vocab)


def build_tiny_pipeline(config: TinyPipelineConfig, out_dir: str | Path) -> Path:
    """Write the pipeline described by `config` to `out_dir` (atomically); returns the path."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        vocab_size = write_tokenizer_files(tmp / "tokenizer_files")
        tokenizer = CLIPTokenizer.from_pretrained(tmp / "tokenizer_files",
                                                  model_max_length=config.max_length)
        torch.manual_seed(config.seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=config.text_hidden_size,
            intermediate_size=2 * config.text_hidden_size,
            num_hidden_layers=config.text_layers, num_attention_heads=config.text_heads,
            max_position_embeddings=config.max_length,
            bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
        ))
        vae_depth = len(config.vae_channels)
        vae = AutoencoderKL(
            in_channels=config.image_channels, out_channels=config.image_channels,
            down_block_types=("DownEncoderBlock2D",) * vae_depth,
            up_block_types=("UpDecoderBlock2D",) * vae_depth,
            block_out_channels=tuple(config.vae_channels), layers_per_block=1,
            latent_channels=config.latent_channels, norm_num_groups=config.norm_num_groups,
            sample_size=config.image_size,
        )
        depth = len(config.unet_channels)
        unet = UNet2DConditionModel(
            sample_size=config.image_size // 2 ** (vae_depth - 1),
            in_channels=config.latent_channels, out_channels=config.latent_channels,
            block_out_channels=tuple(config.unet_channels),
            layers_per_block=config.layers_per_block,
            down_block_types=("CrossAttnDownBlock2D",) * (depth - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (depth - 1),
            cross_attention_dim=config.text_hidden_size,
            attention_head_dim=config.attention_head_dim,
            norm_num_groups=config.norm_num_groups,
        )
        scheduler = DDIMScheduler(  # Stable Diffusion's schedule and sampler settings
            num_train_timesteps=config.num_train_timesteps, beta_start=0.00085, beta_end=0.012,
            beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
            steps_offset=1, prediction_type="epsilon",
        )
        pipeline = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
        pipeline.save_pretrained(tmp)
        for leftover in (tmp / "tokenizer_files").iterdir():
            leftover.unlink()
        (tmp / "tokenizer_files").rmdir()
        write_json(tmp / "ctrl_ray.json", {"prompts": list(config.prompts),
                                           "built_by": "ctrl_ray.models.tiny_pipeline"})
    return out_dir
