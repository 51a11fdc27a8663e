"""What a resumed run may change in its config, and the refusal of what it may not.

A training checkpoint stores the run's resolved config; `--resume` compares the new one with
it key by key (dotted keys, as MLflow records them). Keys that only say how long the run is,
where it runs, how often it checkpoints or reports, and how it is evaluated may change;
any other change alters what the updates compute, so it is refused unless asked for
(``--allow-config-change``), and then recorded on the MLflow run.
"""

from __future__ import annotations

import json
from typing import Any

from ctrl_ray.config import flatten, to_dict
from ctrl_ray.errors import InputError

# `iterations` may change (resuming to run longer is what it is for); with lr_schedule cosine
# the remaining updates then follow the schedule stretched to the new count.
FREE_KEYS = ("iterations", "checkpoint_every", "output_dir", "judge", "evaluate",
             "evaluate_base", "optimum_samples_per_context", "optimum_max_samples_per_context",
             "optimum_policy_samples", "optimum_max_policy_samples", "objective.report_every")
FREE_PREFIXES = ("evaluation.", "distributed.")
# How far rollouts may run ahead of the learner changes which policy samples each batch.
TRAINING_KEYS = ("distributed.max_staleness",)
RESUME_CHANGES_TAG = "resume_changes"

Change = tuple[str, Any, Any]


def resolved_config(config: Any) -> dict[str, Any]:
    """The config as a checkpoint stores it: a plain JSON tree."""
    return json.loads(json.dumps(to_dict(config), default=str))


def config_changes(saved: dict[str, Any], config: Any) -> list[Change]:
    """(dotted key, the checkpoint's value, the new value) for every key that differs. A key the
    checkpoint does not record (written before the key existed) counts as its default."""
    old, new = flatten(saved), flatten(resolved_config(config))
    defaults = flatten(resolved_config(type(config)()))
    old.update({key: defaults[key] for key in new.keys() - old.keys() if key in defaults})
    missing = object()
    return [(key, old.get(key, missing), new.get(key, missing))
            for key in sorted(old.keys() | new.keys())
            if old.get(key, missing) != new.get(key, missing)]


def alters_training(key: str) -> bool:
    return key in TRAINING_KEYS or (key not in FREE_KEYS
                                    and not key.startswith(FREE_PREFIXES))


def describe(changes: list[Change]) -> str:
    """``objective.gamma: 1.0 -> 2.0, iterations: 2 -> 4``."""
    def shown(value: Any) -> str:
        return "(unset)" if not isinstance(value, (str, int, float, bool, list, dict,
                                                    type(None))) else json.dumps(value)
    return ", ".join(f"{key}: {shown(old)} -> {shown(new)}" for key, old, new in changes)


def check_resume(saved: dict[str, Any] | None, config: Any, allow: bool) -> list[Change]:
    """The changes from the checkpoint's config (``saved``; None: a checkpoint that records
    none, nothing to compare); an InputError naming those that alter training unless
    ``allow``."""
    if saved is None:
        return []
    changes = config_changes(saved, config)
    altering = [change for change in changes if alters_training(change[0])]
    if altering and not allow:
        raise InputError(f"--resume: the config differs from the checkpoint's in keys that "
                         f"change training: {describe(altering)}; resume with the "
                         f"checkpoint's values, or pass --allow-config-change to continue with "
                         f"the new ones (the MLflow run records the change)")
    return changes
