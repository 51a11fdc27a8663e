"""CTRL checkpoints: the trainable state (adapters + label embeddings) as safetensors plus JSON.

A checkpoint directory holds `adapter.safetensors` and `policy.json` (how to rebuild the
augmented model around the base model, the label metadata and the sampler settings), in the
artifact format of `ctrl_ray.storage`. Training checkpoints add `optimizer.safetensors`,
`state.json` (iteration, policy version, RNG states, the resolved config) and, for a rule that
keeps data of its own on the learner, `learner_state.safetensors` (the value rule's replay).
Every directory is written atomically.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ctrl_ray.checkpoint_index import STATE_FILE, latest_checkpoint  # noqa: F401 (re-exported)
from ctrl_ray.errors import InputError
from ctrl_ray.models.augmented import AugmentedModel
from ctrl_ray.models.loading import BaseModel, build_backbone
from ctrl_ray.storage import load_artifact, read_json, save_artifact, write_json

POLICY_FORMAT = "ctrl_ray.policy"
ADAPTER_FILE = "adapter.safetensors"
POLICY_FILE = "policy.json"
OPTIMIZER_FILE = "optimizer.safetensors"
LEARNER_STATE_FILE = "learner_state.safetensors"
SCORERS_DIR = "scorers"   # a registered policy's label scorers (judge dirs, labeller files)


def policy_spec(model: AugmentedModel, label_info: dict[str, dict], sampling: dict[str, Any],
                base_model: str, lora_rank: int, lora_alpha: float | None,
                lora_targets: list[str] | None) -> dict[str, Any]:
    """What `load_policy` needs to rebuild `model` around its base model."""
    return {
        "label_classes": model.label_classes,
        "label_info": label_info,
        "adapter": model.adapter,
        "lora_rank": lora_rank,
        "lora_alpha": lora_alpha,
        "lora_targets": lora_targets,
        "min_timestep": model.min_timestep,
        "time_buckets": model.time_buckets,
        "value_head": None if model.value_head is None else {
            "channels": list(model.value_head.spec.channels),
            "hidden_dim": model.value_head.spec.hidden_dim,
            "time_embedding_dim": model.value_head.spec.time_embedding_dim,
            "coordinates": model.value_head.spec.coordinates,
            "step_candidates": model.value_head.spec.step_candidates,
            "initial_candidates": model.value_head.spec.initial_candidates,
            "step_scale": model.value_head.spec.step_scale,
            "target_power": model.value_head.spec.target_power},
        "sampling": sampling,
        "base_model": base_model,
    }


def save_policy(model: AugmentedModel, spec: dict[str, Any], out_dir: str | Path,
                training_state: dict[str, Any] | None = None,
                optimizer: torch.optim.Optimizer | None = None) -> Path:
    """Write the trainable tensors and `spec` (plus optional optimizer and training state)."""
    optimizer_state = optimizer_tensors(optimizer) if optimizer is not None else None
    return save_checkpoint(out_dir, model.trainable_state_dict(), spec, training_state,
                           optimizer_state)


def save_checkpoint(out_dir: str | Path, adapter: dict[str, torch.Tensor], spec: dict[str, Any],
                    training_state: dict[str, Any] | None = None,
                    optimizer_state: tuple[dict[str, torch.Tensor], dict] | None = None,
                    learner_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Atomically write a checkpoint directory from tensors (what a remote learner returns)."""

    def write_training_state(staging: Path) -> None:
        state = training_state
        if learner_state:
            save_file({name: tensor.contiguous() for name, tensor in learner_state.items()},
                      staging / LEARNER_STATE_FILE)
        if optimizer_state is not None:
            tensors, layout = optimizer_state
            save_file(tensors, staging / OPTIMIZER_FILE)
            state = {**(state or {}), "optimizer_layout": layout}
        if state is not None:
            write_json(staging / STATE_FILE, state)

    return save_artifact(out_dir, POLICY_FORMAT, spec, adapter, index=POLICY_FILE,
                         weights=ADAPTER_FILE, write=write_training_state)


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor],
                                                dict[str, Any]]:
    """The adapter tensors, optimizer tensors and training state of a training checkpoint."""
    path = Path(path)
    training_state = read_json(path / STATE_FILE, "training state")
    return (read_tensors(path / ADAPTER_FILE, "adapter weights"),
            read_tensors(path / OPTIMIZER_FILE, "optimizer state"), training_state)


def read_learner_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The update rule's own learner state of a training checkpoint ({} if it keeps none)."""
    path = Path(path) / LEARNER_STATE_FILE
    return read_tensors(path, "learner state") if path.is_file() else {}


def read_policy_spec(path: str | Path) -> dict[str, Any]:
    """The spec (`policy.json`) of a policy checkpoint, its bundled scorers as paths inside it."""
    spec, _ = _load_policy_artifact(path, tensors=False)
    return spec


def _load_policy_artifact(path: str | Path, tensors: bool) -> tuple[dict, dict | None]:
    # Policies saved before the format was named have a policy.json without a format key.
    spec, adapter = load_artifact(path, POLICY_FORMAT, "policy", index=POLICY_FILE,
                                  weights=ADAPTER_FILE, tensors=tensors, unnamed_ok=True)
    for info in spec.get("label_info", {}).values():
        scorer = info.get("scorer")
        if isinstance(scorer, dict) and scorer.get("bundled"):
            info["scorer"] = _unbundled(scorer, Path(path).resolve())
    return spec, adapter


def bundle_scorers(policy_dir: str | Path, out_dir: str | Path) -> Path:
    """Copy the policy at `policy_dir` to `out_dir` carrying its label scorers' files: a held-out
    judge directory or a labeller file (`file.py:function`) is copied under `scorers/` and named
    relative to the policy, so the copy evaluates on any machine. A `module:function` labeller
    stays a reference (its module must be importable where the policy is evaluated)."""
    policy_dir = Path(policy_dir)
    spec, adapter = _load_policy_artifact(policy_dir, tensors=True)
    files: dict[str, Path] = {}
    for name, info in spec.get("label_info", {}).items():
        scorer = info.get("scorer")
        if not isinstance(scorer, dict):
            continue
        if scorer.get("kind") == "judge" and scorer.get("path"):
            source = Path(scorer["path"])
            if not source.is_dir():
                raise InputError(f"label {name!r}: its judge directory {str(source)!r} is "
                                 f"missing; the policy cannot carry it")
            target = f"{SCORERS_DIR}/{name}"
            info["scorer"] = {**scorer, "path": target, "bundled": True}
        elif scorer.get("kind") == "labeller" and ".py:" in str(scorer.get("function", "")):
            module, _, function = str(scorer["function"]).rpartition(":")
            source = Path(module)
            if not source.is_file():
                raise InputError(f"label {name!r}: its labeller file {module!r} is missing; the "
                                 f"policy cannot carry it")
            target = f"{SCORERS_DIR}/{name}.py"
            info["scorer"] = {**scorer, "function": f"{target}:{function}", "bundled": True}
        else:
            continue
        files[target] = source

    def copy_scorers(staging: Path) -> None:
        for target, source in files.items():
            (staging / target).parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                shutil.copytree(source, staging / target)
            else:
                shutil.copyfile(source, staging / target)

    return save_artifact(out_dir, POLICY_FORMAT, spec, adapter, index=POLICY_FILE,
                         weights=ADAPTER_FILE, write=copy_scorers)


def _unbundled(scorer: dict[str, Any], policy_dir: Path) -> dict[str, Any]:
    """A bundled scorer entry with its file named by its path inside `policy_dir`."""
    entry = {key: value for key, value in scorer.items() if key != "bundled"}
    if entry.get("kind") == "judge":
        entry["path"] = str(policy_dir / entry["path"])
    else:
        module, _, function = str(entry["function"]).rpartition(":")
        entry["function"] = f"{policy_dir / module}:{function}"
    return entry


def build_policy(base: BaseModel, spec: dict[str, Any]) -> AugmentedModel:
    """A fresh augmented model (zero-initialised adapters) around `base`, shaped by `spec`
    (a text backbone gets back its prompts and guidance from `spec["backbone"]`)."""
    return AugmentedModel(
        build_backbone(base, spec.get("backbone")),
        {name: int(k) for name, k in spec["label_classes"].items()},
        adapter=spec["adapter"],
        lora_rank=spec["lora_rank"],
        lora_alpha=spec["lora_alpha"],
        lora_targets=spec["lora_targets"],
        min_timestep=int(spec.get("min_timestep", 0)),
        time_buckets=int(spec.get("time_buckets", 1)),
        # A head saved before coordinates and the tilt of x_T existed had neither.
        value_head=spec.get("value_head") and {"coordinates": False, "initial_candidates": 0,
                                               **spec["value_head"]},
    )


def load_policy(base: BaseModel, path: str | Path) -> tuple[AugmentedModel, dict[str, Any]]:
    """Rebuild the fine-tuned policy from a checkpoint; returns it and its sampler settings."""
    spec, adapter = _load_policy_artifact(path, tensors=True)
    model = build_policy(base, spec)
    model.load_trainable_state_dict(adapter)
    return model.eval(), dict(spec.get("sampling", {}))


def read_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise InputError(f"{what} not found: {str(path)!r}")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise InputError(f"{what} {str(path)!r} could not be read: {err}") from None


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (for safetensors) and a JSON layout."""
    state = optimizer.state_dict()
    tensors, layout = {}, {"param_groups": state["param_groups"], "state": {}}
    for index, entry in state["state"].items():
        layout["state"][str(index)] = {}
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
                layout["state"][str(index)][key] = "tensor"
            else:
                layout["state"][str(index)][key] = value
    return tensors, layout


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                      layout: dict[str, Any]) -> None:
    """Load an optimizer state split by `optimizer_tensors` back into `optimizer`."""
    state = {}
    for index, entry in layout["state"].items():
        state[int(index)] = {key: tensors[f"{index}.{key}"] if value == "tensor" else value
                             for key, value in entry.items()}
    optimizer.load_state_dict({"state": state, "param_groups": layout["param_groups"]})
