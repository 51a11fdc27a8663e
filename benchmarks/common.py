"""Shared helpers of the benchmark scripts: where results go and how they are written."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("results")


def machine() -> dict:
    """What the numbers were measured on."""
    return {
        "cpu_count": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d"),
        "load_average_1min": os.getloadavg()[0],
    }


def write_results(name: str, data: dict, markdown: str) -> tuple[Path, Path]:
    """Write `results/NAME.json` and `results/NAME.md`."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS / f"{name}.json"
    md_path = RESULTS / f"{name}.md"
    json_path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    md_path.write_text(markdown.rstrip() + "\n")
    return json_path, md_path
