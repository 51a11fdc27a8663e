"""Prompt encoders of SD3-format flow models: token states and one pooled vector per prompt.

An ``SD3Transformer2DModel`` reads two encodings of a prompt: token states (N, L,
joint_attention_dim) it attends to jointly with the image tokens, and a pooled vector (N,
pooled_projection_dim) added to its timestep embedding. Two layouts are read:

- ctrl-ray's own (the flow testbed): one text encoder (MiniLM, ``text_encoder/`` +
  ``tokenizer/`` as the latent testbed writes them); the states are its token states and the
  pooled vector its mean-pooled, unit-norm embedding (`PromptEncoder.encode_with_embedding`).
- a real Stable Diffusion 3 folder: CLIP-L and CLIP-G (``text_encoder``, ``text_encoder_2``,
  both ``CLIPTextModelWithProjection``) and optionally T5 (``text_encoder_3``), combined as
  diffusers' ``StableDiffusion3Pipeline.encode_prompt`` does (tests/test_flow.py checks that).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ctrl_ray.errors import InputError
from ctrl_ray.models.text_encoder import PromptEncoder


class SingleEncoderPrompts(nn.Module):
    """One text encoder: its token states and its unit-norm mean-pooled embedding."""

    def __init__(self, encoder: PromptEncoder):
        super().__init__()
        self.encoder = encoder
        self.states_dim = self.pooled_dim = encoder.hidden_size

    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Token states (N, max_length, D) and pooled projections (N, D), float32."""
        return self.encoder.encode_with_embedding(prompts)


class SD3Prompts(nn.Module):
    """Stable Diffusion 3's text encoders: CLIP-L and CLIP-G (penultimate hidden states, side by
    side, zero-padded to the joint width) followed by T5's states (zeros when T5 is absent);
    the pooled vector is the two CLIP projections side by side."""

    def __init__(self, text_encoders: list[nn.Module], tokenizers: list, joint_attention_dim: int,
                 max_sequence_length: int = 256):
        super().__init__()
        if len(text_encoders) != 3 or len(tokenizers) != 3 or text_encoders[1] is None:
            raise InputError("an SD3 folder needs text_encoder, text_encoder_2 and (optionally) "
                             "text_encoder_3 with their tokenizers")
        for encoder in text_encoders:
            if encoder is not None:
                encoder.requires_grad_(False).eval()
        self.clip_encoders = nn.ModuleList(text_encoders[:2])
        self.t5_encoder = text_encoders[2]
        self.tokenizers = tokenizers
        self.clip_max_length = int(tokenizers[0].model_max_length)
        self.max_sequence_length = int(max_sequence_length)
        self.states_dim = int(joint_attention_dim)
        self.pooled_dim = sum(int(e.config.projection_dim) for e in self.clip_encoders)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Token states (N, L_clip + max_sequence_length, joint dim) and pooled (N, D), float32."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise InputError(f"prompts must be a list of strings, got {prompts!r}")
        device = next(self.clip_encoders[0].parameters()).device
        clip_states, pooled = [], []
        for encoder, tokenizer in zip(self.clip_encoders, self.tokenizers[:2], strict=True):
            ids = tokenizer(list(prompts), padding="max_length", max_length=self.clip_max_length,
                            truncation=True, return_tensors="pt").input_ids.to(device)
            output = encoder(ids, output_hidden_states=True)
            pooled.append(output[0].float())
            clip_states.append(output.hidden_states[-2].float())
        if self.t5_encoder is None:
            t5_states = torch.zeros(len(prompts), self.max_sequence_length, self.states_dim,
                                    device=device)
        else:
            ids = self.tokenizers[2](list(prompts), padding="max_length",
                                     max_length=self.max_sequence_length, truncation=True,
                                     add_special_tokens=True, return_tensors="pt").input_ids
            t5_states = self.t5_encoder(ids.to(device))[0].float()
        clip = torch.cat(clip_states, dim=-1)
        clip = nn.functional.pad(clip, (0, self.states_dim - clip.shape[-1]))
        return torch.cat([clip, t5_states], dim=-2), torch.cat(pooled, dim=-1)


def load_sd3_prompts(path: Path, index: dict, joint_attention_dim: int,
                     max_sequence_length: int) -> SD3Prompts:
    """The text encoders of a Stable Diffusion 3 folder (``text_encoder_3`` may be null)."""
    from transformers import (
        AutoTokenizer,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5EncoderModel,
    )

    encoders, tokenizers = [], []
    for suffix, encoder_class, tokenizer_class in (("", CLIPTextModelWithProjection,
                                                    CLIPTokenizer),
                                                   ("_2", CLIPTextModelWithProjection,
                                                    CLIPTokenizer),
                                                   ("_3", T5EncoderModel, AutoTokenizer)):
        encoder_dir, tokenizer_dir = path / f"text_encoder{suffix}", path / f"tokenizer{suffix}"
        present = (index.get(f"text_encoder{suffix}") or [None])[0] is not None
        if not present and suffix == "_3":
            encoders.append(None)
            tokenizers.append(None)
            continue
        if not (present and encoder_dir.is_dir() and tokenizer_dir.is_dir()):
            raise InputError(f"SD3 folder {str(path)!r} has no text_encoder{suffix}/ and "
                             f"tokenizer{suffix}/")
        try:
            encoders.append(encoder_class.from_pretrained(encoder_dir, local_files_only=True))
            tokenizers.append(tokenizer_class.from_pretrained(tokenizer_dir,
                                                              local_files_only=True))
        except (OSError, ValueError) as err:
            raise InputError(f"text encoder {str(encoder_dir)!r} could not be loaded: "
                             f"{err}") from None
    return SD3Prompts(encoders, tokenizers, joint_attention_dim, max_sequence_length)
