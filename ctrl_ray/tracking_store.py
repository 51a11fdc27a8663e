"""Where the MLflow store is, without importing MLflow: the checks before a command's work
read it (`ctrl_ray.preflight`); `ctrl_ray.tracking` talks to it."""

from __future__ import annotations

import os
from pathlib import Path


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` if set, else a SQLite store `mlflow.db` in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve()}/mlflow.db"
