"""Head or step? The value policy's distance to the optimum split between the head's error and
the Gaussian step's.

The policy steps from x_k to N(mu_pre + sigma_k^2 grad log h_{k+1}, sigma_k^2 I) with a learned
h. Here the same first-order Gaussian step (and the same first-order tilt of x_T) takes its
h from R base continuations of the point itself instead of the head, h_t(x) ~ mean_r p(y |
x0_r)^lambda, differentiated through the base chain (the continuations' noise fixed, so the
estimate is a smooth function of x). What this "continuation policy" still misses is the
Gaussian step's own error plus the continuations' noise (fewer R: more of it); what the head
policy misses beyond it is the head's. J on the same rows as J* (`policy_objective.py`), so
J* - J is each policy's kl_weight KL(pi || pi*).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/value_probes/oracle_step.py CONFIG POLICY \
        --name NAME [--rows 48] [--continuations 8 32] [--set key=value ...]

Writes benchmarks/results/oracle_step_NAME.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parent))
from common import machine, publish  # noqa: E402
from policy_objective import objective, optimum_objective  # noqa: E402

from ctrl_ray.config import load_config  # noqa: E402
from ctrl_ray.finetune_setup import FinetuneConfig, build_setup  # noqa: E402
from ctrl_ray.objectives.base import draw_inputs  # noqa: E402
from ctrl_ray.policy import load_any  # noqa: E402
from ctrl_ray.sampling.sampler import DenoisingSchedule, step_mean  # noqa: E402


class ContinuationValue(nn.Module):
    """Stands in for the value head: log h_t(x; y, c) from ``continuations`` base rollouts of
    x at t (x0 itself: lambda log p(y | x0, c)), and the first-order step's shift."""

    def __init__(self, spec, model, reward_fn, tilt: float, num_steps: int, eta: float,
                 continuations: int, seed: int):
        super().__init__()
        self.spec = dataclasses.replace(spec, step_candidates=0, step_scale=1.0)
        self.base, self.reward_fn, self.tilt = model, reward_fn, tilt
        self.schedule = DenoisingSchedule.create(model.alphas_cumprod, num_steps, eta)
        self.continuations, self.generator = continuations, torch.Generator().manual_seed(seed)

    def is_flat(self) -> bool:
        return False

    def log_value(self, x: Tensor, t: Tensor, contexts: Tensor | None,
                  labels: dict[str, Tensor]) -> Tensor:
        """log of the mean of p(y | x0)^lambda over R continuations of each row, (B,)."""
        count = self.continuations
        start = int((self.schedule.timesteps == int(t)).nonzero()[0]) if int(t) else None
        x = x.repeat_interleave(count, 0)
        contexts = None if contexts is None else contexts.repeat_interleave(count, 0)
        labels = {name: value.repeat_interleave(count, 0) for name, value in labels.items()}
        if start is not None:
            for step in range(start, len(self.schedule.timesteps)):
                mean = step_mean(self.schedule, step, self.base.reference_noise, x, contexts,
                                 self.base.clip_sample, checkpoint=True)
                noise = torch.randn(x.shape, generator=self.generator, dtype=x.dtype)
                x = mean + self.schedule.sigmas[step] * noise
        log_p = self.tilt * self.reward_fn(x, labels, contexts)
        return torch.logsumexp(log_p.view(-1, count), 1) - math.log(count)

    def mean_shift(self, mean: Tensor, sigma: Tensor, t: Tensor, contexts: Tensor | None,
                   labels: dict[str, Tensor], offsets: Tensor | None) -> Tensor:
        """sigma^2 grad log h_t(mean), the first-order step (``offsets`` are not used)."""
        with torch.enable_grad():
            x = mean.detach().requires_grad_(True)
            (gradient,) = torch.autograd.grad(self.log_value(x, t, contexts, labels).sum(), x)
        return sigma**2 * gradient


def first_order(policy) -> nn.Module:
    """A copy of a value policy whose step and tilt of x_T are first-order (its step scale
    kept)."""
    policy = copy.deepcopy(policy)
    policy.value_head.spec = dataclasses.replace(policy.value_head.spec, step_candidates=0,
                                                 initial_candidates=2)
    return policy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("policy")
    parser.add_argument("--name", required=True)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--continuations", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = load_config(FinetuneConfig, args.config, args.overrides)
    setup = build_setup(config)
    objective_config = dataclasses.replace(config.objective, batch_size=8)
    inputs = draw_inputs(setup.model, dataclasses.replace(objective_config,
                                                          batch_size=args.rows), args.seed)
    best = optimum_objective(args.config, args.overrides, inputs, setup.model.label_classes)
    policy = load_any(args.policy).model.eval()
    tilt = objective_config.tilt_exponent(math.prod(policy.sample_shape))
    arms = {"head, as trained": policy, "head, first-order step": first_order(policy)}
    for count in args.continuations:
        oracle = first_order(policy)
        oracle.value_head = ContinuationValue(oracle.value_head.spec, oracle, setup.reward_fn,
                                              tilt, objective_config.num_inference_steps,
                                              objective_config.eta, count, 7 + count)
        arms[f"{count} continuations, first-order step"] = oracle
    rows, reference = [], None
    for name, model in arms.items():
        began = time.time()
        row = objective(model, setup.reward_fn, objective_config, inputs)
        values = row.pop("values")
        row["per_row_kl"] = row.pop("kl_values").tolist()
        row["per_row_log_likelihood"] = row.pop("log_likelihood_values").tolist()
        reference = values if reference is None else reference
        difference = values - reference
        row.update(arm=name, distance=best - row["objective"], seconds=time.time() - began,
                   paired_se=difference.std().item() / math.sqrt(len(values)),
                   median_difference=difference.median().item(), per_row=values.tolist())
        rows.append(row)
        print(f"{name}: J {row['objective']:.3f} +- {row['objective_se']:.3f}, E[log p] "
              f"{row['log_likelihood']:.3f}, KL {row['kl']:.2f}, J* - J {row['distance']:.3f}, "
              f"paired s.e. against the head {row['paired_se']:.3f}, median row J - the "
              f"head's {row['median_difference']:.3f} ({row['seconds']:.0f} s)", flush=True)
    lines = [f"# Head or step: {args.name}", "",
             f"`python benchmarks/value_probes/oracle_step.py {args.config} {args.policy} "
             f"--name {args.name} --rows {args.rows}` on {machine()['date']}: the same "
             f"{args.rows} rows of the training distribution (seed {args.seed}) for every arm; "
             f"J* {best:.3f} on them. The continuation arms take h from R base continuations of "
             "each point (no head); all first-order arms tilt x_T first-order too.", "",
             "| arm | J (+- s.e.) | E[log p] | KL | J* - J (+- paired s.e. against the head "
             "as trained) | median over rows of J - the head's J | seconds |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['arm']} | {r['objective']:.3f} +- {r['objective_se']:.3f} | "
              f"{r['log_likelihood']:.3f} | {r['kl']:.2f} | {r['distance']:.3f} +- "
              f"{r['paired_se']:.3f} | {r['median_difference']:+.3f} | "
              f"{r['seconds']:.0f} |" for r in rows]
    publish(f"oracle_step_{args.name}", {"machine": machine(), "command": " ".join(sys.argv),
                                         "optimum_objective": best, "rows": rows}, lines)


if __name__ == "__main__":
    main()
