"""The setup of a CTRL run, below the training driver: what every role builds from its config.

The config (`FinetuneConfig` and its sections) lives in the torch-free `ctrl_ray.finetune_config`
and is re-exported here. `build_setup` loads the base model and the reward and wraps the base
in the zero-initialised augmented policy; the learner and the rollout workers
(`ctrl_ray.distributed.roles`) each hold one, `ctrl_ray.distributed.driver.train` runs the loop
(in-process or on Ray) and `evaluate_setup` scores the result. The entry point above them is
`ctrl_ray.finetune`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ctrl_ray.chain import fitted_chain
from ctrl_ray.checkpoint import policy_spec
from ctrl_ray.errors import InputError
from ctrl_ray.evaluation import evaluate, format_report
from ctrl_ray.finetune_config import (
    AdapterConfig,
    DistributedConfig,
    FinetuneConfig,
    RewardSpec,
)
from ctrl_ray.models.augmented import AugmentedModel
from ctrl_ray.models.judge import DigitJudge
from ctrl_ray.models.loading import BaseModel, backbone_spec, build_backbone
from ctrl_ray.models.reward import Reward, RewardTerm, load_reward
from ctrl_ray.models.text_to_image import decode_images
from ctrl_ray.objectives import ObjectiveConfig
from ctrl_ray.objectives.base import make_optimizer
from ctrl_ray.optimum import (
    OptimumConfig,
    against_optimum,
    exact_optimum,
    format_against_optimum,
    format_optimum,
)
from ctrl_ray.registry import load_base_model

__all__ = ["AdapterConfig", "DistributedConfig", "FinetuneConfig", "RewardSpec", "Setup",
           "build_setup", "evaluate_setup", "load_rewards"]


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
    backbone.configure_calls(config.sampling)
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
                               out / "ctrl_grid.png", log_likelihood=setup.image_log_likelihood)
    print(format_report(results["ctrl"], "CTRL fine-tuned"))
    if config.optimum_samples_per_context:
        optimum = run_optimum(setup, config, judge,
                              proposal=setup.model if config.optimum_policy_samples else None)
        print(format_optimum(optimum))
        base = results.get("base", optimum["base"])
        if optimum.get("short_pairs"):
            results["optimum_estimates"] = {"base": optimum["base_samples_levels"][0],
                                            "policy": optimum["levels"][0]}
        results["optimum"] = {**optimum["levels"][0], "proposal": optimum["proposal"]}
        results["against_optimum"] = against_optimum(results["ctrl"], results["optimum"], base)
        print(format_against_optimum(results["against_optimum"], list(setup.label_info)))
    return results


def run_optimum(setup: Setup, config: FinetuneConfig, judge: DigitJudge | None,
                proposal=None) -> dict:
    """The exact optimum at the run's gamma/alpha, on the evaluation's targets and sampler, from
    `optimum_samples_per_context` base samples per context (topped up as configured), and, with
    a `proposal` policy, `optimum_policy_samples` of its samples for each (context, target)
    pair whose base ESS stays below 50 (topped up to `optimum_max_policy_samples`)."""
    tilt = config.objective.tilt_exponent(math.prod(setup.model.sample_shape))
    return exact_optimum(setup.model, setup.label_info, setup.image_log_likelihood, judge,
                         proposal=proposal, config=OptimumConfig(
                             samples_per_context=config.optimum_samples_per_context,
                             max_samples_per_context=config.optimum_max_samples_per_context,
                             short_pair_samples=config.optimum_policy_samples,
                             max_short_pair_samples=config.optimum_max_policy_samples,
                             contexts=config.evaluation.contexts,
                             context_digits=config.evaluation.context_digits,
                             guidance_levels=[tilt],
                             num_inference_steps=config.evaluation.num_inference_steps,
                             eta=config.evaluation.eta,
                             scorers=dict(config.evaluation.scorers)))
