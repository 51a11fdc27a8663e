"""Save and load a pre-trained base model: a local diffusers directory (a `models:/` URI is
resolved to one by `ctrl_ray.registry`).

Four kinds of directory load: ctrl-ray's own (`unet/`, `scheduler/`, `ctrl_ray.json`) with a
class-conditional UNet, the same with a text-conditioned UNet whose metadata names its text
encoder (the digits text model), a diffusers Stable-Diffusion-format pipeline
(`model_index.json`), and an SD3-format flow pipeline (`model_index.json` naming
`StableDiffusion3Pipeline`, or a `transformer/`; `ctrl_ray.models.flow`). `build_backbone` wraps
any of them in the matching backbone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
)

from ctrl_ray.errors import InputError
from ctrl_ray.models import flow, text_to_image
from ctrl_ray.models.backbone import Backbone, UNetBackbone
from ctrl_ray.models.flow_prompts import SD3Prompts, SingleEncoderPrompts
from ctrl_ray.models.text_encoder import PromptEncoder
from ctrl_ray.models.text_to_image import TextToImageBackbone, TextToImageOptions
from ctrl_ray.storage import load_artifact, save_artifact

METADATA_FILE = "ctrl_ray.json"
BASE_FORMAT = "ctrl_ray.base_model"


@dataclass
class BaseModel:
    """A loaded pre-trained diffusion model p_pre(x | c) and what ctrl-ray knows about it: a UNet
    with a DDPM scheduler, or (flow models) a transformer with a flow-match scheduler."""

    unet: UNet2DModel | UNet2DConditionModel | None
    scheduler: DDPMScheduler | FlowMatchEulerDiscreteScheduler
    metadata: dict[str, Any]
    path: Path
    vae: AutoencoderKL | None = None
    prompt_encoder: PromptEncoder | SingleEncoderPrompts | SD3Prompts | None = None
    transformer: SD3Transformer2DModel | None = None

    @property
    def is_text_to_image(self) -> bool:
        return self.prompt_encoder is not None

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.metadata["image_shape"])

    @property
    def num_contexts(self) -> int:
        return int(self.metadata["num_contexts"])


def save_base_model(unet: UNet2DModel, scheduler: DDPMScheduler, out_dir: str | Path,
                    metadata: dict[str, Any]) -> Path:
    """Write `unet/`, `scheduler/` (diffusers `save_pretrained`) and `ctrl_ray.json`, atomically."""

    def write_diffusers(staging: Path) -> None:
        unet.save_pretrained(staging / "unet")
        scheduler.save_pretrained(staging / "scheduler")

    return save_artifact(out_dir, BASE_FORMAT, metadata, index=METADATA_FILE,
                         write=write_diffusers)


def load_base_model_dir(path: Path) -> BaseModel:
    """Load the diffusers UNet and scheduler from a local base-model directory, offline."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"model directory not found: {str(path)!r}")
    if (path / "model_index.json").is_file():
        if flow.is_flow_pipeline(path):
            return BaseModel(unet=None, path=path, **flow.load_flow_pipeline_dir(path))
        parts = text_to_image.load_stable_diffusion_dir(path)
        return BaseModel(path=path, **parts)
    metadata, _ = load_artifact(path, BASE_FORMAT, "base model", index=METADATA_FILE,
                                tensors=False, unnamed_ok=True)
    text = metadata.get("kind") == text_to_image.TEXT_PIXEL
    for part in ("unet", "scheduler"):
        if not (path / part).is_dir():
            raise InputError(f"base model {str(path)!r} has no {part}/ directory")
    try:
        unet_class = UNet2DConditionModel if text else UNet2DModel
        unet = unet_class.from_pretrained(path / "unet", local_files_only=True)
        scheduler = DDPMScheduler.from_pretrained(path / "scheduler", local_files_only=True)
    except (OSError, ValueError) as err:
        raise InputError(f"base model {str(path)!r} could not be loaded: {err}") from None
    unet.eval().requires_grad_(False)
    encoder = None
    if text:
        from ctrl_ray.models.text_encoder import load_named_encoder

        encoder = load_named_encoder(metadata["text_encoder"], int(metadata["max_length"]))
    return BaseModel(unet=unet, scheduler=scheduler, metadata=metadata, path=path,
                     prompt_encoder=encoder)


def build_backbone(base: BaseModel, options: Any = None) -> Backbone:
    """The backbone of `base`: a `UNetBackbone`, or a text backbone configured by `options`
    (a `TextToImageOptions`, or the dict a policy checkpoint recorded; None: the defaults)."""
    if isinstance(options, dict):
        options = TextToImageOptions(**{k: v for k, v in options.items() if k != "kind"})
    options = options or TextToImageOptions()
    if not base.is_text_to_image:
        if not options.is_default():
            raise InputError(f"backbone options {options} apply to text-to-image models only; "
                             f"{str(base.path)!r} is class-conditional")
        return UNetBackbone(base.unet, base.scheduler)
    prompts = options.prompts if options.prompts is not None else base.metadata.get("prompts", [])
    if base.transformer is not None:
        return flow.SD3Backbone(
            base.transformer, base.scheduler, base.prompt_encoder, prompts, vae=base.vae,
            guidance_scale=options.guidance_scale, mixed_precision=options.mixed_precision,
            gradient_checkpointing=options.gradient_checkpointing, kind=base.metadata["kind"])
    return TextToImageBackbone(
        base.unet, base.scheduler, base.prompt_encoder, prompts, vae=base.vae,
        guidance_scale=options.guidance_scale, mixed_precision=options.mixed_precision,
        gradient_checkpointing=options.gradient_checkpointing, kind=base.metadata["kind"])


def backbone_spec(backbone: Backbone) -> dict[str, Any]:
    """What a policy records about its backbone: the kind (the model family: "unet",
    "stable-diffusion", "unet2d-text-conditional", "sd3") and, for prompt backbones, options."""
    describe = getattr(backbone, "describe", None)
    return describe() if describe is not None else {"kind": "unet"}
