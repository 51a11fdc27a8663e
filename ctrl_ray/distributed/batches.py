"""What a rollout worker is handed instead of tensors: a batch's seed and its rows.

Torch-free, so that a worker process unpickles its call without importing the models.
"""

from __future__ import annotations

from dataclasses import dataclass

from ctrl_ray.errors import InputError


@dataclass(frozen=True)
class BatchRows:
    """Rows start:stop of the batch whose randomness is drawn from ``seed`` (`draw_inputs`)."""

    seed: int
    start: int
    stop: int


def split_rows(batch_size: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous (start, stop) shards of the batch, as equal as possible."""
    if batch_size < parts:
        raise InputError(f"batch_size {batch_size} is smaller than the number of workers "
                         f"{parts}")
    bounds = [round(i * batch_size / parts) for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))
