"""benchmarks/paper_full.py: a baseline's frontier is read at the default's KL once per training
seed, and the cell is their mean with a t-interval."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
from paper_full import _baseline  # noqa: E402


def run(seed, scale, kl, score):
    return {"kind": "cg", "seed": seed, "guidance_scale": scale, "kl": kl, "score": score}


def test_each_seed_is_read_at_the_kl_then_averaged():
    runs = [run(None, 1.0, 1.0, 0.30), run(None, 3.0, 3.0, 0.50),   # before seeds: seed 0
            run(1, 1.0, 1.0, 0.40), run(1, 3.0, 9.0, 0.80)]
    entry = _baseline("cg", runs, base=0.25, kl=2.0)
    mean, half = entry["at_kl"]
    # seed 0: 0.30 + (0.50 - 0.30) / 2 = 0.40; seed 1: 0.40 + (0.80 - 0.40) / 8 = 0.45; the
    # mean frontier (1, 0.35), (6, 0.65) would read 0.41 instead
    assert mean == pytest.approx(0.425)
    assert half == pytest.approx(12.706 * 0.025, rel=1e-3)   # t(0.975, 1) s / sqrt(2)
    assert entry["seeds"] == [0, 1]
    assert entry["points"] == [pytest.approx((1.0, 0.35)), pytest.approx((6.0, 0.65))]


def test_one_seed_has_no_interval_and_a_far_frontier_no_reading():
    entry = _baseline("dps", [run(None, 1.0, 0.5, 0.30), run(None, 3.0, 3.0, 0.50)],
                      base=0.25, kl=1.0)
    assert entry["at_kl"][0] == pytest.approx(0.30 + 0.20 * 0.5 / 2.5)
    assert math.isnan(entry["at_kl"][1])
    far = _baseline("cfg", [run(None, 1.0, 47.0, 0.24)], base=0.25, kl=2.0)
    assert far["at_kl"] is None and far["nearest"] == {"kl": 47.0, "score": 0.24}
    beyond = _baseline("cg", [run(None, 1.0, 0.5, 0.30)], base=0.25, kl=2.0)   # past its end
    assert beyond["at_kl"] is None
