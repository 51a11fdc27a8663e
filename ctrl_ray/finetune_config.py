"""The config of a CTRL run (`ctrl-ray finetune`), without torch: read and checked
(`ctrl_ray.config`, `ctrl_ray.preflight`) before torch, Ray or MLflow are imported;
`ctrl_ray.finetune_setup` builds the run from it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

from ctrl_ray.chain import check_chain
from ctrl_ray.config import SEED, check_bounds, from_dict
from ctrl_ray.errors import InputError
from ctrl_ray.evaluation_config import EvaluationConfig
from ctrl_ray.models.adapter_config import AdapterConfig
from ctrl_ray.models.text_to_image_options import TextToImageOptions
from ctrl_ray.objectives.configs import DEFAULT_RULE
from ctrl_ray.objectives.configs import rule_config as objective_config
from ctrl_ray.sampler_config import SamplingOptions


@dataclass
class RewardSpec:
    """One reward classifier directory and its weight in the summed log-likelihood."""

    path: str = "outputs/reward-compress"
    weight: float = 1.0


@dataclass
class DistributedConfig:
    """Where the work runs: `workers: 0` is one process without Ray; N > 0 starts N Ray
    rollout workers and `learners` data-parallel learner ranks (joining `address`, or
    RAY_ADDRESS, or a local Ray). `max_staleness: k` lets rollouts run up to k policy versions
    ahead of the learner (0: the synchronous loop). `keep_actors: true` leaves a finished
    run's actors idle, holding their CPUs and GPUs, for the next run of the same process with
    the same resources, which then skips their start (imports of torch, diffusers and peft:
    a tiny run's 1.5 s become 15.5 s on a learner and two fresh workers on 2 CPU cores,
    benchmarks/actor_start.py); learner ranks in a placement group (those that reserve
    resources) and a failed run's actors are always ended."""

    workers: int = 0
    learners: int = 1
    max_staleness: int = 0
    address: str | None = None
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    learner_cpus: float = 0.0
    learner_gpus: float = 0.0
    max_restarts: int = 3
    keep_actors: bool = False

    def __post_init__(self):
        check_bounds(self, workers="[0, 1024]", learners="[1, 256]", max_staleness="[0, 64]",
                     cpus_per_worker="[0, 1024]",
                     gpus_per_worker="[0, 64]", learner_cpus="[0, 1024]", learner_gpus="[0, 64]",
                     max_restarts="[0, 1000]")
        if self.learners > 1 and not self.workers:
            raise InputError(f"distributed.learners: {self.learners} learner ranks run on Ray; "
                             f"set distributed.workers >= 1")

    @property
    def ray_address(self) -> str:
        """What `ray.init` gets: `address`, else RAY_ADDRESS, else "local", a fresh local Ray.
        (`ray.init()` with no address would join the cluster Ray's temp folder last recorded,
        retrying for good when that head has died.)"""
        return self.address or os.environ.get("RAY_ADDRESS") or "local"


@dataclass
class FinetuneConfig:
    """One CTRL run: base model, reward(s), adapter, update rule (`mode` and its `objective`),
    where it runs, how long, and how it is evaluated."""

    base_model: str = "outputs/base-digits16"
    backbone: TextToImageOptions = field(default_factory=TextToImageOptions)
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec()])
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    mode: Literal["adjoint", "pathwise", "ppo", "value"] = DEFAULT_RULE
    objective: Any = field(default_factory=dict)   # the update rule's config: its type by `mode`
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    sampling: SamplingOptions = field(default_factory=SamplingOptions)   # the denoiser's calls
    iterations: int = 100
    seed: int = 0
    checkpoint_every: int = 25
    judge: str = "outputs/judge-digits16"
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    evaluate: bool = True
    evaluate_base: bool = True
    optimum_samples_per_context: int = 100   # the exact optimum next to the run's numbers; 0: off
    optimum_max_samples_per_context: int = 0  # a low-ESS context topped up to this; 0: no
    # For each (context, target) whose base samples keep the optimum's ESS < 50: as many samples
    # of the fine-tuned policy drawn for it, weighted to the optimum by their path ratio; 0: off.
    optimum_policy_samples: int = 0
    optimum_max_policy_samples: int = 0   # a pair still short topped up to this; 0: no top-up
    output_dir: str = "outputs/ctrl-digits-compress"
    experiment: str = "ctrl-ray-finetune"

    def __post_init__(self):
        check_bounds(self, iterations="[1, 100000000]", seed=SEED, checkpoint_every=">= 0",
                     optimum_samples_per_context="[0, 100000]",
                     optimum_max_samples_per_context="[0, 1000000]",
                     optimum_policy_samples="[0, 100000]",
                     optimum_max_policy_samples="[0, 1000000]")
        # The one place the update rule is chosen: `objective` becomes the rule's own config.
        rule_config = objective_config(self.mode)
        if self.adapter.kind is None:
            self.adapter.kind = "value" if self.mode == "value" else "lora"
        if (self.mode == "value") != (self.adapter.kind == "value"):
            raise InputError(f"mode {self.mode!r} with adapter.kind {self.adapter.kind!r}: the "
                             f"value rule trains exactly the value head (mode value with "
                             f"adapter.kind value)")
        if isinstance(self.objective, dict):
            self.objective = from_dict(rule_config, self.objective, prefix="objective.")
        elif type(self.objective) is not rule_config:
            raise InputError(f"objective: a {type(self.objective).__name__} does not configure "
                             f"mode {self.mode!r} (expected {rule_config.__name__})")

    def check_evaluation_chain(self) -> None:
        """A value run is evaluated on the chain its head is fitted on, unless
        `evaluation.allow_other_chain` (checked when training starts, not by `evaluate`)."""
        if self.adapter.kind == "value" and self.evaluate:
            check_chain({"num_inference_steps": self.objective.num_inference_steps,
                         "eta": self.objective.eta},
                        {"num_inference_steps": self.evaluation.num_inference_steps,
                         "eta": self.evaluation.eta},
                        self.evaluation.allow_other_chain, "evaluation.allow_other_chain: true",
                        prefix="evaluation.")
