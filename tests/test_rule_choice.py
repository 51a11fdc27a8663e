"""The rule of a config that names none: chosen before training from the value rule's targets on
base rollouts."""

from __future__ import annotations

import mlflow
import pytest
import torch
import yaml
from conftest import tiny_finetune_overrides

from ctrl_ray.config import load_raw
from ctrl_ray.finetune import run
from ctrl_ray.rule_choice import (
    FALLBACK_SETTINGS,
    MIN_MASS_ESS_PER_SAMPLE,
    choose_rule,
    decide,
    ess_per_sample,
    mass_ess_per_sample,
    mass_is_one,
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
    kept = decide(1.0, 1.0, exact=True)
    assert kept["mode"] == "value" and "classifier of noisy states" in kept["reason"]
    assert "0.450 effective rollouts" in decide(0.45, 10.0)["reason"]
    assert decide(2 * MIN_MASS_ESS_PER_SAMPLE, 3.0)["mode"] == "value"
    fallen = decide(MIN_MASS_ESS_PER_SAMPLE / 2, 10.0)
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


def test_the_measured_targets_choose_by_the_tilt(tiny_base, tiny_reward, tiny_judge, tmp_path):
    mild = _raw(tiny_base, tiny_reward, tiny_judge, tmp_path / "mild")
    config, choice = choose_rule(mild)
    assert choice["mode"] == config.mode == "value"
    assert choice["mass_ess_per_sample"] == 1.0 and choice["rollouts"] == 0   # exact: none drawn
    assert "nothing to measure" in choice["reason"]

    halved = _raw(tiny_base, tiny_reward, tiny_judge, tmp_path / "halved",
                  f"rewards=[{{path: {tiny_reward}, weight: 0.5}}]")
    config, choice = choose_rule(halved)   # exponent 1/2: measured on base rollouts
    assert choice["rollouts"] > 0 and choice["mode"] == config.mode == "value"
    assert 2 * MIN_MASS_ESS_PER_SAMPLE < choice["mass_ess_per_sample"] < 1 - 1e-6

    sharp = _raw(tiny_base, tiny_reward, tiny_judge, tmp_path / "sharp",
                 f"objective.gamma={SHARP_TILT}")
    config, choice = choose_rule(sharp)
    assert choice["mode"] == config.mode == "adjoint"
    assert choice["mass_ess_per_sample"] <= MIN_MASS_ESS_PER_SAMPLE / 2   # far from it
    assert config.objective.gamma == SHARP_TILT and config.adapter.kind == "lora"
    assert "objective.regression_steps" in choice["dropped"]


def test_the_mass_is_known_to_be_one_only_at_exponent_one_with_kl_summed():
    assert mass_is_one(resolve({})[0])
    assert not mass_is_one(resolve({"objective": {"gamma": 2.0}})[0])
    assert not mass_is_one(resolve({"objective": {"kl_reduction": "mean"}})[0])
    assert mass_is_one(resolve({"objective": {"gamma": 2.0},
                                "rewards": [{"path": "a", "weight": 0.5}]})[0])


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


def test_the_mass_of_joint_targets_is_one_at_tilt_one_and_falls_where_a_reward_is_sharp():
    """The value head regresses all rewards' targets jointly (y1, y2): at tilt 1 their mass is
    a product of ones, however rare a class; at tilt 10 the confident reward's mass rests on
    fewer rollouts, the near-uniform one's hardly moves. Contexts of fewer than
    MIN_CONTEXT_ROWS rollouts are measured together."""
    generator = torch.Generator().manual_seed(0)
    confident = torch.log_softmax(2 * torch.randn(600, 3, generator=generator), 1).double()
    weak = torch.log_softmax(0.1 * torch.randn(600, 4, generator=generator), 1).double()
    joint = (confident[:, :, None] + weak[:, None, :]).flatten(1)
    contexts = torch.cat([torch.zeros(300), torch.ones(280), torch.full((20,), 2)]).long()
    fractions = mass_ess_per_sample(joint, contexts)
    assert len(fractions) == 3 and all(abs(f - 1) < 1e-9 for f in fractions)
    assert max(mass_ess_per_sample(10 * joint, contexts)) < 0.6      # measured 0.35-0.41
    assert min(mass_ess_per_sample(10 * weak, contexts)) > 0.85      # measured 0.91-0.96
    assert len(mass_ess_per_sample(joint, torch.zeros(600).long())) == 1
    assert ess_per_sample(torch.zeros(50).double()) == pytest.approx(1.0)
    assert ess_per_sample(torch.tensor([0.0] + [-1e4] * 49).double()) == pytest.approx(1 / 50)
