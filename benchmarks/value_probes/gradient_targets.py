"""Does fitting the head's gradient, not only its value, bring the policy closer to the optimum?

The policy steers by grad log h, but the value loss fits h's values: held-out value loss and
distance to the optimum have not moved together (a reward-gated head fit the values better and
steered worse, `reward_gate.py`). Under the forward process q(x_t | x_0) = N(sqrt(a) x_0,
(1 - a) I), Tweedie's identity gives the gradient of h_t(x) = E[r(x_0) | x_t = x] an unbiased
regression target from the same pairs:

    grad h_t(x_t) = E[(r(x_0) - b(x_t)) (eps_pre(x_t) - eps) | x_t] / sqrt(1 - a),

eps the forward noise, eps_pre the base's noise prediction (E[eps | x_t] where the base is exact)
and b any baseline (the head's own h, detached: it cancels most of the target's noise). This
probe fits heads like the rule (half the states forward-noised, held-out value loss on the
chain's states) with `weight` times the squared error of sqrt(1 - a) grad h against that target
added on forward-noised states (one random target y per row, t > 0), and scores each policy by
J* - J on the same fresh rollouts.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/value_probes/gradient_targets.py --task slant \
        [--rollouts 8192] [--count 1638] [--steps 6000] [--weights 0 10 100]
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parent))
from policy_targets import fresh_rollouts  # noqa: E402
from reward_gate import policy_rows  # noqa: E402
from td_targets import (  # noqa: E402
    fit,
    forward_alphas,
    offline_arguments,
    probe_arguments,
    rollouts_of,
    split,
)

from ctrl_ray.models.soft_value import SoftValueNet  # noqa: E402


def gradient_loss(head, model, data, rows, which, alphas, generator) -> torch.Tensor:
    """Mean squared error of sqrt(1 - a) grad h_t(x_t; y) against (r_y(x_0) - h) (eps_pre -
    eps) on fresh forward-noised x_t of `rows` at the states `which` (t > 0), y random per row."""
    x0 = data.states[-1, rows]
    a = alphas[which].to(x0.dtype).view(-1, *[1] * (x0.dim() - 1))
    noise = torch.randn(x0.shape, generator=generator)
    x_t = (a.sqrt() * x0 + (1 - a).sqrt() * noise).requires_grad_(True)
    t = data.timesteps[which]
    contexts = None if data.contexts is None else data.contexts[rows]
    with torch.no_grad():
        predicted = model.reference_noise(x_t.detach(), t, contexts)
    target_index = torch.randint(0, data.log_targets.shape[1], (len(rows),), generator=generator)
    head_contexts = None if data.head_contexts is None else data.head_contexts[rows]
    log_q, log_m = head(x_t, t, head_contexts)
    h = (log_q.gather(1, target_index[:, None]).squeeze(1) + log_m).exp()
    (gradient,) = torch.autograd.grad(h.sum(), x_t, create_graph=True)
    reward = data.log_targets[rows].gather(1, target_index[:, None]).squeeze(1).exp()
    shape = (-1, *[1] * (x0.dim() - 1))
    target = (reward - h.detach()).view(shape) * (predicted - noise)
    return ((( 1 - a).sqrt() * gradient - target) ** 2).flatten(1).mean(1).mean()


def main() -> None:
    parser = probe_arguments(__doc__)
    offline_arguments(parser)
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 10.0, 100.0])
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.35])
    args = parser.parse_args()
    data = rollouts_of(args.task, args.rollouts, args.seed)
    held, fit_rows = split(args.rollouts, args.seed)
    model, config, alphas = data.model, data.config.objective, forward_alphas(data)
    inputs, best_rows = fresh_rollouts(model, config, args.task, args.evaluation)
    best = best_rows.mean().item()
    print(f"{args.task}: J* {best:.3f} on {args.evaluation} fresh rollouts", flush=True)
    rows = []
    for weight in args.weights:
        torch.manual_seed(args.seed)
        head = SoftValueNet(copy.deepcopy(model.value_head.spec))
        start = time.time()
        extra = None if not weight else (
            lambda rows, generator, head=head, weight=weight: weight * gradient_loss(
                head, model, data, rows, torch.randint(0, len(alphas) - 1, (len(rows),),
                                                       generator=generator),
                alphas, generator))
        loss, kept, _ = fit(head, data.states, data.log_targets, data.head_contexts,
                            data.timesteps, fit_rows[:args.count], held[:args.heldout],
                            args.steps, args.seed, forward_alphas=alphas,
                            forward_fraction=args.fraction, extra_loss=extra)
        print(f"gradient weight {weight:g}: held-out value loss {loss:.4f} (kept {kept}; "
              f"{time.time() - start:.0f} s)", flush=True)
        rows += policy_rows(model, head, data.setup.reward_fn, config, inputs, best,
                            args.scales, weight=weight, heldout_loss=loss, kept=kept)
    out = Path("benchmarks/results") / f"{args.name or 'gradient_targets_' + args.task}.json"
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
