"""Ray Tune sweeps over the KL weight (and gamma, learning rates) of CTRL, tracked in MLflow.

Each trial is one CTRL run (`ctrl_ray.distributed.driver.train`, in the trial's own process)
that every `report_every` iterations scores its current policy with a small evaluation and
reports it to Tune with the adapter as a checkpoint; ASHA stops the poor trials early. The
sweep is a parent MLflow run, each trial a child run (params, per-iteration metrics,
checkpoints). At the end the trials are tabulated (CSV + Markdown, logged to the parent run)
and the best one (optionally among those whose mean KL is within `kl_budget`) is registered
in the MLflow model registry under an alias.
"""

from importlib import import_module

_HOMES = {
    "configs": ("AshaConfig", "SearchConfig", "SearchSpace", "TuneConfig", "check_inputs"),
    "sweep": ("SweepResult", "register_best", "run_sweep"),
    "table": ("TrialRow", "pick_best", "write_table"),
    "trials": ("report_metrics", "trial_base_config", "trial_config"),
}
_MODULE_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    """Each name from its module on first use: the configs are read and checked without
    importing Ray or MLflow (`ctrl_ray.tuning.sweep`)."""
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
