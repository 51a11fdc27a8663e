"""CTRL update rules: one objective, four ways to optimise it.

Each rule is one module that provides ``Config`` (a subclass of ``ObjectiveConfig``),
``worker_step`` (what a rollout worker does with its shard of a batch) and ``learner_step``
(what the learner does with the workers' payloads); the configs live in
`ctrl_ray.objectives.configs`. ``update_rule`` is the one place a rule is chosen by name.
"""

from __future__ import annotations

from importlib import import_module
from types import ModuleType

from ctrl_ray.objectives.configs import DEFAULT_RULE, RULE_CONFIGS, ObjectiveConfig, rule_config


def update_rule(mode: str) -> ModuleType:
    """The module of update rule ``mode`` (``adjoint``, ``pathwise``, ``ppo`` or ``value``),
    imported when first asked for: a rule's config (`ctrl_ray.objectives.configs`) is read and
    checked without torch."""
    rule_config(mode)  # an unknown mode is refused here, naming the rules
    return import_module(f"ctrl_ray.objectives.{mode}")


__all__ = ["DEFAULT_RULE", "RULE_CONFIGS", "ObjectiveConfig", "rule_config", "update_rule"]
