"""Atomic directories and small JSON/safetensors helpers for checkpoints and saved models."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ctrl_ray.errors import InputError


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
