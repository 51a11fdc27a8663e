"""`ctrl-ray baseline cfg|cg|dps`: train (or load) a baseline, evaluate it by the protocol, log it.

Every baseline uses the same base model, the same offline pairs (or the reward trained on them)
and the same sampler and evaluation (`ctrl_ray.evaluation.evaluate`) as CTRL, so its accuracy,
macro-F1, per-class F1, confusion matrix, fidelity and mean path KL to the pre-trained model are
directly comparable. The base model is scored on the same targets and seeds alongside.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import torch

from ctrl_ray import tracking
from ctrl_ray.baseline_config import (
    BASELINE_CONFIGS,
    BASELINE_KINDS,
    BaselineConfig,
    CFGBaselineConfig,
    CGBaselineConfig,
    DPSBaselineConfig,
    PairsConfig,
    config_class,
    load_baseline_config,
)
from ctrl_ray.baselines import GuidedModel
from ctrl_ray.baselines.cfg import CFGModel, build_triplets, train_cfg
from ctrl_ray.baselines.classifier_guidance import (
    ClassifierGuidedModel,
    NoisyClassifier,
    train_noisy_classifier,
)
from ctrl_ray.baselines.dps import DPSModel
from ctrl_ray.checkpoint import load_policy, policy_spec, read_policy_spec, save_policy
from ctrl_ray.config import flatten, scalar_metrics, to_dict
from ctrl_ray.data.digits import require_digits
from ctrl_ray.data.pairs import PairSet, load_pairs, make_pairs
from ctrl_ray.errors import InputError
from ctrl_ray.evaluation import evaluate, format_report
from ctrl_ray.finetune_setup import load_rewards
from ctrl_ray.models.augmented import AugmentedModel
from ctrl_ray.models.judge import DigitJudge
from ctrl_ray.models.loading import BaseModel, build_backbone
from ctrl_ray.registry import load_base_model
from ctrl_ray.storage import write_json

__all__ = ["BASELINE_CONFIGS", "BASELINE_KINDS", "BaselineConfig", "BuiltBaseline",
           "CFGBaselineConfig", "CGBaselineConfig", "DPSBaselineConfig", "PairsConfig",
           "build_cfg", "build_cg", "build_dps", "config_class", "ensure_pairs",
           "load_baseline_config", "run_baseline"]

# Why a baseline needs a class-conditional pixel model (DPS runs on text-to-image ones too).
CLASS_MODEL_ONLY = {
    "cfg": "it trains on digits triplets (x, digit c, y) of a class-conditional model",
    "cg": "its noisy classifiers read the digits pixels x_t of a class-conditional model",
}


@dataclass
class BuiltBaseline:
    """A ready guided sampler, the label metadata the oracles need, and what it cost."""

    guided: GuidedModel
    label_info: dict[str, dict]
    label_counts: dict[str, Any]
    training: dict[str, Any]


def ensure_pairs(spec: PairsConfig, dataset: str, size: int, field_name: str) -> PairSet:
    """Load the pair set at ``spec.path``, drawing it from ``dataset`` first if it is missing."""
    require_digits(dataset, size=size, key="dataset")
    path = Path(spec.path)
    if not path.exists():
        make_pairs(dataset, spec.label, spec.num_pairs, path, seed=spec.seed)
    pairs = load_pairs(path)
    if pairs.label_name != spec.label:
        raise InputError(f"{field_name}.label: {spec.label!r}, but {str(path)!r} holds "
                         f"{pairs.label_name!r} pairs")
    if len(pairs) != spec.num_pairs:
        raise InputError(f"{field_name}.num_pairs: {spec.num_pairs}, but {str(path)!r} holds "
                         f"{len(pairs)} pairs")
    return pairs


def _pair_sets(config: CFGBaselineConfig | CGBaselineConfig, base: BaseModel) -> list[PairSet]:
    if not config.pairs:
        raise InputError("pairs: at least one pair set is needed")
    size = base.image_shape[-1]
    return [ensure_pairs(spec, config.dataset, size, f"pairs[{index}]")
            for index, spec in enumerate(config.pairs)]


def build_cfg(config: CFGBaselineConfig, base: BaseModel, out: Path,
              progress: bool) -> BuiltBaseline:
    """Train the conditional network on triplets (or load a saved one) and wrap it in CFG."""
    if config.model:
        model, _ = load_policy(base, config.model)
        spec = read_policy_spec(config.model)
        return BuiltBaseline(CFGModel(model, config.guidance_scale), spec["label_info"],
                             spec.get("cfg", {}).get("label_counts", {}),
                             {"loaded_from": config.model})
    dataset = require_digits(config.dataset, size=base.image_shape[-1], key="dataset")
    pair_sets = _pair_sets(config, base)
    triplets = build_triplets(pair_sets, dataset)
    adapter = config.adapter
    with torch.random.fork_rng(devices=[]):  # LoRA down-projections are random: seed them
        torch.manual_seed(config.training.seed)
        model = AugmentedModel(build_backbone(base), triplets.label_classes,
                               adapter=adapter.kind, lora_rank=adapter.rank,
                               lora_alpha=adapter.alpha, lora_targets=adapter.targets)
    training = train_cfg(model, triplets, config.training, progress=progress,
                         log_fn=mlflow.log_metrics)
    label_info = {p.label_name: {"num_classes": p.num_classes, "edges": p.edges}
                  for p in pair_sets}
    counts = {"y": triplets.label_counts(), "c": len(triplets)}
    sampling = {"num_inference_steps": config.evaluation.num_inference_steps,
                "eta": config.evaluation.eta}
    spec = policy_spec(model, label_info, sampling, str(config.base_model), adapter.rank,
                       adapter.alpha, adapter.targets)
    spec["cfg"] = {"guidance_scale": config.guidance_scale,
                   "p_uncond": config.training.p_uncond, "label_counts": counts}
    model_dir = save_policy(model, spec, out / "cfg_model")
    training = {**training, "model_dir": str(model_dir)}
    return BuiltBaseline(CFGModel(model, config.guidance_scale), label_info, counts, training)


def build_cg(config: CGBaselineConfig, base: BaseModel, out: Path,
             progress: bool) -> BuiltBaseline:
    """Train one noisy classifier per pair set (or load them) and guide the frozen base."""
    backbone = build_backbone(base)
    training: dict[str, Any] = {}
    if config.classifiers:
        classifiers = [NoisyClassifier.load(path) for path in config.classifiers]
        counts: dict[str, Any] = {}
        training["loaded_from"] = list(config.classifiers)
    else:
        classifiers, counts = [], {"y": {}}
        for index, pairs in enumerate(_pair_sets(config, base)):
            classifier, report = train_noisy_classifier(
                pairs.images, pairs.labels, backbone.alphas_cumprod,
                num_classes=pairs.num_classes, label_name=pairs.label_name, edges=pairs.edges,
                config=config.training, progress=progress)
            directory = classifier.save(out / "classifiers" / f"{index}-{pairs.label_name}")
            training[pairs.label_name] = {**report, "model_dir": str(directory)}
            mlflow.log_metrics({f"cg_{pairs.label_name}_{key}": value
                                for key, value in report.items()
                                if key.startswith(("val_accuracy", "final_loss"))})
            classifiers.append(classifier)
            counts["y"][pairs.label_name] = len(pairs)
    for classifier in classifiers:
        spec = classifier.spec
        if spec.image_size != base.image_shape[-1] or \
                spec.num_train_timesteps != len(backbone.alphas_cumprod):
            raise InputError(f"classifier {spec.label_name!r} was trained for {spec.image_size}px "
                             f"images and {spec.num_train_timesteps} timesteps, the base model "
                             f"has {base.image_shape[-1]}px and {len(backbone.alphas_cumprod)}")
    label_info = {c.label_name: {"num_classes": c.num_classes, "edges": c.spec.edges}
                  for c in classifiers}
    model = AugmentedModel(backbone, {}, adapter="none").eval()
    guided = ClassifierGuidedModel(model, classifiers, config.guidance_scale)
    return BuiltBaseline(guided, label_info, counts, training)


def build_dps(config: DPSBaselineConfig, base: BaseModel, out: Path,
              progress: bool) -> BuiltBaseline:
    """Load CTRL's reward classifier(s) and guide the frozen base through x0_hat (no training)."""
    reward = load_rewards(config.rewards)
    for term in reward.terms:
        # A text-to-image model's images are resized to the reward's size (`reward_view`).
        if term.classifier.config.image_size != base.image_shape[-1] and \
                not base.is_text_to_image:
            raise InputError(f"reward {term.label_name!r} was trained on "
                             f"{term.classifier.config.image_size}px images, the base model "
                             f"makes {base.image_shape[-1]}px images")
    counts = {"y": {term.label_name: _reward_pairs(term.meta) for term in reward.terms}}
    model = AugmentedModel(build_backbone(base), {}, adapter="none").eval()
    guided = DPSModel(model, reward, config.guidance_scale)
    return BuiltBaseline(guided, reward.label_info(), counts,
                         {"rewards": [spec.path for spec in config.rewards]})


def _reward_pairs(meta: dict) -> int | None:
    report = meta.get("report") or {}
    if "num_train" in report and "num_val" in report:
        return int(report["num_train"]) + int(report["num_val"])
    return None


BUILDERS = {"cfg": build_cfg, "cg": build_cg, "dps": build_dps}


def run_baseline(kind: str, config: BaselineConfig, progress: bool = True) -> dict[str, Any]:
    """Train (or load) baseline ``kind``, score it and the base model by the evaluation protocol,
    write grids and ``report.json`` under ``config.output_dir`` and log everything to MLflow.

    Returns {kind, guidance_scale, <kind>: report, base: report (if evaluate_base),
    train_seconds, sample_seconds, label_counts, training, output_dir, mlflow_run_id}.
    """
    expected = config_class(kind)
    if not isinstance(config, expected):
        raise InputError(f"baseline {kind!r} needs a {expected.__name__}, "
                         f"got {type(config).__name__}")
    base = load_base_model(config.base_model)
    if kind in CLASS_MODEL_ONLY and base.is_text_to_image:
        raise InputError(f"baseline {kind}: {CLASS_MODEL_ONLY[kind]}; {str(base.path)!r} is a "
                         f"text-to-image model ({base.metadata.get('kind')}): use DPS")
    out = Path(config.output_dir)
    params = {**flatten(to_dict(config)), "kind": kind}
    with tracking.run(config.experiment, f"baseline-{kind}", params) as active:
        start = time.perf_counter()
        built = BUILDERS[kind](config, base, out, progress)
        train_seconds = time.perf_counter() - start
        judge = DigitJudge.load(config.judge) if config.judge else None
        result: dict[str, Any] = {
            "kind": kind, "guidance_scale": config.guidance_scale,
            "train_seconds": train_seconds, "label_counts": built.label_counts,
            "training": built.training, "output_dir": str(out),
            "mlflow_run_id": active.info.run_id,
        }
        if config.evaluate_base:
            result["base"] = evaluate(built.guided, built.label_info, judge, config.evaluation,
                                      out / "base_grid.png", from_reference=True)
            print(format_report(result["base"], "base model (ignores y)"))
        start = time.perf_counter()
        result[kind] = evaluate(built.guided, built.label_info, judge, config.evaluation,
                                out / f"{kind}_grid.png")
        result["sample_seconds"] = time.perf_counter() - start
        print(format_report(result[kind], f"{kind} (guidance scale {config.guidance_scale:g})"))
        metrics = {"train_seconds": train_seconds, "sample_seconds": result["sample_seconds"]}
        for name in ("base", kind):
            if name in result:
                metrics.update(scalar_metrics(result[name], f"eval_{name}_"))
        mlflow.log_metrics(metrics)
        write_json(out / "report.json", result)
        mlflow.log_artifacts(str(out), artifact_path="baseline")
    return result
