"""Typed configs: dataclasses from YAML files plus `--set dotted.key=value` overrides, validated.

Every value is checked where its type is declared: the type hints (by `from_dict`), ranges in
the dataclass's `__post_init__` (with `check_bounds`, whose errors `from_dict` reports under
the full dotted key), and, for config types that declare no range of their own, `BOUNDS`.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

from ctrl_ray.errors import InputError

T = TypeVar("T")

MAX_CONFIG_BYTES = 1 << 20
SEED = "[0, 4294967295]"
"""The range of every seed: what numpy's and torch's generators both accept."""

BOUNDS: dict[str, dict[str, str | tuple]] = {
    # Ranges of config types that declare none themselves, by "module.Class" (subclasses
    # inherit them); a rule is an interval ("[1, 512]", ">= 0", "(0, 1)") or a tuple of
    # allowed values.
    "ctrl_ray.models.unet_config.UNetConfig": {
        "image_size": "[4, 1024]", "in_channels": "[1, 64]", "num_contexts": "[1, 100000]",
        "block_out_channels": "[1, 4096]", "layers_per_block": "[1, 16]",
        "norm_num_groups": "[1, 4096]", "attention_head_dim": "[1, 4096]",
    },
    "ctrl_ray.models.unet_config.ScheduleConfig": {
        "num_train_timesteps": "[2, 100000]",
        "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    },
    "ctrl_ray.evaluation_config.EvaluationConfig": {
        "samples_per_target": "[1, 100000]", "contexts": "[0, 100000]",
        "num_inference_steps": "[1, 10000]", "eta": "[0, 100]", "seed": SEED,
        "batch_size": "[1, 100000]",
    },
    "ctrl_ray.reward_config.RewardTrainingConfig": {"seed": SEED},
    "ctrl_ray.baseline_config.CFGTrainingConfig": {"seed": SEED},
    "ctrl_ray.baseline_config.NoisyClassifierTrainingConfig": {"seed": SEED},
    "ctrl_ray.objectives.configs.ObjectiveConfig": {
        "batch_size": "[1, 1000000]", "num_inference_steps": "[1, 10000]",
    },
    "ctrl_ray.tuning.configs.SearchConfig": {"seed": SEED},
}


class ConfigValueError(InputError):
    """A config value outside its range; `from_dict` re-raises it under the full dotted key."""

    def __init__(self, key: str, value: Any, expected: str, *, detail: str | None = None):
        self.key, self.value, self.expected = key, value, expected
        self.detail = f"value {_short(value)} {expected}" if detail is None else detail
        super().__init__(f"config key {key!r}: {self.detail}")

    def under(self, prefix: str) -> ConfigValueError:
        return type(self)(prefix + self.key, self.value, self.expected, detail=self.detail)


class UnknownKeyError(ConfigValueError):
    """A key the config type does not have; `expected` lists the valid keys there."""

    def __init__(self, key: str, value: Any, expected: str, *, detail: str | None = None):
        super().__init__(key, value, expected, detail=detail)
        self.args = (f"unknown config key {key!r} (valid keys here: {expected})",)

    def __str__(self) -> str:
        return self.args[0]


def check_bounds(config: Any, **rules: str | tuple) -> None:
    """Raise ConfigValueError for the first field of `config` outside its rule.

    A rule is an interval, `"[0, 1)"`, `"(0, 10]"`, `">= 1"`, `"> 0"`, `"<= 5"`, or a tuple of
    allowed values. None is always allowed (optional fields); a list is checked item by item.
    """
    for name, rule in rules.items():
        value = getattr(config, name)
        items = value if isinstance(value, (list, tuple)) and not isinstance(rule, tuple) \
            else [value]
        for item in items:
            if item is None:
                continue
            if isinstance(rule, tuple):
                if item not in rule:
                    raise ConfigValueError(name, value,
                                           f"is not one of {', '.join(map(repr, rule))}")
                continue
            if isinstance(item, bool) or not isinstance(item, (int, float)):
                continue  # a wrong type is the type check's to report
            low, low_closed, high, high_closed = _parse_rule(rule)
            if not ((item > low or (low_closed and item == low))
                    and (item < high or (high_closed and item == high))):
                raise ConfigValueError(name, value,
                                       f"is out of range: expected {_describe_rule(rule)}")


@functools.cache
def _parse_rule(rule: str) -> tuple[float, bool, float, bool]:
    text = rule.replace(" ", "")
    if text.startswith((">=", ">", "<=", "<")):
        op = text[:2] if text[1] == "=" else text[:1]
        bound = float(text[len(op):])
        if op.startswith(">"):
            return bound, op == ">=", math.inf, False
        return -math.inf, False, bound, op == "<="
    match = re.fullmatch(r"([\[(])([^,]+),([^,]+)([\])])", text)
    if not match:
        raise ValueError(f"bad bounds rule {rule!r}")
    return (float(match[2]), match[1] == "[", float(match[3]), match[4] == "]")


def _describe_rule(rule: str) -> str:
    text = rule.strip()
    if text[0] in "[(":
        low, _, high = text[1:-1].partition(",")
        return f"a value in {text}" if "." in text or "(" in text or ")" in text else \
            f"{low.strip()}..{high.strip()}"
    return text


class _Loader(yaml.SafeLoader):
    """YAML 1.1 as PyYAML reads it, plus exponent floats without a dot (`1e-3`, `5E4`), and a
    key given twice in one mapping refused (PyYAML would keep the last value silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:  # the mapping's own keys (a `<<` merge may be overridden)
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            key = self.construct_object(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (first on line {seen[key] + 1})",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def yaml_load(text: str) -> Any:
    """Parse YAML text like `yaml.safe_load`, reading `1e-3` as a float."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def yaml_error(err: yaml.YAMLError) -> str:
    """One line: where the YAML is broken and why (not PyYAML's multi-line report)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}"


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] = ()) -> T:
    """Build `cls` from an optional YAML file, then apply `key.sub=value` overrides in order."""
    return from_dict(cls, load_raw(path, overrides))


def load_raw(path: str | Path | None = None, overrides: list[str] = ()) -> dict[str, Any]:
    """The mapping of an optional YAML file with `key.sub=value` overrides applied, unparsed."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_yaml(path)
    for override in overrides:
        key, value = parse_override(override)
        set_dotted(raw, key, value)
    return raw


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping at the top of a YAML file; InputError if missing or not a mapping."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"config file {str(path)!r} is a directory")
    if not path.is_file():
        raise InputError(f"config file not found: {str(path)!r}")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise InputError(f"config file {str(path)!r} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        data = yaml_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise InputError(f"config file {str(path)!r} is not valid YAML: {yaml_error(err)}") \
            from None
    except (UnicodeDecodeError, OSError) as err:
        raise InputError(f"config file {str(path)!r} could not be read as text: "
                         f"{type(err).__name__}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"config file {str(path)!r}: expected a mapping at the top, "
                         f"got {_short(data)}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=3` -> ("a.b", 3); the value is parsed as YAML so numbers, booleans and lists work."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise InputError(f"override {text!r}: expected dotted.key=value")
    if not all(part.strip() for part in key.split(".")):
        raise InputError(f"override {text!r}: {key!r} has an empty part")
    try:
        parsed = yaml_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key, parsed


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set `tree[a][b] = value` for key "a.b", creating intermediate mappings."""
    *parents, leaf = key.split(".")
    node = tree
    for index, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            section = ".".join(parents[:index + 1])
            raise InputError(f"config key {key!r}: {section!r} holds {_short(child)}, "
                             f"not a section")
        node = child
    node[leaf] = value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Instantiate dataclass `cls` from `data`, checking every key, value type and range."""
    if not isinstance(data, dict):
        raise InputError(f"config key {prefix.rstrip('.') or '<root>'!r}: expected a section, "
                         f"got {_short(data)}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(str(key) for key in set(data) - set(fields))
    if unknown:
        raise UnknownKeyError(prefix + unknown[0], data.get(unknown[0]),
                              ", ".join(sorted(fields)))
    kwargs = {name: _coerce(hints[name], value, prefix + name) for name, value in data.items()}
    try:
        obj = cls(**kwargs)
        for base in cls.__mro__:  # a subclass keeps its bases' rules
            rules = BOUNDS.get(f"{base.__module__}.{base.__qualname__}")
            if rules:
                check_bounds(obj, **rules)
    except ConfigValueError as err:
        raise err.under(prefix) from None
    except (TypeError, ValueError) as err:
        raise _keyed_error(str(err), fields, prefix) from None
    return obj


def _keyed_error(message: str, fields: dict[str, Any], prefix: str) -> InputError:
    """A config type's own error ("batch_size must be >= 1") under its full dotted key."""
    message = " ".join(message.split())
    if message.startswith(("config key", "unknown config key")):
        return InputError(message)
    match = re.match(r"([A-Za-z_][\w.]*)(:?\s*)(.*)", message)
    if match:
        leaf = match[1].rsplit(".", 1)[-1]
        if leaf in fields:
            return ConfigValueError(prefix + leaf, None, "", detail=match[3])
    section = prefix.rstrip(".")
    return InputError(f"config section {section!r}: {message}" if section else message)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def to_dict(config: Any) -> dict[str, Any]:
    """A plain, YAML/JSON-serialisable dict of a config dataclass (tuples become lists)."""
    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value
    return plain(dataclasses.asdict(config))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: the form MLflow params take."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def scalar_metrics(report: dict[str, Any], prefix: str = "", per_label: bool = True
                   ) -> dict[str, float]:
    """The numbers of an evaluation report as MLflow metrics: every scalar entry and (with
    `per_label`) each label's accuracy and macro-F1 as `{prefix}{label}_{score}`."""
    metrics = {f"{prefix}{key}": float(value) for key, value in report.items()
               if isinstance(value, (int, float)) and not isinstance(value, bool)}
    for name, scores in report.get("labels", {}).items() if per_label else ():
        for key in ("accuracy", "macro_f1"):
            metrics[f"{prefix}{name}_{key}"] = float(scores[key])
    return metrics


def _coerce(hint: Any, value: Any, key: str) -> Any:
    """Check `value` against the type hint `hint`, converting only where lossless (int -> float)."""
    origin = get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, key)
            except InputError as err:
                errors.append(str(err))
        raise InputError(errors[0] if len(errors) == 1 else
                         f"config key {key!r}: value {value!r} is not a {_describe(hint)}")
    if origin is Literal:
        choices = get_args(hint)
        if value not in choices:
            raise InputError(f"config key {key!r}: value {value!r} is not one of "
                             f"{', '.join(map(repr, choices))}")
        return value
    if origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            raise InputError(f"config key {key!r}: expected a list ({_describe(hint)}), "
                             f"got {value!r}")
        args = get_args(hint)
        item_hint = args[0] if args else Any
        items = [_coerce(item_hint, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, collections.abc.Mapping):
        if not isinstance(value, dict):
            raise InputError(f"config key {key!r}: expected a mapping, got {_short(value)}")
        _, value_hint = get_args(hint) or (Any, Any)
        return {str(k): _coerce(value_hint, v, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, prefix=key + ".")
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise InputError(f"config key {key!r}: value {value!r} is not a finite number")
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported config type {hint!r} for {key!r}")
    raise InputError(f"config key {key!r}: expected {_describe(hint)}, got {_short(value)}")


def _describe(hint: Any) -> str:
    if get_origin(hint) is Literal:
        return "one of " + ", ".join(map(repr, get_args(hint)))
    if get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))
