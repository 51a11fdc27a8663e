"""Would rollouts that follow the policy part-way and the base after it teach the head the rare
pairs? On slant the value policies' distance to the optimum lies on the (digit, target) pairs the
base rarely makes, learnt from base rollouts that almost never reach them (docs/update_rules.md,
section 20). h_k(x) = E_pre[p(y | x0)^lambda | x_k = x] needs only that the chain after x_k is the
base's: a rollout that follows the policy to state k and the base after it gives every state
from k on an exact target, no importance weight (section 17's whole policy rollouts needed
weights, whose effective fraction fell to 0.04 early in the chain). Its states are where the
policy goes, toward the rare targets it was asked for, so the base part starts closer to them.

This probe fits a head like the rule (half the base states forward-noised) on `--count` cached
base rollouts (`td_targets.py`), steers with it, draws `--policy-rollouts` restarted rollouts
per round (the policy up to state k, k spread over `--restart`, the base after: the model's
`min_timestep`), refits a fresh head on the base and the restarted rollouts' states from k on,
and scores every head by J* - J on the same fresh rollouts, by rarity (log Z) too; the control
head gets as many more base rollouts instead. `--check-rollouts N` restarted rollouts of the
round-0 policy (seed 99) held out of every fit measure each head's value loss where the policy
goes (their states from k on), beside the held-out base loss. With `--weighted` a restarted
rollout's x_0 is forward-noised as a base rollout's is, at any timestep, each such state's
loss weighted by its path's importance weight before k, p_pre / pi (the value loss weighted
by w has h as its minimiser wherever the weights are exact).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/value_probes/restart_targets.py \
        --task slant --rollouts 8192 --steps 6000 [--restart 6 10 14] [--rounds 2]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parent))
from context_allocation import (  # noqa: E402
    RARITY_BINS,
    context_log_means,
    distance_by_rarity,
    rarity_line,
)
from policy_targets import effective_fraction, fresh_rollouts  # noqa: E402
from td_targets import (  # noqa: E402
    fit,
    forward_alphas,
    offline_arguments,
    probe_arguments,
    rollouts_of,
    split,
)
from trial_fit import batch_inputs  # noqa: E402

from ctrl_ray.models.soft_value import SoftValueNet, predicted_value_loss  # noqa: E402
from ctrl_ray.objectives.value import target_log_likelihoods  # noqa: E402
from ctrl_ray.sampling.sampler import sample  # noqa: E402


def restarted_rollouts(model, reward_fn, config, tilt: float, timesteps, count: int,
                       restarts: list[int], seed: int):
    """`count` rollouts that follow the policy to state k and the base after it, k spread
    evenly over `restarts`: (states (S+1, N, ...), lambda log p(y | x0) for every y (N, J),
    contexts (N,), k of each (N,), the target index each was asked for (N,), -1 if none, the
    log importance weight of each path, log p_pre / pi of its steps before k and of x_T's tilt:
    the weight that would make its x_0 a base sample (N,))."""
    states, log_targets, contexts, firsts, asked, log_weights = [], [], [], [], [], []
    target_index = {tuple(t): j for j, t in enumerate(model.value_head.spec.targets)}
    names = list(model.label_classes)
    saved = model.min_timestep
    for i, inputs in enumerate(batch_inputs(model, config, count, 1000 * seed)):
        restart = restarts[i % len(restarts)]
        model.min_timestep = int(timesteps[restart - 1]) if restart > 0 else 10**9
        with torch.no_grad():
            path = sample(model, inputs, eta=config.eta, compute_log_ratio=True,
                          kl_reduction=config.kl_reduction)
        states.append(path.states)
        log_weights.append(-path.path_log_ratio)
        log_targets.append(tilt * target_log_likelihoods(model, reward_fn, path.x0,
                                                         path.contexts))
        contexts.append(path.contexts)
        firsts.append(torch.full((inputs.batch_size,), restart))
        labels = torch.stack([inputs.labels[name] for name in names], 1).tolist()
        asked.append(torch.tensor([target_index.get(tuple(y), -1) for y in labels]))
    model.min_timestep = saved
    return (torch.cat(states, 1), torch.cat(log_targets), torch.cat(contexts),
            torch.cat(firsts), torch.cat(asked), torch.cat(log_weights))


def hit_rates(log_targets, contexts, asked, base_log_p, tilt: float) -> dict[str, dict]:
    """Mean p(y | x0) of the target each rollout was asked for, against the base's E_pre[p(y |
    x0)] of the same pairs, by its log: how much more often the restarted rollouts reach their
    targets."""
    keep = asked >= 0
    p = (log_targets[keep, asked[keep]] / tilt).exp()
    log_z = base_log_p[contexts[keep], asked[keep]]
    out = {}
    for lo, hi in RARITY_BINS:
        rows = (log_z > lo) & (log_z <= hi)
        if rows.any():
            out[f"{lo:g} to {hi:g}"] = {"reached": float(p[rows].mean()),
                                        "base": float(log_z[rows].exp().mean())}
    return out


def prefix_weights(log_targets, asked, firsts, log_weights, base_log_p, contexts,
                   tilt: float) -> dict:
    """Per restart state k: the effective fraction of the paths' weights, and the weighted mean
    p(y | x0) of the asked targets below log E_pre[p] -2.5, sum w p / sum w, against the base's
    (equal in expectation: the weights' own check)."""
    out = {}
    for k in firsts.unique().tolist():
        rows = (firsts == k) & (asked >= 0)
        rare = rows & (base_log_p[contexts, asked.clamp(min=0)] <= -2.5)
        p = (log_targets[rare, asked[rare]] / tilt).exp()
        w = log_weights[rare].softmax(0)
        out[k] = {"effective_fraction": float(effective_fraction(log_weights[rows])),
                  "rare_effective_fraction": float(effective_fraction(log_weights[rare])),
                  "rare_reached": float(p.mean()), "rare_weighted": float((w * p).sum()),
                  "rare_base": float(base_log_p[contexts[rare], asked[rare]].exp().mean())}
    return out


def restarted_loss(head, restarted, timesteps, model) -> float:
    """The mean value loss of `head` on every state from k on of `restarted` rollouts (as
    `restarted_rollouts` returns them)."""
    states, log_targets, contexts, firsts, *_ = restarted
    context = model.head_context(contexts)
    total, pairs = 0.0, 0
    with torch.no_grad():
        for index in range(int(firsts.min()), states.shape[0]):
            rows = (firsts <= index).nonzero().squeeze(1)
            loss = predicted_value_loss(*head(states[index, rows],
                                              timesteps[index].expand(len(rows)),
                                              context[rows]), log_targets[rows])
            total, pairs = total + float(loss) * len(rows), pairs + len(rows)
    return total / pairs


def main() -> None:
    parser = probe_arguments(__doc__)
    offline_arguments(parser, evaluation=1024)
    parser.add_argument("--policy-rollouts", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--restart", type=int, nargs="+", default=[6, 10, 14],
                        help="the state indices the base takes over at (0 = x_T: the base)")
    parser.add_argument("--check-rollouts", type=int, default=0)
    parser.add_argument("--weighted", action="store_true",
                        help="forward-noise the restarted rollouts' x_0 too, each state's loss "
                             "weighted by its path's importance weight (before k)")
    parser.add_argument("--weights-only", action="store_true",
                        help="fit the round-0 head, draw one round of restarted rollouts, print "
                             "their paths' importance weights by k, and stop")
    parser.add_argument("--forward-fraction", type=float, default=0.5,
                        help="the base rollouts' states drawn by the forward process (the rule's)")
    args = parser.parse_args()
    data = rollouts_of(args.task, args.rollouts, args.seed)
    last = data.states.shape[0] - 1
    if not all(0 <= k < last for k in args.restart):
        parser.error(f"--restart takes state indices 0 .. {last - 1} (x_T .. the last step's)")
    if data.contexts is None or data.contexts.dim() != 1:
        parser.error("the probe groups pairs by class-id contexts (the digits testbed's)")
    held, fit_rows = split(args.rollouts, args.seed)
    held = held[: args.heldout]
    model, config, alphas = data.model, data.config.objective, forward_alphas(data)
    inputs, best_rows = fresh_rollouts(model, config, args.task, args.evaluation)
    print(f"{args.task}: J* {best_rows.mean():.3f} on {args.evaluation} fresh rollouts",
          flush=True)
    base_log_p = context_log_means(data.log_targets[fit_rows] / data.tilt,
                                   data.contexts[fit_rows])

    def score(name: str, states, log_targets, head_contexts, rows, first_states,
              row_log_weights=None) -> dict:
        torch.manual_seed(args.seed)
        head = SoftValueNet(model.value_head.spec)
        start = time.time()
        loss, kept, _ = fit(head, states, log_targets, head_contexts, data.timesteps, rows, held,
                            args.steps, args.seed, forward_alphas=alphas,
                            forward_fraction=args.forward_fraction, first_states=first_states,
                            row_log_weights=row_log_weights)
        model.value_head = head
        scores = distance_by_rarity(model, data.setup.reward_fn, config, inputs, best_rows)
        print(f"{name}: {len(rows)} rollouts, held-out {loss:.4f} (kept {kept}; "
              f"{time.time() - start:.0f} s); {rarity_line(scores)}", flush=True)
        heads.append(head)
        return {"head": name, "rollouts": len(rows), "heldout_loss": loss, "kept": kept,
                **scores}

    heads, check = [], None
    base_rows = fit_rows[: args.count]
    extra = args.rounds * args.policy_rollouts
    results = [] if args.weights_only else [
        score("base (control)", data.states, data.log_targets, data.head_contexts,
              fit_rows[: args.count + extra], None)]
    states, log_targets, head_contexts = data.states, data.log_targets, data.head_contexts
    first_states = torch.zeros(states.shape[1], dtype=torch.long)
    row_log_weights = torch.zeros(states.shape[1])
    rows, reached = base_rows, []
    for round_ in range(args.rounds + 1):
        results.append(score(f"round {round_}: {len(base_rows)} base + restarted", states,
                             log_targets, head_contexts, rows, first_states,
                             row_log_weights if args.weighted else None))
        if round_ == args.rounds:
            break
        if round_ == 0 and args.check_rollouts:
            check = restarted_rollouts(model, data.setup.reward_fn, config, data.tilt,
                                       data.timesteps, args.check_rollouts, args.restart, 99)
        start = time.time()
        new = restarted_rollouts(model, data.setup.reward_fn, config, data.tilt, data.timesteps,
                                 args.policy_rollouts, args.restart, 100 + round_)
        new_states, new_targets, new_contexts, new_first, asked, new_weights = new
        reached.append(hit_rates(new_targets, new_contexts, asked, base_log_p, data.tilt))
        print(f"  {args.policy_rollouts} restarted rollouts ({time.time() - start:.0f} s); "
              "p(y | x0) of the asked target against the base's, by log E_pre[p]: " + ", ".join(
                  f"{k}: {v['reached']:.3f} vs {v['base']:.3f}"
                  for k, v in reached[-1].items()), flush=True)
        weights = prefix_weights(new_targets, asked, new_first, new_weights, base_log_p,
                                 new_contexts, data.tilt)
        reached[-1]["prefix_weights"] = weights
        for k, v in weights.items():
            print(f"    restart at state {k}: the paths' weights' effective fraction "
                  f"{v['effective_fraction']:.3f} (rare pairs' {v['rare_effective_fraction']:.3f});"
                  f" rare pairs' p(y | x0) {v['rare_reached']:.3f}, weighted "
                  f"{v['rare_weighted']:.3f}, the base's {v['rare_base']:.3f}", flush=True)
        if args.weights_only:
            break
        first = states.shape[1]
        states = torch.cat([states, new_states], 1)
        log_targets = torch.cat([log_targets, new_targets])
        head_contexts = torch.cat([head_contexts, model.head_context(new_contexts)])
        first_states = torch.cat([first_states, new_first])
        row_log_weights = torch.cat([row_log_weights, new_weights])
        rows = torch.cat([rows, torch.arange(first, states.shape[1])])
    if check is not None:
        for head, result in zip(heads, results, strict=True):
            result["restarted_heldout_loss"] = restarted_loss(head, check, data.timesteps, model)
            print(f"{result['head']}: value loss on {args.check_rollouts} held-out restarted "
                  f"rollouts' states from k on {result['restarted_heldout_loss']:.4f}")
    out = Path("benchmarks/results") / f"{args.name or 'restart_targets_' + args.task}.json"
    out.write_text(json.dumps({"args": vars(args), "results": results, "reached": reached},
                              indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
