"""Single-process CTRL fine-tuning end to end on the tiny testbed, plus evaluate and sample."""

from __future__ import annotations

import json
import math

import mlflow
import pytest
import torch

from ctrl_ray.checkpoint import ADAPTER_FILE, OPTIMIZER_FILE, POLICY_FILE
from ctrl_ray.cli import main
from ctrl_ray.policy import load_any


def test_finetune_writes_policy_checkpoints_and_mlflow_run(tiny_run):
    out, result = tiny_run
    for directory in (out / "policy", out / "checkpoints" / "000002",
                      out / "checkpoints" / "000004"):
        assert (directory / ADAPTER_FILE).is_file() and (directory / POLICY_FILE).is_file()
    assert (out / "checkpoints" / "000004" / OPTIMIZER_FILE).is_file()
    assert (out / "ctrl_grid.png").is_file() and (out / "base_grid.png").is_file()

    run = mlflow.get_run(result["mlflow_run_id"])
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "reward")
    assert [m.step for m in history] == [1, 2, 3, 4]
    factors = mlflow.MlflowClient().get_metric_history(run.info.run_id, "lr_factor")
    assert [m.value for m in factors] == pytest.approx([1.0, 0.868, 0.55, 0.232], abs=1e-3)
    assert "eval_ctrl_fidelity" in run.data.metrics
    ctrl = result["ctrl"]["labels"]["compress_class"]
    assert len(ctrl["per_class_f1"]) == 4 and sum(map(sum, ctrl["confusion_matrix"])) == 8
    assert result["base"]["mean_kl"] == 0.0 and result["ctrl"]["mean_kl"] > 0.0
    # 16 base samples per digit cannot give the optimum an ESS of 50: the pairs left short took
    # 16 samples of the policy each, drawn for that pair, and the run reports that estimate.
    # (kept where their ESS is the larger, else the base samples serve the pair).
    estimates = result.get("optimum_estimates")
    if estimates:
        assert estimates["base"]["ess_min"] <= 16
        assert result["optimum"]["proposal"].startswith("base, and the policy for ")
        assert result["optimum"]["kl"] == estimates["policy"]["kl"]
    else:
        assert result["optimum"]["proposal"] == "base"
    assert result["optimum"]["ess_min"] <= 16
    # the policy's distance to the optimum, KL(pi || pi*), beside the ratios and in MLflow
    distance = result["against_optimum"]["kl_to_optimum"]
    assert math.isfinite(distance)
    assert run.data.metrics["eval_against_optimum_kl_to_optimum"] == pytest.approx(distance)


def test_fine_tuned_policy_differs_from_base_and_reloads(tiny_run):
    out, _ = tiny_run
    loaded = load_any(out / "policy")
    assert loaded.fine_tuned and loaded.model.label_classes == {"compress_class": 4}
    assert loaded.model.min_timestep == 100
    weights = loaded.model.label_embeddings["compress_class"].weight
    assert weights[:4].abs().sum() > 0 and weights[4].abs().sum() == 0  # null row stays zero


def test_cli_evaluate_and_sample(tiny_run, tiny_judge, tmp_path, capsys):
    out, _ = tiny_run
    code = main(["evaluate", "--model", str(out / "policy"), "--set", f"judge={tiny_judge}",
                 "--set", "evaluation.samples_per_target=1", "--set", "evaluation.contexts=[2]",
                 "--set", "evaluation.num_inference_steps=4", "--set", f"output_dir={tmp_path}"])
    printed = capsys.readouterr().out
    assert code == 0
    report = json.loads(printed[printed.index("{"):])
    assert 0.0 <= report["accuracy"] <= 1.0 and report["num_samples"] == 4
    grid = tmp_path / "grid.png"
    assert main(["sample", "--model", str(out / "policy"), "--c", "3", "--y", "0", "--n", "4",
                 "--out", str(grid)]) == 0
    assert grid.is_file()
    assert main(["sample", "--model", str(out / "policy"), "--c", "3", "--y", "7", "--n", "4",
                 "--out", str(tmp_path / "bad.png")]) == 2


def test_same_seed_gives_same_sample_alone_or_in_a_batch(tiny_run):
    from ctrl_ray.evaluation import generate

    loaded = load_any(tiny_run[0] / "policy")
    labels = {"compress_class": torch.tensor([0, 3, 1])}
    batch, _ = generate(loaded.model, torch.tensor([1, 2, 3]), labels, [5, 6, 7],
                        num_inference_steps=4)
    alone, _ = generate(loaded.model, torch.tensor([2]), {"compress_class": torch.tensor([3])},
                        [6], num_inference_steps=4)
    torch.testing.assert_close(batch[1:2], alone, atol=1e-5, rtol=0)


def test_evaluation_scores_each_sample_against_its_own_target_and_context(tiny_run):
    """E[log p(y | x0, c)] of the evaluation (what the distance to the optimum reads) passes
    every sample with its own target and context, in batches: a stand-in reward of
    10 y + c averages to 10 * 1.5 + 0.5 over 4 targets x contexts [0, 1]."""
    from ctrl_ray.evaluation import evaluate
    from ctrl_ray.evaluation_config import EvaluationConfig

    loaded = load_any(tiny_run[0] / "policy")
    seen = []

    def stand_in(images, labels, contexts):
        assert len(images) == len(labels["compress_class"]) == len(contexts) <= 3
        seen.append(len(images))
        return 10 * labels["compress_class"].double() + contexts.double()

    config = EvaluationConfig(samples_per_target=2, contexts=[0, 1], num_inference_steps=4,
                              batch_size=3)
    report = evaluate(loaded.model, loaded.label_info, None, config, log_likelihood=stand_in)
    assert sum(seen) == report["num_samples"] == 16
    assert report["expected_reward"] == pytest.approx(15.5)


def test_report_every_changes_what_is_measured_not_the_update(tiny_base, tiny_reward,
                                                             tiny_judge, tmp_path):
    """The value rule samples the policy only to report its reward and KL: every 3rd update
    (and the first and last) gives bit-identical adapters to every update, and MLflow says
    how old the reported values are."""
    from conftest import tiny_finetune_overrides

    from ctrl_ray.config import load_config
    from ctrl_ray.finetune import FinetuneConfig, finetune

    runs = {}
    for every in (1, 3):
        config = load_config(FinetuneConfig, overrides=[
            *tiny_finetune_overrides(tiny_base, tiny_reward, tiny_judge, tmp_path / str(every),
                                     "value"),
            "objective.regression_steps=3", "objective.regression_batch_size=8",
            "objective.batch_size=4", f"objective.report_every={every}", "evaluate=false"])
        runs[every] = finetune(config, progress=False)
    adapters = [(tmp_path / str(every) / "policy" / ADAPTER_FILE).read_bytes()
                for every in (1, 3)]
    assert adapters[0] == adapters[1]
    client = mlflow.MlflowClient()
    sparse = runs[3]["mlflow_run_id"]

    def history(run_id: str, key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))

    assert [step for step, _ in history(sparse, "reward")] == [1, 3, 4]
    assert [step for step, _ in history(sparse, "kl")] == [1, 3, 4]
    assert history(sparse, "report_age") == [(1, 0.0), (2, 1.0), (3, 0.0), (4, 0.0)]
    assert [step for step, _ in history(runs[1]["mlflow_run_id"], "reward")] == [1, 2, 3, 4]
