"""How far from the optimum is the value policy, as a function of the base rollouts its head
is fit on? Heads fit on the first N of the cached base rollouts' fit rows (same held-out rows,
steps and seed), each scored by CTRL's objective on the same fresh rollouts: J* - J is the
policy's distance to the exact optimum in nats (`policy_targets.score_head`).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/value_probes/head_rollouts.py \
        [--task ink] [--rollouts 8192] [--counts 614 1638 3276 6553] [--steps 6000]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from policy_targets import evaluation_arguments, evaluation_setup, score_head  # noqa: E402
from td_targets import probe_arguments  # noqa: E402


def main() -> None:
    parser = probe_arguments(__doc__)
    parser.add_argument("--counts", type=int, nargs="+", default=[614, 1638, 3276, 6553])
    parser.add_argument("--heldout", type=int, default=512,
                        help="held-out rollouts for the fit's early stopping")
    evaluation_arguments(parser)
    args = parser.parse_args()
    data, held, fit_rows, evaluation, best_objective = evaluation_setup(args)
    held = held[: args.heldout]   # the check's cost grows with it, not the comparison
    for count in args.counts:
        score_head(f"{count} base rollouts", data, fit_rows[:count], held, args, evaluation,
                   best_objective, data.states, data.log_targets, data.head_contexts)


if __name__ == "__main__":
    main()
