"""Where the KL goes, step by step: the exact optimum's KL per reverse step (by nested base
rollouts) next to value policies' (their Gaussian steps' KL), on a digits task.

The optimum's marginal after step k is p_pre(x) h_k(x) / Z, h_k(x) = E_pre[p(y | x0, c)^lambda |
x_k = x], so its path KL up to step k (the initial tilt included, which a policy starting from
N(0, I) makes in its first step) is C_k = E*[log h_k(x_k)] - log Z, and step k costs
C_k - C_{k-1}. Estimated per (digit c, target y) on M base rollouts: from each state x_k,
R base continuations give h_k(x_k) = mean_r p(y | x0_r)^lambda (every y at once), the
optimum's expectation is self-normalised by h_k itself, and Z by the mean of h_k. A policy's
per-step KL is that of its Gaussian step given its mean, averaged over 64 samples per (c, y).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/value_probes/step_kl.py NAME \
        --config configs/ctrl_digits_ink.yaml --policies DIR [DIR ...] [--set key=value ...]

Writes benchmarks/results/step_kl_NAME.{json,md}.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
from common import machine, publish  # noqa: E402

from ctrl_ray.config import load_config  # noqa: E402
from ctrl_ray.finetune import FinetuneConfig, build_setup  # noqa: E402
from ctrl_ray.objectives.value import target_log_likelihoods  # noqa: E402
from ctrl_ray.policy import load_any  # noqa: E402
from ctrl_ray.sampling.sampler import (  # noqa: E402
    DenoisingSchedule,
    RolloutInputs,
    sample,
    step_mean,
)


def optimum_step_kl(setup, config, context: int, states: int, continuations: int,
                    seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-step KL of the optimum (J, S), ESS at x0 (J,)) for the digit ``context``."""
    model, objective = setup.model.eval(), config.objective
    steps = objective.num_inference_steps
    tilt = objective.tilt_exponent(math.prod(model.sample_shape))
    schedule = DenoisingSchedule.create(model.alphas_cumprod, steps, objective.eta)
    inputs = RolloutInputs.draw(seed, states, steps, model.sample_shape, model.label_classes,
                                num_contexts=model.num_contexts)
    inputs.contexts = torch.full((states,), context)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        base = sample(model, inputs, eta=objective.eta, compute_kl=False, from_reference=True)
        log_h = [tilt * target_log_likelihoods(model, setup.reward_fn, base.x0, base.contexts)]
        for k in range(steps - 1, 0, -1):      # h after step k, from continuations of x_k
            x = base.states[k].repeat_interleave(continuations, 0)
            contexts = inputs.contexts.repeat_interleave(continuations, 0)
            for step in range(k, steps):
                mean = step_mean(schedule, step, model.reference_noise, x, contexts,
                                 model.clip_sample)
                x = mean + schedule.sigmas[step] * torch.randn(x.shape, generator=generator)
            log_p = tilt * target_log_likelihoods(model, setup.reward_fn, x, contexts)
            log_h.append(torch.logsumexp(log_p.view(states, continuations, -1), 1)
                         - math.log(continuations))
    log_h = torch.stack(log_h[::-1]).double()      # (S, M, J): after steps 1 .. S
    weights = torch.softmax(log_h, 1)
    log_z = torch.logsumexp(log_h, 1) - math.log(states)
    cumulative = (weights * log_h).sum(1) - log_z                        # (S, J)
    per_step = torch.diff(cumulative, dim=0, prepend=torch.zeros_like(cumulative[:1]))
    ess = 1.0 / (weights[-1] ** 2).sum(0)
    return per_step.T.float(), ess.float()


def policy_step_kl(policy, config, context: int, samples: int, seed: int) -> torch.Tensor:
    """A policy's mean KL per step (J, S) for the digit ``context``, 64 samples per target."""
    objective, rows = config.objective, []
    for index, target in enumerate(policy.value_head.spec.targets):
        inputs = RolloutInputs.draw(seed + index, samples, objective.num_inference_steps,
                                    policy.sample_shape, policy.label_classes,
                                    num_contexts=policy.num_contexts)
        inputs.contexts = torch.full((samples,), context)
        inputs.labels = {name: torch.full((samples,), k)
                         for name, k in zip(policy.label_classes, target, strict=True)}
        with torch.no_grad():
            rows.append(sample(policy, inputs, eta=objective.eta,
                               kl_reduction=objective.kl_reduction).kl.mean(1))
    return torch.stack(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("--config", default="configs/ctrl_digits_ink.yaml")
    parser.add_argument("--policies", nargs="+", default=[])
    parser.add_argument("--digits", type=int, nargs="+", default=[3, 8])
    parser.add_argument("--states", type=int, default=192)
    parser.add_argument("--continuations", type=int, default=8)
    parser.add_argument("--set", nargs="*", default=[], dest="overrides",
                        help="config overrides, key=value")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = load_config(FinetuneConfig, args.config, args.overrides)
    setup = build_setup(config)
    policies = {path: load_any(path).model.eval() for path in args.policies}
    rows = []
    for digit in args.digits:
        optimum, ess = optimum_step_kl(setup, config, digit, args.states, args.continuations,
                                       1000 + digit)
        measured = {path: policy_step_kl(policy, config, digit, 64, 2000 + 100 * digit)
                    for path, policy in policies.items()}
        for index, target in enumerate(setup.model.value_head.spec.targets):
            rows.append({"digit": digit, "target": list(target), "ess": float(ess[index]),
                         "optimum": optimum[index].tolist(),
                         "policies": {p: kl[index].tolist() for p, kl in measured.items()}})
            print(digit, target, f"ESS {float(ess[index]):.0f}",
                  f"optimum {float(optimum[index].sum()):.2f}",
                  {p: round(float(kl[index].sum()), 2) for p, kl in measured.items()},
                  flush=True)
    publish(f"step_kl_{args.name}", {"machine": machine(), "command": " ".join(sys.argv),
                                     "args": vars(args), "rows": rows},
            markdown(rows, args))


def markdown(rows: list[dict], args) -> list[str]:
    """Per step: the optimum's KL and each policy's, averaged over the (digit, target) pairs,
    and their ratio; steps grouped as 1, 2, 3, 4-10, 11-S."""
    steps = len(rows[0]["optimum"])
    groups = [(0, 1), (1, 2), (2, 3), (3, 10), (10, steps)]

    def mean_over(key: str, path: str | None = None) -> list[float]:
        series = [row[key] if path is None else row[key][path] for row in rows]
        return [statistics.mean(s[i] for s in series) for i in range(steps)]

    optimum = mean_over("optimum")
    names = ["step " + (f"{a + 1}" if b == a + 1 else f"{a + 1}-{b}") for a, b in groups]
    lines = [f"# Where the KL goes, step by step ({args.name})", "",
             f"`python benchmarks/value_probes/step_kl.py {args.name} --config {args.config} "
             f"...` on {machine()['date']}: digits {args.digits}, every target; the optimum by "
             f"nested base rollouts ({args.states} states, {args.continuations} continuations "
             f"each; ESS at x0 min {min(r['ess'] for r in rows):.0f}, median "
             f"{statistics.median(r['ess'] for r in rows):.0f}); each policy's Gaussian step "
             "KL on 64 samples per (digit, target). Nats, mean over the (digit, target) pairs.",
             "", "| | " + " | ".join(names) + " | total |", "|---" * (len(names) + 2) + "|"]

    def row(label: str, series: list[float]) -> str:
        cells = [sum(series[a:b]) for a, b in groups]
        return f"| {label} | " + " | ".join(f"{c:.3f}" for c in cells) + \
            f" | {sum(series):.2f} |"

    lines.append(row("exact optimum", optimum))
    for path in rows[0]["policies"]:
        series = mean_over("policies", path)
        lines.append(row(path, series))
        ratios = [f"{sum(series[a:b]) / sum(optimum[a:b]):.2f}x"
                  if sum(optimum[a:b]) > 0.01 else "-" for a, b in groups]
        lines.append("| ratio | " + " | ".join(ratios) +
                     f" | {sum(series) / sum(optimum):.2f}x |")
    return lines


if __name__ == "__main__":
    main()
