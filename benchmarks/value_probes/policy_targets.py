"""Would the policy's own rollouts, importance-weighted, fit h better than base rollouts alone?

h_k(x) = E_pre[p(y | x0)^lambda | x_k = x] is an expectation under the base chain, but it can be
estimated from any chain that starts at x: from a policy rollout, with the weight of its path
after x_k, w_k = prod_{j >= k} p_pre(x_{j+1} | x_j) / pi(x_{j+1} | x_j), E_pi[w_k
p(y | x0)^lambda | x_k] = h_k(x_k). The value loss is linear in its targets, so a policy
rollout enters the regression with its targets shifted by log w_k at each state. Where the
policy is the exact tilted chain, w_k p(y | x0)^lambda = h_k(x_k) on every path (zero variance):
the closer the policy, the less noise in its targets, and its states are where it steers. The
rule samples policy rollouts anyway, for its reports.

This probe fits a head on the cached base rollouts (`td_targets.py`), steers with it, draws
policy rollouts with their per-step log ratios, refits a fresh head on the base and weighted
policy rollouts together (each round adding the newest policy's), and compares the policies'
held-out value loss (base rollouts) and CTRL's objective J on the same fresh rollouts (J* - J
is the distance to the optimum, `policy_objective.py`).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/value_probes/policy_targets.py \
        [--task ink] [--rollouts 2048] [--policy-rollouts 1024] [--rounds 2] [--scales 1 1.35]
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parent))
from policy_objective import objective, optimum_objective_rows  # noqa: E402
from rule_choice import DEMO_BASE, TASKS  # noqa: E402
from td_targets import fit, probe_arguments, rollouts_of, split  # noqa: E402
from trial_fit import batch_inputs  # noqa: E402

from ctrl_ray.models.soft_value import SoftValueNet  # noqa: E402
from ctrl_ray.objectives.base import draw_inputs  # noqa: E402
from ctrl_ray.objectives.value import target_log_likelihoods  # noqa: E402
from ctrl_ray.sampling.sampler import sample  # noqa: E402


def policy_rollouts(model, reward_fn, objective_config, tilt: float, count: int, seed: int):
    """`count` rollouts of the model's policy: (states (S+1, N, ...), lambda log p(y | x0) for
    every y (N, J), contexts (N,) or None, log w_k of each state's path after it (S+1, N))."""
    states, log_targets, contexts, offsets = [], [], [], []
    for inputs in batch_inputs(model, objective_config, count, 1000 * seed):
        with torch.no_grad():
            path = sample(model, inputs, eta=objective_config.eta, compute_log_ratio=True,
                          kl_reduction=objective_config.kl_reduction)
            log_ratio = path.log_ratio.clone()
            # x_T's tilt joined step 1's ratio; it is not part of x_T's own continuation
            log_ratio[0] -= ((path.states[0] ** 2 - inputs.initial_noise ** 2)
                             .flatten(1).sum(1) / 2)
            after = log_ratio.flip(0).cumsum(0).flip(0)   # sum over steps j >= k
            offsets.append(torch.cat([-after, torch.zeros_like(after[:1])]))
            states.append(path.states)
            log_targets.append(tilt * target_log_likelihoods(model, reward_fn, path.x0,
                                                             path.contexts))
            contexts.append(path.contexts)
    return (torch.cat(states, 1), torch.cat(log_targets), None if contexts[0] is None else
            torch.cat(contexts), torch.cat(offsets, 1))


def effective_fraction(log_weights: torch.Tensor) -> torch.Tensor:
    """(sum w)^2 / (N sum w^2) along the last dimension."""
    return (2 * torch.logsumexp(log_weights, -1) - torch.logsumexp(2 * log_weights, -1)
            ).exp() / log_weights.shape[-1]


def evaluation_arguments(parser) -> None:
    """The step scales and fresh rollouts a fitted head's policy is scored at."""
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.35])
    parser.add_argument("--evaluation", type=int, default=512)
    parser.add_argument("--channels", type=int, nargs="+", default=None,
                        help="the head's conv widths (default: the config's)")


def evaluation_setup(args):
    """(the task's cached base rollouts, held-out rows, fit rows, `args.evaluation` fresh
    rollouts' inputs (seed 1), the optimum's J* on them)."""
    data = rollouts_of(args.task, args.rollouts, args.seed)
    held, fit_rows = split(args.rollouts, args.seed)
    evaluation, best_rows = fresh_rollouts(data.model, data.config.objective, args.task,
                                           args.evaluation)
    best_objective = best_rows.mean().item()
    print(f"{args.task}: optimum J* {best_objective:.3f} on {args.evaluation} fresh rollouts "
          f"(seed 1)", flush=True)
    return data, held, fit_rows, evaluation, best_objective


def fresh_rollouts(model, objective_config, task: str, count: int, overrides=()):
    """(`count` fresh rollouts' inputs of the training distribution, seed 1; each row's J*,
    kl_weight log Z(c, y), from base rollouts of the task's config with `overrides`)."""
    inputs = draw_inputs(model, dataclasses.replace(objective_config, batch_size=count), 1)
    path, extra = TASKS[task]
    return inputs, optimum_objective_rows(path, [f"base_model={DEMO_BASE}", *extra, *overrides],
                                          inputs, model.label_classes)


def score_head(name: str, data, rows, held, args, evaluation, best_objective: float,
               states, log_targets, contexts, offsets=None, **fit_options) -> list[dict]:
    """Fit a fresh head on `rows` of `states` (their targets shifted by `offsets`, if given),
    install it on the task's model, and print J on `evaluation` at each of `args.scales` (the
    model is left at the first)."""
    model, config = data.model, data.config
    spec = model.value_head.spec
    if args.channels is not None:
        spec = dataclasses.replace(spec, channels=args.channels)
    start = time.time()
    torch.manual_seed(args.seed)
    head = SoftValueNet(spec)
    loss, kept, _ = fit(head, states, log_targets, contexts, data.timesteps, rows, held,
                        args.steps, args.seed, offsets=offsets, **fit_options)
    model.value_head = head
    scores, lines = [], []
    for scale in args.scales:
        spec.step_scale = scale
        row = objective(model.eval(), data.setup.reward_fn, config.objective, evaluation)
        for key in ("values", "kl_values", "log_likelihood_values"):
            row.pop(key)
        scores.append({"scale": scale, **row, "distance": best_objective - row["objective"]})
        lines.append(f"x{scale:g}: J {row['objective']:.3f} +- {row['objective_se']:.3f} "
                     f"(E[log p] {row['log_likelihood']:.3f}, KL {row['kl']:.2f}, "
                     f"J* - J {best_objective - row['objective']:.3f})")
    spec.step_scale = args.scales[0]
    print(f"{name}: head on {len(rows)} rollouts, held-out base loss {loss:.4f} (kept {kept}; "
          f"{time.time() - start:.0f} s)\n    " + "\n    ".join(lines), flush=True)
    return scores


def main() -> None:
    parser = probe_arguments(__doc__)
    parser.add_argument("--base-rollouts", type=int, default=None,
                        help="fit on this many of the base fit rollouts (default: all); the "
                             "control head gets as many more base rollouts as the policy's")
    parser.add_argument("--policy-rollouts", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=2)
    evaluation_arguments(parser)
    parser.add_argument("--clip", type=float, default=None,
                        help="cap each log w_k at this many nats (default: none)")
    args = parser.parse_args()
    data, held, fit_rows, evaluation, best_objective = evaluation_setup(args)
    model = data.model
    reward_fn, objective_config = data.setup.reward_fn, data.config.objective

    states, log_targets = data.states, data.log_targets
    contexts = data.head_contexts
    offsets = torch.zeros(states.shape[:2])
    base_rows = fit_rows[: args.base_rollouts]
    extra = args.rounds * args.policy_rollouts
    if len(base_rows) < len(fit_rows):
        score_head("control, base only", data, fit_rows[: len(base_rows) + extra], held, args,
                   evaluation, best_objective, states, log_targets, contexts, offsets)
    rows = base_rows
    for round_ in range(args.rounds + 1):
        score_head(f"round {round_} ({len(base_rows)} base + policy)", data, rows, held, args,
                   evaluation, best_objective, states, log_targets, contexts, offsets)
        if round_ == args.rounds:
            break
        start = time.time()
        new_states, new_targets, new_contexts, new_offsets = policy_rollouts(
            model, reward_fn, objective_config, data.tilt, args.policy_rollouts,
            100 + round_)
        if args.clip is not None:
            new_offsets = new_offsets.clamp(max=args.clip)
        fraction = effective_fraction(new_offsets)
        print(f"  {args.policy_rollouts} policy rollouts ({time.time() - start:.0f} s); the "
              f"weights' effective fraction by state x_T..x_0: "
              + " ".join(f"{v:.2f}" for v in fraction.tolist())
              + f"; log w_T mean {new_offsets[0].mean():.2f} sd {new_offsets[0].std():.2f}",
              flush=True)
        first = states.shape[1]
        states = torch.cat([states, new_states], 1)
        log_targets = torch.cat([log_targets, new_targets])
        offsets = torch.cat([offsets, new_offsets], 1)
        if contexts is not None:
            contexts = torch.cat([contexts, model.head_context(new_contexts)])
        rows = torch.cat([rows, torch.arange(first, states.shape[1])])


if __name__ == "__main__":
    main()
