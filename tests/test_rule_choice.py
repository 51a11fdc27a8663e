"""The rule of a config that names none: chosen from the exact optimum before training."""

from __future__ import annotations

import mlflow
import yaml
from conftest import tiny_finetune_overrides

from ctrl_ray.config import load_raw
from ctrl_ray.finetune import run
from ctrl_ray.rule_choice import (
    FALLBACK_SETTINGS,
    MIN_ESS_PER_SAMPLE,
    choose_rule,
    decide,
    resolve,
    with_rule,
)

SHARP_TILT = 300.0   # gamma/alpha at which the tiny reward's optimum leaves the base behind


def _raw(tiny_base, tiny_reward, tiny_judge, out, *extra: str) -> dict:
    """A tiny config with no `mode:` (the adjoint-only keys of the shared overrides left out)."""
    overrides = [o for o in tiny_finetune_overrides(tiny_base, tiny_reward, tiny_judge, out,
                                                    "value")
                 if not o.startswith(("mode=", "objective.lr_embedding", "adapter.time_buckets"))]
    return load_raw(None, [*overrides, "objective.regression_steps=2", "iterations=1",
                           "checkpoint_every=1", "evaluate=false", *extra])


def test_the_threshold_decides_and_says_why():
    kept = decide(2 * MIN_ESS_PER_SAMPLE, 1.0)
    assert kept["mode"] == "value" and f"{2 * MIN_ESS_PER_SAMPLE:.4f}" in kept["reason"]
    fallen = decide(MIN_ESS_PER_SAMPLE / 2, 10.0)
    assert fallen["mode"] == "adjoint"
    assert "gamma/alpha 10" in fallen["reason"] and "Adjoint Matching" in fallen["reason"]


def test_a_fallback_keeps_the_objective_and_takes_the_rules_own_settings():
    raw = {"mode": "auto", "objective": {"gamma": 10.0, "kl_weight": 1.0, "batch_size": 16,
                                         "regression_steps": 30, "lr_adapter": 0.5},
           "adapter": {"min_timestep": 0}}
    config, dropped = with_rule(raw, "adjoint")
    assert config.mode == "adjoint" and config.adapter.kind == "lora"
    assert config.adapter.min_timestep == FALLBACK_SETTINGS["adapter"]["min_timestep"]
    assert (config.objective.gamma, config.objective.batch_size) == (10.0, 16)
    assert config.objective.lr_adapter == FALLBACK_SETTINGS["objective"]["lr_adapter"]
    assert set(dropped) == {"objective.regression_steps", "objective.lr_adapter",
                            "adapter.min_timestep"}
    assert raw["objective"]["regression_steps"] == 30   # the caller's mapping is left alone


def test_a_named_rule_is_never_chosen_over():
    config, rule_open = resolve({"mode": "ppo"})
    assert config.mode == "ppo" and not rule_open
    config, rule_open = resolve({})
    assert config.mode == "value" and rule_open


def test_the_measured_optimum_chooses_by_the_tilt(tiny_base, tiny_reward, tiny_judge, tmp_path):
    mild = _raw(tiny_base, tiny_reward, tiny_judge, tmp_path / "mild")
    config, choice = choose_rule(mild)
    assert choice["mode"] == config.mode == "value"
    assert choice["ess_per_sample"] >= 2 * MIN_ESS_PER_SAMPLE   # far from the threshold

    sharp = _raw(tiny_base, tiny_reward, tiny_judge, tmp_path / "sharp",
                 f"objective.gamma={SHARP_TILT}")
    config, choice = choose_rule(sharp)
    assert choice["mode"] == config.mode == "adjoint"
    assert choice["ess_per_sample"] <= 0.7 * MIN_ESS_PER_SAMPLE   # ESS 1 of 300: the floor
    assert config.objective.gamma == SHARP_TILT and config.adapter.kind == "lora"
    assert "objective.regression_steps" in choice["dropped"]


def test_a_chosen_rule_trains_is_logged_and_resumes_as_chosen(tiny_base, tiny_reward,
                                                              tiny_judge, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_raw(tiny_base, tiny_reward, tiny_judge, tmp_path / "run",
                                        f"objective.gamma={SHARP_TILT}")))
    result = run(path, [], progress=False)
    assert result["rule_choice"]["mode"] == "adjoint"
    assert "rule adjoint" in capsys.readouterr().out
    tags = mlflow.get_run(result["mlflow_run_id"]).data.tags
    assert tags["rule_choice"].startswith("rule adjoint")

    config, rule_open = resolve(load_raw(path), resume=True)
    assert config.mode == "adjoint" and not rule_open   # no new measurement on a resume


def test_rewards_are_measured_one_by_one(tiny_base, tiny_reward, tiny_judge, tmp_path):
    """Two copies of a reward tilt the joint optimum twice as hard, but each reward's own tilt
    is the single reward's: the choice reads the latter, from the same base samples."""
    single = choose_rule(_raw(tiny_base, tiny_reward, tiny_judge, tmp_path / "one"))[1]
    pair = choose_rule(_raw(tiny_base, tiny_reward, tiny_judge, tmp_path / "two",
                            f"rewards=[{{path: {tiny_reward}}}, {{path: {tiny_reward}}}]"))[1]
    assert pair["ess_per_sample"] == single["ess_per_sample"]
    assert str(tiny_reward) in pair["reason"]
