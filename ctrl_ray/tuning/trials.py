"""One trial of a sweep: a CTRL run (`ctrl_ray.distributed.driver.train`, in the trial's own
process) whose MLflow run is a child of the sweep's, scored every `report_every` iterations
and reported to Ray Tune with its adapter as a checkpoint."""

from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import torch

from ctrl_ray.checkpoint import save_checkpoint
from ctrl_ray.config import scalar_metrics
from ctrl_ray.distributed.driver import train
from ctrl_ray.errors import InputError
from ctrl_ray.evaluation import EvaluationConfig
from ctrl_ray.finetune_setup import FinetuneConfig
from ctrl_ray.registry import is_uri
from ctrl_ray.tuning.configs import SEARCHABLE, TuneConfig


@dataclass
class TrialContext:
    """Everything a trial process needs besides its sampled hyper-parameters."""

    finetune: FinetuneConfig
    output_dir: str
    tracking_uri: str
    parent_run_id: str
    report_every: int
    evaluation: EvaluationConfig
    threads: int


def trial_base_config(config: TuneConfig) -> FinetuneConfig:
    """The FinetuneConfig every trial starts from: in-process roles, absolute paths (trials run
    in their own working directory), no end-of-run evaluation (the trial reports its own), and
    the sweep's MLflow experiment (so the child runs nest under the parent in the UI)."""
    base = copy.deepcopy(config.finetune)
    base.distributed.workers = 0
    base.evaluate = False
    base.evaluate_base = False
    base.experiment = config.experiment
    if not is_uri(base.base_model):
        base.base_model = str(Path(base.base_model).resolve())
    for reward in base.rewards:
        reward.path = str(Path(reward.path).resolve())
    if base.judge:
        base.judge = str(Path(base.judge).resolve())
    return base


def trial_evaluation(config: TuneConfig) -> EvaluationConfig:
    """The finetune evaluation protocol with `eval_samples_per_target` samples per target."""
    evaluation = copy.deepcopy(config.finetune.evaluation)
    evaluation.samples_per_target = config.eval_samples_per_target
    return evaluation


def trial_config(base: FinetuneConfig, params: dict[str, float], output_dir: str | Path
                 ) -> FinetuneConfig:
    """`base` with the trial's hyper-parameters set on the objective of its mode."""
    config = copy.deepcopy(base)
    objective = config.objective
    for name, value in params.items():
        if name not in SEARCHABLE:
            raise InputError(f"unknown search parameter {name!r}")
        setattr(objective, name, float(value))
    config.output_dir = str(output_dir)
    return config


def run_trial(params: dict[str, float], context: TrialContext) -> None:
    """One Tune trial: a CTRL run whose MLflow run is a child of the sweep's."""
    from ray import tune

    os.environ["MLFLOW_TRACKING_URI"] = context.tracking_uri
    torch.set_num_threads(context.threads)
    trial_id = tune.get_context().get_trial_id()
    config = trial_config(context.finetune, params, Path(context.output_dir) / trial_id)
    reporter = _Reporter(config, context, trial_id)
    # A trial Tune restarts after a failure continues from its own last checkpoint.
    result = train(config, progress=False, on_iteration=reporter,
                   parent_run_id=context.parent_run_id, resume="if-present")
    if reporter.final is not None:  # reported once the run is complete: see _Reporter
        tune.report(reporter.final,
                    checkpoint=tune.Checkpoint.from_directory(result["policy_dir"]))


class _Reporter:
    """The `on_iteration` callback of a trial: every `report_every` iterations (and at the end)
    score the learner's current policy, log it and its adapter to MLflow and report to Tune.

    The last iteration's scores are kept in `final` and reported after `train` returns, with
    the saved policy as the checkpoint: ASHA may stop a trial at its last rung (= max_t), and
    a stop inside `tune.report` ends the trial's thread, which must not cut the run short.
    """

    def __init__(self, config: FinetuneConfig, context: TrialContext, trial_id: str):
        self.config, self.context, self.trial_id = config, context, trial_id
        self.spec = None
        self.final: dict[str, Any] | None = None

    def __call__(self, iteration: int, roles) -> None:
        from ray import tune

        if iteration % self.context.report_every and iteration != self.config.iterations:
            return
        if self.spec is None:
            self.spec = roles.call(roles.learner, "describe")["spec"]
            mlflow.set_tags({"mlflow.runName": f"trial-{self.trial_id}",
                             "ray.tune.trial_id": self.trial_id})
        state = roles.call(roles.learner, "trainable_state")
        report = roles.call(roles.learner, "score", self.context.evaluation)
        scores = report_metrics(report)
        mlflow.log_metrics({f"tune_{k}": v for k, v in scores.items()}, step=iteration)
        metrics = {**scores, "iteration": iteration,
                   "mlflow_run_id": mlflow.active_run().info.run_id}
        with tempfile.TemporaryDirectory(prefix="ctrl-tune-") as tmp:
            checkpoint = save_checkpoint(Path(tmp) / "policy", state, self.spec,
                                         {"iteration": iteration})
            mlflow.log_artifacts(str(checkpoint), artifact_path=f"tune/{iteration:06d}")
            if iteration == self.config.iterations:
                self.final = metrics
                return
            try:
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(checkpoint)))
            except SystemExit:  # the scheduler stopped this trial: end its run as KILLED
                mlflow.set_tag("ray.tune.status", "stopped")
                mlflow.end_run("KILLED")
                raise


def report_metrics(report: dict) -> dict[str, float]:
    """The scalar scores Tune sees: macro-F1 / accuracy (averaged over labels if several),
    joint accuracy, fidelity, mean KL, and each label's macro-F1 / accuracy."""
    labels = report["labels"]
    flat = scalar_metrics(report, per_label=len(labels) > 1)
    metrics = {
        "macro_f1": float(sum(s["macro_f1"] for s in labels.values()) / len(labels)),
        "accuracy": float(sum(s["accuracy"] for s in labels.values()) / len(labels)),
        "joint_accuracy": flat["joint_accuracy"],
        "mean_kl": flat["mean_kl"],
    }
    per_label = {f"{name}_{score}" for name in labels for score in ("accuracy", "macro_f1")}
    return metrics | {key: value for key, value in flat.items()
                      if key == "fidelity" or key in per_label}
