"""The frozen pre-trained noise predictor that CTRL adapts, behind one small interface.

A backbone answers ``predict_noise(x_t, t, context, extra_embedding)`` and exposes what the
sampler and the augmented model need: ``sample_shape``, ``alphas_cumprod`` (the forward
process), ``embedding_dim`` (the size of the vector added to the timestep embedding),
``clip_sample``, ``num_contexts`` and ``network`` (the module adapters are injected into).
Every backbone says whether its samples are latents (``is_latent``) and turns them into images
with ``decode`` (a VAE decoder for latent backbones, identity for pixel ones).
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel
from torch import Tensor, nn

from ctrl_ray.errors import InputError
from ctrl_ray.sampler_config import SamplingOptions


class Backbone(nn.Module):
    """Interface of a pre-trained epsilon-predictor p_pre(x | c) with a slot for new conditions.

    Subclasses set the attributes below in ``__init__``, register the noise schedule as the
    buffer ``alphas_cumprod`` (length T = number of training timesteps) and implement
    ``predict_noise``. ``extra_embedding`` (B, embedding_dim) is added to the timestep
    embedding; ``None`` means nothing is added, so the output is the pre-trained one.
    """

    sample_shape: tuple[int, ...]
    embedding_dim: int
    clip_sample: bool
    num_contexts: int | None
    network: nn.Module
    default_lora_targets: list[str]
    alphas_cumprod: Tensor

    def predict_noise(
        self, x_t: Tensor, t: Tensor, context: Tensor | None, extra_embedding: Tensor | None = None
    ) -> Tensor:
        raise NotImplementedError

    @property
    def is_latent(self) -> bool:
        """Whether samples are latents that ``decode`` maps to images (False: they are pixels)."""
        return False

    @property
    def image_shape(self) -> tuple[int, ...]:
        """Shape of one decoded image; a pixel backbone's samples are its images."""
        return tuple(self.sample_shape)

    def decode(self, samples: Tensor) -> Tensor:
        """Images (B, C, H, W) in about [-1, 1] from samples; identity for pixel backbones."""
        return samples

    def configure_calls(self, options: SamplingOptions) -> None:
        """How the network's calls run (`SamplingOptions`); only UNet backbones have any."""
        if options != SamplingOptions():
            raise InputError(f"sampling options {options} apply to UNet backbones only")

    def forward(
        self, x_t: Tensor, t: Tensor, context: Tensor | None, extra_embedding: Tensor | None = None
    ) -> Tensor:
        # forward lets torch.func.functional_call run the backbone with swapped weights.
        return self.predict_noise(x_t, t, context, extra_embedding)


class UNetBackbone(Backbone):
    """A diffusers UNet (epsilon prediction) as a backbone; its weights are frozen.

    ``context`` is the class-label tensor (B,) long for a ``UNet2DModel`` with class
    embeddings, or the encoder hidden states (B, L, D) for a ``UNet2DConditionModel``.
    The extra embedding is added to the output of ``unet.time_embedding`` by a forward hook
    registered for one ``predict_noise`` call and removed after it, so the UNet code is used
    unchanged and the UNet never keeps a hook (two backbones on one UNet do not interfere).
    """

    def __init__(self, unet: UNet2DModel | UNet2DConditionModel, scheduler: DDPMScheduler):
        super().__init__()
        if scheduler.config.prediction_type != "epsilon":
            prediction = scheduler.config.prediction_type
            raise InputError(f"scheduler.prediction_type must be 'epsilon', got {prediction!r}")
        unet.requires_grad_(False)
        unet.eval()
        self.network = unet
        self.register_buffer(
            "alphas_cumprod", scheduler.alphas_cumprod.detach().clone().float(), persistent=False
        )
        size = unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        self.sample_shape = (unet.config.in_channels, height, width)
        self.embedding_dim = unet.time_embedding.linear_2.out_features
        self.clip_sample = bool(scheduler.config.clip_sample)
        self.is_cross_attention = isinstance(unet, UNet2DConditionModel)
        self.num_contexts = None if self.is_cross_attention else unet.config.num_class_embeds
        self.default_lora_targets = ["conv1", "conv2", "to_q", "to_k", "to_v", "to_out.0"]
        self.options = SamplingOptions()

    def configure_calls(self, options: SamplingOptions) -> None:
        """Run the UNet's calls under bf16 autocast (outputs in the input's dtype) or not."""
        self.options = options

    def predict_noise(
        self, x_t: Tensor, t: Tensor, context: Tensor | None, extra_embedding: Tensor | None = None
    ) -> Tensor:
        if extra_embedding is None:
            return self._run_unet(x_t, t, context)

        def add_extra_embedding(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
            return output + extra_embedding.to(output.dtype)

        handle = self.network.time_embedding.register_forward_hook(add_extra_embedding)
        try:
            return self._run_unet(x_t, t, context)
        finally:
            handle.remove()

    def _run_unet(self, x_t: Tensor, t: Tensor, context: Tensor | None) -> Tensor:
        network = self.network
        with torch.autocast(x_t.device.type, dtype=torch.bfloat16, enabled=self.options.bf16):
            if self.is_cross_attention:
                eps = network(x_t, t, encoder_hidden_states=context).sample
            else:
                eps = network(x_t, t, class_labels=context).sample
        return eps.to(x_t.dtype)
