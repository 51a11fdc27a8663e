"""Do tempered targets reach the rare pairs? h = E[p(y | x0)^lambda | x_t] rests, for a
(digit, target) pair the base rarely makes, on the few rollouts that hit it (section 20: the
distance to the optimum lies there). h_f = E[p^(f lambda) | x_t], f < 1, gives near misses a
larger share of the target, so the few hits weigh less: less variance, but the policy then steers
by (1 / f) log h_f, which is not log h (by the power-mean inequality h_f^(1/f) <= h), a bias.
Heads fit like the rule (half the states forward-noised) on the first `--count` cached base
rollouts, one per fraction f, the policy steering by log h_f / f (the x_T tilt, the tilted
step's weights and its gradient alike), each scored by J* - J on the same fresh rollouts, by
rarity too, at step scales 1 and 1.35.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/value_probes/tempered_targets.py \
        --task slant [--rollouts 8192] [--count 1638] [--steps 6000] [--fractions 1 0.5 0.25]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parent))
from context_allocation import distance_by_rarity, rarity_line  # noqa: E402
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


class TemperedHead(SoftValueNet):
    """A head fit to f lambda log p whose log h is its own divided by f (f = 1: the rule's)."""

    def __init__(self, spec, fraction: float):
        super().__init__(spec)
        self.fraction = fraction

    def log_value(self, x, t, contexts, labels):
        log_value, active = super().log_value(x, t, contexts, labels)
        return log_value / self.fraction, active


def main() -> None:
    parser = probe_arguments(__doc__)
    offline_arguments(parser, evaluation=1024)
    parser.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.35])
    args = parser.parse_args()
    data = rollouts_of(args.task, args.rollouts, args.seed)
    held, fit_rows = split(args.rollouts, args.seed)
    rows = fit_rows[:args.count]
    model, config, alphas = data.model, data.config.objective, forward_alphas(data)
    inputs, best_rows = fresh_rollouts(model, config, args.task, args.evaluation)
    print(f"{args.task}: J* {best_rows.mean():.3f} on {args.evaluation} fresh rollouts",
          flush=True)
    results = []
    for fraction in args.fractions:
        torch.manual_seed(args.seed)
        head = TemperedHead(model.value_head.spec, fraction)
        loss, kept, _ = fit(head, data.states, data.log_targets * fraction, data.head_contexts,
                            data.timesteps, rows, held[:args.heldout], args.steps, args.seed,
                            forward_alphas=alphas, forward_fraction=0.5)
        model.value_head = head
        for scale in args.scales:
            head.spec.step_scale = scale
            scores = distance_by_rarity(model, data.setup.reward_fn, config, inputs, best_rows)
            results.append({"fraction": fraction, "step_scale": scale, "heldout_loss": loss,
                            "kept": kept, **scores})
            print(f"f {fraction:g}, step x{scale:g}: held-out {loss:.4f} (kept {kept}); "
                  f"{rarity_line(scores)}", flush=True)
        head.spec.step_scale = 1.0
    out = Path("benchmarks/results") / f"{args.name or 'tempered_targets_' + args.task}.json"
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
