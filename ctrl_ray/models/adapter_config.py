"""The adapter a CTRL run trains on the frozen base (config section ``adapter``), without
torch: its kinds, the value head's keys, and `AdapterConfig`, read and checked before any
heavy import (`ctrl_ray.models.augmented` builds the adapter)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ctrl_ray.config import UnknownKeyError, check_bounds
from ctrl_ray.errors import InputError

ADAPTERS = ("lora", "full", "none", "value")
WIDTH_KEYS = ("channels", "hidden_dim", "time_embedding_dim")
VALUE_HEAD_KEYS = (*WIDTH_KEYS, "coordinates", "step_candidates", "initial_candidates",
                   "step_scale", "target_power")


@dataclass
class AdapterConfig:
    """Trainable parameters added to the frozen base: LoRA (zero-initialised up-projections),
    full fine-tuning, label embeddings only, or a value head (mode value). ``kind: null`` takes
    the update rule's own: value for mode value, lora otherwise."""

    kind: str | None = None
    rank: int = 4
    alpha: float | None = None
    targets: list[str] | None = None
    min_timestep: int = 0    # adapters and label embeddings act only at t >= min_timestep
    time_buckets: int = 1    # a label embedding per class and band of timesteps
    value_head: dict[str, Any] = field(default_factory=dict)   # VALUE_HEAD_KEYS

    def __post_init__(self):
        check_bounds(self, kind=ADAPTERS, rank="[1, 4096]", alpha="> 0", min_timestep=">= 0",
                     time_buckets="[1, 1000]")
        if self.value_head and self.kind not in (None, "value"):
            raise InputError(f"adapter.value_head configures a value head; adapter.kind "
                             f"{self.kind!r} has none")
        unknown = sorted(set(self.value_head) - set(VALUE_HEAD_KEYS))
        if unknown:
            raise UnknownKeyError(f"adapter.value_head.{unknown[0]}",
                                  self.value_head[unknown[0]], ", ".join(VALUE_HEAD_KEYS))
        for key in ("step_candidates", "initial_candidates"):
            if key in self.value_head:
                check_step_candidates(self.value_head[key], key)
        for key in ("step_scale", "target_power"):
            if key in self.value_head:
                check_step_scale(self.value_head[key], key)
        if not isinstance(self.value_head.get("coordinates", True), bool):
            raise InputError(f"adapter.value_head.coordinates: need true or false, got "
                             f"{self.value_head['coordinates']!r}")


def check_step_scale(value: Any, key: str = "step_scale") -> None:
    """The value head's step multiplier (or target power): a number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise InputError(f"value_head.{key}: need a number > 0, got {value!r}")


def check_step_candidates(value: Any, key: str = "step_candidates") -> None:
    """The value head's steps take 0 (first-order; for x_T: no tilt) or an even number of
    antithetic candidates."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0 or value % 2:
        raise InputError(f"value_head.{key}: need 0 or an even number >= 2, got {value!r}")
