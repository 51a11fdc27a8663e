"""Text-to-image backbones: a prompt-conditioned UNet, in latent space (Stable Diffusion) or pixels.

The context c of a text backbone is a prompt, held as an index into the backbone's list of
prompts (`ctrl_ray.models.prompt_contexts`): the frozen text encoder's token states are what the
UNet cross-attends to, their pooled embedding what a value head reads.

Classifier-free guidance on the prompt: with ``guidance_scale`` w != 1 every noise prediction is
``eps_uncond + w (eps_cond - eps_uncond)``, the empty prompt giving eps_uncond. The new label's
embedding goes into both branches and the reference is the same guided prediction with the
adapters off, so the per-step KL compares the guided policy with the guided pre-trained model.

A latent backbone (``vae`` given) samples latents of ``sample_shape`` and ``decode`` maps them
through the VAE decoder to images of ``image_shape``; the reward and the evaluation read the
decoded images. ``mixed_precision`` and ``gradient_checkpointing`` are those of every prompt
backbone (`ctrl_ray.models.prompt_contexts`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch import Tensor
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from ctrl_ray.errors import InputError
from ctrl_ray.models.backbone import UNetBackbone
from ctrl_ray.models.prompt_contexts import PromptContexts
from ctrl_ray.models.text_encoder import PromptEncoder
from ctrl_ray.models.text_to_image_options import TextToImageOptions  # noqa: F401 - re-exported

STABLE_DIFFUSION = "stable-diffusion"
TEXT_PIXEL = "unet2d-text-conditional"


class TextToImageBackbone(PromptContexts, UNetBackbone):
    """A frozen ``UNet2DConditionModel`` conditioned on prompts, optionally in a VAE's latents.

    ``network`` is the UNet (LoRA goes on its attention projections); the text encoder and the
    VAE are frozen submodules that never get adapters.
    """

    def __init__(self, unet: UNet2DConditionModel, scheduler: DDPMScheduler,
                 prompt_encoder: PromptEncoder, prompts: list[str],
                 vae: AutoencoderKL | None = None, guidance_scale: float = 1.0,
                 mixed_precision: str = "no", gradient_checkpointing: bool = False,
                 kind: str = STABLE_DIFFUSION):
        if not isinstance(unet, UNet2DConditionModel):
            raise InputError(f"a text backbone needs a UNet2DConditionModel, got "
                             f"{type(unet).__name__}")
        cross_dim = unet.config.cross_attention_dim
        if cross_dim != prompt_encoder.hidden_size:
            raise InputError(f"the UNet cross-attends to {cross_dim}-d states but the text "
                             f"encoder makes {prompt_encoder.hidden_size}-d ones")
        super().__init__(unet, scheduler)
        self.prompt_encoder = prompt_encoder
        self.vae = vae
        self.init_options(unet, kind, guidance_scale, mixed_precision, gradient_checkpointing)
        self.default_lora_targets = ["to_q", "to_k", "to_v", "to_out.0"]
        if vae is not None:
            vae.requires_grad_(False)
            vae.eval()
            self.clip_sample = False  # latents are not bounded to [-1, 1]
            factor = 2 ** (len(vae.config.block_out_channels) - 1)
            _, height, width = self.sample_shape
            self._image_shape = (vae.config.out_channels, height * factor, width * factor)
        else:
            self._image_shape = tuple(self.sample_shape)
        self.init_prompts(prompts)

    # -- contexts are prompts ----------------------------------------------------------------
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Token states (N, L, D) the UNet cross-attends to and pooled embeddings (N, D)."""
        states, embeddings = self.prompt_encoder.encode_with_embedding(prompts)
        return {"states": states, "embeddings": embeddings}

    def context_states(self, context: Tensor | None, batch_size: int) -> Tensor:
        """Token states (B, L, D) for prompt indices (B,), given states, or None (empty prompt)."""
        if context is not None and context.is_floating_point():
            return context
        return self.prompt_rows("states", context, batch_size)

    # -- the network calls -------------------------------------------------------------------
    def _unet(self, x_t: Tensor, t: Tensor, states: Tensor, extra: Tensor | None) -> Tensor:
        self.checkpoint_calls(policy_call=extra is not None)
        with self.autocast(x_t):
            eps = super().predict_noise(x_t, t, states, extra)
        return eps.to(x_t.dtype)

    def predict_noise(self, x_t: Tensor, t: Tensor, context: Tensor | None,
                      extra_embedding: Tensor | None = None) -> Tensor:
        batch = x_t.shape[0]
        states = self.context_states(context, batch).to(x_t.dtype)
        t = t.expand(batch)
        if self.guidance_scale == 1.0:
            return self._unet(x_t, t, states, extra_embedding)
        uncond = self.empty_prompt_states.to(x_t.dtype).expand(batch, -1, -1)
        extra = None if extra_embedding is None else torch.cat([extra_embedding] * 2)
        eps = self._unet(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([uncond, states]),
                         extra)
        eps_uncond, eps_cond = eps.chunk(2)
        return eps_uncond + self.guidance_scale * (eps_cond - eps_uncond)

    # -- latents to images -------------------------------------------------------------------
    @property
    def is_latent(self) -> bool:
        return self.vae is not None

    @property
    def image_shape(self) -> tuple[int, ...]:
        return self._image_shape

    def decode(self, samples: Tensor) -> Tensor:
        if self.vae is None:
            return samples
        with self.autocast(samples):
            images = self.vae.decode(samples / self.vae.config.scaling_factor).sample
        return images.to(samples.dtype)


def decode_images(backbone, samples: Tensor) -> Tensor:
    """``backbone.decode(samples)``; when gradients flow (pathwise) the decoder's activations are
    recomputed in backward instead of stored (``torch.utils.checkpoint``)."""
    if not backbone.is_latent:
        return backbone.decode(samples)
    if torch.is_grad_enabled() and samples.requires_grad:
        return activation_checkpoint(backbone.decode, samples, use_reentrant=False)
    return backbone.decode(samples)


def reward_view(images: Tensor, channels: int, image_size: int) -> Tensor:
    """Decoded images as a reward classifier reads them: RGB to luma (ITU-R 601) when it reads
    one channel, resized (bilinear, antialiased) to its size; differentiable, identity when the
    images already fit."""
    if images.shape[1] == 3 and channels == 1:
        weights = images.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        images = (images * weights).sum(1, keepdim=True)
    if images.shape[1] != channels:
        raise InputError(f"the reward reads {channels}-channel images, the model makes "
                         f"{images.shape[1]}-channel ones")
    if tuple(images.shape[-2:]) != (image_size, image_size):
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear",
                               antialias=True, align_corners=False)
    return images


def load_stable_diffusion_dir(path: Path) -> dict[str, Any]:
    """The parts of a diffusers Stable-Diffusion-format directory (``model_index.json``):
    unet, vae, prompt_encoder, scheduler (DDPM on its noise schedule) and metadata."""
    from ctrl_ray.models.text_encoder import load_pretrained_encoder
    from ctrl_ray.storage import read_json

    index = read_json(path / "model_index.json", "pipeline index")
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if part not in index or not (path / part).is_dir():
            raise InputError(f"Stable-Diffusion directory {str(path)!r} has no {part}/")
    try:
        unet = UNet2DConditionModel.from_pretrained(path / "unet", local_files_only=True)
        vae = AutoencoderKL.from_pretrained(path / "vae", local_files_only=True)
        scheduler_config = DDPMScheduler.load_config(path / "scheduler")
        scheduler = DDPMScheduler.from_config(scheduler_config)
    except (OSError, ValueError) as err:
        raise InputError(f"Stable-Diffusion directory {str(path)!r} could not be loaded: "
                         f"{err}") from None
    encoder = load_pretrained_encoder(path / "text_encoder", path / "tokenizer")
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    size = unet.config.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    metadata: dict[str, Any] = {"prompts": []}
    extra = path / "ctrl_ray.json"
    if extra.is_file():
        metadata.update(read_json(extra, "base model metadata"))
    metadata.update(kind=STABLE_DIFFUSION, num_contexts=len(metadata["prompts"]) or None,
                    image_shape=[vae.config.out_channels, height * factor, width * factor])
    return {"unet": unet, "vae": vae, "prompt_encoder": encoder, "scheduler": scheduler,
            "metadata": metadata}
