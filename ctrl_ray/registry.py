"""The MLflow model registry: `models:/` and `runs:/` URIs, registration, aliases, the pyfunc model.

Everything that turns a model reference into local directories lives here, so `ctrl_ray.models`
loads local directories only (as diffusers' `from_pretrained` does) and a caller that accepts a
URI resolves it here first. Models are logged as MLflow pyfunc models from code
(`pyfunc_model.py`) with their weights as artifacts, a signature and an input example.
"""

from __future__ import annotations

import posixpath
import re
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import yaml
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import AnyType, ColSpec, Schema, TensorSpec

from ctrl_ray import tracking
from ctrl_ray.checkpoint import POLICY_FILE, bundle_scorers, load_policy, read_policy_spec
from ctrl_ray.errors import InputError
from ctrl_ray.models.loading import BaseModel, load_base_model_dir
from ctrl_ray.scoring import get_scorer

PYFUNC_MODEL_FILE = Path(__file__).with_name("pyfunc_model.py")
CLASS_CONDITIONAL = "unet2d-class-conditional"


def is_uri(reference: Any) -> bool:
    """A `models:/`, `runs:/` or other `scheme:/` reference rather than a local path: the one
    test every caller uses."""
    return ":/" in str(reference)


def resolve_artifacts(uri: str | Path) -> dict[str, Path]:
    """Local paths of a model's artifacts, for a local directory or a `models:/`/`runs:/` URI.

    A local directory is returned as {"model": dir}, unless it is a logged model pulled to disk
    (it holds an `MLmodel` file). A logged ctrl-ray model is downloaded first; its pyfunc
    artifacts (e.g. "base_model", "adapter") are returned by key.
    """
    text = str(uri)
    if not is_uri(text):
        path = Path(text)
        if not path.is_dir():
            raise InputError(f"model directory not found: {text!r}")
        return logged_artifacts(path, text) if (path / "MLmodel").is_file() else {"model": path}
    tracking.configure()
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=text))
    except mlflow.exceptions.MlflowException as err:
        raise InputError(f"model URI {text!r} could not be resolved: {err.message}") from None
    return logged_artifacts(local, text)


def logged_artifacts(local: Path, name: str) -> dict[str, Path]:
    """The pyfunc artifacts of a logged model's local copy, by key."""
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    stored = mlmodel.get("flavors", {}).get("python_function", {}).get("artifacts", {})
    if not stored:
        raise InputError(f"model {name!r} is not a ctrl-ray model (no pyfunc artifacts)")
    return {key: local / entry["path"] for key, entry in stored.items()}


def base_model_dir(reference: str | Path) -> Path:
    """The local base-model directory of a directory or of a logged model's URI."""
    artifacts = resolve_artifacts(reference)
    path = artifacts.get("base_model") or artifacts.get("model")
    if path is None:
        raise InputError(f"model {str(reference)!r} carries no base model")
    return path


def load_base_model(reference: str | Path) -> BaseModel:
    """Load a base model from a directory written by `save_base_model` or a `models:/` URI."""
    return load_base_model_dir(base_model_dir(reference))


def model_signature(base_metadata: dict[str, Any], labels: list[str]
                    ) -> tuple[ModelSignature, pd.DataFrame]:
    """The pyfunc signature and a one-row input example of a model (see `pyfunc_model.py`).

    Inputs: `c` (a class id), or for a text model `prompt` (any text; `c` may hold a prompt
    or a prompt index instead), an optional `seed` and, for a fine-tuned model, one optional
    column per label and `y` (class index or name). Output: the images, (N, C, H, W) float32.
    """
    text = base_metadata.get("kind", CLASS_CONDITIONAL) != CLASS_CONDITIONAL
    if text:
        columns = [ColSpec("string", "prompt", False), ColSpec(AnyType(), "c", False)]
        context = {"prompt": [(base_metadata.get("prompts") or ["a photo"])[0]]}
    else:
        columns, context = [ColSpec("long", "c")], {"c": [0]}
    columns += [ColSpec("long", "seed", False)]
    columns += [ColSpec(AnyType(), name, False) for name in [*labels, "y"] if labels]
    outputs = Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1, -1))])
    example = pd.DataFrame({**context, "seed": [0], **{name: [0] for name in labels}})
    return ModelSignature(inputs=Schema(columns), outputs=outputs), example


def log_model(artifacts: dict[str, str | Path], registered_name: str | None,
              base_metadata: dict[str, Any], labels: list[str] | None = None,
              metadata: dict[str, Any] | None = None) -> str:
    """Log a ctrl-ray pyfunc model (code from `pyfunc_model.py`, weights as artifacts) with its
    signature and input example (`base_metadata`: the base model's; `labels`: a policy's).

    Returns the model URI: `models:/NAME/VERSION` if registered, else `runs:/RUN/model`.
    """
    signature, example = model_signature(base_metadata, list(labels or []))
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=str(PYFUNC_MODEL_FILE),
        artifacts={key: str(path) for key, path in artifacts.items()},
        pip_requirements=[f"ctrl-ray=={_version()}"],
        signature=signature,
        input_example=example,
        metadata=metadata,
        registered_model_name=registered_name,
    )
    if registered_name:
        return f"models:/{registered_name}/{info.registered_model_version}"
    return info.model_uri


def set_alias(name: str, version: int | str, alias: str) -> None:
    """Point `models:/name@alias` at `version`."""
    check_alias(alias)
    MlflowClient().set_registered_model_alias(name, alias, str(version))


def check_name(name: str, key: str = "--name") -> None:
    """A registered-model name MLflow accepts; InputError before anything is created.

    MLflow's rule: not blank, no '/' or ':', and a plain file name (it may be stored as one).
    Checked here rather than through `mlflow.utils.validation`, whose private names change.
    """
    why = None
    if not name.strip():
        why = "it is blank"
    elif "/" in name or ":" in name:
        why = "names cannot contain '/' or ':'"
    elif posixpath.normpath(name) != name or name == "." or name.startswith(".."):
        why = f"as a file name it would resolve to {posixpath.normpath(name)!r}"
    if why:
        raise InputError(f"{key}: {name!r} is not a valid model name ({why})")


_ALIAS = re.compile(r"[\w\-]{1,255}")
_VERSION_ALIAS = re.compile(r"[vV]\d+")


def check_alias(alias: str, key: str = "--alias") -> None:
    """An alias MLflow accepts and does not reserve (`latest`, `v1`, `V2` ... are reserved)."""
    why = None
    if not _ALIAS.fullmatch(alias):
        why = "1-255 characters, only alphanumerics, underscores (_) and dashes (-)"
    elif alias.lower() == "latest" or _VERSION_ALIAS.fullmatch(alias):
        why = "'latest' and version names like 'v1' are reserved"
    if why:
        raise InputError(f"{key}: {alias!r} is not a usable alias ({why})")


def latest_version(name: str) -> str | None:
    """The newest version number of registered model `name`, or None if it does not exist."""
    tracking.configure()
    client = MlflowClient()
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except mlflow.exceptions.MlflowException:
        return None
    if not versions:
        return None
    return str(max(int(v.version) for v in versions))


def _version() -> str:
    from ctrl_ray import __version__

    return __version__


def register_policy(policy_dir: str | Path, name: str = "ctrl-digits",
                    alias: str | None = "champion", metadata: dict[str, Any] | None = None) -> str:
    """Log a CTRL policy (its base model + adapter, the adapter carrying its label scorers: see
    `bundle_scorers`) as a pyfunc model, register it as a new version of `name`, and point
    `alias` at it. Returns `models:/name/version`.

    Logs into the active MLflow run, or a new run in the "ctrl-ray-registry" experiment.
    """
    check_name(name)
    if alias:
        check_alias(alias)
    policy_dir = Path(policy_dir)
    if not policy_dir.is_dir():
        raise InputError(f"--policy: folder not found: {str(policy_dir)!r}")
    tracking.configure()
    if not (policy_dir / POLICY_FILE).is_file():
        load_base_model_dir(policy_dir)  # the folder's own error if it is not a model at all
        raise InputError(f"--policy: {str(policy_dir)!r} holds a base model, not a CTRL policy")
    spec = read_policy_spec(policy_dir)
    base_dir = base_model_dir(spec["base_model"])
    base = load_base_model_dir(base_dir)
    load_policy(base, policy_dir)  # the whole policy must load before a version is created
    with tempfile.TemporaryDirectory(prefix="ctrl-ray-register-") as staging:
        # The adapter carries its label scorers (judge, labeller file): evaluable anywhere.
        adapter = bundle_scorers(policy_dir, Path(staging) / "adapter")
        carried = read_policy_spec(adapter)["label_info"]
        for label, entry in carried.items():
            get_scorer(label, entry)  # a carried scorer that cannot load fails here
        artifacts = {"base_model": base_dir, "adapter": adapter}
        info = {"label_info": spec["label_info"], "sampling": spec["sampling"],
                "base_model": spec["base_model"],
                "backbone": spec.get("backbone", {"kind": "unet"}), **(metadata or {})}
        logged = {"base_metadata": base.metadata, "labels": list(spec["label_info"]),
                  "metadata": {"ctrl_ray": info}}
        if mlflow.active_run() is None:
            tracking.use_experiment("ctrl-ray-registry")
            with mlflow.start_run(run_name=f"register-{name}"):
                uri = log_model(artifacts, name, **logged)
        else:
            uri = log_model(artifacts, name, **logged)
    if alias:
        set_alias(name, uri.rsplit("/", 1)[1], alias)
    return uri


def register_base_model(model_dir: str | Path, name: str, alias: str | None = None) -> str:
    """Log a base-model directory (ctrl-ray's own or a Stable-Diffusion-format pipeline) as a
    pyfunc model and register it as a new version of `name`; returns `models:/name/version`."""
    check_name(name)
    if alias:
        check_alias(alias)
    if not Path(model_dir).is_dir():
        raise InputError(f"--model: folder not found: {str(model_dir)!r}")
    base = load_base_model_dir(Path(model_dir))  # fails early on a directory that cannot load
    tracking.use_experiment("ctrl-ray-registry")
    metadata = {"ctrl_ray": {k: v for k, v in base.metadata.items() if k != "training"}}
    with mlflow.start_run(run_name=f"register-{name}"):
        uri = log_model({"base_model": Path(model_dir)}, name, base.metadata, metadata=metadata)
    if alias:
        set_alias(name, uri.rsplit("/", 1)[1], alias)
    return uri


def list_registered() -> list[dict[str, Any]]:
    """Every registered model version with its aliases, newest first per model."""
    tracking.configure()
    client = MlflowClient()
    rows = []
    for model in client.search_registered_models():
        aliases: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        for version in sorted(client.search_model_versions(f"name = '{model.name}'"),
                              key=lambda v: -int(v.version)):
            rows.append({"name": model.name, "version": int(version.version),
                         "aliases": sorted(aliases.get(str(version.version), [])),
                         "run_id": version.run_id, "status": version.status})
    return rows


def promote(name: str, version: int | str, alias: str) -> None:
    """Point `models:/name@alias` at an existing `version` (InputError if it does not exist)."""
    check_alias(alias, "ALIAS")
    tracking.configure()
    try:
        MlflowClient().get_model_version(name, str(version))
    except mlflow.exceptions.MlflowException:
        raise InputError(f"registered model {name!r} has no version {version}") from None
    set_alias(name, version, alias)
