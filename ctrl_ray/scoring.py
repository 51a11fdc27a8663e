"""Who labels a generated sample's y: the built-in oracle, a user's exact labeller, or a judge.

Every label's entry in a policy's `label_info` may name its scorer:

- `{"kind": "oracle"}`: the exact functions of `ctrl_ray.data.oracles` (built-in labels);
- `{"kind": "labeller", "function": "module:function"}` (or `/path/file.py:function`): the
  user's own exact labeller, a function from a float32 array (N, C, H, W) in [-1, 1] to the
  classes (N,), as integers or class names;
- `{"kind": "judge", "path": DIR}`: a `LabelJudge` trained on the pair set's held-out rows
  only, saved inside the reward directory by `ctrl-ray reward train`.

Without an entry a built-in label is scored by its oracle. `label_images_for` is the one call
for every consumer (evaluation, the exact-optimum audit, tuning): images in, classes out.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ctrl_ray.data import oracles
from ctrl_ray.errors import InputError

SCORER_KINDS = ("oracle", "labeller", "judge")


@dataclass
class Scorer:
    """A label's scorer: `kind`, a one-line `description`, and `label(images) -> (N,) int64`."""

    kind: str
    description: str
    label: Callable[[Any], np.ndarray]


def parse_scorer(text: str, label_name: str) -> dict[str, str]:
    """A scorer entry from text: "oracle", "module:function", "file.py:function", or a judge
    directory (a path to a directory)."""
    text = str(text).strip()
    if text == "oracle":
        return {"kind": "oracle"}
    if Path(text).is_dir():
        return {"kind": "judge", "path": str(Path(text).resolve())}
    module, sep, function = text.rpartition(":")
    if sep and module and function.isidentifier():
        if module.endswith(".py"):
            if not Path(module).is_file():
                raise InputError(f"scorer of {label_name!r}: labeller file {module!r} not found")
            module = str(Path(module).resolve())
        return {"kind": "labeller", "function": f"{module}:{function}"}
    raise InputError(f"scorer of {label_name!r}: expected 'oracle', 'module:function', "
                     f"'file.py:function' or a judge directory, got {text!r}")


@lru_cache(maxsize=32)
def load_function(spec: str) -> Callable[[Any], Any]:
    """Import `module:function` (or `/path/file.py:function`); InputError if it cannot be."""
    module_name, _, name = spec.rpartition(":")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise InputError(f"labeller {spec!r}: file {module_name!r} not found")
            unique = f"ctrl_ray_labeller_{abs(hash(str(path.resolve())))}"
            module_spec = importlib.util.spec_from_file_location(unique, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError:
                # `ctrl-ray` is a console script: let a module next to the user's config load.
                if "" in sys.path or str(Path.cwd()) in sys.path:
                    raise
                sys.path.append(str(Path.cwd()))
                module = importlib.import_module(module_name)
    except InputError:
        raise
    except Exception as error:  # the user's module failed to import
        raise InputError(f"labeller {spec!r}: cannot import {module_name!r} "
                         f"({type(error).__name__}: {error})") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise InputError(f"labeller {spec!r}: {module_name!r} has no function {name!r}")
    return function


def _as_classes(values: Any, count: int, num_classes: int, class_names: list[str],
                who: str) -> np.ndarray:
    """A labeller's output as int64 classes (N,), names mapped through `class_names`."""
    if hasattr(values, "detach"):  # a torch tensor (torch is not imported to check inputs)
        values = values.detach().cpu().numpy()
    try:
        array = np.asarray(values)
    except (TypeError, ValueError) as error:
        raise InputError(f"{who}: returned {type(values).__name__} that is not an array "
                         f"({error})") from None
    if array.shape != (count,):
        raise InputError(f"{who}: returned shape {array.shape} for {count} images, expected "
                         f"({count},)")
    if array.dtype.kind in "US" or array.dtype == object:
        lookup = {name: index for index, name in enumerate(class_names)}
        unknown = [value for value in array.tolist() if str(value) not in lookup]
        if unknown:
            raise InputError(f"{who}: returned {unknown[0]!r}, not a class name "
                             f"{class_names or list(range(num_classes))}")
        return np.asarray([lookup[str(value)] for value in array.tolist()], np.int64)
    if array.dtype.kind not in "iu":
        raise InputError(f"{who}: returned dtype {array.dtype}, expected integer classes or "
                         f"class names")
    outside = (array < 0) | (array >= num_classes)
    if outside.any():
        raise InputError(f"{who}: returned class {int(array[np.argmax(outside)])}, expected "
                         f"0..{num_classes - 1}")
    return array.astype(np.int64)


def _images_array(images: Any) -> np.ndarray:
    if hasattr(images, "detach"):  # a torch tensor
        images = images.detach().cpu().float().numpy()
    array = np.asarray(images, dtype=np.float32)
    if array.ndim == 3:
        array = array[:, None]
    return array


def get_scorer(label_name: str, info: Mapping[str, Any],
               override: str | None = None) -> Scorer:
    """The scorer of `label_name` given its `label_info` entry (and an optional override from
    `evaluation.scorers`): what labels its generated samples."""
    entry = parse_scorer(override, label_name) if override else info.get("scorer")
    num_classes = int(info["num_classes"])
    class_names = list(info.get("class_names") or [])
    if entry is None:
        if label_name in oracles.ORACLES and info.get("edges"):
            entry = {"kind": "oracle"}
        else:
            raise InputError(
                f"label {label_name!r} has no built-in oracle and no judge or labeller; train "
                f"its reward from a pair set with held-out rows (ctrl-ray data import), or set "
                f"evaluation.scorers.{label_name}=module:function (or a judge directory)")
    kind = entry.get("kind") if isinstance(entry, Mapping) else None
    if kind == "oracle":
        if label_name not in oracles.ORACLES or not info.get("edges"):
            raise InputError(f"label {label_name!r}: no built-in oracle (built-in labels are "
                             f"{sorted(oracles.ORACLES)})")
        edges = info["edges"]

        def oracle(images: Any) -> np.ndarray:
            gray = _images_array(images)
            if gray.shape[1] == 3:  # the oracles read grayscale: RGB is seen as its luma
                gray = np.tensordot(np.asarray([0.299, 0.587, 0.114], np.float32), gray,
                                    axes=([0], [1]))[:, None]
            return oracles.label_images(gray, label_name, edges)
        return Scorer("oracle", f"oracle {oracles.ORACLES[label_name].attribute}", oracle)
    if kind == "labeller":
        spec = str(entry.get("function", ""))
        function = load_function(spec)
        who = f"labeller {spec}"

        def labeller(images: Any) -> np.ndarray:
            array = _images_array(images)
            try:
                values = function(array)
            except Exception as error:  # the user's function: reported as bad input, one line
                raise InputError(f"{who}: raised {type(error).__name__}: {error}") from None
            return _as_classes(values, len(array), num_classes, class_names, who)
        return Scorer("labeller", f"labeller {spec}", labeller)
    if kind == "judge":
        from ctrl_ray.models.judge import LabelJudge

        path = str(entry.get("path", ""))
        if not Path(path).is_dir():
            raise InputError(f"label {label_name!r}: its judge directory {path!r} is missing; "
                             f"set evaluation.scorers.{label_name}=DIR (the reward's judge/) or "
                             f"a module:function labeller")
        judge = LabelJudge.load(path)
        if judge.num_classes != num_classes:
            raise InputError(f"judge {path!r} predicts {judge.num_classes} classes, label "
                             f"{label_name!r} has {num_classes}")
        accuracy = judge.meta.get("train_rows_accuracy")
        note = f" (accuracy {accuracy:.3f} on the reward's train rows)" if accuracy is not None \
            else ""
        return Scorer("judge", f"held-out judge {path}{note}", judge.predict)
    raise InputError(f"label {label_name!r}: unknown scorer {entry!r}; kinds are "
                     f"{list(SCORER_KINDS)}")


def label_images_for(images: Any, label_name: str, info: Mapping[str, Any],
                     override: str | None = None) -> np.ndarray:
    """Classes (N,) of `images` ((N, C, H, W) in [-1, 1], numpy or torch) for one label, by
    its oracle, labeller or judge (see `get_scorer`)."""
    return get_scorer(label_name, info, override).label(images)
