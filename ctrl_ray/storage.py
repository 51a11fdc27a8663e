"""Atomic directories and small JSON/safetensors helpers for checkpoints and saved models.

`save_artifact` / `load_artifact` are the one save format of ctrl-ray's own artifacts
(classifiers, rewards, judges, noisy classifiers, policies, base models): a folder with an
index JSON that names its format, a safetensors file of its tensors (if any) and whatever else
the kind needs (a base model's diffusers folders, a training checkpoint's optimizer state),
written atomically.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ctrl_ray.errors import InputError

WEIGHTS_FILE = "model.safetensors"


def atomic_directory(final: str | Path) -> _AtomicDirectory:
    """Context manager yielding a temp dir that replaces `final` only if the block succeeds."""
    return _AtomicDirectory(Path(final))


class _AtomicDirectory:
    def __init__(self, final: Path):
        self.final = final

    def __enter__(self) -> Path:
        if os.path.lexists(self.final) and not self.final.is_dir():
            raise InputError(f"{str(self.final)!r} is a file, not a folder: not replacing it")
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.", dir=self.final.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if os.path.lexists(self.final) and not self.final.is_dir():
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise InputError(f"{str(self.final)!r} is a file, not a folder: not replacing it")
        if self.final.exists():
            trash = self.final.with_name(f".{self.final.name}.old")
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(self.final, trash)
            os.replace(self.tmp, self.final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(self.tmp, self.final)


def write_json(path: Path, data: Any) -> None:
    """Write `data` as indented, key-sorted JSON: to a temporary sibling, then moved into place
    (a failure, even while serialising, leaves the old file as it was)."""
    path = Path(path)
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would differ from a plainly written file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path, what: str) -> Any:
    """Read JSON from `path`; InputError naming `what` if missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} not found: {str(path)!r}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{what} {str(path)!r} is not valid JSON: {err}") from None


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def save_artifact(directory: str | os.PathLike, fmt: str, document: Mapping[str, Any],
                  tensors: Mapping[str, Any] | None = None, *, index: str = "config.json",
                  weights: str = WEIGHTS_FILE,
                  write: Callable[[Path], Any] | None = None) -> Path:
    """Write an artifact folder atomically: `index` holds {"format": fmt, **document}, the
    tensors (if any) go to `weights`, and `write(staging)` adds the kind's other files."""
    try:
        text = json.dumps({"format": fmt, **document}, indent=2, default=_json_default,
                          allow_nan=False)
    except (TypeError, ValueError) as error:
        raise InputError(f"{fmt}: metadata is not JSON-serialisable ({error})") from error
    with atomic_directory(directory) as staging:
        if tensors is not None:
            from safetensors.torch import save_file

            save_file({name: tensor.detach().cpu().contiguous()
                       for name, tensor in tensors.items()},
                      str(staging / weights), metadata={"format": fmt})
        (staging / index).write_text(text)
        if write is not None:
            write(staging)
    return Path(directory)


def load_artifact(directory: str | os.PathLike, fmt: str, what: str, *,
                  index: str = "config.json", weights: str = WEIGHTS_FILE, tensors: bool = True,
                  unnamed_ok: bool = False) -> tuple[dict, dict | None]:
    """(document without its format key, tensors) of a folder `save_artifact` wrote in format
    `fmt`; an InputError naming `what` when the folder, its index or its weights are missing,
    malformed or of another format. `tensors=False` reads the index only; `unnamed_ok` accepts
    an index without a format key (written before the kind's format was named)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"{what} directory: {str(directory)!r} does not exist")
    index_path = directory / index
    if not index_path.is_file():
        raise InputError(f"{what} directory: {str(index_path)!r} is missing")
    try:
        document = json.loads(index_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{str(index_path)!r}: not valid JSON ({error})") from error
    if not isinstance(document, dict) or not (
            document.get("format") == fmt or (unnamed_ok and "format" not in document)):
        raise InputError(f"{str(index_path)!r}: format is not {fmt!r}: not a {what}")
    document = {key: value for key, value in document.items() if key != "format"}
    if not tensors:
        return document, None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights_path = directory / weights
    if not weights_path.is_file():
        raise InputError(f"{what} weights: {str(weights_path)!r} is missing")
    try:
        return document, load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise InputError(f"{what} weights: {str(weights_path)!r} is corrupted ({error})") from error
