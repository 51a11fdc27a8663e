"""The update rules' configs, without torch: what every rule shares (`ObjectiveConfig`: the
objective's hyper-parameters, the batch, the sampler, AdamW) and each rule's own knobs.

Every rule maximises the same J = E[gamma log p(y | x0, c)] - kl_weight KL(P_theta || P_pre);
a rule's config is a small subclass of ``ObjectiveConfig``. The rule modules
(`ctrl_ray.objectives.adjoint` ...) import their config from here; a config is read and
checked (`ctrl_ray.config`) before torch is imported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ctrl_ray.errors import InputError
from ctrl_ray.sampler_config import KL_REDUCTIONS, Truncation

LR_SCHEDULES = ("constant", "cosine")
ADVANTAGE_BASELINES = ("per_label", "global", "none")
ADVANTAGE_SCALES = ("std", "none")
DEFAULT_RULE = "value"


@dataclass
class ObjectiveConfig:
    """The objective (gamma, kl_weight, how KL is reduced), the batch, the sampler and AdamW."""

    gamma: float = 1.0
    kl_weight: float = 1.0
    kl_reduction: str = "sum"
    batch_size: int = 64
    num_inference_steps: int = 50
    eta: float = 1.0
    lr_embedding: float = 1e-3
    lr_adapter: float = 1e-4
    lr_schedule: str = "constant"   # or "cosine": anneal both rates to lr_final_fraction
    lr_final_fraction: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    label_distribution: Sequence[float] | Mapping[str, Sequence[float]] | None = None
    context_distribution: Sequence[float] | None = None

    def __post_init__(self):
        if self.kl_reduction not in KL_REDUCTIONS:
            raise InputError(
                f"kl_reduction must be one of {KL_REDUCTIONS}, got {self.kl_reduction!r}"
            )
        for name in ("batch_size", "num_inference_steps"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("kl_weight", "lr_embedding", "lr_adapter", "weight_decay"):
            if getattr(self, name) < 0:
                raise InputError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise InputError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if not 0 <= self.lr_final_fraction <= 1:
            raise InputError(f"lr_final_fraction must be in [0, 1], got {self.lr_final_fraction}")
        if self.eta <= 0:
            raise InputError(f"eta must be > 0 for the per-step KL, got {self.eta}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise InputError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")

    def tilt_exponent(self, sample_dims: int) -> float:
        """gamma / alpha, the exponent of p(y | x) in the optimum, with alpha the KL weight per
        path (``kl_reduction: mean`` divides the KL by the number of dimensions)."""
        alpha = self.kl_weight if self.kl_reduction == "sum" else self.kl_weight / sample_dims
        return self.gamma / alpha if alpha > 0 else float("inf")


@dataclass
class AdjointConfig(ObjectiveConfig):
    """Adjoint Matching: the shared objective; ``kl_weight`` must be > 0 (the tilt is
    gamma / kl_weight)."""

    lr_embedding: float = 1e-2
    lr_adapter: float = 1e-3
    regression_steps: int = 1   # optimizer steps per batch of rollouts (see the module doc)

    def __post_init__(self):
        super().__post_init__()
        if self.regression_steps < 1:
            raise InputError(f"regression_steps must be >= 1, got {self.regression_steps}")
        if not self.kl_weight > 0:
            raise InputError(f"kl_weight must be > 0 for adjoint matching (the optimum tilts "
                             f"by gamma / kl_weight), got {self.kl_weight}")


@dataclass
class PathwiseConfig(ObjectiveConfig):
    """Pathwise CTRL: the shared objective, plus which steps are differentiated and whether
    network calls are checkpointed."""

    truncation: Truncation = field(default_factory=Truncation)
    checkpoint: bool = True

    def __post_init__(self):
        if isinstance(self.truncation, Mapping):
            self.truncation = Truncation(**self.truncation)
        super().__post_init__()


@dataclass
class PPOConfig(ObjectiveConfig):
    """PPO CTRL: the shared objective plus PPO's knobs. ``clip_range`` is per dimension, as in
    DDPO (see the module docstring); ``minibatch_size`` counts (step, sample) pairs;
    ``max_staleness`` counts policy versions (0 = strictly on-policy). ``advantage_baseline``:
    leave-one-out mean of the return-to-go over samples with the same labels (and class
    context) ``per_label``, over the whole batch ``global``, or ``none``; ``advantage_scale``:
    divide by the batch RMS (``std``) or not."""

    clip_range: float = 1e-4
    ppo_epochs: int = 1
    minibatch_size: int = 512
    advantage_baseline: str = "per_label"
    advantage_scale: str = "std"
    max_staleness: int = 1

    def __post_init__(self):
        super().__post_init__()
        if self.advantage_baseline not in ADVANTAGE_BASELINES:
            raise InputError(f"advantage_baseline must be one of {ADVANTAGE_BASELINES}, "
                             f"got {self.advantage_baseline!r}")
        if self.advantage_scale not in ADVANTAGE_SCALES:
            raise InputError(f"advantage_scale must be one of {ADVANTAGE_SCALES}, "
                             f"got {self.advantage_scale!r}")
        for name in ("ppo_epochs", "minibatch_size"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_staleness < 0:
            raise InputError(f"max_staleness must be >= 0, got {self.max_staleness}")
        if not self.clip_range > 0:
            raise InputError(f"clip_range must be > 0, got {self.clip_range}")


@dataclass
class ValueConfig(ObjectiveConfig):
    """Value CTRL: the shared objective (``kl_weight`` > 0: the tilt is gamma / kl_weight) and
    the regression of the value head (``lr_adapter``; the label embeddings are not used).

    The replay keeps the newest base rollouts within both ``replay_rollouts`` and
    ``replay_bytes`` (states, targets and contexts together); beyond either bound the oldest
    are dropped (base rollouts are i.i.d. draws of a fixed chain, so an old one is worth no
    more than a new one). 256 MiB holds 4,096 rollouts of the digits and text testbeds
    (21.5 kB each at 20 steps, 52 kB at 50). ``report_every`` samples the policy (only for
    the reward and KL a run reports; the fit never sees it) every k-th update and at the
    last; between, the latest measured values are shown with their age. ``check_bf16`` runs
    the held-out check's forward passes under bf16 autocast on a device with native bf16 (a CPU
    with AVX-512-BF16/AMX, a CUDA GPU that supports it): its losses match fp32's to 1e-3, so
    early stopping keeps the same weights but at near-ties, at half the check's time; the fit
    itself stays in fp32 (a bf16 fit was no faster: benchmarks/results/check_bf16.md).
    ``check_patience: k`` ends an update's fit after k checks in a row without a better
    held-out loss (the weights kept are the best so far either way), since most updates keep
    the weights they came in with. After the last update the head takes ``final_fit_steps``
    more steps on the whole replay at ``final_fit_lr`` (best held-out weights kept): the online
    fits, 30 annealed steps per update on a growing replay, end under-fit. Then its step scale
    is chosen among
    ``step_scales`` (and up to ``step_scale_extensions`` more past the edge where J still rises)
    by CTRL's objective on ``calibration_rollouts`` policy rollouts, the one
    closest to the exact optimum (`ctrl_ray.objectives.step_scale`). ``forward_noise_fraction``
    of the states a fit step reads are drawn afresh from the forward process of their rollout's
    x_0, the rest read from its chain: a rollout then gives new states at every step (offline
    a fifth to a third closer to the optimum in nats on 1,638 rollouts; docs/update_rules.md,
    section 18)."""

    lr_embedding: float = 0.0
    lr_adapter: float = 3e-3
    lr_schedule: str = "cosine"
    weight_decay: float = 1e-4
    regression_steps: int = 30          # value-head steps per batch (more over-fit h: KL)
    regression_batch_size: int = 128    # (state, timestep) pairs per step
    # the share of a step's states drawn afresh by the forward process from their rollout's x_0
    forward_noise_fraction: float = 0.5
    replay_rollouts: int = 4096         # base rollouts the learner keeps (0: this batch's only)
    heldout_every: int = 8              # every k-th base rollout is held out of the fit (0: none)
    heldout_rollouts: int = 256         # the newest held-out rollouts the check reads (all states)
    check_every: int = 10               # head steps between held-out checks (early stopping)
    heldout_pairs: int = 1024           # (state, timestep) pairs a check reads (0: every one)
    replay_bytes: int = 256 * 2**20     # the replay's bound in bytes (the oldest dropped)
    report_every: int = 10              # sample the policy for reward/KL every k-th update
    check_bf16: bool = True             # the held-out check under bf16 where it is native
    check_patience: int = 0             # checks without a better loss that end the fit (0: never)
    # the head's step scale, chosen among these after training by the objective J on
    # `calibration_rollouts` of the policy (0: keep adapter.value_head.step_scale)
    step_scales: list[float] = field(default_factory=lambda: [0.7, 0.85, 1.0, 1.2, 1.35, 1.5,
                                                               1.7])
    calibration_rollouts: int = 128
    step_scale_extensions: int = 4      # scales past the grid's edge while J still improves there
    final_fit_steps: int = 3000         # head steps on the whole replay after the last update
    final_fit_lr: float = 1e-3          # (0 steps: none)

    def __post_init__(self):
        super().__post_init__()
        if self.final_fit_steps < 0 or not self.final_fit_lr > 0:
            raise InputError(f"final_fit_steps must be >= 0 and final_fit_lr > 0, got "
                             f"{self.final_fit_steps} and {self.final_fit_lr}")
        if self.regression_steps < 1 or self.regression_batch_size < 1:
            raise InputError(f"regression_steps and regression_batch_size must be >= 1, got "
                             f"{self.regression_steps} and {self.regression_batch_size}")
        if not 0 <= self.forward_noise_fraction <= 1:
            raise InputError(f"forward_noise_fraction must be in [0, 1], got "
                             f"{self.forward_noise_fraction}")
        if self.replay_rollouts < 0 or self.replay_bytes < 0:
            raise InputError(f"replay_rollouts and replay_bytes must be >= 0, got "
                             f"{self.replay_rollouts} and {self.replay_bytes}")
        if self.report_every < 1:
            raise InputError(f"report_every must be >= 1, got {self.report_every}")
        if self.heldout_pairs < 0:
            raise InputError(f"heldout_pairs must be >= 0, got {self.heldout_pairs}")
        if self.calibration_rollouts < 0 or (self.calibration_rollouts and (
                not self.step_scales or min(self.step_scales) <= 0)):
            raise InputError(f"calibration_rollouts must be >= 0 and step_scales positive "
                             f"numbers, got {self.calibration_rollouts} and "
                             f"{self.step_scales}")
        if self.step_scale_extensions < 0:
            raise InputError(f"step_scale_extensions must be >= 0, got "
                             f"{self.step_scale_extensions}")
        if self.check_patience < 0:
            raise InputError(f"check_patience must be >= 0, got {self.check_patience}")
        if self.heldout_rollouts < 1:
            raise InputError(f"heldout_rollouts must be >= 1, got {self.heldout_rollouts}")
        if self.heldout_every < 0 or self.heldout_every == 1 or self.check_every < 1:
            raise InputError(f"heldout_every must be 0 or >= 2 and check_every >= 1, got "
                             f"{self.heldout_every} and {self.check_every}")
        if not self.kl_weight > 0:
            raise InputError(f"kl_weight must be > 0 for the value rule (the optimum tilts "
                             f"by gamma / kl_weight), got {self.kl_weight}")


RULE_CONFIGS: dict[str, type[ObjectiveConfig]] = {
    "adjoint": AdjointConfig, "pathwise": PathwiseConfig, "ppo": PPOConfig,
    "value": ValueConfig}


def rule_config(mode: str) -> type[ObjectiveConfig]:
    """The config type of update rule ``mode`` (``adjoint``, ``pathwise``, ``ppo`` or
    ``value``)."""
    if mode not in RULE_CONFIGS:
        raise InputError(f"mode: {mode!r} is not an update rule (one of "
                         f"{', '.join(sorted(RULE_CONFIGS))})")
    return RULE_CONFIGS[mode]
