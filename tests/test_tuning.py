"""A tiny Ray Tune sweep over the KL weight: ASHA stops trials, MLflow nests them, the best is
registered; plus the pieces that need no Ray (search spaces, best-trial choice, the table)."""

from __future__ import annotations

import csv

import mlflow
import pytest
from conftest import tiny_finetune_overrides

from ctrl_ray.config import load_config
from ctrl_ray.errors import InputError
from ctrl_ray.tuning import TrialRow, TuneConfig, pick_best, run_sweep, write_table

NUM_TRIALS = 4
ITERATIONS = 4


@pytest.fixture(scope="module")
def sweep(tiny_base, tiny_reward, tiny_judge, ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    finetune = tiny_finetune_overrides(tiny_base, tiny_reward, tiny_judge, root / "unused")
    config = load_config(TuneConfig, overrides=[
        *(f"finetune.{override}" for override in finetune),
        f"finetune.iterations={ITERATIONS}",
        "finetune.checkpoint_every=0",
        "finetune.evaluation.contexts=[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]",
        "search.kl_weight={loguniform: [0.1, 10.0]}",
        "search.gamma={choices: [1.0]}",
        "search.lr_embedding={loguniform: [0.003, 0.3]}",
        f"search.num_samples={NUM_TRIALS}",
        "asha.grace_period=1",
        "asha.reduction_factor=2",
        "report_every=1",
        "eval_samples_per_target=1",
        "cpus_per_trial=0.5",
        "max_concurrent_trials=1",  # trials reach each rung in a fixed order: ASHA is repeatable
        "register_name=ctrl-digits-tune-test",
        f"output_dir={root / 'sweep'}",
        "experiment=ctrl-ray-tune-test",
    ])
    return config, run_sweep(config, progress=False)


def test_sweep_runs_every_trial_and_asha_stops_some_early(sweep):
    config, result = sweep
    assert len(result.trials) == NUM_TRIALS
    assert all(row.status in ("completed", "stopped") for row in result.trials), \
        [row.error for row in result.trials]
    assert len({row.params["kl_weight"] for row in result.trials}) == NUM_TRIALS
    assert all(0.1 <= row.params["kl_weight"] <= 10.0 for row in result.trials)
    assert any(row.status == "completed" and row.iterations == ITERATIONS
               for row in result.trials)
    stopped = [row for row in result.trials if row.status == "stopped"]
    assert stopped and all(1 <= row.iterations < ITERATIONS for row in stopped)
    for row in result.trials:
        assert 0.0 <= row.metrics["macro_f1"] <= 1.0 and row.metrics["mean_kl"] > 0.0
        assert row.checkpoint is not None

    with open(result.table_csv) as handle:
        table = list(csv.DictReader(handle))
    assert [line["trial"] for line in table] == [row.trial for row in result.trials]
    assert table[0]["trial"] == result.best.trial
    assert result.best.metrics["macro_f1"] == max(r.metrics["macro_f1"] for r in result.trials)
    assert "| kl_weight |" in result.table_markdown.read_text().replace("| trial ", "")


def test_each_trial_is_a_child_mlflow_run_with_metrics_and_checkpoints(sweep):
    config, result = sweep
    client = mlflow.MlflowClient()
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert {"trials.csv", "trials.md"} <= {a.path for a in client.list_artifacts(
        result.parent_run_id)}
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert len(children) == NUM_TRIALS
    by_id = {child.info.run_id: child for child in children}
    for row in result.trials:
        child = by_id[row.mlflow_run_id]
        expected = "FINISHED" if row.status == "completed" else "KILLED"
        assert child.info.status == expected, (row.status, child.info.status)
        assert child.info.run_name == f"trial-{row.trial}"
        assert float(child.data.params["objective.kl_weight"]) == pytest.approx(
            row.params["kl_weight"])
        history = client.get_metric_history(row.mlflow_run_id, "tune_macro_f1")
        assert [m.step for m in history] == list(range(1, row.iterations + 1))
        assert len(client.get_metric_history(row.mlflow_run_id, "reward")) >= row.iterations
        saved = [a.path for a in client.list_artifacts(row.mlflow_run_id, "tune")]
        assert len(saved) == row.iterations


def test_best_trial_is_registered_with_its_alias(sweep):
    config, result = sweep
    assert result.model_uri and result.model_uri.startswith(f"models:/{config.register_name}/")
    version = mlflow.MlflowClient().get_model_version_by_alias(config.register_name,
                                                               config.alias)
    assert result.model_uri.endswith(f"/{version.version}")


def _row(trial: str, f1: float, kl: float, status: str = "completed") -> TrialRow:
    return TrialRow(trial=trial, params={"kl_weight": 1.0, "gamma": 1.0, "lr_embedding": 0.01,
                                         "lr_adapter": 0.001},
                    iterations=4, metrics={"macro_f1": f1, "mean_kl": kl}, status=status,
                    checkpoint=object())


def test_best_trial_respects_the_kl_budget_and_breaks_ties_by_kl(tmp_path):
    rows = [_row("a", 0.9, 50.0), _row("b", 0.7, 5.0), _row("c", 0.7, 2.0),
            _row("d", 0.95, 1.0, status="error")]
    assert pick_best(rows, "macro_f1", "max", None).trial == "a"
    assert pick_best(rows, "mean_kl", "min", None).trial == "c"
    assert pick_best(rows, "macro_f1", "max", 0.5) is None
    assert pick_best(rows, "macro_f1", "max", 10.0).trial == "c"
    assert [row.eligible for row in rows] == [False, True, True, False]
    csv_path, markdown_path = write_table(rows, tmp_path)
    assert len(markdown_path.read_text().splitlines()) == 2 + len(rows)
    with open(csv_path) as handle:
        assert [line["eligible"] for line in csv.DictReader(handle)] == ["False", "True",
                                                                          "True", "False"]


@pytest.mark.parametrize("override, field", [
    ("search.kl_weight={loguniform: [0, 10]}", "kl_weight"),
    ("search.kl_weight={grid: [0.1], choices: [1.0]}", "kl_weight"),
    ("search.gamma={uniform: [2.0, 1.0]}", "gamma"),
    ("metric=reward", "metric"),
    ("cpus_per_trial=0", "cpus_per_trial"),
])
def test_bad_sweep_config_names_the_field(override, field):
    with pytest.raises(InputError, match=field):
        load_config(TuneConfig, overrides=[override])


def test_missing_base_model_fails_before_any_trial_starts(tmp_path):
    config = load_config(TuneConfig, overrides=[f"finetune.base_model={tmp_path / 'none'}",
                                                f"output_dir={tmp_path / 'sweep'}"])
    with pytest.raises(InputError, match="finetune.base_model"):
        run_sweep(config, progress=False)
