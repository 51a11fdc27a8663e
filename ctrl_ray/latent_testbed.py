"""Build the latent text-to-image testbed: a VAE and a prompt-conditioned latent UNet trained on
the digits, saved as one diffusers Stable-Diffusion-format folder (DESIGN section 3).

Two stages, as Stable Diffusion was made: an `AutoencoderKL` learns to map 32x32 digits to
4x8x8 latents (reconstruction + a small KL weight), its `scaling_factor` is set to 1 / the std
of the latents so they have unit variance; then a `UNet2DConditionModel` learns DDPM noise
prediction on the scaled latents, cross-attending to MiniLM token states of prompts drawn from
several templates per digit (`TRAINING_TEMPLATES`), the prompt dropped with `prompt_dropout`
so classifier-free guidance works. `HELDOUT_TEMPLATES` are never trained on. The folder
(`model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`,
`ctrl_ray.json`) loads with `ctrl_ray.models.loading.load_base_model_dir` and diffusers'
`StableDiffusionPipeline.from_pretrained`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tqdm.auto import tqdm

from ctrl_ray import registry, tracking
from ctrl_ray.config import flatten, to_dict
from ctrl_ray.data.digits import (
    HELDOUT_TEMPLATES,
    NUM_DIGITS,
    digit_prompts,
    require_digits,
    template_prompts,
)
from ctrl_ray.latent_testbed_config import LatentTestbedConfig, TestbedVAEConfig
from ctrl_ray.models.text_encoder import PromptEncoder, load_named_encoder
from ctrl_ray.models.text_to_image import STABLE_DIFFUSION
from ctrl_ray.models.unet import UNetConfig, build_scheduler, build_text_unet
from ctrl_ray.pretrain import _warmup_cosine, step_with_ema
from ctrl_ray.storage import atomic_directory, write_json

BUILT_BY = "ctrl_ray.latent_testbed"


@dataclass
class LatentTestbedResult:
    model_dir: Path
    model_uri: str | None
    vae_seconds: float
    unet_seconds: float
    vae_loss: float
    unet_loss: float
    val_psnr: float
    scaling_factor: float


def build_latent_testbed(config: LatentTestbedConfig,
                         progress: bool = True) -> LatentTestbedResult:
    """Train the VAE, then the latent UNet on its latents; save (and register) the folder."""
    dataset = require_digits(config.data.path, size=config.data.size, key="data.path")
    train = torch.from_numpy(dataset.subset("train").images)
    digits = torch.from_numpy(dataset.subset("train").digits).long()
    val = torch.from_numpy(dataset.subset("val").images)
    encoder = load_named_encoder(config.text.encoder, config.text.max_length)

    params = flatten(to_dict(config))
    with tracking.run(config.experiment, "text2image-testbed", params) as active:
        start = time.perf_counter()
        vae, vae_loss = train_vae(config.vae, train, config.data.size, progress)
        vae_seconds = time.perf_counter() - start
        val_mse = reconstruction_mse(vae, val)
        val_psnr = psnr(val_mse)
        mean, std = _posterior(vae, train)
        scaling_factor = float(1.0 / (mean + std * torch.randn(
            mean.shape, generator=torch.Generator().manual_seed(config.vae.seed))).std())
        vae.register_to_config(scaling_factor=scaling_factor)
        mlflow.log_metrics({"vae_seconds": vae_seconds, "vae_val_mse": val_mse,
                            "vae_val_psnr": val_psnr, "vae_scaling_factor": scaling_factor})

        start = time.perf_counter()
        unet, unet_loss = train_latent_unet(config, encoder, (mean, std), digits,
                                            scaling_factor, progress)
        unet_seconds = time.perf_counter() - start
        mlflow.log_metrics({"unet_seconds": unet_seconds,
                            "unet_steps_per_second": config.unet.steps / unet_seconds})

        metadata = testbed_metadata(config)
        metadata["training"] = {
            "vae": {"steps": config.vae.steps, "final_loss": vae_loss,
                    "seconds": round(vae_seconds, 1), "val_mse": val_mse,
                    "val_psnr": val_psnr, "scaling_factor": scaling_factor},
            "unet": {"steps": config.unet.steps, "final_loss": unet_loss,
                     "seconds": round(unet_seconds, 1)},
            "mlflow_run_id": active.info.run_id,
        }
        model_dir = save_testbed(config, vae, unet, encoder, metadata)
        model_uri = None
        if config.registered_model:
            base_metadata = {**metadata, "kind": STABLE_DIFFUSION,
                             "num_contexts": len(metadata["prompts"]),
                             "image_shape": [1, config.data.size, config.data.size]}
            model_uri = registry.log_model({"base_model": model_dir}, config.registered_model,
                                           base_metadata=base_metadata,
                                           metadata={"ctrl_ray": base_metadata})
    return LatentTestbedResult(model_dir=model_dir, model_uri=model_uri,
                               vae_seconds=vae_seconds, unet_seconds=unet_seconds,
                               vae_loss=vae_loss, unet_loss=unet_loss, val_psnr=val_psnr,
                               scaling_factor=scaling_factor)


def build_vae(config: TestbedVAEConfig, image_size: int) -> AutoencoderKL:
    """A fresh one-channel `AutoencoderKL` (the digits are grey)."""
    depth = len(config.block_out_channels)
    return AutoencoderKL(
        in_channels=1, out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * depth,
        up_block_types=("UpDecoderBlock2D",) * depth,
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block, latent_channels=config.latent_channels,
        norm_num_groups=config.norm_num_groups, sample_size=image_size,
    )


def train_vae(config: TestbedVAEConfig, images: torch.Tensor, image_size: int,
              progress: bool = True) -> tuple[AutoencoderKL, float]:
    """Fit the VAE to `images` (N, 1, H, W) in [-1, 1]: MSE + kl_weight * KL per element.
    Returns it frozen (eval, no grad) with its last logged mean loss."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    vae = build_vae(config, image_size)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.lr)
    window: list[float] = []
    mean_loss = math.nan
    for step in tqdm(range(config.steps), desc="vae", disable=not progress):
        batch = images[torch.randint(len(images), (config.batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape,
                                                               generator=generator)
        reconstruction = vae.decode(latents).sample
        kl = posterior.kl().mean() / latents[0].numel()
        loss = F.mse_loss(reconstruction, batch) + config.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        window.append(loss.item())
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            mean_loss = sum(window) / len(window)
            window.clear()
            mlflow.log_metrics({"vae_loss": mean_loss, "vae_kl": kl.item()}, step=step + 1)
    return vae.eval().requires_grad_(False), mean_loss


@torch.no_grad()
def reconstruction_mse(vae: AutoencoderKL, images: torch.Tensor) -> float:
    """Mean squared error of decode(encode(x).mode()) against x, clamped to [-1, 1]."""
    errors = [F.mse_loss(vae.decode(vae.encode(chunk).latent_dist.mode()).sample.clamp(-1, 1),
                         chunk, reduction="sum") for chunk in images.split(256)]
    return float(sum(errors) / images.numel())


def psnr(mse: float) -> float:
    """Peak signal-to-noise ratio (dB) of images in [-1, 1] (peak-to-peak 2)."""
    return 10.0 * math.log10(4.0 / max(mse, 1e-12))


@torch.no_grad()
def _posterior(vae: AutoencoderKL, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior's mean and std for every image (the UNet draws its latents from it)."""
    parts = [vae.encode(chunk).latent_dist for chunk in images.split(256)]
    return torch.cat([p.mean for p in parts]), torch.cat([p.std for p in parts])


def train_latent_unet(config: LatentTestbedConfig, encoder: PromptEncoder,
                      posterior: tuple[torch.Tensor, torch.Tensor], digits: torch.Tensor,
                      scaling_factor: float, progress: bool = True
                      ) -> tuple[UNet2DConditionModel, float]:
    """DDPM epsilon loss on scaled latents drawn from each image's posterior; each image gets a
    random prompt naming its digit (or the empty prompt, with `prompt_dropout`). Returns the
    EMA weights (eval, no grad) and the last logged mean loss."""
    cfg, text = config.unet, config.text
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    prompts, prompt_digits = template_prompts(text.templates, text.numerals)
    states = encoder.encode(prompts + [""])  # the last row is the empty prompt
    by_digit = torch.stack([torch.tensor([i for i, d in enumerate(prompt_digits) if d == digit])
                            for digit in range(NUM_DIGITS)])  # (10, prompts per digit)
    unet = build_text_unet(UNetConfig(
        image_size=config.latent_size, in_channels=config.vae.latent_channels,
        block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_num_groups, attention_head_dim=cfg.attention_head_dim,
    ), encoder.hidden_size)
    alphas_cumprod = build_scheduler(config.schedule).alphas_cumprod.float()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.lr)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _warmup_cosine(step, cfg.warmup_steps, cfg.steps))
    ema = [p.detach().clone() for p in unet.parameters()]
    mean, std = posterior
    window: list[float] = []
    mean_loss = math.nan
    for step in tqdm(range(cfg.steps), desc="unet", disable=not progress):
        index = torch.randint(len(mean), (cfg.batch_size,), generator=generator)
        x0 = scaling_factor * (mean[index] + std[index] * torch.randn(
            mean[index].shape, generator=generator))
        choice = by_digit[digits[index], torch.randint(by_digit.shape[1], (len(index),),
                                                       generator=generator)]
        dropped = torch.rand(len(index), generator=generator) < text.prompt_dropout
        rows = torch.where(dropped, torch.full_like(choice, len(prompts)), choice)
        t = torch.randint(config.schedule.num_train_timesteps, (len(index),),
                          generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(x_t, t, encoder_hidden_states=states[rows]).sample, noise)

        step_with_ema(loss, unet, optimizer, lr_schedule, ema, cfg.ema_decay, step)
        window.append(loss.item())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            mean_loss = sum(window) / len(window)
            window.clear()
            mlflow.log_metrics({"unet_loss": mean_loss, "lr": lr_schedule.get_last_lr()[0]},
                               step=step + 1)
    with torch.no_grad():
        for param, averaged in zip(unet.parameters(), ema, strict=True):
            param.copy_(averaged)
    return unet.eval().requires_grad_(False), mean_loss


def testbed_metadata(config: LatentTestbedConfig) -> dict:
    """What `ctrl_ray.json` says beside the diffusers parts: the default prompts (the first
    template with digit names; prompt i names digit i), every training prompt, the held-out
    paraphrase templates and their prompts, and how the folder was made."""
    prompts, prompt_digits = template_prompts(config.text.templates, config.text.numerals)
    heldout, heldout_digits = template_prompts(HELDOUT_TEMPLATES, config.text.numerals)
    return {
        "built_by": BUILT_BY,
        "prompts": digit_prompts(config.text.templates[0]),
        "context_name": "prompt",
        "training_templates": list(config.text.templates),
        "training_prompts": prompts,
        "training_prompt_digits": prompt_digits,
        "heldout_templates": list(HELDOUT_TEMPLATES),
        "heldout_prompts": heldout,
        "heldout_prompt_digits": heldout_digits,
        "numerals": config.text.numerals,
        "prompt_dropout": config.text.prompt_dropout,
        "text_encoder": config.text.encoder,
        "max_length": config.text.max_length,
        "dataset": str(config.data.path),
    }


def save_testbed(config: LatentTestbedConfig, vae: AutoencoderKL, unet: UNet2DConditionModel,
                 encoder: PromptEncoder, metadata: dict) -> Path:
    """Write the SD-format folder atomically. The tokenizer is saved with `model_max_length`
    = max_length and the text encoder's config with `use_attention_mask`, so diffusers'
    pipeline and ctrl-ray's loader encode prompts exactly as training did."""
    from transformers import AutoTokenizer

    from ctrl_ray.models.text_encoder import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path(),
                                              model_max_length=config.text.max_length)
    encoder.model.config.use_attention_mask = True
    # Stable Diffusion's timestep grid ("leading", offset 1), which ctrl-ray's sampler also uses
    scheduler = DDPMScheduler.from_config(build_scheduler(config.schedule).config, steps_offset=1)
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=encoder.model, tokenizer=tokenizer, unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    out_dir = Path(config.output_dir)
    with atomic_directory(out_dir) as staging:
        pipeline.save_pretrained(staging)
        write_json(staging / "ctrl_ray.json", metadata)
    return out_dir
