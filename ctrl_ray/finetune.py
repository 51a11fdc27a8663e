"""`ctrl-ray finetune`: the entry point of a CTRL run, above the training driver.

It loads the config, checks inputs and outputs (`ctrl_ray.preflight`) and hands the run to
`ctrl_ray.distributed.driver.train`. The run's config and the setup every role builds from it
live below the driver, in `ctrl_ray.finetune_setup`.
"""

from __future__ import annotations

from pathlib import Path

from ctrl_ray import preflight
from ctrl_ray.config import load_raw
from ctrl_ray.distributed.driver import train
from ctrl_ray.finetune_setup import FinetuneConfig, build_setup
from ctrl_ray.rule_choice import choose_rule, resolve

__all__ = ["FinetuneConfig", "build_setup", "finetune", "run", "run_checked"]


def finetune(config: FinetuneConfig, progress: bool = True, resume: bool | str = False,
             overwrite: bool = False, allow_config_change: bool = False,
             rule_choice: dict | None = None) -> dict:
    """Run CTRL: in this process (`distributed.workers: 0`) or with Ray rollout workers;
    `overwrite` lets a fresh run replace an earlier run's checkpoints in `output_dir`;
    `allow_config_change` lets a resume continue with a config that changes training;
    `rule_choice` (how the rule was chosen) is logged with the run."""
    return train(config, progress=progress, resume=resume, overwrite=overwrite,
                 allow_config_change=allow_config_change, rule_choice=rule_choice)


def run(config_path: str | Path | None, overrides: list[str], overwrite: bool = False,
        resume: bool | str = False, progress: bool = True,
        allow_config_change: bool = False) -> dict:
    """Load the config file with `--set` overrides, check it before any work, run CTRL. A config
    that names no rule (no `mode`, or `mode: auto`) gets one chosen from the exact optimum
    before training (`ctrl_ray.rule_choice`); a resume keeps the rule its checkpoint ran."""
    raw = load_raw(config_path, overrides)
    config, rule_open = resolve(raw, resume)
    preflight.finetune(config, overwrite, resume=resume, allow_config_change=allow_config_change)
    return run_checked(raw, config, rule_open, progress=progress, resume=resume,
                       overwrite=overwrite, allow_config_change=allow_config_change)


def run_checked(raw: dict, config: FinetuneConfig, rule_open: bool, progress: bool = True,
                resume: bool | str = False, overwrite: bool = False,
                allow_config_change: bool = False) -> dict:
    """After the checks (`resolve`, then `preflight.finetune`): choose the rule if the config
    left it open, then run CTRL; the result carries the choice."""
    choice = None
    if rule_open:
        config, choice = choose_rule(raw)
        print(choice["reason"])
    result = finetune(config, progress=progress, resume=resume, overwrite=overwrite,
                      allow_config_change=allow_config_change, rule_choice=choice)
    return {**result, **({"rule_choice": choice} if choice else {})}
