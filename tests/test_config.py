"""Typed configs: YAML + overrides, and a clear InputError for unknown keys or wrong types."""

from __future__ import annotations

import pytest

from ctrl_ray.config import load_config, to_dict
from ctrl_ray.errors import InputError
from ctrl_ray.pretrain import PretrainConfig


def test_yaml_and_overrides_fill_typed_fields(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  steps: 10\n  lr: 1\nmodel:\n  block_out_channels: [8, 16]\n")
    config = load_config(PretrainConfig, path, ["training.steps=20", "output_dir=out/x"])
    assert config.training.steps == 20
    assert config.training.lr == 1.0 and isinstance(config.training.lr, float)
    assert config.model.block_out_channels == (8, 16)
    assert config.output_dir == "out/x"
    assert to_dict(config)["model"]["block_out_channels"] == [8, 16]


def test_repository_config_loads():
    config = load_config(PretrainConfig, "configs/pretrain_digits.yaml")
    assert config.model.image_size == config.data.size == 16


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("training.stepz=3", "unknown config key 'training.stepz'"),
        ("training.steps=many", "config key 'training.steps': expected int, got 'many'"),
        ("training.steps=1.5", "config key 'training.steps': expected int, got 1.5"),
        ("training.lr=true", "config key 'training.lr': expected float, got True"),
        ("model.block_out_channels=8", "config key 'model.block_out_channels': expected a list"),
        ("training=3", "config key 'training': expected a section, got 3"),
        ("noequals", "expected dotted.key=value"),
    ],
)
def test_bad_values_name_key_value_and_expectation(override, message):
    with pytest.raises(InputError) as caught:
        load_config(PretrainConfig, overrides=[override])
    assert message in str(caught.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(InputError, match="config file not found"):
        load_config(PretrainConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(InputError, match="expected a mapping"):
        load_config(PretrainConfig, bad)


def test_exponent_floats_and_one_line_yaml_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  lr: 1e-3\n  weight_decay: 5E-4\n")
    config = load_config(PretrainConfig, path, ["training.ema_decay=9e-1"])
    assert (config.training.lr, config.training.weight_decay) == (1e-3, 5e-4)
    assert config.training.ema_decay == 0.9
    path.write_text("training:\n  steps: [1, 2\n  lr: 3\n")
    with pytest.raises(InputError) as caught:
        load_config(PretrainConfig, path)
    assert "\n" not in str(caught.value) and "line 3, column" in str(caught.value)


@pytest.mark.parametrize(("override", "key"), [
    ("finetune.objective.batch_size=0", "'finetune.objective.batch_size'"),
    ("finetune.distributed.workers=-1", "'finetune.distributed.workers'"),
    ("finetune.objective.nope=1", "'finetune.objective.nope'"),
    ("pretrain.training.steps=0", "'pretrain.training.steps'"),
    ("reward.training.lr=0", "'reward.training.lr'"),
    ("finetune.evaluation.samples_per_target=0", "'finetune.evaluation.samples_per_target'"),
])
def test_nested_errors_name_the_full_dotted_key(override, key):
    from ctrl_ray.demo import DemoConfig

    with pytest.raises(InputError) as caught:
        load_config(DemoConfig, overrides=[override])
    assert key in str(caught.value)


def test_no_address_means_a_fresh_local_ray(monkeypatch):
    """ray.init() with no address would join the cluster Ray's temp folder last recorded (and
    retry for good if it died); a run passes "local" instead, unless told an address."""
    from ctrl_ray.finetune_config import DistributedConfig

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert DistributedConfig().ray_address == "local"
    assert DistributedConfig(address="10.0.0.1:6379").ray_address == "10.0.0.1:6379"
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert DistributedConfig().ray_address == "ray://head:10001"
    assert DistributedConfig(address="10.0.0.1:6379").ray_address == "10.0.0.1:6379"
