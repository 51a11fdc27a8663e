"""Is the Gaussian step what keeps the value policy from the optimum? The policy steps from
N(mu_pre, sigma_k^2 I) shifted toward the tilted transition's mean; the optimum's step is that
Gaussian times h_{k+1} / h_k, which a shifted Gaussian matches exactly only as sigma_k -> 0.
With more reverse steps each step is smaller, so if the step's shape is the gap, the same
head's distance to the optimum (J* - J, each step count against its own optimum) falls with
the step count.

The head must know h at every step count's timesteps: it is fit on forward-noised states only
(section 18: as good as the chain's states on slant) at the timesteps of `--train-steps`'
schedule, from the first `--count` cached base rollouts (`td_targets.py`), held-out check on
the chain's states. Each step count's J* comes from base rollouts at that count.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/value_probes/step_count.py --task slant \
        [--rollouts 8192] [--count 1638] [--train-steps 80] [--eval-steps 20 40 80]
"""

from __future__ import annotations

import dataclasses
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
    offline_arguments,
    probe_arguments,
    rollouts_of,
    split,
)

from ctrl_ray.models.soft_value import SoftValueNet  # noqa: E402
from ctrl_ray.sampling.sampler import DenoisingSchedule  # noqa: E402


def main() -> None:
    parser = probe_arguments(__doc__)
    offline_arguments(parser)
    parser.add_argument("--train-steps", type=int, default=80)
    parser.add_argument("--eval-steps", type=int, nargs="+", default=[20, 40, 80])
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.35])
    args = parser.parse_args()
    data = rollouts_of(args.task, args.rollouts, args.seed)
    held, fit_rows = split(args.rollouts, args.seed)
    model, objective_config = data.model, data.config.objective
    alphas_cumprod = model.alphas_cumprod
    schedule = DenoisingSchedule.create(alphas_cumprod, args.train_steps, objective_config.eta)
    fit_timesteps = (torch.cat([schedule.timesteps, schedule.timesteps.new_zeros(1)]).long(),
                     torch.cat([schedule.alphas, schedule.alphas.new_ones(1)]))
    start = time.time()
    torch.manual_seed(args.seed)
    head = SoftValueNet(model.value_head.spec)
    loss, kept, _ = fit(head, data.states, data.log_targets, data.head_contexts,
                        data.timesteps, fit_rows[:args.count], held[:args.heldout], args.steps,
                        args.seed, fit_timesteps=fit_timesteps)
    print(f"{args.task}: head on {args.count} rollouts, forward-noised at the {args.train_steps}"
          f"-step schedule's timesteps, held-out loss {loss:.4f} (kept {kept}; "
          f"{time.time() - start:.0f} s)", flush=True)
    rows = []
    for steps in args.eval_steps:
        config = dataclasses.replace(objective_config, num_inference_steps=steps)
        inputs, best_rows = fresh_rollouts(model, config, args.task, args.evaluation,
                                           [f"objective.num_inference_steps={steps}"])
        best = best_rows.mean().item()
        print(f"{steps} steps: J* {best:.3f}", flush=True)
        rows += policy_rows(model, head, data.setup.reward_fn, config, inputs, best,
                            args.scales, steps=steps)
    name = args.name or f"step_count_{args.task}_train{args.train_steps}"
    out = Path("benchmarks/results") / f"{name}.json"
    out.write_text(json.dumps({"args": vars(args), "heldout_loss": loss, "kept": kept,
                               "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
