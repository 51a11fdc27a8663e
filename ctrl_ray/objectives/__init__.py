"""CTRL update rules: one objective, four ways to optimise it.

Each rule is one module that provides ``Config`` (a subclass of ``ObjectiveConfig``),
``worker_step`` (what a rollout worker does with its shard of a batch) and ``learner_step``
(what the learner does with the workers' payloads). ``update_rule`` is the one place a rule is
chosen by name.
"""

from __future__ import annotations

from types import ModuleType

from ctrl_ray.errors import InputError
from ctrl_ray.objectives import adjoint, pathwise, ppo, value
from ctrl_ray.objectives.base import ObjectiveConfig

UPDATE_RULES: dict[str, ModuleType] = {
    "adjoint": adjoint, "pathwise": pathwise, "ppo": ppo, "value": value}
DEFAULT_RULE = "value"


def update_rule(mode: str) -> ModuleType:
    """The module of update rule ``mode`` (``adjoint``, ``pathwise``, ``ppo`` or ``value``)."""
    if mode not in UPDATE_RULES:
        raise InputError(f"mode: {mode!r} is not an update rule (one of "
                         f"{', '.join(sorted(UPDATE_RULES))})")
    return UPDATE_RULES[mode]


__all__ = ["DEFAULT_RULE", "UPDATE_RULES", "ObjectiveConfig", "update_rule"]
