"""`ctrl-ray finetune`: the entry point of a CTRL run, above the training driver.

It loads the config, checks inputs and outputs (`ctrl_ray.preflight`) and hands the run to
`ctrl_ray.distributed.driver.train`. The run's config and the setup every role builds from it
live below the driver, in `ctrl_ray.finetune_setup`.
"""

from __future__ import annotations

from pathlib import Path

from ctrl_ray import preflight
from ctrl_ray.config import load_config
from ctrl_ray.distributed.driver import train
from ctrl_ray.finetune_setup import FinetuneConfig, build_setup

__all__ = ["FinetuneConfig", "build_setup", "finetune", "run"]


def finetune(config: FinetuneConfig, progress: bool = True, resume: bool | str = False,
             overwrite: bool = False, allow_config_change: bool = False) -> dict:
    """Run CTRL: in this process (`distributed.workers: 0`) or with Ray rollout workers;
    `overwrite` lets a fresh run replace an earlier run's checkpoints in `output_dir`;
    `allow_config_change` lets a resume continue with a config that changes training."""
    return train(config, progress=progress, resume=resume, overwrite=overwrite,
                 allow_config_change=allow_config_change)


def run(config_path: str | Path | None, overrides: list[str], overwrite: bool = False,
        resume: bool | str = False, progress: bool = True,
        allow_config_change: bool = False) -> dict:
    """Load the config file with `--set` overrides, check it before any work, run CTRL."""
    config = load_config(FinetuneConfig, config_path, overrides)
    preflight.finetune(config, overwrite, resume=resume,
                       allow_config_change=allow_config_change)
    return finetune(config, progress=progress, resume=resume, overwrite=overwrite,
                    allow_config_change=allow_config_change)
