"""Load a model for use: a CTRL checkpoint, a base-model directory, or a `models:/` URI."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ctrl_ray.checkpoint import POLICY_FILE, load_policy, read_policy_spec
from ctrl_ray.errors import InputError
from ctrl_ray.evaluation import EvaluationConfig, evaluate, format_report, generate, save_grid
from ctrl_ray.models.augmented import AugmentedModel
from ctrl_ray.models.backbone import UNetBackbone
from ctrl_ray.models.judge import DigitJudge
from ctrl_ray.models.loading import load_base_model, load_base_model_dir
from ctrl_ray.tracking import resolve_artifacts


@dataclass
class LoadedPolicy:
    """A ready-to-sample model; `fine_tuned=False` means the pre-trained base (no labels)."""

    model: AugmentedModel
    sampling: dict[str, Any]
    label_info: dict[str, dict]
    fine_tuned: bool


def load_any(uri: str | Path) -> LoadedPolicy:
    """Resolve `uri` (checkpoint dir, base-model dir, or logged model) into a policy."""
    return load_from_artifacts(resolve_artifacts(uri), str(uri))


def load_from_artifacts(artifacts: dict[str, Path], name: str = "model") -> LoadedPolicy:
    """A policy from local paths: {"model": dir} or a logged model's {"base_model", "adapter"}."""
    artifacts = {key: Path(path) for key, path in artifacts.items()}
    if "model" in artifacts:  # a local directory
        path = artifacts["model"]
        if (path / POLICY_FILE).is_file():
            spec = read_policy_spec(path)
            model, sampling = load_policy(load_base_model(spec["base_model"]), path)
            return LoadedPolicy(model, sampling, spec["label_info"], True)
        base = load_base_model_dir(path)
    elif "adapter" in artifacts:
        spec = read_policy_spec(artifacts["adapter"])
        model, sampling = load_policy(load_base_model_dir(artifacts["base_model"]),
                                      artifacts["adapter"])
        return LoadedPolicy(model, sampling, spec["label_info"], True)
    elif "base_model" in artifacts:
        base = load_base_model_dir(artifacts["base_model"])
    else:
        raise InputError(f"{name!r} holds neither a policy nor a base model")
    model = AugmentedModel(UNetBackbone(base.unet, base.scheduler), {}, adapter="none")
    return LoadedPolicy(model.eval(), {}, {}, False)


def evaluate_model(uri: str | Path, config: EvaluationConfig, judge_path: str | None,
                   output_dir: str | Path) -> dict[str, Any]:
    """The evaluation protocol for a fine-tuned model, with its grid under `output_dir`."""
    loaded = load_any(uri)
    if not loaded.fine_tuned:
        raise InputError(f"model {str(uri)!r} is a base model: there is no label y to evaluate")
    judge = DigitJudge.load(judge_path) if judge_path else None
    report = evaluate(loaded.model, loaded.label_info, judge, config,
                      Path(output_dir) / "evaluate_grid.png")
    print(format_report(report, f"evaluation of {uri}"))
    return report


def sample_grid(uri: str | Path, context: int, label: int, count: int, seed: int,
                out: str | Path) -> Path:
    """`count` samples for digit `context` and class `label` (-1: unconditional) as a PNG row."""
    loaded = load_any(uri)
    model = loaded.model
    if model.num_contexts is not None and not 0 <= context < model.num_contexts:
        raise InputError(f"--c {context}: the model knows contexts 0..{model.num_contexts - 1}")
    labels = {}
    for name, num_classes in model.label_classes.items():
        if not -1 <= label < num_classes:
            raise InputError(f"--y {label}: label {name!r} has classes 0..{num_classes - 1} "
                             f"(or -1 for unconditional)")
        labels[name] = torch.full((count,), num_classes if label < 0 else label)
    images, _ = generate(model, torch.full((count,), context), labels,
                         [seed + i for i in range(count)], from_reference=not loaded.fine_tuned,
                         **loaded.sampling)
    return save_grid(images, rows=1, path=out)
