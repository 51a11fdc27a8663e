"""MLflow: the embedded default store, runs, model logging (pyfunc from code) and the registry."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.tracking import MlflowClient

from ctrl_ray.errors import InputError

PYFUNC_MODEL_FILE = Path(__file__).with_name("pyfunc_model.py")


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` if set, else a SQLite store `mlflow.db` in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve()}/mlflow.db"


def configure() -> str:
    """Point MLflow at `tracking_uri()` and return it."""
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def use_experiment(name: str) -> str:
    """Create `name` if missing (artifacts beside a local SQLite store) and make it current."""
    configure()
    client = MlflowClient()
    found = client.get_experiment_by_name(name)
    if found is not None:
        experiment_id = found.experiment_id
    else:
        location = None
        uri = mlflow.get_tracking_uri()
        if uri.startswith("sqlite:///"):
            root = Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts"
            location = root.resolve().as_uri()
        experiment_id = client.create_experiment(name, artifact_location=location)
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


@contextmanager
def run(experiment: str, run_name: str, params: dict[str, Any] | None = None,
        nested: bool = False) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run in `experiment` with `params` logged (flattened, stringified)."""
    use_experiment(experiment)
    failed_on_input = False
    with mlflow.start_run(run_name=run_name, nested=nested) as active:
        if params:
            mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})
        try:
            yield active
        except InputError:
            failed_on_input = True
            raise
        finally:
            if failed_on_input:  # bad input found late: leave no FAILED run behind
                mlflow.end_run("KILLED")
                MlflowClient().delete_run(active.info.run_id)


def log_model(artifacts: dict[str, str | Path], registered_name: str | None,
              metadata: dict[str, Any] | None = None) -> str:
    """Log a ctrl-ray pyfunc model (code from `pyfunc_model.py`, weights as artifacts).

    Returns the model URI: `models:/NAME/VERSION` if registered, else `runs:/RUN/model`.
    """
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=str(PYFUNC_MODEL_FILE),
        artifacts={key: str(path) for key, path in artifacts.items()},
        pip_requirements=[f"ctrl-ray=={_version()}"],
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
    """A registered-model name MLflow accepts; InputError before anything is created."""
    from mlflow.utils.validation import _validate_model_name

    try:
        _validate_model_name(name)
    except mlflow.exceptions.MlflowException as err:
        raise InputError(f"{key}: {name!r} is not a valid model name ({err.message})") from None


def check_alias(alias: str, key: str = "--alias") -> None:
    """An alias MLflow accepts and does not reserve (`latest`, `v1`, `V2` ... are reserved)."""
    from mlflow.utils.validation import (
        _validate_model_alias_name,
        _validate_model_alias_name_reserved,
    )

    try:
        _validate_model_alias_name(alias)
        _validate_model_alias_name_reserved(alias)
    except mlflow.exceptions.MlflowException as err:
        raise InputError(f"{key}: {alias!r} is not a usable alias ({err.message})") from None


def latest_version(name: str) -> str | None:
    """The newest version number of registered model `name`, or None if it does not exist."""
    configure()
    client = MlflowClient()
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except mlflow.exceptions.MlflowException:
        return None
    if not versions:
        return None
    return str(max(int(v.version) for v in versions))


def resolve_artifacts(uri: str | Path) -> dict[str, Path]:
    """Local paths of a model's artifacts, for a local directory or a `models:/`/`runs:/` URI.

    A local directory is returned as {"model": dir}. A logged ctrl-ray model is downloaded and
    its pyfunc artifacts (e.g. "base_model", "adapter") are returned by key.
    """
    text = str(uri)
    if "://" not in text and ":/" not in text:
        path = Path(text)
        if not path.is_dir():
            raise InputError(f"model directory not found: {text!r}")
        return {"model": path}
    configure()
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=text))
    except mlflow.exceptions.MlflowException as err:
        raise InputError(f"model URI {text!r} could not be resolved: {err.message}") from None
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    stored = mlmodel.get("flavors", {}).get("python_function", {}).get("artifacts", {})
    if not stored:
        raise InputError(f"model URI {text!r} is not a ctrl-ray model (no pyfunc artifacts)")
    return {key: local / entry["path"] for key, entry in stored.items()}


def _version() -> str:
    from ctrl_ray import __version__

    return __version__


def register_policy(policy_dir: str | Path, name: str = "ctrl-digits",
                    alias: str | None = "champion", metadata: dict[str, Any] | None = None) -> str:
    """Log a CTRL policy (its base model + adapter) as a pyfunc model, register it as a new
    version of `name`, and point `alias` at it. Returns `models:/name/version`.

    Logs into the active MLflow run, or a new run in the "ctrl-ray-registry" experiment.
    """
    from ctrl_ray.checkpoint import read_policy_spec
    from ctrl_ray.policy import load_any

    check_name(name)
    if alias:
        check_alias(alias)
    if not Path(policy_dir).is_dir():
        raise InputError(f"--policy: folder not found: {str(policy_dir)!r}")
    configure()
    loaded = load_any(policy_dir)  # the whole policy must load before a version is created
    if not loaded.fine_tuned:
        raise InputError(f"--policy: {str(policy_dir)!r} holds a base model, not a CTRL policy")
    spec = read_policy_spec(policy_dir)
    base = resolve_artifacts(spec["base_model"])
    base_dir = base.get("base_model") or base["model"]
    artifacts = {"base_model": base_dir, "adapter": Path(policy_dir)}
    info = {"label_info": spec["label_info"], "sampling": spec["sampling"],
            "base_model": spec["base_model"],
            "backbone": spec.get("backbone", {"kind": "unet"}), **(metadata or {})}
    if mlflow.active_run() is None:
        use_experiment("ctrl-ray-registry")
        with mlflow.start_run(run_name=f"register-{name}"):
            uri = log_model(artifacts, name, metadata={"ctrl_ray": info})
    else:
        uri = log_model(artifacts, name, metadata={"ctrl_ray": info})
    if alias:
        set_alias(name, uri.rsplit("/", 1)[1], alias)
    return uri


def register_base_model(model_dir: str | Path, name: str, alias: str | None = None) -> str:
    """Log a base-model directory (ctrl-ray's own or a Stable-Diffusion-format pipeline) as a
    pyfunc model and register it as a new version of `name`; returns `models:/name/version`."""
    from ctrl_ray.models.loading import load_base_model_dir

    check_name(name)
    if alias:
        check_alias(alias)
    if not Path(model_dir).is_dir():
        raise InputError(f"--model: folder not found: {str(model_dir)!r}")
    base = load_base_model_dir(Path(model_dir))  # fails early on a directory that cannot load
    configure()
    use_experiment("ctrl-ray-registry")
    metadata = {"ctrl_ray": {k: v for k, v in base.metadata.items() if k != "training"}}
    with mlflow.start_run(run_name=f"register-{name}"):
        uri = log_model({"base_model": Path(model_dir)}, name, metadata=metadata)
    if alias:
        set_alias(name, uri.rsplit("/", 1)[1], alias)
    return uri


def list_registered() -> list[dict[str, Any]]:
    """Every registered model version with its aliases, newest first per model."""
    configure()
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
    configure()
    try:
        MlflowClient().get_model_version(name, str(version))
    except mlflow.exceptions.MlflowException:
        raise InputError(f"registered model {name!r} has no version {version}") from None
    set_alias(name, version, alias)
