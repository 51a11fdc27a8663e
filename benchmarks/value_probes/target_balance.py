"""Does the value loss under-weight the rare targets? The head's cross-entropy weights each
target y by its share of the mass, p(y | x0)^lambda: a (digit, target) pair the base reaches once
in thousands of rollouts carries a thousandth of the loss, so its log q, which the policy steers
by, is fit by what is left over (docs/update_rules.md, section 20: the distance lies on those
pairs). Re-weighting targets and predictions alike by w(c, y) = Z(c, y)^-power (Z the pair's
mean target on the fit rollouts; normalised so that sum_y w Z keeps its size) leaves the
minimiser unchanged and gives every pair a share of the loss by the power. Heads fit like the
rule (half the states forward-noised) on the first `--count` cached base rollouts, one per
power, each scored by J* - J on the same fresh rollouts, by rarity too. `--draws K` fits each
power K times (head initialisation and fit draws from seed + 1000 k; the rollouts' split stays):
two fits of one setting differ by a few hundredths of a nat.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/value_probes/target_balance.py \
        --task slant [--rollouts 8192] [--count 1638] [--steps 6000] [--powers 0 0.5 1] [--draws 1]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parent))
from context_allocation import context_log_means, distance_by_rarity, rarity_line  # noqa: E402
from policy_targets import fresh_rollouts  # noqa: E402
from td_targets import (  # noqa: E402
    fit,
    forward_alphas,
    offline_arguments,
    probe_arguments,
    rollouts_of,
    split,
)

from ctrl_ray.models.soft_value import SoftValueNet  # noqa: E402


def balance_log_weights(log_targets: torch.Tensor, contexts: torch.Tensor,
                        power: float) -> torch.Tensor:
    """Per row, log w(c, y) = -power log Z(c, y), Z(c, y) the mean of exp(log_targets) over the
    given rows of the row's context, shifted per context so that sum_y w Z = sum_y Z: each
    (context, target) pair then weighs in the loss by Z^(1 - power) rather than Z."""
    groups = torch.unique(contexts, return_inverse=True)[1]
    log_z = context_log_means(log_targets, groups).clamp(min=-50.0)
    log_w = -power * log_z
    log_w = log_w + (torch.logsumexp(log_z, 1) - torch.logsumexp(log_z + log_w, 1))[:, None]
    return log_w[groups]


def context_balance(data, rows: torch.Tensor, power: float) -> torch.Tensor:
    """`balance_log_weights` from the fit rollouts `rows`, for every cached rollout by its context
    (held-out ones included)."""
    contexts = data.contexts[rows]
    table = torch.zeros(int(data.contexts.max()) + 1, data.log_targets.shape[1],
                        dtype=data.log_targets.dtype)
    table[contexts] = balance_log_weights(data.log_targets[rows], contexts, power)
    return table[data.contexts]


def main() -> None:
    parser = probe_arguments(__doc__)
    offline_arguments(parser, evaluation=1024)
    parser.add_argument("--powers", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    parser.add_argument("--draws", type=int, default=1)
    parser.add_argument("--first-draw", type=int, default=0)
    args = parser.parse_args()
    data = rollouts_of(args.task, args.rollouts, args.seed)
    held, fit_rows = split(args.rollouts, args.seed)
    rows = fit_rows[:args.count]
    model, config, alphas = data.model, data.config.objective, forward_alphas(data)
    log_z = context_log_means(data.log_targets[rows], data.contexts[rows])
    inputs, best_rows = fresh_rollouts(model, config, args.task, args.evaluation)
    print(f"{args.task}: J* {best_rows.mean():.3f} on {args.evaluation} fresh rollouts; "
          f"log Z(c, y) from {len(rows)} fit rollouts, {log_z.min():.2f} to {log_z.max():.2f}",
          flush=True)
    results = []
    for draw in range(args.first_draw, args.first_draw + args.draws):
        seed = args.seed + 1000 * draw
        for power in args.powers:
            torch.manual_seed(seed)
            head = SoftValueNet(model.value_head.spec)
            weights = context_balance(data, rows, power) if power else None
            loss, kept, _ = fit(head, data.states, data.log_targets, data.head_contexts,
                                data.timesteps, rows, held[:args.heldout], args.steps, seed,
                                forward_alphas=alphas, forward_fraction=0.5,
                                target_log_weights=weights)
            model.value_head = head
            scores = distance_by_rarity(model, data.setup.reward_fn, config, inputs, best_rows)
            results.append({"power": power, "draw": draw, "heldout_loss": loss, "kept": kept,
                            **scores})
            print(f"power {power:g}, draw {draw}: held-out {loss:.4f} (kept {kept}); "
                  f"{rarity_line(scores)}", flush=True)
    out = Path("benchmarks/results") / f"{args.name or 'target_balance_' + args.task}.json"
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
