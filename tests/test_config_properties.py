"""Property-based tests of the config parser and `--set` overrides (hypothesis).

Whatever a user types, loading a config either succeeds or raises one `InputError` whose
message is a single line naming the key; valid values round-trip exactly.
"""

from __future__ import annotations

import json
import math

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctrl_ray.config import flatten, load_config, parse_override, read_yaml, to_dict
from ctrl_ray.errors import InputError
from ctrl_ray.finetune import FinetuneConfig
from ctrl_ray.pretrain import PretrainConfig

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)


def _load_or_input_error(cls, overrides=(), path=None):
    """The config, or None after checking the InputError is one line."""
    try:
        return load_config(cls, path, list(overrides))
    except InputError as err:
        message = " ".join(str(err).split())
        assert message and len(message) < 2000
        return None


@SETTINGS
@given(finite)
def test_every_float_spelling_reads_as_that_float(value):
    for text in (repr(value), f"{value:e}", f"{value:E}", f"{value:g}", json.dumps(value)):
        key, parsed = parse_override(f"training.lr={text}")
        assert key == "training.lr"
        assert isinstance(parsed, (int, float)) and not isinstance(parsed, bool)
        assert parsed == float(text)


@SETTINGS
@given(st.integers(min_value=-10**12, max_value=10**12))
def test_integers_read_as_integers_and_steps_are_range_checked(steps):
    assert parse_override(f"training.steps={steps}") == ("training.steps", steps)
    config = _load_or_input_error(PretrainConfig, [f"training.steps={steps}"])
    assert (config is not None) == (1 <= steps <= 10**8)
    if config is not None:
        assert config.training.steps == steps


@SETTINGS
@given(st.floats(min_value=1e-12, max_value=10.0), st.floats(min_value=0, max_value=0.999),
       st.integers(min_value=1, max_value=4096), st.sampled_from([8, 16, 32]))
def test_valid_overrides_round_trip_through_set_strings(lr, ema, batch, size):
    overrides = [f"training.lr={lr!r}", f"training.ema_decay={ema:e}",
                 f"training.batch_size={batch}", f"data.size={size}",
                 f"model.image_size={size}"]
    config = load_config(PretrainConfig, overrides=overrides)
    assert config.training.lr == lr and config.training.batch_size == batch
    assert math.isclose(config.training.ema_decay, float(f"{ema:e}"))
    # Every value of the loaded config, written back as --set strings, loads to the same config.
    again = load_config(PretrainConfig, overrides=[
        f"{key}={json.dumps(value)}" for key, value in flatten(to_dict(config)).items()])
    assert to_dict(again) == to_dict(config)


@SETTINGS
@given(st.text(max_size=60))
def test_any_override_text_loads_or_fails_with_one_input_error(text):
    _load_or_input_error(PretrainConfig, [text])
    _load_or_input_error(FinetuneConfig, [text])


keys = st.sampled_from(["training.steps", "training.lr", "data.size", "model.image_size",
                        "output_dir", "training", "model.block_out_channels", "text.max_length",
                        "conditioning", "schedule.beta_schedule", "training.nope", "x.y.z"])
values = st.recursive(
    st.none() | st.booleans() | st.integers() | finite | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                 max_size=3),
    max_leaves=8)


@SETTINGS
@given(st.lists(st.tuples(keys, values), max_size=4))
def test_any_typed_value_at_any_key_loads_or_names_the_key(pairs):
    overrides = [f"{key}={json.dumps(value)}" for key, value in pairs]
    try:
        load_config(PretrainConfig, overrides=overrides)
    except InputError as err:
        assert any(key.split(".")[0] in str(err) for key, _ in pairs) or "output_dir" in str(err)


@SETTINGS
@given(st.text(max_size=200))
def test_any_yaml_file_reads_as_a_mapping_or_one_line_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("yaml") / "c.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        data = read_yaml(path)
    except InputError as err:
        assert "\n" not in str(err) and "c.yaml" in str(err)
        return
    assert isinstance(data, dict)
    _load_or_input_error(PretrainConfig, path=path)


@SETTINGS
@given(st.dictionaries(st.from_regex(r"[a-z_]{1,12}", fullmatch=True), st.integers(),
                       min_size=1, max_size=3))
def test_unknown_keys_are_named_with_their_section(tmp_path_factory, section):
    known = {"steps", "batch_size", "lr", "warmup_steps", "weight_decay", "ema_decay", "seed",
             "log_every"}
    unknown = sorted(set(section) - known)
    path = tmp_path_factory.mktemp("yaml") / "c.yaml"
    path.write_text(yaml.safe_dump({"training": section}))
    try:
        load_config(PretrainConfig, path)
    except InputError as err:
        if unknown:
            assert f"'training.{unknown[0]}'" in str(err)
        else:
            assert "training." in str(err)
    else:
        assert not unknown
