"""One run per output folder: an exclusive `flock` on ``OUTPUT_DIR/.ctrl-ray.lock``, held by
the driver process for the length of a run and released by the OS when it exits or crashes.

The lock file is removed when the run ends; a run that finds the file it locked already
unlinked (a holder was just finishing) locks the new one instead, so two runs never both hold
the folder.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ctrl_ray.errors import InputError

LOCK_FILE = ".ctrl-ray.lock"


@contextmanager
def output_dir_lock(directory: str | os.PathLike, key: str = "output_dir") -> Iterator[Path]:
    """Hold ``directory`` for this process (created if missing; removed again at the end if
    the run left it empty); an InputError naming it if another run holds it."""
    directory = Path(directory)
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    descriptor = _acquire(path, directory, key)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)
        os.close(descriptor)
        if created and not any(directory.iterdir()):
            directory.rmdir()


def check_unlocked(directory: str | os.PathLike, key: str = "output_dir") -> None:
    """An InputError naming ``directory`` if a run holds it now (the preflight's early answer;
    the run itself takes the lock with `output_dir_lock`)."""
    path = Path(directory) / LOCK_FILE
    if not path.is_file():
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = Path(path).read_text(errors="replace").strip() or "unknown"
        raise InputError(_in_use(directory, holder, key)) from None
    finally:
        os.close(descriptor)


def _in_use(directory: str | os.PathLike, holder: str, key: str) -> str:
    return (f"{key}: {str(directory)!r} is in use by another run (pid {holder}); wait for it "
            f"to end or choose another {key}")


def _acquire(path: Path, directory: Path, key: str) -> int:
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(descriptor, 32).decode(errors="replace").strip() or "unknown"
            os.close(descriptor)
            raise InputError(_in_use(directory, holder, key)) from None
        try:
            same_file = os.fstat(descriptor).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            os.ftruncate(descriptor, 0)
            os.write(descriptor, f"{os.getpid()}\n".encode())
            return descriptor
        os.close(descriptor)   # the holder unlinked it while ending: lock the new file
