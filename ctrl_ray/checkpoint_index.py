"""Where a run's training checkpoints are and what config each recorded, read without torch, so
that `--resume` is checked before any heavy import (`ctrl_ray.checkpoint` reads the tensors)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ctrl_ray.storage import read_json

STATE_FILE = "state.json"


def latest_checkpoint(checkpoints_dir: str | Path) -> Path | None:
    """The newest complete training checkpoint under `checkpoints_dir` (names sort by step)."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return None
    complete = sorted(p for p in root.iterdir()
                      if not p.name.startswith(".") and (p / STATE_FILE).is_file())
    return complete[-1] if complete else None


def saved_config(checkpoint: str | Path) -> dict[str, Any] | None:
    """The resolved config a training checkpoint recorded (None if it records none)."""
    return read_json(Path(checkpoint) / STATE_FILE, "training state").get("config")
