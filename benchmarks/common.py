"""Shared helpers of the benchmark scripts: where results go and how they are written."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("results")
# The digits testbed's artifacts, as the demo and the README commands build them.
TESTBED = {"base": "outputs/base-digits16", "judge": "outputs/judge-digits16",
           "dataset": "data/digits16.parquet", "reward": "outputs/reward-compress",
           "config": "configs/ctrl_digits_compress.yaml"}


def testbed_parser(doc: str | None, *inputs: str, **defaults: str) -> argparse.ArgumentParser:
    """A parser with the testbed inputs named (``--base``, ``--judge`` ...) at their defaults
    (``TESTBED``, or as given)."""
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in inputs:
        parser.add_argument(f"--{name}", default=defaults.get(name, TESTBED.get(name)))
    return parser


def choose_within_kl(table: dict[int, tuple[float, float]], optimum_kl: float,
                     budget: float) -> int:
    """The setting (key of `table`: setting -> (score, KL), on validation seeds) with the most
    score among those within `budget` x the optimum's KL, else the one with the least KL."""
    within = [key for key, (_, kl) in table.items() if kl <= budget * optimum_kl]
    if within:
        return max(within, key=lambda key: table[key][0])
    return min(table, key=lambda key: table[key][1])


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


def publish(name: str, data: dict, lines: list[str]) -> None:
    """Write `results/NAME.json` and `.md` and print the Markdown."""
    json_path, md_path = write_results(name, data, "\n".join(lines))
    print("\n".join(lines))
    print(f"\nwrote {json_path} and {md_path}")
