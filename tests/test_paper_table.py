"""benchmarks/paper_table.py end to end: its --quick mode on the session's tiny 8x8 model, one
process per seed, and --combine of the two runs into one results page."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "paper_table.py"
# The smallest run that still goes through every method and experiment.
SHRINK = ["--n", "100", "--set", "ctrl:iterations=4", "--set", "cfg:training.steps=20",
          "--set", "cg:training.steps=20", "--set", "reward:training.epochs=2"]


def paper_table(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(SCRIPT), *args], check=True, env=env, timeout=900,
                   capture_output=True, text=True)


def test_quick_runs_per_seed_and_combines(tiny_base, tiny_judge, digits8, tmp_path):
    inputs = ["--quick", "--base-model", str(tiny_base.model_dir), "--judge", str(tiny_judge),
              "--dataset", str(digits8), *SHRINK]
    for seed in (0, 1):
        paper_table(*inputs, "--seeds", str(seed), "--out", str(tmp_path / f"s{seed}"),
                    "--json", str(tmp_path / f"s{seed}.json"))
    docs = tmp_path / "docs"
    paper_table("--combine", str(tmp_path / "s0.json"), str(tmp_path / "s1.json"),
                "--json", str(tmp_path / "combined.json"), "--docs", str(docs))

    combined = json.loads((tmp_path / "combined.json").read_text())
    assert combined["budget"]["seeds"] == [0, 1]
    for method in ("base", "ctrl", "cfg", "cg", "dps"):
        reports = combined["single"][method]["100"]
        assert len(reports) == 2
        for report in reports:
            assert 0.0 <= report["accuracy"] <= 1.0 and 0.0 <= report["macro_f1"] <= 1.0
            assert report["mean_kl"] >= 0.0
    assert combined["single"]["base"]["100"][0]["mean_kl"] == 0.0
    assert combined["single"]["ctrl"]["100"][0]["mean_kl"] > 0.0
    assert {len(reports) for reports in combined["multitask"].values()} == {2}
    assert {len(reports) for reports in combined["guidance"].values()} == {2}
    # Each seed's run keeps its reports: a second run over the same --out reuses them.
    assert (tmp_path / "s0" / "single" / "n100-s0" / "ctrl" / "report.json").is_file()

    page = (docs / "results.md").read_text()
    for heading in ("## 1. Single task", "## 2. Multi-task", "## 3. Guidance level"):
        assert heading in page
    assert page.count("| 100 |") == 6  # the five methods and the exact optimum of CTRL's objective
    assert "**exact optimum** (gamma/alpha 10)" in page
    assert "seeds [0, 1]" in page
    for figure in ("macro_f1_vs_n.png", "guidance_per_class.png"):
        assert (docs / figure).stat().st_size > 0
