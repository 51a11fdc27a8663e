"""Running a sweep on Ray Tune: the parent MLflow run, the scheduler, closing the trials' child
runs, the table and the registration of the best trial."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlflow

from ctrl_ray import registry, tracking
from ctrl_ray.config import flatten, to_dict
from ctrl_ray.distributed.ray_runtime import connect
from ctrl_ray.registry import is_uri
from ctrl_ray.tuning.configs import TuneConfig, check_inputs
from ctrl_ray.tuning.table import TrialRow, format_params, pick_best, score, trial_rows, write_table
from ctrl_ray.tuning.trials import TrialContext, run_trial, trial_base_config, trial_evaluation


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


def run_sweep(config: TuneConfig, progress: bool = True) -> SweepResult:
    """Run the sweep on Ray Tune (joining `finetune.distributed.address` or RAY_ADDRESS, else
    starting a local Ray, unless one runs in this process); tabulate, pick and register the
    best trial."""
    from ray import tune

    check_inputs(config)
    out = Path(config.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    storage = config.storage_path or str(out / "ray_results")
    if not is_uri(storage):
        storage = str(Path(storage).resolve())
    base = trial_base_config(config)
    uri = tracking.tracking_uri()
    connect(config.finetune.distributed.ray_address)

    with tracking.run(config.experiment, config.name, flatten(to_dict(config))) as parent:
        parent_id = parent.info.run_id
        context = TrialContext(
            finetune=base, output_dir=str(out / "trials"), tracking_uri=uri,
            parent_run_id=parent_id, report_every=config.report_every,
            evaluation=trial_evaluation(config), threads=max(1, int(config.cpus_per_trial)))
        trainable = tune.with_resources(tune.with_parameters(run_trial, context=context),
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
        rows = trial_rows(results, base)
        close_trial_runs(parent_id, rows)
        best = pick_best(rows, config.metric, config.mode, config.kl_budget)
        rows.sort(key=lambda row: (row is not best, -score(row, config.metric, config.mode)))
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
                  f" {format_params(best.params)}" + (f" -> {model_uri}" if model_uri else ""))
    return SweepResult(rows, best, model_uri, parent_id, csv_path, markdown_path,
                       results.experiment_path)


def register_best(best: TrialRow, name: str, alias: str) -> str:
    """Register the best trial's last checkpoint (with its base model) as a new version of
    `name` with `alias`, logged into the active (parent) run; returns its model URI."""
    metadata = {"tune_trial": best.trial, "tune_iterations": best.iterations,
                "mlflow_trial_run_id": best.mlflow_run_id, **best.params, **best.metrics}
    with best.checkpoint.as_directory() as policy_dir:
        return registry.register_policy(policy_dir, name, alias, metadata=metadata)


def close_trial_runs(parent_run_id: str, rows: list[TrialRow]) -> None:
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
