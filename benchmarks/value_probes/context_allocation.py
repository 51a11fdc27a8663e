"""Would base rollouts drawn per context by what its targets need bring the head closer where the
distance lies? On slant the value policies' distance to the optimum grows with how rarely the
base makes the target (docs/update_rules.md, section 20): the head learns h for a (digit,
target) pair from its digit's rollouts, and a digit whose targets are rare gets as many as any.
This probe fits heads like the rule (half the states forward-noised) on the same number of
cached base rollouts (`td_targets.py`), drawn uniformly over digits or with each digit's share
proportional to sum_y -log Z(c, y) (measured on the cache, as the audit measures it before
training), and scores each policy by J* - J on the same fresh rollouts, by rarity too.
`--share-late K` adds an arm with uniform rollouts whose states from index K on (t <= 251 for
K = 14 of 20 steps) read another rollout's digit half the time: late in the chain h hardly
depends on the digit, so the digits that make a target often can teach the ones that rarely do.
`--boost DIGIT...` adds an arm with uniform rollouts plus every cached fit rollout of those
digits: how fast the distance of their rare pairs falls with their own rollouts.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/value_probes/context_allocation.py \
        --task slant [--rollouts 8192] [--count 1638] [--steps 6000] [--share-late 14]
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parent))
from policy_objective import objective  # noqa: E402
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

RARITY_BINS = [(-1.0, 1.0), (-2.5, -1.0), (-30.0, -2.5)]


def context_log_means(log_values: torch.Tensor, contexts: torch.Tensor) -> torch.Tensor:
    """log of the mean of exp(log_values) (N, J) over the rows of each context id 0 .. max,
    (C, J): log Z(c, y) of the rollouts' targets (-inf for a context with no rows)."""
    return torch.stack([torch.logsumexp(log_values[contexts == c], 0)
                        - math.log(max(1, int((contexts == c).sum())))
                        for c in range(int(contexts.max()) + 1)])


def distance_by_rarity(model, reward_fn, config, inputs, best_rows: torch.Tensor) -> dict:
    """The installed head's policy on `inputs`: J* - J overall and by the rows' J* (log Z of
    their pair, in RARITY_BINS), with its KL and E[log p]."""
    row = objective(model.eval(), reward_fn, config, inputs)
    gap = best_rows - row["values"].double()
    return {"distance": float(gap.mean()), "kl": row["kl"],
            "log_likelihood": row["log_likelihood"],
            "by_log_z": {f"{lo:g} to {hi:g}": float(gap[(best_rows > lo) & (best_rows <= hi)]
                                                   .mean()) for lo, hi in RARITY_BINS}}


def rarity_line(scores: dict) -> str:
    """`distance_by_rarity`'s numbers in one printed line."""
    return (f"J* - J {scores['distance']:.3f} (E[log p] {scores['log_likelihood']:.3f}, KL "
            f"{scores['kl']:.2f}); by log Z: "
            + ", ".join(f"{k}: {v:.3f}" for k, v in scores["by_log_z"].items()))


def allocation(data, fit_rows: torch.Tensor, count: int) -> dict[str, torch.Tensor]:
    """`count` fit rows, uniform over contexts, or each context's share proportional to its
    targets' sum_y -log Z(c, y) (Z from the rollouts themselves), in cache order."""
    contexts = data.contexts[fit_rows]
    values = contexts.unique()
    log_z = context_log_means(data.log_targets[fit_rows], contexts)[values]   # (C, J)
    need = (-log_z).clamp(min=0).sum(1)
    out = {}
    for name, share in (("uniform", torch.ones(len(values))), ("by need", need)):
        quota = (share / share.sum() * count).round().long()
        chosen = [fit_rows[contexts == c][:int(q)] for c, q in zip(values, quota, strict=True)]
        out[name] = torch.cat(chosen)
        print(f"{name}: rollouts per context " + ", ".join(
            f"{int(c)}: {len(rows)}" for c, rows in zip(values, chosen, strict=True)), flush=True)
    return out


def main() -> None:
    parser = probe_arguments(__doc__)
    offline_arguments(parser, evaluation=1024)
    parser.add_argument("--share-late", type=int, default=None, metavar="K")
    parser.add_argument("--boost", type=int, nargs="+", default=None, metavar="DIGIT")
    parser.add_argument("--arms", nargs="+", default=["uniform", "by need"])
    args = parser.parse_args()
    data = rollouts_of(args.task, args.rollouts, args.seed)
    held, fit_rows = split(args.rollouts, args.seed)
    model, config, alphas = data.model, data.config.objective, forward_alphas(data)
    inputs, best_rows = fresh_rollouts(model, config, args.task, args.evaluation)
    print(f"{args.task}: J* {best_rows.mean():.3f} on {args.evaluation} fresh rollouts",
          flush=True)
    results = []
    arms = allocation(data, fit_rows, args.count)
    if args.share_late is not None:
        arms[f"uniform, digits shared from state {args.share_late}"] = arms["uniform"]
    if args.boost is not None:
        boosted = fit_rows[torch.isin(data.contexts[fit_rows], torch.tensor(args.boost))]
        arms[f"uniform, every rollout of {args.boost}"] = torch.cat(
            [arms["uniform"], boosted[~torch.isin(boosted, arms["uniform"])]])
    for name, rows in arms.items():
        if name not in args.arms and "shared" not in name and "every" not in name:
            continue
        torch.manual_seed(args.seed)
        head = SoftValueNet(model.value_head.spec)
        shared = (args.share_late, 0.5) if "shared" in name else None
        loss, kept, _ = fit(head, data.states, data.log_targets, data.head_contexts,
                            data.timesteps, rows, held[:args.heldout], args.steps, args.seed,
                            forward_alphas=alphas, forward_fraction=0.5,
                            shared_contexts=shared)
        model.value_head = head
        scores = distance_by_rarity(model, data.setup.reward_fn, config, inputs, best_rows)
        results.append({"allocation": name, "heldout_loss": loss, "kept": kept, **scores})
        print(f"{name}: held-out {loss:.4f} (kept {kept}); {rarity_line(scores)}", flush=True)
    out = Path("benchmarks/results") / f"{args.name or 'context_allocation_' + args.task}.json"
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
