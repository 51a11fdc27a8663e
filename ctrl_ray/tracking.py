"""MLflow tracking: the embedded default store, experiments and runs (the registry of models is
`ctrl_ray.registry`)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from ctrl_ray.errors import InputError
from ctrl_ray.tracking_store import tracking_uri

__all__ = ["actor_env", "configure", "run", "tracking_uri", "use_experiment"]


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


def actor_env() -> dict | None:
    """The Ray runtime_env that points actors at this store (MLFLOW_TRACKING_URI), unless a Ray
    job's runtime_env already sets it (Ray refuses to merge a driver env var whose key the
    job's runtime_env also has)."""
    job_config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
    if "MLFLOW_TRACKING_URI" in ((job_config.get("runtime_env") or {}).get("env_vars") or {}):
        return None
    return {"env_vars": {"MLFLOW_TRACKING_URI": tracking_uri()}}
