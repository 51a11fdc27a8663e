"""The config of the exact-optimum estimate (`ctrl_ray.optimum`), without torch: `reward audit`
reads and checks it before any heavy import."""

from __future__ import annotations

from dataclasses import dataclass, field

from ctrl_ray.errors import InputError


@dataclass
class OptimumConfig:
    """The importance-sampling estimate: M base samples per context (shared by every target
    and guidance level), the sampler, and the ESS below which a level is flagged; a context
    whose ESS falls below it gets more samples, up to `max_samples_per_context`; a (context,
    target) pair still below it after that can take `short_pair_samples` of a trained policy's
    samples drawn for that pair alone (`exact_optimum`'s ``proposal``), topped up in the same
    way to `max_short_pair_samples`."""

    samples_per_context: int = 300
    max_samples_per_context: int = 0   # top a low-ESS context up to this many (0: no top-up)
    short_pair_samples: int = 0        # a proposal's samples per pair still short (0: all pairs)
    max_short_pair_samples: int = 0    # top a pair still short up to this many (0: no top-up)
    contexts: list[int | str] | None = None   # class ids / prompt indices, or prompts
    context_digits: list[int] | None = None   # the digit each context names, for the judge
    guidance_levels: list[float] = field(default_factory=lambda: [1.0, 3.0, 10.0, 30.0, 100.0])
    num_inference_steps: int = 50
    eta: float = 1.0
    seed: int = 20_000
    batch_size: int = 256
    min_ess: float = 50.0
    scorers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.samples_per_context < 1:
            raise InputError(f"samples_per_context must be >= 1, got {self.samples_per_context}")
        if not self.guidance_levels or any(not level >= 0 for level in self.guidance_levels):
            raise InputError(f"guidance_levels must be gamma / alpha values >= 0, got "
                             f"{self.guidance_levels}")
        if self.min_ess < 1:
            raise InputError(f"min_ess must be >= 1, got {self.min_ess}")
        if self.short_pair_samples < 0:
            raise InputError(f"short_pair_samples must be >= 0, got {self.short_pair_samples}")
        if self.max_short_pair_samples < 0:
            raise InputError(f"max_short_pair_samples must be >= 0, got "
                             f"{self.max_short_pair_samples}")
        if self.max_samples_per_context < 0:
            raise InputError(f"max_samples_per_context must be >= 0, got "
                             f"{self.max_samples_per_context}")
