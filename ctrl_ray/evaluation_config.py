"""The evaluation protocol's config, without torch: read and checked before any heavy import
(`ctrl_ray.evaluation` runs it)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EvaluationConfig:
    """The protocol of DESIGN section 4: M samples per target (y, c), each labelled by its
    label's scorer. `scorers` overrides it per label: "oracle", "module:function" (or
    "file.py:function"), or a judge directory."""

    samples_per_target: int = 8
    contexts: list[int | str] | None = None   # class ids / prompt indices, or prompts (any text)
    context_digits: list[int] | None = None   # the digit each context names, for the judge
    num_inference_steps: int = 50
    eta: float = 1.0
    seed: int = 10_000
    batch_size: int = 256
    scorers: dict[str, str] = field(default_factory=dict)
    allow_other_chain: bool = False   # sample a value policy off the chain its head fits
