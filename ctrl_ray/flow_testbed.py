"""Build the flow-matching testbed: an SD3-format transformer trained by flow matching on the
latent text testbed's latents and prompts, saved as one diffusers Stable-Diffusion-3 folder
(DESIGN section 3, "Flow-matching models").

The latent testbed (`ctrl_ray.latent_testbed`) is reused unchanged: its `AutoencoderKL` gives
the scaled latents x0 (drawn from each image's posterior, as its UNet saw them), its MiniLM text
encoder the token states the transformer attends to jointly and the pooled prompt embedding
(`PromptEncoder.encode_with_embedding`: unit-norm mean over the real tokens) its
`pooled_projections` read. Training is rectified flow as SD3 does it: x_s = (1 - s) x0 + s eps,
target velocity v = eps - x0, the transformer called at timestep 1000 s; s drawn logit-normal (or
uniform); the prompt dropped with `prompt_dropout` for classifier-free guidance; an EMA of the
weights kept. The folder, written by `ctrl_ray.models.flow.save_flow_pipeline`
(`model_index.json` naming `StableDiffusion3Pipeline`, `transformer/`, `scheduler/`, `vae/`,
`text_encoder/`, `tokenizer/`, `ctrl_ray.json` with kind "sd3"), loads with ctrl-ray's loader
(`load_base_model_dir`) and diffusers' `StableDiffusion3Pipeline.from_pretrained` (the second
and third encoders passed as None, prompts as embeddings: its own encoders are CLIP and T5).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import mlflow
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from tqdm.auto import tqdm

from ctrl_ray import registry, tracking
from ctrl_ray.config import flatten, to_dict
from ctrl_ray.data.digits import NUM_DIGITS, require_digits, template_prompts
from ctrl_ray.flow_testbed_config import (
    FlowSchedulerConfig,
    FlowTestbedConfig,
    FlowTransformerConfig,
    LatentTestbedFacts,
    read_latent_testbed,
)
from ctrl_ray.latent_testbed import _posterior, testbed_metadata
from ctrl_ray.models.flow import SD3, save_flow_pipeline
from ctrl_ray.models.text_encoder import PromptEncoder, load_pretrained_encoder
from ctrl_ray.pretrain import _warmup_cosine, step_with_ema

BUILT_BY = "ctrl_ray.flow_testbed"
POOLING = "mean"  # how `pooled_projections` come from the token states (encode_with_embedding)


@dataclass
class FlowTestbedResult:
    model_dir: Path
    model_uri: str | None
    seconds: float
    final_loss: float
    num_parameters: int


@dataclass
class FlowTestbedParts:
    """The reused latent testbed's frozen parts and the training latents' posterior."""

    vae: AutoencoderKL
    encoder: PromptEncoder
    posterior: tuple[torch.Tensor, torch.Tensor]
    digits: torch.Tensor
    facts: LatentTestbedFacts


def build_flow_testbed(config: FlowTestbedConfig, progress: bool = True) -> FlowTestbedResult:
    """Train the transformer on the latent testbed's latents; save (and register) the folder."""
    parts = load_latent_testbed(config)
    params = flatten(to_dict(config))
    with tracking.run(config.experiment, "flow-testbed", params) as active:
        start, load_start = time.perf_counter(), os.getloadavg()[0]
        transformer, loss = train_flow_transformer(config, parts, progress)
        seconds = time.perf_counter() - start
        num_parameters = sum(p.numel() for p in transformer.parameters())
        mlflow.log_metrics({"transformer_seconds": seconds, "num_parameters": num_parameters,
                            "steps_per_second": config.transformer.steps / seconds})
        metadata = flow_metadata(config, parts.facts)
        metadata["training"] = {
            "transformer": {"steps": config.transformer.steps, "final_loss": loss,
                            "seconds": round(seconds, 1), "num_parameters": num_parameters,
                            "torch_threads": torch.get_num_threads(),
                            "load_average_1min": [load_start, os.getloadavg()[0]]},
            "vae_scaling_factor": float(parts.vae.config.scaling_factor),
            "mlflow_run_id": active.info.run_id,
        }
        model_dir = save_flow_pipeline(config.output_dir, transformer,
                                       build_flow_scheduler(config.scheduler), parts.vae,
                                       parts.encoder, metadata)
        model_uri = None
        if config.registered_model:
            model_uri = registry.log_model({"base_model": model_dir}, config.registered_model,
                                           base_metadata=metadata,
                                           metadata={"ctrl_ray": metadata})
    return FlowTestbedResult(model_dir=model_dir, model_uri=model_uri, seconds=seconds,
                             final_loss=loss, num_parameters=num_parameters)


def load_latent_testbed(config: FlowTestbedConfig) -> FlowTestbedParts:
    """The reused VAE (with `shift_factor` 0, which SD3's pipeline adds after unscaling) and text
    encoder, and the posterior of every training digit under that VAE."""
    facts = read_latent_testbed(config)
    root = Path(config.latent_testbed)
    vae = AutoencoderKL.from_pretrained(root / "vae", local_files_only=True)
    vae.register_to_config(shift_factor=0.0)
    vae.eval().requires_grad_(False)
    encoder = load_pretrained_encoder(root / "text_encoder", root / "tokenizer",
                                      config.text.max_length)
    train = require_digits(facts.metadata["dataset"], size=int(vae.config.sample_size),
                           key="latent_testbed").subset("train")
    posterior = _posterior(vae, torch.from_numpy(train.images))
    return FlowTestbedParts(vae=vae, encoder=encoder, posterior=posterior,
                            digits=torch.from_numpy(train.digits).long(), facts=facts)


def build_transformer(config: FlowTransformerConfig, facts: LatentTestbedFacts,
                      text_dim: int) -> SD3Transformer2DModel:
    """A fresh `SD3Transformer2DModel` on the latents: the prompt's token states (text_dim wide)
    join the image tokens in every block; the pooled prompt embedding joins the timestep's."""
    return SD3Transformer2DModel(
        sample_size=facts.latent_size, patch_size=config.patch_size,
        in_channels=facts.latent_channels, out_channels=facts.latent_channels,
        num_layers=config.num_layers, attention_head_dim=config.attention_head_dim,
        num_attention_heads=config.num_attention_heads, joint_attention_dim=text_dim,
        caption_projection_dim=config.inner_dim, pooled_projection_dim=text_dim,
        pos_embed_max_size=facts.latent_size // config.patch_size, qk_norm=config.qk_norm,
    )


def build_flow_scheduler(config: FlowSchedulerConfig) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=config.num_train_timesteps,
                                           shift=config.shift)


def training_times(count: int, config: FlowTransformerConfig,
                   generator: torch.Generator) -> torch.Tensor:
    """Flow times s in (0, 1) (1 = pure noise) as SD3 draws them for training."""
    if config.timestep_sampling == "uniform":
        return torch.rand(count, generator=generator)
    normal = torch.randn(count, generator=generator)
    return torch.sigmoid(config.logit_mean + config.logit_std * normal)


def train_flow_transformer(config: FlowTestbedConfig, parts: FlowTestbedParts,
                           progress: bool = True) -> tuple[SD3Transformer2DModel, float]:
    """Flow-matching loss ||v(x_s, 1000 s, prompt) - (eps - x0)||^2 on scaled latents drawn
    from each image's posterior; each image gets a random training prompt naming its digit (or
    the empty prompt, with `prompt_dropout`). Returns the EMA weights (eval, no grad) and the
    last logged mean loss."""
    cfg, text = config.transformer, config.text
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    prompts, prompt_digits = template_prompts(text.templates, text.numerals)
    states, pooled = parts.encoder.encode_with_embedding(prompts + [""])  # last: empty prompt
    by_digit = torch.stack([torch.tensor([i for i, d in enumerate(prompt_digits) if d == digit])
                            for digit in range(NUM_DIGITS)])  # (10, prompts per digit)
    transformer = build_transformer(cfg, parts.facts, parts.encoder.hidden_size)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=cfg.lr)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _warmup_cosine(step, cfg.warmup_steps, cfg.steps))
    ema = [p.detach().clone() for p in transformer.parameters()]
    scale = float(parts.vae.config.scaling_factor)
    timesteps = config.scheduler.num_train_timesteps
    mean, std = parts.posterior
    window: list[float] = []
    mean_loss = math.nan
    for step in tqdm(range(cfg.steps), desc="transformer", disable=not progress):
        index = torch.randint(len(mean), (cfg.batch_size,), generator=generator)
        x0 = scale * (mean[index] + std[index] * torch.randn(mean[index].shape,
                                                             generator=generator))
        choice = by_digit[parts.digits[index],
                          torch.randint(by_digit.shape[1], (len(index),), generator=generator)]
        dropped = torch.rand(len(index), generator=generator) < text.prompt_dropout
        rows = torch.where(dropped, torch.full_like(choice, len(prompts)), choice)
        s = training_times(len(index), cfg, generator)
        noise = torch.randn(x0.shape, generator=generator)
        x_s = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * noise
        velocity = transformer(x_s, encoder_hidden_states=states[rows],
                               pooled_projections=pooled[rows], timestep=s * timesteps).sample
        loss = F.mse_loss(velocity, noise - x0)

        step_with_ema(loss, transformer, optimizer, lr_schedule, ema, cfg.ema_decay, step)
        window.append(loss.item())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            mean_loss = sum(window) / len(window)
            window.clear()
            mlflow.log_metrics({"transformer_loss": mean_loss,
                                "lr": lr_schedule.get_last_lr()[0]}, step=step + 1)
    with torch.no_grad():
        for param, averaged in zip(transformer.parameters(), ema, strict=True):
            param.copy_(averaged)
    return transformer.eval().requires_grad_(False), mean_loss


def flow_metadata(config: FlowTestbedConfig, facts: LatentTestbedFacts) -> dict:
    """`ctrl_ray.json`: the latent testbed's keys for these prompts (`testbed_metadata`), the kind,
    the latent shape the transformer samples, the decoded image shape, how prompts are pooled,
    and which latent testbed lent the VAE and text encoder."""
    latent = SimpleNamespace(text=config.text,
                             data=SimpleNamespace(path=facts.metadata["dataset"]))
    metadata = testbed_metadata(latent)
    metadata.update({
        "built_by": BUILT_BY,
        "kind": SD3,
        "num_contexts": len(metadata["prompts"]),
        "image_shape": [1, facts.image_size, facts.image_size],
        "latent_shape": [facts.latent_channels, facts.latent_size, facts.latent_size],
        "pooled_projection": POOLING,
        "latent_testbed": str(config.latent_testbed),
    })
    return metadata


@torch.no_grad()
def sample_latents(transformer: SD3Transformer2DModel,
                   scheduler: FlowMatchEulerDiscreteScheduler, prompt: tuple[torch.Tensor, ...],
                   empty: tuple[torch.Tensor, ...], guidance_scale: float, steps: int,
                   noise: torch.Tensor) -> torch.Tensor:
    """The flow ODE from `noise` (s = 1) to latents (s = 0) by the scheduler's Euler steps on
    its default sigma grid, as `StableDiffusion3Pipeline` samples: `prompt` and `empty` are
    (token states, pooled embedding), one row per sample and the empty prompt's; with
    guidance_scale w != 1 the velocity is v_empty + w (v_prompt - v_empty)."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    scheduler.set_timesteps(steps)
    guided = guidance_scale != 1.0
    states, pooled = prompt
    if guided:
        count = len(noise)
        states = torch.cat([empty[0].expand(count, -1, -1), states])
        pooled = torch.cat([empty[1].expand(count, -1), pooled])
    latents = noise
    for t in scheduler.timesteps:
        batch = torch.cat([latents] * 2) if guided else latents
        velocity = transformer(batch, encoder_hidden_states=states, pooled_projections=pooled,
                               timestep=t.expand(len(batch))).sample
        if guided:
            unconditional, conditional = velocity.chunk(2)
            velocity = unconditional + guidance_scale * (conditional - unconditional)
        latents = scheduler.step(velocity, t, latents).prev_sample
    return latents
