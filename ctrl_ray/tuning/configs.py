"""What a sweep is: the search space, the scheduler, how trials are scored and what happens
to the best one, and the checks that fail before Ray starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ctrl_ray.errors import InputError
from ctrl_ray.finetune_config import FinetuneConfig

SEARCHABLE = ("kl_weight", "gamma", "lr_embedding", "lr_adapter")
REPORTED_METRICS = ("macro_f1", "accuracy", "joint_accuracy", "fidelity", "mean_kl")


@dataclass
class SearchSpace:
    """One hyper-parameter's values: exactly one of `value` (fixed), `grid` (every value, each
    `num_samples` times), `choices` (drawn uniformly) or `loguniform` / `uniform` ([low, high])."""

    value: float | None = None
    grid: list[float] | None = None
    choices: list[float] | None = None
    loguniform: list[float] | None = None
    uniform: list[float] | None = None

    def __post_init__(self):
        given = [name for name in ("value", "grid", "choices", "loguniform", "uniform")
                 if getattr(self, name) is not None]
        if len(given) != 1:
            raise InputError(f"set exactly one of value, grid, choices, loguniform, uniform "
                             f"(got {', '.join(given) or 'none'})")
        for name in ("grid", "choices"):
            if getattr(self, name) is not None and not getattr(self, name):
                raise InputError(f"{name} is empty")
        for name in ("loguniform", "uniform"):
            bounds = getattr(self, name)
            if bounds is None:
                continue
            if len(bounds) != 2 or not bounds[0] < bounds[1]:
                raise InputError(f"{name} needs [low, high] with low < high, got {bounds}")
            if name == "loguniform" and bounds[0] <= 0:
                raise InputError(f"loguniform needs low > 0, got {bounds}")
        values = [self.value] if self.value is not None else \
            (self.grid or self.choices or self.loguniform or self.uniform)
        if any(v < 0 for v in values):
            raise InputError(f"values must be >= 0, got {values}")

    def to_tune(self) -> Any:
        from ray import tune

        if self.value is not None:
            return self.value
        if self.grid is not None:
            return tune.grid_search(list(self.grid))
        if self.choices is not None:
            return tune.choice(list(self.choices))
        if self.loguniform is not None:
            return tune.loguniform(*self.loguniform)
        return tune.uniform(*self.uniform)


@dataclass
class SearchConfig:
    """What the trials try; a learning rate left out keeps the `finetune` config's value. Random
    draws are seeded (`seed`), so the same config proposes the same trials."""

    kl_weight: SearchSpace = field(default_factory=lambda: SearchSpace(loguniform=[0.1, 10.0]))
    gamma: SearchSpace = field(default_factory=lambda: SearchSpace(choices=[1.0]))
    lr_embedding: SearchSpace | None = None
    lr_adapter: SearchSpace | None = None
    num_samples: int = 8
    seed: int = 0

    def __post_init__(self):
        if self.num_samples < 1:
            raise InputError(f"num_samples must be >= 1, got {self.num_samples}")

    def spaces(self) -> dict[str, SearchSpace]:
        return {name: getattr(self, name) for name in SEARCHABLE
                if getattr(self, name) is not None}


@dataclass
class AshaConfig:
    """Asynchronous successive halving over CTRL iterations (max_t = `finetune.iterations`):
    at iterations grace_period * reduction_factor^k a trial below the top 1/reduction_factor
    of those that reached the same point is stopped. `enabled: false` runs every trial out."""

    enabled: bool = True
    grace_period: int = 10
    reduction_factor: float = 2.0

    def __post_init__(self):
        if self.grace_period < 1:
            raise InputError(f"grace_period must be >= 1, got {self.grace_period}")
        if self.reduction_factor <= 1:
            raise InputError(f"reduction_factor must be > 1, got {self.reduction_factor}")


@dataclass
class TuneConfig:
    """A sweep: the CTRL run every trial starts from (`finetune`; its trials always run in the
    trial's process, `distributed.workers` is ignored), the search, the scheduler, how trials
    are scored and what happens to the best one."""

    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    asha: AshaConfig = field(default_factory=AshaConfig)
    metric: str = "macro_f1"
    mode: Literal["max", "min"] = "max"
    kl_budget: float | None = None
    report_every: int = 5
    eval_samples_per_target: int = 2
    cpus_per_trial: float = 0.5
    max_concurrent_trials: int | None = None
    register: bool = True
    register_name: str = "ctrl-digits"
    alias: str = "champion"
    name: str = "tune-kl"
    output_dir: str = "outputs/tune-kl"
    storage_path: str | None = None
    experiment: str = "ctrl-ray-tune"

    def __post_init__(self):
        if self.metric not in REPORTED_METRICS:
            raise InputError(f"metric {self.metric!r} is not one of {', '.join(REPORTED_METRICS)}")
        if self.kl_budget is not None and self.kl_budget < 0:
            raise InputError(f"kl_budget must be >= 0, got {self.kl_budget}")
        for name in ("report_every", "eval_samples_per_target"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.cpus_per_trial > 0:
            raise InputError(f"cpus_per_trial must be > 0, got {self.cpus_per_trial}")
        if self.max_concurrent_trials is not None and self.max_concurrent_trials < 1:
            raise InputError(f"max_concurrent_trials must be >= 1, got "
                             f"{self.max_concurrent_trials}")


def check_inputs(config: TuneConfig) -> None:
    """Fail before starting Ray on what would make every trial fail."""
    from ctrl_ray.registry import check_alias, check_name, is_uri  # MLflow: after the config

    finetune = config.finetune
    local = [] if is_uri(finetune.base_model) else [("finetune.base_model", finetune.base_model)]
    local += [(f"finetune.rewards[{i}].path", r.path) for i, r in enumerate(finetune.rewards)]
    local += [("finetune.judge", finetune.judge)] if finetune.judge else []
    for key, path in local:
        if not Path(path).exists():
            raise InputError(f"config key {key!r}: {path!r} does not exist")
    if not finetune.rewards:
        raise InputError("finetune.rewards: at least one reward classifier is needed")
    iterations = finetune.iterations
    if iterations < 1:
        raise InputError(f"finetune.iterations must be >= 1, got {iterations}")
    if config.asha.enabled and config.asha.grace_period > iterations:
        raise InputError(f"asha.grace_period {config.asha.grace_period} is more than "
                         f"finetune.iterations {iterations}")
    if config.register:  # found here, not after every trial has run
        check_name(config.register_name, "register_name")
        if config.alias:
            check_alias(config.alias, "alias")
