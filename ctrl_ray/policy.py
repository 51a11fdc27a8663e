"""Load a model for use: a CTRL checkpoint, a base-model directory, or a `models:/` URI."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ctrl_ray.chain import check_chain
from ctrl_ray.checkpoint import POLICY_FILE, load_policy, read_policy_spec
from ctrl_ray.errors import InputError
from ctrl_ray.evaluation import (
    EvaluationConfig,
    class_names,
    context_indices,
    context_labels,
    evaluate,
    format_report,
    generate,
    save_grid,
)
from ctrl_ray.models.augmented import AugmentedModel
from ctrl_ray.models.judge import DigitJudge
from ctrl_ray.models.loading import build_backbone, load_base_model_dir
from ctrl_ray.registry import load_base_model, resolve_artifacts


@dataclass
class LoadedPolicy:
    """A ready-to-sample model; `fine_tuned=False` means the pre-trained base (no labels)."""

    model: AugmentedModel
    sampling: dict[str, Any]
    label_info: dict[str, dict]
    fine_tuned: bool
    chain: dict[str, Any] | None = None   # the chain a value head was fitted on

    def check_chain(self, allow: bool, option: str, prefix: str = "",
                    **requested: Any) -> None:
        """Refuse a sampler other than the one the value head was fitted on (`ctrl_ray.chain`)."""
        requested.setdefault("guidance_scale", getattr(self.model.backbone, "guidance_scale",
                                                       1.0))
        check_chain(self.chain, requested, allow, option, prefix)


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
            return LoadedPolicy(model, sampling, spec["label_info"], True, spec.get("chain"))
        base = load_base_model_dir(path)
    elif "adapter" in artifacts:
        spec = read_policy_spec(artifacts["adapter"])
        model, sampling = load_policy(load_base_model_dir(artifacts["base_model"]),
                                      artifacts["adapter"])
        return LoadedPolicy(model, sampling, spec["label_info"], True, spec.get("chain"))
    elif "base_model" in artifacts:
        base = load_base_model_dir(artifacts["base_model"])
    else:
        raise InputError(f"{name!r} holds neither a policy nor a base model")
    model = AugmentedModel(build_backbone(base), {}, adapter="none")
    return LoadedPolicy(model.eval(), {}, {}, False)


def evaluate_model(uri: str | Path, config: EvaluationConfig, judge_path: str | None,
                   output_dir: str | Path) -> dict[str, Any]:
    """The evaluation protocol for a fine-tuned model, with its grid under `output_dir`."""
    loaded = load_any(uri)
    if not loaded.fine_tuned:
        raise InputError(f"model {str(uri)!r} is a base model: there is no label y to evaluate")
    loaded.check_chain(config.allow_other_chain, "evaluation.allow_other_chain: true",
                       prefix="evaluation.", num_inference_steps=config.num_inference_steps,
                       eta=config.eta)
    judge = DigitJudge.load(judge_path) if judge_path else None
    report = evaluate(loaded.model, loaded.label_info, judge, config,
                      Path(output_dir) / "evaluate_grid.png")
    print(format_report(report, f"evaluation of {uri}"))
    return report


def class_index(label: int | str, name: str, num_classes: int, info: dict[str, Any]) -> int:
    """A class given as an index (-1: unconditional) or by its name in `info["class_names"]`."""
    names = [str(n) for n in info.get("class_names") or []]
    if isinstance(label, str) and label.strip() in names:
        return names.index(label.strip())
    try:
        index = int(label)
    except (TypeError, ValueError):
        index = None
    if index is None or not -1 <= index < num_classes:
        named = f" or one of {names}" if names else ""
        raise InputError(f"y {label!r}: label {name!r} has classes 0..{num_classes - 1}"
                         f"{named} (or -1 for unconditional)")
    return index


def sample_grid(uri: str | Path, context: int | str | None, label: int | str, count: int,
                seed: int, out: str | Path, guidance_scale: float | None = None,
                allow_other_chain: bool = False) -> Path:
    """`count` samples for context `context` (a digit, a prompt index, or a prompt string for a
    text-to-image model) and class `label` (an index or class name; -1: unconditional) as a PNG
    row, named by its y and (in the title) its context, each column by its seed.
    `guidance_scale` overrides a text model's classifier-free guidance (default: the one it was
    trained with); a value policy refuses another unless `allow_other_chain`."""
    loaded = load_any(uri)
    model = loaded.model
    if guidance_scale is not None:
        if not hasattr(model.backbone, "guidance_scale"):
            raise InputError("--guidance-scale applies to text-to-image models only")
        if not guidance_scale >= 0:
            raise InputError(f"--guidance-scale must be >= 0, got {guidance_scale}")
        loaded.check_chain(allow_other_chain, "--allow-other-chain",
                           guidance_scale=float(guidance_scale))
        model.backbone.guidance_scale = float(guidance_scale)
    if context is None:
        raise InputError("give a context: --c for a class id (or prompt index), --prompt for "
                         "a text-to-image model")
    try:
        contexts = context_indices(model, [context] * count)
    except InputError as err:
        raise InputError(f"--c/--prompt: {err}") from None
    labels, named = {}, []
    for name, num_classes in model.label_classes.items():
        info = loaded.label_info.get(name, {})
        index = class_index(label, name, num_classes, info)
        labels[name] = torch.full((count,), num_classes if index < 0 else index)
        named.append(f"{name}: " + ("unconditional" if index < 0 else
                                    class_names({"num_classes": num_classes, **info})[index]))
    seeds = [seed + i for i in range(count)]
    images, _ = generate(model, contexts, labels, seeds, from_reference=not loaded.fine_tuned,
                         **loaded.sampling)
    return save_grid(images, rows=1, path=out,
                     row_labels=[", ".join(named) if named else "base model (no y)"],
                     column_labels=[f"seed {s}" for s in seeds],
                     title=context_labels(model, contexts[:1].tolist())[0])
