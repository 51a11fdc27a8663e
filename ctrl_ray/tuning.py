"""Ray Tune sweeps over the KL weight (and gamma, learning rates) of CTRL, tracked in MLflow.

Each trial is one CTRL run (`ctrl_ray.distributed.driver.train`, in the trial's own process)
that every `report_every` iterations scores its current policy with a small evaluation and
reports it to Tune with the adapter as a checkpoint; ASHA stops the poor trials early. The
sweep is a parent MLflow run, each trial a child run (params, per-iteration metrics,
checkpoints). At the end the trials are tabulated (CSV + Markdown, logged to the parent run)
and the best one (optionally among those whose mean KL is within `kl_budget`) is registered
in the MLflow model registry under an alias.
"""

from __future__ import annotations

import copy
import csv
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import mlflow
import torch

from ctrl_ray import tracking
from ctrl_ray.checkpoint import save_checkpoint
from ctrl_ray.config import flatten, to_dict
from ctrl_ray.errors import InputError
from ctrl_ray.evaluation import EvaluationConfig
from ctrl_ray.finetune import FinetuneConfig

SEARCHABLE = ("kl_weight", "gamma", "lr_embedding", "lr_adapter")
REPORTED_METRICS = ("macro_f1", "accuracy", "joint_accuracy", "fidelity", "mean_kl")
TABLE_COLUMNS = ("trial", "kl_weight", "gamma", "lr_embedding", "lr_adapter", "iterations",
                 "macro_f1", "accuracy", "mean_kl", "fidelity", "status", "eligible",
                 "mlflow_run_id")


@dataclass
class SearchSpace:
    """One hyper-parameter's values: exactly one of `value` (fixed), `grid` (every value, each
    `num_samples` times), `choices` (drawn uniformly) or `loguniform` / `uniform` ([low, high])."""

    value: float | None = None
    grid: list[float] | None = None
    choices: list[float] | None = None
    loguniform: list[float] | None = None
    uniform: list[float] | None = None

    def __post_init__(self):
        given = [name for name in ("value", "grid", "choices", "loguniform", "uniform")
                 if getattr(self, name) is not None]
        if len(given) != 1:
            raise InputError(f"set exactly one of value, grid, choices, loguniform, uniform "
                             f"(got {', '.join(given) or 'none'})")
        for name in ("grid", "choices"):
            if getattr(self, name) is not None and not getattr(self, name):
                raise InputError(f"{name} is empty")
        for name in ("loguniform", "uniform"):
            bounds = getattr(self, name)
            if bounds is None:
                continue
            if len(bounds) != 2 or not bounds[0] < bounds[1]:
                raise InputError(f"{name} needs [low, high] with low < high, got {bounds}")
            if name == "loguniform" and bounds[0] <= 0:
                raise InputError(f"loguniform needs low > 0, got {bounds}")
        values = [self.value] if self.value is not None else \
            (self.grid or self.choices or self.loguniform or self.uniform)
        if any(v < 0 for v in values):
            raise InputError(f"values must be >= 0, got {values}")

    def to_tune(self) -> Any:
        from ray import tune

        if self.value is not None:
            return self.value
        if self.grid is not None:
            return tune.grid_search(list(self.grid))
        if self.choices is not None:
            return tune.choice(list(self.choices))
        if self.loguniform is not None:
            return tune.loguniform(*self.loguniform)
        return tune.uniform(*self.uniform)


@dataclass
class SearchConfig:
    """What the trials try; a learning rate left out keeps the `finetune` config's value. Random
    draws are seeded (`seed`), so the same config proposes the same trials."""

    kl_weight: SearchSpace = field(default_factory=lambda: SearchSpace(loguniform=[0.1, 10.0]))
    gamma: SearchSpace = field(default_factory=lambda: SearchSpace(choices=[1.0]))
    lr_embedding: SearchSpace | None = None
    lr_adapter: SearchSpace | None = None
    num_samples: int = 8
    seed: int = 0

    def __post_init__(self):
        if self.num_samples < 1:
            raise InputError(f"num_samples must be >= 1, got {self.num_samples}")

    def spaces(self) -> dict[str, SearchSpace]:
        return {name: getattr(self, name) for name in SEARCHABLE
                if getattr(self, name) is not None}


@dataclass
class AshaConfig:
    """Asynchronous successive halving over CTRL iterations (max_t = `finetune.iterations`):
    at iterations grace_period * reduction_factor^k a trial below the top 1/reduction_factor
    of those that reached the same point is stopped. `enabled: false` runs every trial out."""

    enabled: bool = True
    grace_period: int = 10
    reduction_factor: float = 2.0

    def __post_init__(self):
        if self.grace_period < 1:
            raise InputError(f"grace_period must be >= 1, got {self.grace_period}")
        if self.reduction_factor <= 1:
            raise InputError(f"reduction_factor must be > 1, got {self.reduction_factor}")


@dataclass
class TuneConfig:
    """A sweep: the CTRL run every trial starts from (`finetune`; its trials always run in the
    trial's process, `distributed.workers` is ignored), the search, the scheduler, how trials
    are scored and what happens to the best one."""

    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    asha: AshaConfig = field(default_factory=AshaConfig)
    metric: str = "macro_f1"
    mode: Literal["max", "min"] = "max"
    kl_budget: float | None = None
    report_every: int = 5
    eval_samples_per_target: int = 2
    cpus_per_trial: float = 0.5
    max_concurrent_trials: int | None = None
    register: bool = True
    register_name: str = "ctrl-digits"
    alias: str = "champion"
    name: str = "tune-kl"
    output_dir: str = "outputs/tune-kl"
    storage_path: str | None = None
    experiment: str = "ctrl-ray-tune"

    def __post_init__(self):
        if self.metric not in REPORTED_METRICS:
            raise InputError(f"metric {self.metric!r} is not one of {', '.join(REPORTED_METRICS)}")
        if self.kl_budget is not None and self.kl_budget < 0:
            raise InputError(f"kl_budget must be >= 0, got {self.kl_budget}")
        for name in ("report_every", "eval_samples_per_target"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.cpus_per_trial > 0:
            raise InputError(f"cpus_per_trial must be > 0, got {self.cpus_per_trial}")
        if self.max_concurrent_trials is not None and self.max_concurrent_trials < 1:
            raise InputError(f"max_concurrent_trials must be >= 1, got "
                             f"{self.max_concurrent_trials}")


@dataclass
class TrialRow:
    """One trial's outcome: its hyper-parameters and the metrics of its last report."""

    trial: str
    params: dict[str, float]
    iterations: int
    metrics: dict[str, float]
    status: str  # completed | stopped (by the scheduler) | error
    eligible: bool = False
    mlflow_run_id: str | None = None
    checkpoint: Any = None  # ray.tune.Checkpoint of the last report
    error: str | None = None

    def table_row(self) -> dict[str, Any]:
        return {"trial": self.trial, **self.params, "iterations": self.iterations,
                **{k: self.metrics.get(k) for k in ("macro_f1", "accuracy", "mean_kl",
                                                    "fidelity")},
                "status": self.status, "eligible": self.eligible,
                "mlflow_run_id": self.mlflow_run_id}


@dataclass
class SweepResult:
    """What a sweep leaves: every trial (best first), the best one, its registered model URI."""

    trials: list[TrialRow]
    best: TrialRow | None
    model_uri: str | None
    parent_run_id: str
    table_csv: Path
    table_markdown: Path
    tune_path: str


@dataclass
class _TrialContext:
    """Everything a trial process needs besides its sampled hyper-parameters."""

    finetune: FinetuneConfig
    output_dir: str
    tracking_uri: str
    parent_run_id: str
    report_every: int
    evaluation: EvaluationConfig
    threads: int


def run_sweep(config: TuneConfig, progress: bool = True) -> SweepResult:
    """Run the sweep on Ray Tune (joining `finetune.distributed.address`, RAY_ADDRESS, or a
    local Ray unless one is running); tabulate, pick and register the best trial."""
    import ray
    from ray import tune

    _validate(config)
    out = Path(config.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    storage = config.storage_path or str(out / "ray_results")
    if "://" not in storage:
        storage = str(Path(storage).resolve())
    base = trial_base_config(config)
    uri = tracking.tracking_uri()
    if not ray.is_initialized():
        from ctrl_ray.distributed.driver import _actor_env

        ray.init(address=config.finetune.distributed.address, include_dashboard=False,
                 runtime_env=_actor_env())

    with tracking.run(config.experiment, config.name, flatten(to_dict(config))) as parent:
        parent_id = parent.info.run_id
        context = _TrialContext(
            finetune=base, output_dir=str(out / "trials"), tracking_uri=uri,
            parent_run_id=parent_id, report_every=config.report_every,
            evaluation=trial_evaluation(config), threads=max(1, int(config.cpus_per_trial)))
        trainable = tune.with_resources(tune.with_parameters(_run_trial, context=context),
                                        {"cpu": config.cpus_per_trial})
        tuner = tune.Tuner(
            trainable,
            param_space={name: space.to_tune() for name, space in config.search.spaces().items()},
            tune_config=tune.TuneConfig(
                metric=config.metric, mode=config.mode, scheduler=_scheduler(config),
                search_alg=_search_algorithm(config), num_samples=config.search.num_samples),
            run_config=tune.RunConfig(name=config.name, storage_path=storage,
                                      verbose=1 if progress else 0),
        )
        results = tuner.fit()
        rows = _trial_rows(results, base)
        _close_trial_runs(parent_id, rows)
        best = pick_best(rows, config.metric, config.mode, config.kl_budget)
        rows.sort(key=lambda row: (row is not best, -_score(row, config.metric, config.mode)))
        csv_path, markdown_path = write_table(rows, out)
        print(markdown_path.read_text())
        mlflow.log_artifact(str(csv_path))
        mlflow.log_artifact(str(markdown_path))
        mlflow.log_metrics({"trials": len(rows),
                            "trials_stopped_early": sum(r.status == "stopped" for r in rows),
                            "trials_failed": sum(r.status == "error" for r in rows)})
        if all(row.status == "error" for row in rows):
            raise RuntimeError(f"every trial failed; the first: {rows[0].error}")
        model_uri = None
        if best is None:
            print("no trial is eligible as best" + (f" (mean KL within {config.kl_budget})"
                                                    if config.kl_budget is not None else ""))
        else:
            mlflow.log_metrics({f"best_{k}": v for k, v in best.metrics.items()})
            mlflow.set_tags({"best_trial": best.trial, "best_run_id": best.mlflow_run_id or ""})
            if config.register:
                model_uri = register_best(best, config.register_name, config.alias)
            print(f"best trial {best.trial}: {config.metric} {best.metrics.get(config.metric)}"
                  f" {_format_params(best.params)}" + (f" -> {model_uri}" if model_uri else ""))
    return SweepResult(rows, best, model_uri, parent_id, csv_path, markdown_path,
                       results.experiment_path)


def trial_base_config(config: TuneConfig) -> FinetuneConfig:
    """The FinetuneConfig every trial starts from: in-process roles, absolute paths (trials run
    in their own working directory), no end-of-run evaluation (the trial reports its own), and
    the sweep's MLflow experiment (so the child runs nest under the parent in the UI)."""
    base = copy.deepcopy(config.finetune)
    base.distributed.workers = 0
    base.evaluate = False
    base.evaluate_base = False
    base.experiment = config.experiment
    if "://" not in base.base_model and ":/" not in base.base_model:
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


def _run_trial(params: dict[str, float], context: _TrialContext) -> None:
    """One Tune trial: a CTRL run whose MLflow run is a child of the sweep's."""
    from ray import tune

    from ctrl_ray.distributed.driver import train

    os.environ["MLFLOW_TRACKING_URI"] = context.tracking_uri
    torch.set_num_threads(context.threads)
    trial_id = tune.get_context().get_trial_id()
    config = trial_config(context.finetune, params, Path(context.output_dir) / trial_id)
    reporter = _Reporter(config, context, trial_id)
    result = train(config, progress=False, on_iteration=reporter,
                   parent_run_id=context.parent_run_id)
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

    def __init__(self, config: FinetuneConfig, context: _TrialContext, trial_id: str):
        self.config, self.context, self.trial_id = config, context, trial_id
        self.setup = None
        self.judge = None
        self.final: dict[str, Any] | None = None

    def __call__(self, iteration: int, roles) -> None:
        from ray import tune

        from ctrl_ray.evaluation import evaluate
        from ctrl_ray.finetune import build_setup
        from ctrl_ray.models.judge import DigitJudge

        if iteration % self.context.report_every and iteration != self.config.iterations:
            return
        if self.setup is None:  # a scoring copy of the policy, built once per trial
            self.setup = build_setup(self.config)
            self.judge = DigitJudge.load(self.config.judge) if self.config.judge else None
            self.spec = roles.call(roles.learner, "describe")["spec"]
            mlflow.set_tags({"mlflow.runName": f"trial-{self.trial_id}",
                             "ray.tune.trial_id": self.trial_id})
        state = roles.call(roles.learner, "trainable_state")
        self.setup.model.load_trainable_state_dict(state)
        self.setup.model.eval()
        report = evaluate(self.setup.model, self.setup.label_info, self.judge,
                          self.context.evaluation)
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
    metrics = {
        "macro_f1": float(sum(s["macro_f1"] for s in labels.values()) / len(labels)),
        "accuracy": float(sum(s["accuracy"] for s in labels.values()) / len(labels)),
        "joint_accuracy": float(report["joint_accuracy"]),
        "mean_kl": float(report["mean_kl"]),
    }
    if "fidelity" in report:
        metrics["fidelity"] = float(report["fidelity"])
    if len(labels) > 1:
        for name, scores in labels.items():
            metrics[f"{name}_macro_f1"] = float(scores["macro_f1"])
            metrics[f"{name}_accuracy"] = float(scores["accuracy"])
    return metrics


def pick_best(rows: list[TrialRow], metric: str, mode: str, kl_budget: float | None
              ) -> TrialRow | None:
    """The trial with the best last-reported `metric` among those that reported it with a mean
    KL within `kl_budget` (all, if None); ties go to the lower KL. Marks `eligible` on rows."""
    for row in rows:
        row.eligible = (row.status != "error" and metric in row.metrics
                        and row.checkpoint is not None
                        and (kl_budget is None or row.metrics.get("mean_kl", math.inf)
                             <= kl_budget))
    eligible = [row for row in rows if row.eligible]
    if not eligible:
        return None
    return max(eligible, key=lambda row: (_score(row, metric, mode),
                                          -row.metrics.get("mean_kl", math.inf)))


def write_table(rows: list[TrialRow], out: Path) -> tuple[Path, Path]:
    """`trials.csv` and `trials.md` under `out`: one line per trial, in the given order."""
    table = [row.table_row() for row in rows]
    csv_path, markdown_path = out / "trials.csv", out / "trials.md"
    with open(csv_path.with_suffix(".csv.tmp"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=TABLE_COLUMNS)
        writer.writeheader()
        writer.writerows(table)
    os.replace(csv_path.with_suffix(".csv.tmp"), csv_path)
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |",
             "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"]
    lines += ["| " + " | ".join(_cell(entry.get(column)) for column in TABLE_COLUMNS) + " |"
              for entry in table]
    markdown_path.with_suffix(".md.tmp").write_text("\n".join(lines) + "\n")
    os.replace(markdown_path.with_suffix(".md.tmp"), markdown_path)
    return csv_path, markdown_path


def register_best(best: TrialRow, name: str, alias: str) -> str:
    """Register the best trial's last checkpoint (with its base model) as a new version of
    `name` with `alias`, logged into the active (parent) run; returns its model URI."""
    metadata = {"tune_trial": best.trial, "tune_iterations": best.iterations,
                "mlflow_trial_run_id": best.mlflow_run_id, **best.params, **best.metrics}
    with best.checkpoint.as_directory() as policy_dir:
        return tracking.register_policy(policy_dir, name, alias, metadata=metadata)


def _validate(config: TuneConfig) -> None:
    """Fail before starting Ray on what would make every trial fail."""
    finetune = config.finetune
    local = [("finetune.base_model", finetune.base_model)] if ":/" not in finetune.base_model \
        else []
    local += [(f"finetune.rewards[{i}].path", r.path) for i, r in enumerate(finetune.rewards)]
    local += [("finetune.judge", finetune.judge)] if finetune.judge else []
    for key, path in local:
        if not Path(path).exists():
            raise InputError(f"config key {key!r}: {path!r} does not exist")
    if not finetune.rewards:
        raise InputError("finetune.rewards: at least one reward classifier is needed")
    iterations = finetune.iterations
    if iterations < 1:
        raise InputError(f"finetune.iterations must be >= 1, got {iterations}")
    if config.asha.enabled and config.asha.grace_period > iterations:
        raise InputError(f"asha.grace_period {config.asha.grace_period} is more than "
                         f"finetune.iterations {iterations}")


def _scheduler(config: TuneConfig):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if not config.asha.enabled:
        return FIFOScheduler()
    # Time is counted in CTRL iterations (the reported `iteration`), not in reports; a trial
    # that reaches max_t finishes its own run (stop_last_trials=False), so it saves its policy.
    return ASHAScheduler(time_attr="iteration", max_t=config.finetune.iterations,
                         grace_period=config.asha.grace_period,
                         reduction_factor=config.asha.reduction_factor, stop_last_trials=False)


def _search_algorithm(config: TuneConfig):
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=config.search.seed,
                                 max_concurrent=config.max_concurrent_trials or 0)


def _trial_rows(results, base: FinetuneConfig) -> list[TrialRow]:
    """One row per trial from Tune's results, with the effective hyper-parameters."""
    objective = base.objective
    rows = []
    for result in results:
        reported = result.metrics or {}
        params = {name: float(result.config.get(name, getattr(objective, name)))
                  for name in SEARCHABLE}
        iterations = int(reported.get("iteration", 0))
        if result.error is not None:
            status = "error"
        elif iterations >= base.iterations:
            status = "completed"
        else:
            status = "stopped"
        rows.append(TrialRow(
            trial=str(reported.get("trial_id") or Path(result.path).name), params=params,
            iterations=iterations,
            metrics={k: float(v) for k, v in reported.items()
                     if k in REPORTED_METRICS or k.endswith(("_macro_f1", "_accuracy"))},
            status=status, mlflow_run_id=reported.get("mlflow_run_id"),
            checkpoint=result.checkpoint,
            error=None if result.error is None else f"{type(result.error).__name__}: "
                                                    f"{result.error}"[:500]))
    return rows


def _close_trial_runs(parent_run_id: str, rows: list[TrialRow]) -> None:
    """Tag each child run with its trial's status; end any a stopped trial left RUNNING (its
    process can be ended before the run is closed)."""
    client = mlflow.MlflowClient()
    parent = client.get_run(parent_run_id)
    by_run = {row.mlflow_run_id: row for row in rows if row.mlflow_run_id}
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent_run_id}'")
    for child in children:
        row = by_run.get(child.info.run_id)
        if row is not None:
            client.set_tag(child.info.run_id, "ray.tune.status", row.status)
        if child.info.status == "RUNNING":
            failed = row is None or row.status == "error"
            client.set_terminated(child.info.run_id, "FAILED" if failed else "KILLED")


def _score(row: TrialRow, metric: str, mode: str) -> float:
    value = row.metrics.get(metric)
    if value is None or math.isnan(value):
        return -math.inf
    return value if mode == "max" else -value


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _format_params(params: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in params.items())


__all__ = ["AshaConfig", "SearchConfig", "SearchSpace", "SweepResult", "TrialRow", "TuneConfig",
           "pick_best", "report_metrics", "run_sweep", "trial_base_config", "trial_config",
           "write_table"]
