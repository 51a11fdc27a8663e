"""The ESS per base rollout of the value targets' mass, sum_y p(y | x0, c)^lambda, at several
tilts lambda, as the rule choice measures it at the run's own (`ctrl_ray.rule_choice`: the
value rule's targets on base rollouts of the training distribution, smallest over the digits).
At lambda = 1 a classifier reward's mass is 1; above it, a weak reward's mass rests on the few
rollouts where it is confident (docs/update_rules.md, section 15).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/value_probes/target_mass.py \
        [--tasks ink slant ...] [--tilts 1 2 3 5 10]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))
from rule_choice import DEMO_BASE, TASKS  # noqa: E402

from ctrl_ray.config import load_raw  # noqa: E402
from ctrl_ray.rule_choice import (  # noqa: E402
    base_log_likelihoods,
    mass_ess_per_sample,
    value_config,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--tilts", nargs="+", type=float, default=[1, 2, 3, 5, 10])
    args = parser.parse_args()
    print("| task | " + " | ".join(f"lambda {t:g}" for t in args.tilts) + " |")
    print("|---|" + "---|" * len(args.tilts))
    for task in args.tasks:
        path, extra = TASKS[task]
        raw = load_raw(path, [f"base_model={DEMO_BASE}", *extra])
        raw.pop("mode", None)
        log_likelihoods, contexts, _ = base_log_likelihoods(value_config(raw))
        cells = [min(mass_ess_per_sample(tilt * log_likelihoods, contexts))
                 for tilt in args.tilts]
        print(f"| {task} | " + " | ".join(f"{c:.3f}" for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
