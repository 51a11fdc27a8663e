"""Typed configs: dataclasses from YAML files plus `--set dotted.key=value` overrides, validated."""

from __future__ import annotations

import collections.abc
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

from ctrl_ray.errors import InputError

T = TypeVar("T")


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] = ()) -> T:
    """Build `cls` from an optional YAML file, then apply `key.sub=value` overrides in order."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_yaml(path)
    for override in overrides:
        key, value = parse_override(override)
        set_dotted(raw, key, value)
    return from_dict(cls, raw)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping at the top of a YAML file; InputError if missing or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config file not found: {str(path)!r}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise InputError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"config file {str(path)!r}: expected a mapping at the top, got {data!r}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=3` -> ("a.b", 3); the value is parsed as YAML so numbers, booleans and lists work."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise InputError(f"override {text!r}: expected dotted.key=value")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key.strip(), parsed


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set `tree[a][b] = value` for key "a.b", creating intermediate mappings."""
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise InputError(f"config key {key!r}: {part!r} holds {child!r}, not a section")
        node = child
    node[leaf] = value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Instantiate dataclass `cls` from `data`, checking every key and value type."""
    if not isinstance(data, dict):
        raise InputError(f"config key {prefix.rstrip('.') or '<root>'!r}: expected a section, "
                         f"got {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise InputError(f"unknown config key {prefix + unknown[0]!r} "
                         f"(valid keys here: {', '.join(sorted(fields))})")
    kwargs = {name: _coerce(hints[name], value, prefix + name) for name, value in data.items()}
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as err:
        if isinstance(err, InputError):
            raise
        raise InputError(f"config section {prefix.rstrip('.') or '<root>'!r}: {err}") from None
    return obj


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
            raise InputError(f"config key {key!r}: expected a mapping, got {value!r}")
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
    raise InputError(f"config key {key!r}: expected {_describe(hint)}, got {value!r}")


def _describe(hint: Any) -> str:
    if get_origin(hint) is Literal:
        return "one of " + ", ".join(map(repr, get_args(hint)))
    if get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))
