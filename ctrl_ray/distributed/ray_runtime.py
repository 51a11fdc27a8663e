"""Joining Ray: a running cluster at its address, or a fresh local Ray whose workers compute
at this process's priority."""

from __future__ import annotations

import os
from typing import Any

from ctrl_ray import tracking

WORKER_NICENESS = "RAY_worker_niceness"


def connect(address: str, **options: Any) -> None:
    """`ray.init(address)` unless Ray is already up. A fresh local Ray (address "local") starts
    its workers at this process's niceness unless RAY_worker_niceness says otherwise: Ray's
    default (+15) lets any other process on a shared machine starve the rollouts (measured on
    2 busy cores: one Ray worker at 0.35-0.52x the single-process loop, docs/cluster.md). A
    cluster's workers keep the niceness its `ray start` gave them."""
    import ray

    if ray.is_initialized():
        return
    if address == "local":
        os.environ.setdefault(WORKER_NICENESS, "0")
    ray.init(address=address, include_dashboard=False,
             runtime_env=options.pop("runtime_env", tracking.actor_env()), **options)
