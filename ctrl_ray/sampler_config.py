"""The sampler's options as config values, without torch: how a path's KL is reduced and
which final steps get parameter gradients (`Truncation`). `ctrl_ray.sampling.sampler` uses
them; configs read and check them before any heavy import."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ctrl_ray.errors import InputError

if TYPE_CHECKING:
    import torch

KL_REDUCTIONS = ("sum", "mean")
TRUNCATION_MODES = ("none", "fixed", "random")


@dataclass(frozen=True)
class Truncation:
    """Which final steps get parameter gradients: all (none), the last k (fixed), or the last
    k' ~ Uniform{1..k} drawn once per batch (random, as in DRaFT / the CTRL paper)."""

    mode: str = "none"
    k: int = 1

    def __post_init__(self):
        if self.mode not in TRUNCATION_MODES:
            raise InputError(
                f"truncation.mode must be one of {TRUNCATION_MODES}, got {self.mode!r}"
            )
        if self.k < 1:
            raise InputError(f"truncation.k must be >= 1, got {self.k}")

    def gradient_steps(self, num_steps: int, generator: torch.Generator | None = None) -> int:
        """The number of final steps whose network calls are differentiated."""
        import torch

        if self.mode == "none":
            return num_steps
        if self.mode == "fixed":
            return min(self.k, num_steps)
        return int(torch.randint(1, min(self.k, num_steps) + 1, (), generator=generator))


@dataclass(frozen=True)
class SamplingOptions:
    """How the denoiser's calls run (config section ``sampling``): ``bf16`` autocast of the
    UNet's calls on any device. Off by default: on the 2-core CPU it bought nothing on the
    digits UNet and 22% per call on the text testbed's at 0.045 error in eps
    (docs/benchmarks.md, throughput); on a GPU it is the usual choice
    (benchmarks/gpu_check.py). torch.compile and channels-last were measured and not kept."""

    bf16: bool = False
