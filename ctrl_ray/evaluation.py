"""Evaluation of generated samples: labels of y (by the oracle, the user's labeller or the
held-out judge: `ctrl_ray.scoring`), fidelity, class histograms and sample grids."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

from ctrl_ray.errors import InputError
from ctrl_ray.evaluation_config import EvaluationConfig
from ctrl_ray.grids import image_grid, save_grid
from ctrl_ray.models.text_to_image import reward_view
from ctrl_ray.scoring import get_scorer, label_images_for

__all__ = ["EvaluationConfig", "class_histogram", "evaluate", "format_report", "generate",
           "image_grid", "label_images_for", "save_grid"]


def class_histogram(labels: np.ndarray, num_classes: int) -> list[float]:
    """Fraction of `labels` in each class 0..num_classes-1."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    return (counts / max(1, counts.sum())).round(4).tolist()


def generate(model, contexts: torch.Tensor | None, labels: dict[str, torch.Tensor],
             seeds: Sequence[int], *, num_inference_steps: int = 50, eta: float = 1.0,
             from_reference: bool = False, batch_size: int = 256,
             compute_kl: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sample one image per row of (contexts, labels, seeds); each row depends only on its own
    seed, so a sample is reproducible alone or in any batch.

    Returns the images (N, C, H, W) (`model.decode` of the samples: a latent model's VAE decode,
    identity for pixel models) and, when `compute_kl`, each path's KL to the reference.
    """
    images, kls = [], []
    for trajectory in sample_rows(model, contexts, labels, seeds,
                                  num_inference_steps=num_inference_steps, eta=eta,
                                  from_reference=from_reference, batch_size=batch_size,
                                  compute_kl=compute_kl):
        with torch.no_grad():
            images.append(model.decode(trajectory.x0).cpu())
        if compute_kl:
            kls.append(trajectory.path_kl.cpu())
    return torch.cat(images), (torch.cat(kls) if compute_kl else None)


def sample_rows(model, contexts: torch.Tensor | None, labels: dict[str, torch.Tensor],
                seeds: Sequence[int], *, num_inference_steps: int = 50, eta: float = 1.0,
                from_reference: bool = False, batch_size: int = 256,
                compute_kl: bool = False, compute_log_ratio: bool = False):
    """The trajectories of `generate`, batch by batch (each row from its own seed); with
    `compute_log_ratio`, each carries its paths' log q/p_ref."""
    from ctrl_ray.sampling.sampler import RolloutInputs, sample

    shape = tuple(model.sample_shape)
    initial, steps = [], []
    for seed in seeds:
        generator = torch.Generator().manual_seed(int(seed))
        initial.append(torch.randn(shape, generator=generator))
        steps.append(torch.randn((num_inference_steps, *shape), generator=generator))
    inputs = RolloutInputs(labels=dict(labels), contexts=contexts,
                           initial_noise=torch.stack(initial), step_noise=torch.stack(steps, 1))
    for start in range(0, len(initial), batch_size):
        yield sample(model, inputs.slice(start, start + batch_size), eta=eta,
                     compute_kl=compute_kl or compute_log_ratio, from_reference=from_reference,
                     compute_log_ratio=compute_log_ratio)


def evaluate(model, label_info: dict[str, dict], judge, config: EvaluationConfig,
             grid_path: str | Path | None = None, from_reference: bool = False,
             log_likelihood=None) -> dict:
    """Generate M samples for every (y, c), label them with each label's scorer (oracle,
    labeller or held-out judge) and score them.

    Returns per-label accuracy, macro-F1, per-class F1 and confusion matrix (with the class
    names and the scorer used), the joint accuracy over all labels, digit fidelity (judge vs c)
    and the mean path KL to the pre-trained model. `from_reference=True` scores the
    pre-trained model on the same targets (the baseline). With the reward's ``log_likelihood``
    (images, labels, contexts) -> (B,) it also reports E[log p(y | x0, c)], which with the KL
    places the policy's objective against the optimum's (`ctrl_ray.optimum.against_optimum`).
    """
    names = list(model.label_classes)
    overrides = dict(getattr(config, "scorers", None) or {})
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise InputError(f"evaluation.scorers.{unknown[0]}: the model has no label "
                         f"{unknown[0]!r} (labels: {names})")
    # Resolve every scorer before sampling, so a missing judge fails before the work.
    scorers = {name: get_scorer(name, label_info[name], overrides.get(name)) for name in names}
    contexts, digits = resolve_contexts(model, config.contexts, config.context_digits)
    targets = list(itertools.product(*(range(model.label_classes[n]) for n in names)))
    rows = [(target, c) for target in targets for c in range(len(contexts))
            for _ in range(config.samples_per_target)]
    labels = {name: torch.tensor([target[i] for target, _ in rows]) for i, name in
              enumerate(names)}
    context_tensor = torch.tensor([contexts[c] for _, c in rows]) if model.num_contexts else None
    seeds = [config.seed + i for i in range(len(rows))]
    images, path_kl = generate(model, context_tensor, labels, seeds,
                               num_inference_steps=config.num_inference_steps, eta=config.eta,
                               from_reference=from_reference, batch_size=config.batch_size,
                               compute_kl=not from_reference)

    report: dict = {"num_samples": len(rows), "labels": {},
                    "scorers": {name: scorer.description for name, scorer in scorers.items()}}
    correct_all = np.ones(len(rows), dtype=bool)
    for name in names:
        info = label_info[name]
        wanted = labels[name].numpy()
        got = scorers[name].label(images)
        classes = list(range(info["num_classes"]))
        correct_all &= got == wanted
        report["labels"][name] = {
            "accuracy": float(accuracy_score(wanted, got)),
            "macro_f1": float(f1_score(wanted, got, labels=classes, average="macro",
                                       zero_division=0)),
            "per_class_f1": f1_score(wanted, got, labels=classes, average=None,
                                     zero_division=0).round(4).tolist(),
            "confusion_matrix": confusion_matrix(wanted, got, labels=classes).tolist(),
            "histogram": class_histogram(got, info["num_classes"]),
            "class_names": class_names(info),
            "scorer": scorers[name].description,
            "scorer_kind": scorers[name].kind,
        }
    report["joint_accuracy"] = float(correct_all.mean())
    if judge is not None and context_tensor is not None and digits is not None:
        report["fidelity"] = judge.fidelity(judge_view(images, judge),
                                            np.asarray([digits[c] for _, c in rows]))
    report["mean_kl"] = 0.0 if path_kl is None else float(path_kl.mean())
    if log_likelihood is not None:
        with torch.no_grad():
            report["expected_reward"] = float(torch.cat([log_likelihood(
                images[i:i + config.batch_size],
                {name: value[i:i + config.batch_size] for name, value in labels.items()},
                None if context_tensor is None else context_tensor[i:i + config.batch_size],
            ).double().cpu() for i in range(0, len(rows), config.batch_size)]).mean())
    if len(names) == 1:
        report.update({k: report["labels"][names[0]][k] for k in ("accuracy", "macro_f1")})
    if grid_path is not None:
        first = [i for i, (target, c) in enumerate(rows) if i % config.samples_per_target == 0]
        report["grid"] = str(save_grid(
            images[first], rows=len(targets), path=grid_path,
            row_labels=target_labels({name: label_info[name] for name in names}, targets),
            column_labels=context_labels(model, contexts)))
    return report


def judge_view(images: torch.Tensor, judge) -> np.ndarray:
    """Images as the digit judge reads them: grayscale (an RGB model's luma) at its size (a
    32x32 latent model's decoded images are resized to a 16x16 judge)."""
    return reward_view(images, channels=1, image_size=judge.image_size).numpy()


def context_indices(model, contexts: list) -> torch.Tensor:
    """Contexts as the (N,) long tensor the sampler carries: ints are class ids (or prompt
    indices); strings are prompts of a text-to-image model, appended to its list when new."""
    backbone = getattr(model, "backbone", None)   # a guided baseline has none: class ids only
    indices = []
    for value in contexts:
        if isinstance(value, str):
            if not hasattr(backbone, "add_prompt"):
                raise InputError(f"prompt {value!r} given, but the model is class-conditional: "
                                 f"give a class id")
            indices.append(backbone.add_prompt(value))
            continue
        index = int(value)
        if model.num_contexts is not None and not 0 <= index < model.num_contexts:
            raise InputError(f"context {index}: the model knows contexts "
                             f"0..{model.num_contexts - 1}")
        indices.append(index)
    return torch.tensor(indices, dtype=torch.long)


def resolve_contexts(model, contexts: list | None, context_digits: list[int] | None
                     ) -> tuple[list[int], list[int] | None]:
    """The context indices to evaluate (default: every context the model knows) and the digit
    each one names for the judge: `context_digits` if given, else the index itself for
    class ids and prompt indices (prompt i of a digits text model names digit i), else None."""
    if not model.num_contexts:
        return [0], None
    given = list(contexts) if contexts is not None else list(range(model.num_contexts))
    indices = context_indices(model, given).tolist()
    if context_digits is not None:
        if len(context_digits) != len(given):
            raise InputError(f"evaluation.context_digits: {len(context_digits)} digits for "
                             f"{len(given)} contexts")
        return indices, [int(d) for d in context_digits]
    return indices, None if any(isinstance(c, str) for c in given) else indices


def target_labels(label_info: dict[str, dict], targets: Sequence[tuple[int, ...]]
                  ) -> list[str]:
    """A grid row's name for each target y (a class per label, in `label_info`'s order):
    "label: class name" per label."""
    names = {name: class_names(info) for name, info in label_info.items()}
    return [", ".join(f"{name}: {names[name][k]}" for name, k in zip(names, target, strict=True))
            for target in targets]


def context_labels(model, contexts: Sequence[int]) -> list[str]:
    """A grid column's name for each context index: the prompt of a text-to-image model, else
    "c = index" (the class id)."""
    prompts = getattr(getattr(model, "backbone", None), "prompts", None)
    if not model.num_contexts:
        return ["no context" for _ in contexts]
    return [prompts[c] if prompts else f"c = {c}" for c in contexts]


def class_names(info: dict) -> list[str]:
    """A label's class names from its `label_info` entry, else "0", "1", ..."""
    names = info.get("class_names")
    if isinstance(names, list) and len(names) == int(info["num_classes"]):
        return [str(name) for name in names]
    return [str(k) for k in range(int(info["num_classes"]))]


def format_report(report: dict, title: str) -> str:
    """A few aligned lines: per label accuracy / macro-F1 / per-class F1, then fidelity and KL."""
    lines = [title]
    for name, scores in report["labels"].items():
        names = scores.get("class_names") or [str(k) for k in range(len(scores["per_class_f1"]))]
        per_class = ", ".join(f"{label} {f:.2f}" for label, f in
                              zip(names, scores["per_class_f1"], strict=True))
        lines.append(f"  {name:<16} accuracy {scores['accuracy']:.3f}  macro-F1 "
                     f"{scores['macro_f1']:.3f}  per-class F1 [{per_class}]")
        if "scorer" in scores:
            lines.append(f"  {'':<16} scored by {scores['scorer']}")
    if "fidelity" in report:
        lines.append(f"  {'fidelity':<16} {report['fidelity']:.3f}")
    lines.append(f"  {'mean path KL':<16} {report['mean_kl']:.2f} nats")
    return "\n".join(lines)
