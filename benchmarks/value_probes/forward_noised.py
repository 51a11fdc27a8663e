"""Can the forward process multiply the head's regression data? Under a well-trained base the
pairs (x_t, x_0) of its reverse chain and those of x_0 ~ p_pre noised by q(x_t | x_0) have the
same joint, so h_t(x) = E[p(y | x_0)^lambda | x_t = x] can also be fitted on base samples noised
afresh at every step, as a noisy classifier is: each rollout then yields new states every
epoch instead of its S fixed ones. This probe fits heads on the first N cached base rollouts
with a fraction of every batch's states forward-noised from the rollout's x_0 (0 = the rule's
chain states), held-out loss on the chain's states, and scores each policy by CTRL's objective
on the same fresh rollouts (J* - J, `policy_targets.score_head`).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/value_probes/forward_noised.py \
        [--task ink] [--rollouts 8192] [--counts 614 1638] [--fractions 0.5 1] [--steps 6000] \
        [--chain-states K]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from policy_targets import evaluation_arguments, evaluation_setup, score_head  # noqa: E402
from td_targets import forward_alphas, probe_arguments  # noqa: E402


def main() -> None:
    parser = probe_arguments(__doc__)
    parser.add_argument("--counts", type=int, nargs="+", default=[614, 1638])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.5, 1.0])
    parser.add_argument("--heldout", type=int, default=512,
                        help="held-out rollouts for the fit's early stopping")
    parser.add_argument("--chain-states", type=int, default=0,
                        help="the first this many states (x_T, x_T-1, ...) never forward-noised")
    evaluation_arguments(parser)
    args = parser.parse_args()
    data, held, fit_rows, evaluation, best_objective = evaluation_setup(args)
    held = held[: args.heldout]
    alphas = forward_alphas(data)
    for count in args.counts:
        for fraction in args.fractions:
            name = f"{count} base rollouts, {fraction:g} forward-noised"
            if args.chain_states:   # the first states (x_T ...) only from the chain
                fraction = torch.full((len(alphas),), fraction)
                fraction[:args.chain_states] = 0
                name += f", the first {args.chain_states} states the chain's"
            score_head(name, data, fit_rows[:count], held, args, evaluation, best_objective,
                       data.states, data.log_targets, data.head_contexts,
                       forward_alphas=alphas, forward_fraction=fraction)


if __name__ == "__main__":
    main()
