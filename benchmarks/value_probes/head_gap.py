"""How far is the fitted head from the true h, state by state?

The held-out value loss mixes the head's error with the targets' own noise, which early in the
chain is most of it. This probe separates them: from held-out states x_k of the cached base
rollouts (`td_targets.py`) it runs M fresh base continuations each, so that the mean of
p(y | x0)^lambda over them estimates h_k(x_k) itself, and scores that estimate with the same
loss and targets as a head fit on the other rollouts. Where the two losses meet, the head is
as good as h can be from those targets; the difference is what a better head could gain.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/value_probes/head_gap.py \
        [--task ink] [--rows 64] [--continuations 32] [--states 2 5 8 11 14 17]
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from td_targets import fit, probe_arguments, rollouts_of, split  # noqa: E402
from trial_fit import constant_loss  # noqa: E402

from ctrl_ray.models.soft_value import SoftValueNet, predicted_value_loss, value_loss  # noqa: E402
from ctrl_ray.objectives.value import target_log_likelihoods  # noqa: E402
from ctrl_ray.sampling.sampler import DenoisingSchedule  # noqa: E402


def continued(model, schedule: DenoisingSchedule, x: torch.Tensor, contexts, start: int,
              generator: torch.Generator) -> torch.Tensor:
    """x0 of the base chain run from state index `start` (x = x_k) to the end."""
    with torch.no_grad():
        for step in range(start, len(schedule.timesteps)):
            t = schedule.timesteps[step].expand(x.shape[0])
            eps = model.reference_noise(x, t, contexts)
            mean = schedule.mean(step, x, eps, model.clip_sample)
            x = mean + schedule.sigmas[step] * torch.randn(x.shape, generator=generator)
    return x


def main() -> None:
    parser = probe_arguments(__doc__)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--continuations", type=int, default=32)
    parser.add_argument("--states", type=int, nargs="+", default=[2, 5, 8, 11, 14, 17])
    args = parser.parse_args()
    data = rollouts_of(args.task, args.rollouts, args.seed)
    model, states, log_targets = data.model, data.states, data.log_targets
    held, fit_rows = split(args.rollouts, args.seed)
    start = time.time()
    torch.manual_seed(args.seed)
    head = SoftValueNet(model.value_head.spec)
    best, kept, _ = fit(head, states, log_targets, data.head_contexts, data.timesteps,
                        fit_rows, held, args.steps, args.seed)
    rows = held[: args.rows]
    print(f"{args.task}: head fit on {len(fit_rows)} rollouts, held-out {best:.4f} at step "
          f"{kept} ({time.time() - start:.0f} s); on the {len(rows)} rows below the constant "
          f"head (any state) scores {constant_loss(log_targets, fit_rows, rows):.4f}",
          flush=True)
    base_contexts = None if data.contexts is None else \
        data.contexts[rows].repeat_interleave(args.continuations, 0)
    schedule = DenoisingSchedule.create(model.alphas_cumprod, states.shape[0] - 1,
                                        data.config.objective.eta)
    generator = torch.Generator().manual_seed(args.seed + 1)
    for k in args.states:
        start = time.time()
        x = states[k, rows].repeat_interleave(args.continuations, 0)
        x0 = continued(model, schedule, x, base_contexts, k, generator)
        with torch.no_grad():
            logs = data.tilt * target_log_likelihoods(model, data.setup.reward_fn, x0,
                                                      base_contexts)
        logs = logs.double().view(len(rows), args.continuations, -1)
        log_h = torch.logsumexp(logs, 1) - math.log(args.continuations)   # (R, J)
        log_m = torch.logsumexp(log_h, 1)
        monte_carlo = float(predicted_value_loss(log_h - log_m[:, None], log_m,
                                                 log_targets[rows].double()))
        with torch.no_grad():
            fitted = float(value_loss(head, states[k, rows], data.timesteps[k].expand(len(rows)),
                                      None if data.head_contexts is None
                                      else data.head_contexts[rows], log_targets[rows]))
        print(f"  state {k:2d} (t = {int(data.timesteps[k]):3d}): head {fitted:.4f}, "
              f"{args.continuations} continuations {monte_carlo:.4f}, gap "
              f"{fitted - monte_carlo:+.4f} ({time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
