"""Save and load a pre-trained base model: a diffusers directory from a local path or `models:/`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusers import DDPMScheduler, UNet2DModel

from ctrl_ray.errors import InputError
from ctrl_ray.storage import atomic_directory, read_json, write_json
from ctrl_ray.tracking import resolve_artifacts

METADATA_FILE = "ctrl_ray.json"


@dataclass
class BaseModel:
    """A loaded pre-trained diffusion model p_pre(x | c) and what ctrl-ray knows about it."""

    unet: UNet2DModel
    scheduler: DDPMScheduler
    metadata: dict[str, Any]
    path: Path

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.metadata["image_shape"])

    @property
    def num_contexts(self) -> int:
        return int(self.metadata["num_contexts"])


def save_base_model(unet: UNet2DModel, scheduler: DDPMScheduler, out_dir: str | Path,
                    metadata: dict[str, Any]) -> Path:
    """Write `unet/`, `scheduler/` (diffusers `save_pretrained`) and `ctrl_ray.json`, atomically."""
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        unet.save_pretrained(tmp / "unet")
        scheduler.save_pretrained(tmp / "scheduler")
        write_json(tmp / METADATA_FILE, metadata)
    return out_dir


def load_base_model(uri: str | Path) -> BaseModel:
    """Load a base model from a directory written by `save_base_model` or a `models:/` URI."""
    artifacts = resolve_artifacts(uri)
    path = artifacts.get("base_model") or artifacts.get("model")
    if path is None:
        raise InputError(f"model {str(uri)!r} carries no base model")
    return load_base_model_dir(path)


def load_base_model_dir(path: Path) -> BaseModel:
    """Load the diffusers UNet and scheduler from a base-model directory, offline."""
    path = Path(path)
    metadata = read_json(path / METADATA_FILE, "base model metadata")
    for part in ("unet", "scheduler"):
        if not (path / part).is_dir():
            raise InputError(f"base model {str(path)!r} has no {part}/ directory")
    try:
        unet = UNet2DModel.from_pretrained(path / "unet", local_files_only=True)
        scheduler = DDPMScheduler.from_pretrained(path / "scheduler", local_files_only=True)
    except (OSError, ValueError) as err:
        raise InputError(f"base model {str(path)!r} could not be loaded: {err}") from None
    unet.eval().requires_grad_(False)
    return BaseModel(unet=unet, scheduler=scheduler, metadata=metadata, path=path)
