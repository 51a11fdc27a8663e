"""Would the policy's rollouts teach the head the rare pairs with one step's importance weight?

The value policies are furthest from the optimum on the (digit, target) pairs the base rarely
makes (docs/update_rules.md, section 20). The policy reaches them, but section 17's policy
rollouts entered the regression with their whole path's weight after x_k (an effective fraction
of 0.04 early in the chain), and section 21's rollouts restarted under the base reached the
rare targets too seldom after the restart. The soft value also satisfies h_k(x) = E_pre[h_{k+1}
(x_{k+1}) | x_k = x]: from a policy rollout, the target w_k h_{k+1}(x_{k+1}), w_k = p_pre / pi of
that one step, is unbiased for h_k given h_{k+1}, and its weight varies as one step's KL (a
twentieth of the path's). At the last step h is the reward itself, exactly, wherever the policy
ended; the head's own values carry it back along the states the policy visits
(`td_targets.policy_returns`, TD(lambda) with per-decision weights).

This probe fits a head like the rule (half the states forward-noised) on `--count` cached base
rollouts, steers with it, draws `--policy-rollouts` policy rollouts with each step's log ratio,
refits a fresh head on the base rollouts (Monte Carlo targets) and the policy's (TD targets at
each `--td`, their states from the chain only), and scores every head by J* - J on the same
fresh rollouts, by rarity (log Z) too; the control head gets as many more base rollouts.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/value_probes/policy_td.py \
        --task slant --rollouts 8192 --steps 6000 [--td 0 0.5] [--policy-rollouts 1024]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parent))
from context_allocation import distance_by_rarity, rarity_line  # noqa: E402
from policy_targets import fresh_rollouts, policy_rollouts  # noqa: E402
from td_targets import (  # noqa: E402
    fit,
    forward_alphas,
    offline_arguments,
    probe_arguments,
    rollouts_of,
    split,
)

from ctrl_ray.models.soft_value import SoftValueNet  # noqa: E402


def main() -> None:
    parser = probe_arguments(__doc__)
    offline_arguments(parser, evaluation=1024)
    parser.add_argument("--policy-rollouts", type=int, default=1024)
    parser.add_argument("--td", type=float, nargs="+", default=[0.0, 0.5])
    parser.add_argument("--refresh", type=int, default=100)
    parser.add_argument("--no-control", action="store_true",
                        help="skip the control head (as many more base rollouts)")
    parser.add_argument("--forward-fraction", type=float, default=0.5,
                        help="the base rollouts' states drawn by the forward process (the rule's)")
    args = parser.parse_args()
    data = rollouts_of(args.task, args.rollouts, args.seed)
    held, fit_rows = split(args.rollouts, args.seed)
    held = held[: args.heldout]
    model, config, alphas = data.model, data.config.objective, forward_alphas(data)
    inputs, best_rows = fresh_rollouts(model, config, args.task, args.evaluation)
    print(f"{args.task}: J* {best_rows.mean():.3f} on {args.evaluation} fresh rollouts",
          flush=True)

    def score(name: str, states, log_targets, head_contexts, rows, policy_td=None) -> dict:
        torch.manual_seed(args.seed)
        head = SoftValueNet(model.value_head.spec)
        start = time.time()
        loss, kept, _ = fit(head, states, log_targets, head_contexts, data.timesteps, rows, held,
                            args.steps, args.seed, refresh=args.refresh, forward_alphas=alphas,
                            forward_fraction=args.forward_fraction, policy_td=policy_td)
        model.value_head = head
        scores = distance_by_rarity(model, data.setup.reward_fn, config, inputs, best_rows)
        print(f"{name}: {len(rows)} rollouts, held-out {loss:.4f} (kept {kept}; "
              f"{time.time() - start:.0f} s); {rarity_line(scores)}", flush=True)
        return {"head": name, "rollouts": len(rows), "heldout_loss": loss, "kept": kept,
                **scores}

    base_rows = fit_rows[: args.count]
    results = [] if args.no_control else [
        score("base (control)", data.states, data.log_targets, data.head_contexts,
              fit_rows[: args.count + args.policy_rollouts])]
    results.append(score("base", data.states, data.log_targets, data.head_contexts, base_rows))
    start = time.time()
    new_states, new_targets, new_contexts, offsets = policy_rollouts(
        model, data.setup.reward_fn, config, data.tilt, args.policy_rollouts, 100)
    step_log_weights = offsets[:-1] - offsets[1:]   # log p_pre / pi of each step
    fraction = [float(v) for v in (2 * torch.logsumexp(step_log_weights, 1)
                                   - torch.logsumexp(2 * step_log_weights, 1)).exp()
                / step_log_weights.shape[1]]
    print(f"  {args.policy_rollouts} policy rollouts ({time.time() - start:.0f} s); each step's "
          "weights' effective fraction, x_T..x_1: " + " ".join(f"{v:.2f}" for v in fraction),
          flush=True)
    first = data.states.shape[1]
    states = torch.cat([data.states, new_states], 1)
    log_targets = torch.cat([data.log_targets, new_targets])
    head_contexts = torch.cat([data.head_contexts, model.head_context(new_contexts)])
    rows = torch.cat([base_rows, torch.arange(first, states.shape[1])])
    weights = torch.cat([torch.zeros(step_log_weights.shape[0], first), step_log_weights], 1)
    for td in args.td:
        row_td = torch.cat([torch.ones(first), torch.full((args.policy_rollouts,), td)])
        results.append(score(f"base + policy, TD({td:g})", states, log_targets, head_contexts,
                             rows, (row_td, weights)))
    out = Path("benchmarks/results") / f"{args.name or 'policy_td_' + args.task}.json"
    out.write_text(json.dumps({"args": vars(args), "step_effective_fraction": fraction,
                               "results": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
