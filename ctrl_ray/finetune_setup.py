"""The setup of a CTRL run, below the training driver: its config and what every role builds.

`build_setup` loads the base model and the reward and wraps the base in the zero-initialised
augmented policy; the learner and the rollout workers (`ctrl_ray.distributed.roles`) each hold
one, `ctrl_ray.distributed.driver.train` runs the loop (in-process or on Ray) and
`evaluate_setup` scores the result. The entry point above them is `ctrl_ray.finetune`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ctrl_ray.chain import check_chain, fitted_chain
from ctrl_ray.checkpoint import policy_spec
from ctrl_ray.config import SEED, UnknownKeyError, check_bounds, from_dict
from ctrl_ray.errors import InputError
from ctrl_ray.evaluation import EvaluationConfig, evaluate, format_report
from ctrl_ray.models.augmented import ADAPTERS, AugmentedModel
from ctrl_ray.models.judge import DigitJudge
from ctrl_ray.models.loading import BaseModel, backbone_spec, build_backbone
from ctrl_ray.models.reward import Reward, RewardTerm, load_reward
from ctrl_ray.models.soft_value import WIDTH_KEYS
from ctrl_ray.models.text_to_image import TextToImageOptions, decode_images
from ctrl_ray.objectives import DEFAULT_RULE, ObjectiveConfig, update_rule
from ctrl_ray.objectives.base import make_optimizer
from ctrl_ray.optimum import OptimumConfig, exact_optimum, format_optimum
from ctrl_ray.registry import load_base_model


@dataclass
class RewardSpec:
    """One reward classifier directory and its weight in the summed log-likelihood."""

    path: str = "outputs/reward-compress"
    weight: float = 1.0


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
    value_head: dict[str, Any] = field(default_factory=dict)   # widths: channels, hidden_dim,
                                                               # time_embedding_dim

    def __post_init__(self):
        check_bounds(self, kind=ADAPTERS, rank="[1, 4096]", alpha="> 0", min_timestep=">= 0",
                     time_buckets="[1, 1000]")
        if self.value_head and self.kind not in (None, "value"):
            raise InputError(f"adapter.value_head sets the widths of a value head; adapter.kind "
                             f"{self.kind!r} has none")
        unknown = sorted(set(self.value_head) - set(WIDTH_KEYS))
        if unknown:
            raise UnknownKeyError(f"adapter.value_head.{unknown[0]}",
                                  self.value_head[unknown[0]], ", ".join(WIDTH_KEYS))


@dataclass
class DistributedConfig:
    """Where the work runs: `workers: 0` is one process without Ray; N > 0 starts N Ray
    rollout workers and a learner actor (joining `address`, or RAY_ADDRESS, or a local Ray)."""

    workers: int = 0
    address: str | None = None
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    learner_cpus: float = 0.0
    learner_gpus: float = 0.0
    max_restarts: int = 3

    def __post_init__(self):
        check_bounds(self, workers="[0, 1024]", cpus_per_worker="[0, 1024]",
                     gpus_per_worker="[0, 64]", learner_cpus="[0, 1024]", learner_gpus="[0, 64]",
                     max_restarts="[0, 1000]")

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
    iterations: int = 100
    seed: int = 0
    checkpoint_every: int = 25
    judge: str = "outputs/judge-digits16"
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    evaluate: bool = True
    evaluate_base: bool = True
    optimum_samples_per_context: int = 100   # the exact optimum next to the run's numbers; 0: off
    optimum_max_samples_per_context: int = 0  # a low-ESS context topped up to this; 0: no
    output_dir: str = "outputs/ctrl-digits-compress"
    experiment: str = "ctrl-ray-finetune"

    def __post_init__(self):
        check_bounds(self, iterations="[1, 100000000]", seed=SEED, checkpoint_every=">= 0",
                     optimum_samples_per_context="[0, 100000]",
                     optimum_max_samples_per_context="[0, 1000000]")
        # The one place the update rule is chosen: `objective` becomes the rule's own config.
        rule_config = update_rule(self.mode).Config
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


@dataclass
class Setup:
    """Everything one CTRL update needs: policy, reward, optimizer, and what describes them."""

    base: BaseModel
    model: AugmentedModel
    reward: Reward
    optimizer: torch.optim.Optimizer
    objective: ObjectiveConfig
    spec: dict[str, Any]

    @property
    def label_info(self) -> dict[str, dict]:
        return self.spec["label_info"]

    def reward_fn(self, x0: torch.Tensor, labels: dict[str, torch.Tensor],
                  contexts: torch.Tensor | None) -> torch.Tensor:
        """log p(y | x0, c) of the samples (a latent model's VAE decode is inside the graph,
        checkpointed)."""
        return self.image_log_likelihood(decode_images(self.model.backbone, x0), labels, contexts)

    def image_log_likelihood(self, images: torch.Tensor, labels: dict[str, torch.Tensor],
                             contexts: torch.Tensor | None) -> torch.Tensor:
        """log p(y | x, c) of decoded images, each reward classifier seeing them at its own
        size and channels."""
        device = next(self.reward.parameters()).device
        labels = {name: values.to(device) for name, values in labels.items()}
        contexts = None if contexts is None else contexts.to(device)
        return self.reward.image_log_likelihood(images.to(device), labels, contexts)


def load_rewards(specs: list[RewardSpec]) -> Reward:
    """The reward of one spec, or the weighted sum of several (labels independent given x)."""
    if not specs:
        raise InputError("rewards: at least one reward classifier is needed")
    if len(specs) == 1 and specs[0].weight == 1.0:
        return load_reward(specs[0].path)
    return Reward([(RewardTerm.load(spec.path), spec.weight) for spec in specs])


def build_setup(config: FinetuneConfig, base: BaseModel | None = None) -> Setup:
    """Load the base model and reward, wrap the base in a zero-initialised augmented policy."""
    base = base or load_base_model(config.base_model)
    reward = load_rewards(config.rewards)
    image_size = base.image_shape[-1]
    for term in reward.terms:
        # A text-to-image model's images are resized to the reward's size (`reward_view`).
        if term.classifier.config.image_size != image_size and not base.is_text_to_image:
            raise InputError(f"reward {term.label_name!r} was trained on "
                             f"{term.classifier.config.image_size}px images, the base model "
                             f"makes {image_size}px images")
    backbone = build_backbone(base, config.backbone)
    if base.is_text_to_image and not backbone.num_contexts:
        raise InputError("backbone.prompts: a text-to-image base model needs at least one "
                         "prompt to train on")
    adapter = config.adapter
    with torch.random.fork_rng():  # LoRA down-projections are random: same seed, same policy
        torch.manual_seed(config.seed)
        model = AugmentedModel(backbone, reward.num_classes,
                               adapter=adapter.kind, lora_rank=adapter.rank,
                               lora_alpha=adapter.alpha, lora_targets=adapter.targets,
                               min_timestep=adapter.min_timestep,
                               time_buckets=adapter.time_buckets,
                               value_head=adapter.value_head)
    sampling = {"num_inference_steps": config.evaluation.num_inference_steps,
                "eta": config.evaluation.eta}
    spec = policy_spec(model, reward.label_info(), sampling, str(config.base_model),
                       adapter.rank, adapter.alpha, adapter.targets)
    spec["backbone"] = backbone_spec(backbone)
    if model.value_head is not None:
        spec["chain"] = fitted_chain(backbone, config.objective.num_inference_steps,
                                     config.objective.eta)
    return Setup(base, model, reward, make_optimizer(model, config.objective), config.objective,
                 spec)


def evaluate_setup(setup: Setup, config: FinetuneConfig, out: Path) -> dict[str, Any]:
    """Score the fine-tuned policy (and the base model on the same targets) by the protocol."""
    judge = DigitJudge.load(config.judge) if config.judge else None
    results = {}
    setup.model.eval()
    if config.evaluate_base:
        results["base"] = evaluate(setup.model, setup.label_info, judge, config.evaluation,
                                   out / "base_grid.png", from_reference=True)
        print(format_report(results["base"], "base model (ignores y)"))
    results["ctrl"] = evaluate(setup.model, setup.label_info, judge, config.evaluation,
                               out / "ctrl_grid.png")
    print(format_report(results["ctrl"], "CTRL fine-tuned"))
    if config.optimum_samples_per_context:
        tilt = config.objective.tilt_exponent(math.prod(setup.model.sample_shape))
        optimum = exact_optimum(setup.model, setup.label_info, setup.image_log_likelihood, judge,
                                OptimumConfig(
                                    samples_per_context=config.optimum_samples_per_context,
                                    max_samples_per_context=(
                                        config.optimum_max_samples_per_context),
                                    contexts=config.evaluation.contexts,
                                    context_digits=config.evaluation.context_digits,
                                    guidance_levels=[tilt],
                                    num_inference_steps=config.evaluation.num_inference_steps,
                                    eta=config.evaluation.eta,
                                    scorers=dict(config.evaluation.scorers)))
        print(format_optimum(optimum))
        results["optimum"] = optimum["levels"][0]
    return results
