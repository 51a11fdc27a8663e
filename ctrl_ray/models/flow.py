"""Flow-matching backbones: a rectified flow (Stable Diffusion 3's transformer) as a CTRL backbone.

A rectified flow noises x0 as x_s = (1 - s) x0 + s eps, s in [0, 1], and its network predicts
the velocity v = eps - x0 (diffusers calls it at timestep s * num_train_timesteps). In the
rescaled coordinates x~ = x_s / r(s), r(s) = sqrt((1 - s)^2 + s^2), the same process is
variance-preserving, x~ = sqrt(abar) x0 + sqrt(1 - abar) eps with abar(s) = (1 - s)^2 / r(s)^2,
and the velocity gives the noise prediction eps = x_s + (1 - s) v (and x0 = x_s - s v). A
`FlowBackbone` therefore exposes ``alphas_cumprod[i] = abar(s_i)`` over the scheduler's training
sigmas (s increasing with i) and ``predict_noise(x~, i) = x_s + (1 - s_i) v(x_s, s_i)`` with
x_s = r(s_i) x~. The sampler's DDIM-eta steps on that table are the flow's own reverse steps:
eta = 0 is exactly the Euler step of the flow ODE, eta = 1 the memoryless (DDPM posterior) step,
and for small steps eta is the reverse SDE dx = [v + sigma^2 / (2 s) (x + (1 - s) v)] ds + sigma dW
with sigma(s) = eta sqrt(2 s / (1 - s)) (docs/flow_models.md). Each step is a Gaussian with a
closed-form per-step KL, so every update rule runs unchanged.

`SD3Backbone` wraps a diffusers ``SD3Transformer2DModel`` with its VAE and text encoders;
`save_flow_pipeline` writes ctrl-ray's own SD3-format folder and `load_flow_pipeline_dir` reads
it or a real Stable Diffusion 3 folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from torch import Tensor, nn

from ctrl_ray.errors import InputError
from ctrl_ray.models.backbone import Backbone
from ctrl_ray.models.flow_prompts import SD3Prompts, SingleEncoderPrompts, load_sd3_prompts
from ctrl_ray.models.prompt_contexts import PromptContexts
from ctrl_ray.models.text_encoder import PromptEncoder
from ctrl_ray.storage import atomic_directory, read_json, write_json

SD3 = "sd3"
PIPELINE_CLASS = "StableDiffusion3Pipeline"
METADATA_FILE = "ctrl_ray.json"
DEFAULT_MAX_SEQUENCE_LENGTH = 256  # T5 tokens of diffusers' StableDiffusion3Pipeline
# The joint attention's projections, image side and prompt side.
SD3_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0",
                    "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def shifted_sigmas(num_train_timesteps: int, shift: float = 1.0) -> Tensor:
    """The training noise levels s_i = shift u / (1 + (shift - 1) u), u = (i + 1) / T, i = 0..T-1
    (increasing, float64): the sigma table of diffusers' ``FlowMatchEulerDiscreteScheduler``."""
    u = torch.arange(1, num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    return shift * u / (1 + (shift - 1) * u)


def scheduler_sigmas(scheduler: FlowMatchEulerDiscreteScheduler, image_seq_len: int) -> Tensor:
    """A flow-match scheduler's training sigmas, increasing: its static ``shift``, or with
    ``use_dynamic_shifting`` the shift its pipeline computes for ``image_seq_len`` tokens.
    Inference-only reshaping (Karras, exponential, beta, ``shift_terminal``) does not apply:
    ctrl-ray's sampler picks its steps on this table."""
    config = scheduler.config
    num_train_timesteps = int(config.num_train_timesteps)
    if not config.get("use_dynamic_shifting"):
        return shifted_sigmas(num_train_timesteps, float(config.shift))
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    mu = calculate_shift(image_seq_len, config.base_image_seq_len, config.max_image_seq_len,
                         config.base_shift, config.max_shift)
    return scheduler.time_shift(mu, 1.0, shifted_sigmas(num_train_timesteps))


class FlowBackbone(Backbone):
    """A velocity predictor v(x_s, s) seen as an epsilon predictor on rescaled states.

    Subclasses call ``register_flow_sigmas`` in ``__init__`` and implement ``predict_velocity``
    (x_s in the flow's own coordinates, ``t`` the timestep indices into ``flow_sigmas``).
    """

    flow_sigmas: Tensor

    def register_flow_sigmas(self, sigmas: Tensor) -> None:
        """Register ``flow_sigmas`` (T,) and the matching ``alphas_cumprod`` = abar(s)."""
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
        if sigmas.ndim != 1 or len(sigmas) < 2 or not (
                0 < sigmas[0] and sigmas[-1] <= 1 and bool((sigmas.diff() > 0).all())):
            raise InputError("flow sigmas must increase within (0, 1]")
        alphas_cumprod = (1 - sigmas) ** 2 / ((1 - sigmas) ** 2 + sigmas**2)
        self.register_buffer("flow_sigmas", sigmas.float(), persistent=False)
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)

    def predict_velocity(self, x_s: Tensor, t: Tensor, context: Tensor | None,
                         extra_embedding: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def sigma(self, t: Tensor | int, like: Tensor) -> Tensor:
        """s of timestep indices ``t``, shaped (B, 1, ...) to broadcast against ``like``."""
        t = torch.as_tensor(t, device=self.flow_sigmas.device).expand(like.shape[0])
        return self.flow_sigmas[t].to(like.dtype).view(-1, *[1] * (like.dim() - 1))

    def flow_state(self, x: Tensor, t: Tensor | int) -> Tensor:
        """x_s = r(s) x~: a rescaled state at timestep index ``t`` in the flow's coordinates."""
        s = self.sigma(t, x)
        return x * torch.hypot(1 - s, s)

    def predict_noise(self, x_t: Tensor, t: Tensor, context: Tensor | None,
                      extra_embedding: Tensor | None = None) -> Tensor:
        t = torch.as_tensor(t, device=x_t.device).expand(x_t.shape[0])
        s = self.sigma(t, x_t)
        x_s = self.flow_state(x_t, t)
        return x_s + (1 - s) * self.predict_velocity(x_s, t, context, extra_embedding)


class SD3Backbone(PromptContexts, FlowBackbone):
    """A frozen ``SD3Transformer2DModel`` with its VAE and prompt encoder, as a flow backbone.

    ``network`` is the transformer (LoRA on its joint-attention projections). The new label's
    embedding is added to the transformer's conditioning vector (the output of
    ``time_text_embed``, timestep + pooled prompt) by a forward hook held for one call. The
    options are those of every prompt backbone (`ctrl_ray.models.prompt_contexts`); guidance
    acts on the velocity, equivalently on eps (eps = x_s + (1 - s) v is affine in v).
    """

    def __init__(self, transformer: SD3Transformer2DModel,
                 scheduler: FlowMatchEulerDiscreteScheduler,
                 prompt_encoder: SingleEncoderPrompts | SD3Prompts, prompts: list[str],
                 vae: AutoencoderKL, guidance_scale: float = 1.0, mixed_precision: str = "no",
                 gradient_checkpointing: bool = False, kind: str = SD3):
        super().__init__()
        config = transformer.config
        if config.joint_attention_dim != prompt_encoder.states_dim:
            raise InputError(f"the transformer attends to {config.joint_attention_dim}-d prompt "
                             f"states but the text encoder makes {prompt_encoder.states_dim}-d "
                             f"ones")
        if config.pooled_projection_dim != prompt_encoder.pooled_dim:
            raise InputError(f"the transformer reads a {config.pooled_projection_dim}-d pooled "
                             f"prompt but the text encoder makes {prompt_encoder.pooled_dim}-d")
        transformer.requires_grad_(False).eval()
        vae.requires_grad_(False).eval()
        self.network = transformer
        self.vae = vae
        self.prompt_encoder = prompt_encoder
        size = config.sample_size
        self.sample_shape = (config.in_channels, size, size)
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.register_flow_sigmas(scheduler_sigmas(scheduler, (size // config.patch_size) ** 2))
        self.embedding_dim = int(transformer.inner_dim)
        self.clip_sample = False
        self.default_lora_targets = list(SD3_LORA_TARGETS)
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self._image_shape = (vae.config.out_channels, size * factor, size * factor)
        self.init_options(transformer, kind, guidance_scale, mixed_precision,
                          gradient_checkpointing)
        self.init_prompts(prompts)

    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """Token states, pooled projections and the unit-norm pooled embedding of each prompt."""
        states, pooled = self.prompt_encoder.encode(prompts)
        return {"states": states, "pooled": pooled,
                "embeddings": nn.functional.normalize(pooled, dim=-1)}

    def predict_velocity(self, x_s: Tensor, t: Tensor, context: Tensor | None,
                         extra_embedding: Tensor | None = None) -> Tensor:
        if context is not None and context.is_floating_point():
            raise InputError("a flow backbone's contexts are prompt indices")
        batch = x_s.shape[0]
        states = self.prompt_rows("states", context, batch).to(x_s.dtype)
        pooled = self.prompt_rows("pooled", context, batch).to(x_s.dtype)
        timestep = self.flow_sigmas[t].to(x_s.dtype) * self.num_train_timesteps
        if self.guidance_scale == 1.0:
            return self._transformer(x_s, timestep, states, pooled, extra_embedding)
        empty_states = self.prompt_rows("states", None, batch).to(x_s.dtype)
        empty_pooled = self.prompt_rows("pooled", None, batch).to(x_s.dtype)
        extra = None if extra_embedding is None else torch.cat([extra_embedding] * 2)
        velocity = self._transformer(torch.cat([x_s, x_s]), torch.cat([timestep, timestep]),
                                     torch.cat([empty_states, states]),
                                     torch.cat([empty_pooled, pooled]), extra)
        unconditional, conditional = velocity.chunk(2)
        return unconditional + self.guidance_scale * (conditional - unconditional)

    def _transformer(self, x_s: Tensor, timestep: Tensor, states: Tensor, pooled: Tensor,
                     extra: Tensor | None) -> Tensor:
        self.checkpoint_calls(policy_call=extra is not None)

        def add_extra_embedding(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
            return output + extra.to(output.dtype)

        handle = None if extra is None else \
            self.network.time_text_embed.register_forward_hook(add_extra_embedding)
        try:
            with self.autocast(x_s):
                velocity = self.network(hidden_states=x_s, encoder_hidden_states=states,
                                        pooled_projections=pooled, timestep=timestep,
                                        return_dict=False)[0]
        finally:
            if handle is not None:
                handle.remove()
        return velocity.to(x_s.dtype)

    @property
    def is_latent(self) -> bool:
        return True

    @property
    def image_shape(self) -> tuple[int, ...]:
        return self._image_shape

    def decode(self, samples: Tensor) -> Tensor:
        """Images from final states: undo the rescaling at the last noise level s_0 (the state
        the sampler ends on), then the SD3 VAE's latent normalisation and its decoder."""
        latents = self.flow_state(samples, 0)
        shift = self.vae.config.get("shift_factor") or 0.0
        with self.autocast(samples):
            images = self.vae.decode(latents / self.vae.config.scaling_factor + shift).sample
        return images.to(samples.dtype)


def is_flow_pipeline(path: Path) -> bool:
    """Whether a diffusers folder (``model_index.json``) holds an SD3-format flow pipeline."""
    index = read_json(Path(path) / "model_index.json", "pipeline index")
    return index.get("_class_name") == PIPELINE_CLASS or (Path(path) / "transformer").is_dir()


def load_flow_pipeline_dir(path: Path) -> dict[str, Any]:
    """The parts of an SD3-format folder: transformer, scheduler, vae, prompt_encoder and
    metadata (``ctrl_ray.json``'s, with kind, num_contexts and image_shape set)."""
    from ctrl_ray.models.text_encoder import load_pretrained_encoder

    path = Path(path)
    index = read_json(path / "model_index.json", "pipeline index")
    for part in ("transformer", "scheduler", "vae", "text_encoder", "tokenizer"):
        if not (path / part).is_dir():
            raise InputError(f"SD3-format folder {str(path)!r} has no {part}/")
    try:
        transformer = SD3Transformer2DModel.from_pretrained(path / "transformer",
                                                            local_files_only=True)
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path / "scheduler",
                                                                    local_files_only=True)
        vae = AutoencoderKL.from_pretrained(path / "vae", local_files_only=True)
    except (OSError, ValueError) as err:
        raise InputError(f"SD3-format folder {str(path)!r} could not be loaded: {err}") from None
    metadata: dict[str, Any] = {"prompts": []}
    if (path / METADATA_FILE).is_file():
        metadata.update(read_json(path / METADATA_FILE, "base model metadata"))
    if (index.get("text_encoder_2") or [None])[0] is not None:
        prompt_encoder = load_sd3_prompts(
            path, index, transformer.config.joint_attention_dim,
            int(metadata.get("max_sequence_length", DEFAULT_MAX_SEQUENCE_LENGTH)))
    else:
        max_length = metadata.get("max_length")
        prompt_encoder = SingleEncoderPrompts(load_pretrained_encoder(
            path / "text_encoder", path / "tokenizer", None if max_length is None else
            int(max_length)))
    transformer.eval().requires_grad_(False)
    size = transformer.config.sample_size
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    metadata.update(kind=SD3, num_contexts=len(metadata["prompts"]) or None,
                    image_shape=[vae.config.out_channels, size * factor, size * factor])
    return {"transformer": transformer, "scheduler": scheduler, "vae": vae,
            "prompt_encoder": prompt_encoder, "metadata": metadata}


def save_flow_pipeline(out_dir: str | Path, transformer: SD3Transformer2DModel,
                       scheduler: FlowMatchEulerDiscreteScheduler, vae: AutoencoderKL,
                       prompt_encoder: PromptEncoder | SingleEncoderPrompts,
                       metadata: dict[str, Any]) -> Path:
    """Write ctrl-ray's own SD3-format folder atomically: diffusers' ``StableDiffusion3Pipeline``
    layout with one text encoder (``text_encoder/`` + ``tokenizer/``; the other two null) and
    ``ctrl_ray.json`` = ``metadata`` with kind "sd3". The tokenizer is saved with
    ``model_max_length`` = the encoder's max_length and the encoder's config with
    ``use_attention_mask``, so a reload encodes prompts exactly as training did."""
    from diffusers import StableDiffusion3Pipeline

    if isinstance(prompt_encoder, SingleEncoderPrompts):
        prompt_encoder = prompt_encoder.encoder
    tokenizer = prompt_encoder.tokenizer
    tokenizer.model_max_length = prompt_encoder.max_length
    prompt_encoder.model.config.use_attention_mask = prompt_encoder.use_attention_mask
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae,
        text_encoder=prompt_encoder.model, tokenizer=tokenizer, text_encoder_2=None,
        tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as staging:
        pipeline.save_pretrained(staging)
        write_json(staging / METADATA_FILE, {**metadata, "kind": SD3,
                                             "max_length": prompt_encoder.max_length})
    return out_dir
