"""Ray Tune sweeps over the KL weight (and gamma, learning rates) of CTRL, tracked in MLflow.

Each trial is one CTRL run (`ctrl_ray.distributed.driver.train`, in the trial's own process)
that every `report_every` iterations scores its current policy with a small evaluation and
reports it to Tune with the adapter as a checkpoint; ASHA stops the poor trials early. The
sweep is a parent MLflow run, each trial a child run (params, per-iteration metrics,
checkpoints). At the end the trials are tabulated (CSV + Markdown, logged to the parent run)
and the best one (optionally among those whose mean KL is within `kl_budget`) is registered
in the MLflow model registry under an alias.
"""

from ctrl_ray.tuning.configs import (
    AshaConfig,
    SearchConfig,
    SearchSpace,
    TuneConfig,
    check_inputs,
)
from ctrl_ray.tuning.sweep import SweepResult, register_best, run_sweep
from ctrl_ray.tuning.table import TrialRow, pick_best, write_table
from ctrl_ray.tuning.trials import report_metrics, trial_base_config, trial_config

__all__ = ["AshaConfig", "SearchConfig", "SearchSpace", "SweepResult", "TrialRow", "TuneConfig",
           "check_inputs", "pick_best", "register_best", "report_metrics", "run_sweep",
           "trial_base_config", "trial_config", "write_table"]
