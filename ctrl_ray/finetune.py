"""CTRL fine-tuning in one process: base model + reward -> augmented policy, pathwise updates.

The pieces (`build_setup`, `Setup.update`) are what the Ray learner and workers reuse; this module
is the whole algorithm read top to bottom.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import torch
from tqdm.auto import tqdm

from ctrl_ray import tracking
from ctrl_ray.checkpoint import policy_spec, save_policy
from ctrl_ray.config import flatten, to_dict
from ctrl_ray.errors import InputError
from ctrl_ray.evaluation import EvaluationConfig, evaluate, format_report
from ctrl_ray.models.augmented import AugmentedModel
from ctrl_ray.models.backbone import UNetBackbone
from ctrl_ray.models.judge import DigitJudge
from ctrl_ray.models.loading import BaseModel, load_base_model
from ctrl_ray.models.reward import MultiTaskReward, RewardModel, load_reward
from ctrl_ray.objectives.pathwise import PathwiseConfig, draw_inputs, make_optimizer, train_step


@dataclass
class RewardSpec:
    """One reward classifier directory and its weight in the summed log-likelihood."""

    path: str = "outputs/reward-compress"
    weight: float = 1.0


@dataclass
class AdapterConfig:
    """Trainable parameters added to the frozen base: LoRA (zero-initialised up-projections),
    full fine-tuning, or label embeddings only."""

    kind: str = "lora"
    rank: int = 4
    alpha: float | None = None
    targets: list[str] | None = None


@dataclass
class FinetuneConfig:
    base_model: str = "outputs/base-digits16"
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec()])
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    objective: PathwiseConfig = field(default_factory=PathwiseConfig)
    iterations: int = 100
    seed: int = 0
    checkpoint_every: int = 25
    judge: str = "outputs/judge-digits16"
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    evaluate_base: bool = True
    output_dir: str = "outputs/ctrl-digits-compress"
    experiment: str = "ctrl-ray-finetune"


@dataclass
class Setup:
    """Everything one CTRL update needs: policy, reward, optimizer, and what describes them."""

    base: BaseModel
    model: AugmentedModel
    reward: RewardModel | MultiTaskReward
    optimizer: torch.optim.Optimizer
    objective: PathwiseConfig
    spec: dict[str, Any]

    @property
    def label_info(self) -> dict[str, dict]:
        return self.spec["label_info"]

    def reward_fn(self, x0: torch.Tensor, labels: dict[str, torch.Tensor],
                  contexts: torch.Tensor | None) -> torch.Tensor:
        return self.reward.log_likelihood(x0, labels, contexts)

    def update(self, generator: torch.Generator) -> dict[str, float]:
        """Draw one batch (labels, contexts, noise) and apply one pathwise update."""
        inputs = draw_inputs(self.model, self.objective, generator)
        return train_step(self.model, self.optimizer, self.reward_fn, inputs, self.objective)


def load_rewards(specs: list[RewardSpec]) -> RewardModel | MultiTaskReward:
    """One reward, or the weighted sum of several (labels independent given x)."""
    if not specs:
        raise InputError("rewards: at least one reward classifier is needed")
    if len(specs) == 1 and specs[0].weight == 1.0:
        return load_reward(specs[0].path)
    return MultiTaskReward([(RewardModel.load(spec.path), spec.weight) for spec in specs])


def reward_label_info(reward: RewardModel | MultiTaskReward) -> dict[str, dict]:
    """Label name -> {num_classes, edges}: what the oracles need to judge the samples."""
    terms = reward.rewards if isinstance(reward, MultiTaskReward) else [reward]
    return {term.label_name: {"num_classes": term.classifier.num_classes, "edges": term.edges}
            for term in terms}


def build_setup(config: FinetuneConfig, base: BaseModel | None = None) -> Setup:
    """Load the base model and reward, wrap the base in a zero-initialised augmented policy."""
    base = base or load_base_model(config.base_model)
    reward = load_rewards(config.rewards)
    image_size = base.image_shape[-1]
    for term in (reward.rewards if isinstance(reward, MultiTaskReward) else [reward]):
        if term.classifier.config.image_size != image_size:
            raise InputError(f"reward {term.label_name!r} was trained on "
                             f"{term.classifier.config.image_size}px images, the base model "
                             f"makes {image_size}px images")
    adapter = config.adapter
    model = AugmentedModel(UNetBackbone(base.unet, base.scheduler), reward.num_classes,
                           adapter=adapter.kind, lora_rank=adapter.rank,
                           lora_alpha=adapter.alpha, lora_targets=adapter.targets)
    sampling = {"num_inference_steps": config.evaluation.num_inference_steps,
                "eta": config.evaluation.eta}
    spec = policy_spec(model, reward_label_info(reward), sampling, str(config.base_model),
                       adapter.rank, adapter.alpha, adapter.targets)
    optimizer = make_optimizer(model, config.objective)
    return Setup(base, model, reward, optimizer, config.objective, spec)


def finetune(config: FinetuneConfig, progress: bool = True) -> dict[str, Any]:
    """Run CTRL for `config.iterations` pathwise updates, checkpoint, evaluate, log to MLflow."""
    setup = build_setup(config)
    out = Path(config.output_dir)
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    params = flatten(to_dict(config))
    params["trainable_parameters"] = setup.model.num_trainable_parameters()
    with tracking.run(config.experiment, "finetune", params) as active:
        start = time.perf_counter()
        bar = tqdm(range(config.iterations), desc="ctrl", disable=not progress)
        for iteration in bar:
            metrics = setup.update(generator)
            mlflow.log_metrics(metrics, step=iteration + 1)
            bar.set_postfix(reward=f"{metrics['reward']:.3f}", kl=f"{metrics['kl']:.2f}")
            if config.checkpoint_every and (iteration + 1) % config.checkpoint_every == 0:
                save_policy(setup.model, setup.spec, out / "checkpoints" / f"{iteration + 1:06d}",
                            {"iteration": iteration + 1}, setup.optimizer)
        train_seconds = time.perf_counter() - start
        policy_dir = save_policy(setup.model, setup.spec, out / "policy")
        mlflow.log_artifacts(str(policy_dir), artifact_path="policy")
        result = {"policy_dir": str(policy_dir), "train_seconds": train_seconds,
                  "mlflow_run_id": active.info.run_id}
        result.update(evaluate_setup(setup, config, out))
        for name in ("base", "ctrl"):
            if name in result:
                mlflow.log_metrics(_scalar_metrics(result[name], f"eval_{name}_"))
    return result


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
    for path in (out / "base_grid.png", out / "ctrl_grid.png"):
        if path.exists():
            mlflow.log_artifact(str(path))
    return results


def _scalar_metrics(report: dict, prefix: str) -> dict[str, float]:
    metrics = {f"{prefix}{k}": float(v) for k, v in report.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for name, scores in report.get("labels", {}).items():
        for key in ("accuracy", "macro_f1"):
            metrics[f"{prefix}{name}_{key}"] = float(scores[key])
    return metrics
