"""Contexts that are prompts: a backbone's list of prompts and their encodings, by index, and
the options every prompt backbone takes (`TextToImageOptions`).

A prompt-conditioned backbone (the text UNets, the SD3 flow transformer) holds a list of prompts
(from the config's ``backbone.prompts`` or the base model's metadata) and what its frozen text
encoder made of them, encoded once; the contexts the sampler carries stay (B,) long indices into
that list, so drawing, sharding, seeding and Ray transport are those of class contexts. A free
prompt at sampling time (``ctrl-ray sample --prompt``, a pyfunc row with a string ``c``) is
appended with ``add_prompt`` and gets the next index. Each prompt also has a unit-norm pooled text
embedding (``context_embedding``): the value head conditions on it, so it generalises to text it
was never trained on instead of looking an index up in a table.

The options: classifier-free guidance on the prompt (``guidance_scale``), autocast of the network
and the VAE on CUDA tensors only (``mixed_precision``), and the network's own activation
checkpointing for the policy's calls (those that carry a label embedding). The reference's calls
run inside ``AugmentedModel.reference()`` (adapters off, or the original weights swapped in): a
checkpoint inside the network would be recomputed lazily in backward, after that context has
closed, i.e. with the policy's weights, so they are never checkpointed inside the network (the
sampler's own checkpoint around each whole network call still applies to them).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ctrl_ray.errors import InputError

PRECISIONS = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class PromptContexts:
    """Mixin for an ``nn.Module`` backbone whose contexts are prompts.

    The backbone implements ``encode_prompts(prompts) -> {name: (N, ...) tensor}``; the parts
    always include ``states`` (what the network attends to) and ``embeddings`` (unit-norm,
    what a value head reads). Each part ``name`` is kept as the buffers ``prompt_<name>`` (one
    row per prompt) and ``empty_prompt_<name>`` (the empty prompt: classifier-free guidance's
    unconditional branch).
    """

    prompts: list[str]

    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        raise NotImplementedError

    def init_prompts(self, prompts: list[str]) -> None:
        """Encode the empty prompt and ``prompts`` (called once from ``__init__``)."""
        self.prompts = []
        for name, values in self.encode_prompts([""]).items():
            self.register_buffer(f"empty_prompt_{name}", values, persistent=False)
            self.register_buffer(f"prompt_{name}", values[:0].clone(), persistent=False)
        for prompt in prompts:
            self.add_prompt(prompt)

    @property
    def num_contexts(self) -> int:
        return len(self.prompts)

    @num_contexts.setter
    def num_contexts(self, value) -> None:  # a base class's __init__ assigns it; prompts decide
        pass

    def add_prompt(self, prompt: str) -> int:
        """The context index of ``prompt``, encoding and appending it if it is new."""
        if not isinstance(prompt, str):
            raise InputError(f"a prompt must be a string, got {prompt!r}")
        if prompt in self.prompts:
            return self.prompts.index(prompt)
        for name, values in self.encode_prompts([prompt]).items():
            known = getattr(self, f"prompt_{name}")
            setattr(self, f"prompt_{name}", torch.cat([known, values.to(known)]))
        self.prompts.append(prompt)
        return len(self.prompts) - 1

    @property
    def context_embedding_dim(self) -> int:
        """Width of `context_embedding`: what a value head conditions on instead of an index."""
        return int(self.prompt_embeddings.shape[-1])

    def context_embedding(self, context: Tensor) -> Tensor:
        """The pooled, unit-norm text embedding (B, D) of each row's prompt (indices (B,))."""
        return self.prompt_rows("embeddings", context, context.shape[0])

    def prompt_rows(self, name: str, context: Tensor | None, batch_size: int) -> Tensor:
        """Part ``name`` of each row's prompt for indices (B,), or of the empty prompt (None)."""
        if context is None:
            empty = getattr(self, f"empty_prompt_{name}")
            return empty.expand(batch_size, *empty.shape[1:])
        self._check_indices(context)
        rows = getattr(self, f"prompt_{name}")
        return rows[context.to(rows.device)]

    def init_options(self, network: nn.Module, kind: str, guidance_scale: float,
                     mixed_precision: str, gradient_checkpointing: bool) -> None:
        """Keep the options (and the model family ``kind``); turn on the network's checkpointing."""
        self.kind = kind
        self.guidance_scale = float(guidance_scale)
        self.mixed_precision = mixed_precision
        self.autocast_dtype = PRECISIONS[mixed_precision]
        self.gradient_checkpointing = bool(gradient_checkpointing)
        if self.gradient_checkpointing:
            network.enable_gradient_checkpointing()
        self._checkpointed_blocks = [m for m in network.modules()
                                     if getattr(m, "gradient_checkpointing", False)]

    def describe(self) -> dict[str, Any]:
        """What a policy checkpoint records to rebuild this backbone around its base model."""
        return {"kind": self.kind, "prompts": list(self.prompts),
                "guidance_scale": self.guidance_scale, "mixed_precision": self.mixed_precision,
                "gradient_checkpointing": self.gradient_checkpointing}

    def autocast(self, like: Tensor):
        """The ``mixed_precision`` autocast context, on for CUDA tensors only."""
        enabled = self.autocast_dtype is not None and like.is_cuda
        return torch.autocast("cuda", dtype=self.autocast_dtype or torch.bfloat16,
                              enabled=enabled)

    def checkpoint_calls(self, policy_call: bool) -> None:
        """Checkpoint inside the network for the policy's calls only (module docstring)."""
        for block in self._checkpointed_blocks:
            block.gradient_checkpointing = policy_call

    def _check_indices(self, context: Tensor) -> None:
        if context.numel() and not 0 <= int(context.min()) <= int(context.max()) < len(
                self.prompts):
            raise InputError(f"prompt indices must lie in 0..{len(self.prompts) - 1}, got "
                             f"{int(context.min())}..{int(context.max())}")
