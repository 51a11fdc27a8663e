"""CTRL's objective J = gamma E[log p(y | x0, c)] - kl_weight KL of saved policies, paired: every
policy samples the same rollouts of the training distribution (labels, contexts and noise from
one seed), so their J differ by their policies alone. J falls short of the optimum's by
kl_weight KL(pi || pi*): of two policies of one task, the larger J is the closer to the exact
optimum, whatever rule trained it.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/value_probes/policy_objective.py CONFIG \
        POLICY_DIR [POLICY_DIR ...] [--set key=value ...] [--rollouts 256] [--seed 1]

`--optimum` also prints the optimum's J* = kl_weight E[log E_pre[p(y | x0, c)^lambda]] on the
same rows (Z per context from the rule choice's base rollouts, 300 per context), so J* - J is
each policy's kl_weight KL(pi || pi*): its distance to the exact optimum, in nats.

`--step-scales S ...` scores a value policy at other step scales; `--control-scales S ...` an
adapter policy (Adjoint Matching, pathwise, PPO) with its control times S, exactly: it predicts
eps_pre + S (eps_theta - eps_pre), two network passes (docs/update_rules.md, section 23).
`--scales-from-profile FILE:NAME [--profile-fractions F ...]` scales each step's control by
its own s_k = 1 + F (gain_k / (2 KL_k) - 1), the first-order best size that
`benchmarks/adjoint_step_profile.py` measured for policy NAME (written to FILE).

`--calibration-of RUN_SEED --rollouts 128` samples the step-scale calibration's own rollouts
of a run with that seed (how docs/update_rules.md, section 11, compared the rules); a value
policy's scale was chosen on them, so fresh rollouts (`--seed`) are the unbiased comparison.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
from pathlib import Path

import torch

from ctrl_ray.config import load_config, load_raw
from ctrl_ray.finetune_setup import FinetuneConfig, build_setup
from ctrl_ray.objectives.base import draw_inputs
from ctrl_ray.objectives.step_scale import CALIBRATION_SEED
from ctrl_ray.policy import load_any
from ctrl_ray.rule_choice import base_log_likelihoods, value_config
from ctrl_ray.sampling.sampler import sample


def objective(model, reward_fn, config, inputs) -> dict:
    """J with its standard error, E[log p] and the path KL of `model` on `inputs`, and each
row's gamma log p - kl_weight KL, KL and log p (``values``, ``kl_values``,
``log_likelihood_values``: for paired comparisons)."""
    log_likelihood, kl = [], []
    for start in range(0, inputs.batch_size, config.batch_size):
        with torch.no_grad():
            policy = sample(model, inputs.slice(start, start + config.batch_size),
                            eta=config.eta, kl_reduction=config.kl_reduction)
            log_likelihood.append(reward_fn(policy.x0, policy.labels, policy.contexts).float())
        kl.append(policy.path_kl.float())
    log_likelihood, kl = torch.cat(log_likelihood), torch.cat(kl)
    values = config.gamma * log_likelihood - config.kl_weight * kl
    return {"objective": values.mean().item(),
            "objective_se": values.std().item() / math.sqrt(len(values)),
            "log_likelihood": log_likelihood.mean().item(), "kl": kl.mean().item(),
            "values": values, "kl_values": kl, "log_likelihood_values": log_likelihood}


def scale_control(model, scale: float | dict[int, float]) -> None:
    """Make an adapter policy predict eps_pre + scale (eps_policy - eps_pre): its control (the
    step mean's departure from the base's) times ``scale``, exactly; two network passes. A dict
    gives each timestep its own scale (1 where it names none)."""
    predict = type(model).predict_noise.__get__(model)

    def scaled(x_t, t, context, labels=None):
        if model._reference_mode:
            return predict(x_t, t, context, labels)
        factor = scale if not isinstance(scale, dict) else \
            scale.get(int(torch.as_tensor(t).flatten()[0]), 1.0)
        reference = model.reference_noise(x_t, t, context)
        return reference + factor * (predict(x_t, t, context, labels) - reference)

    model.predict_noise = scaled


def profile_scales(spec: str, fraction: float) -> dict[int, float]:
    """Per-timestep scales 1 + fraction (gain_k / (2 KL_k) - 1) from an
    `adjoint_step_profile.py` result, ``spec`` = FILE:NAME (steps without control keep 1)."""
    path, name = spec.rsplit(":", 1)
    steps = json.loads(Path(path).read_text())["profiles"][name]["steps"]
    return {step["timestep"]: 1 + fraction * (step["gain"] / (2 * step["kl"]) - 1)
            for step in steps if step["kl"] > 1e-6}


def optimum_objective(config_path: str, overrides: list[str], inputs,
                      label_classes: dict[str, int]) -> float:
    """J* on the rows of `inputs`: kl_weight times the mean over rows of log Z(c, y), Z the
    mean of p(y | x0, c)^lambda over the base rollouts of the row's context (all of them where
    contexts are not class ids). A row's J* - J is kl_weight KL(pi || pi*) of its (c, y)."""
    return optimum_objective_rows(config_path, overrides, inputs, label_classes).mean().item()


def optimum_objective_rows(config_path: str, overrides: list[str], inputs,
                           label_classes: dict[str, int]) -> torch.Tensor:
    """`optimum_objective` of each row, kl_weight log Z(c, y) (N,)."""
    config = value_config(load_raw(config_path, overrides))
    log_p, contexts, tilt = base_log_likelihoods(config)
    rows = torch.stack([inputs.labels[name].long() for name in label_classes], 1)
    # the columns of `base_log_likelihoods`: the value head's targets, in product order
    targets = itertools.product(*(range(k) for k in label_classes.values()))
    index = {target: j for j, target in enumerate(targets)}
    out = []
    for i, row in enumerate(rows.tolist()):
        keep = slice(None) if contexts is None else contexts == inputs.contexts[i]
        column = log_p[keep, index[tuple(row)]]
        out.append(float(torch.logsumexp(tilt * column, 0) - math.log(len(column))))
    return config.objective.kl_weight * torch.tensor(out, dtype=torch.float64)


def by_target(inputs, label_classes: dict[str, int], best_rows: torch.Tensor,
              row: dict) -> list[str]:
    """Markdown rows of J* - J, KL and E[log p] per (context, target), with kl_weight log Z
    (how rare the target is under the base): where a policy's distance lies."""
    keys = torch.stack([inputs.labels[name].long() for name in label_classes], 1)
    if inputs.contexts is not None and inputs.contexts.dim() == 1:
        keys = torch.cat([inputs.contexts.long()[:, None], keys], 1)
    gap = best_rows - row["values"].double()
    lines = ["| context, target | rows | log Z | J* - J | KL | E[log p] |",
             "|---|---|---|---|---|---|"]
    for key in keys.unique(dim=0).tolist():
        chosen = (keys == torch.tensor(key)).all(1)
        lines.append(f"| {tuple(key)} | {int(chosen.sum())} | {best_rows[chosen].mean():.3f} | "
                     f"{gap[chosen].mean():.3f} | {row['kl_values'][chosen].mean():.2f} | "
                     f"{row['log_likelihood_values'][chosen].mean():.3f} |")
    return lines


def paired_parser(doc: str) -> argparse.ArgumentParser:
    """The flags of a probe that scores saved policies on one seed's rollouts: a config, the
    policies, `--set` overrides, `--rollouts` and `--seed`."""
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("policies", nargs="+")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--rollouts", type=int, default=256)
    parser.add_argument("--seed", type=int, default=1)
    return parser


def main() -> None:
    parser = paired_parser(__doc__)
    parser.add_argument("--calibration-of", type=int, default=None, metavar="RUN_SEED")
    parser.add_argument("--optimum", action="store_true",
                        help="also the optimum's J* on the same rows, and J* - J per policy")
    parser.add_argument("--by-target", action="store_true",
                        help="with --optimum: J* - J per (context, target) as well")
    parser.add_argument("--step-scales", type=float, nargs="+", default=None,
                        help="score each value policy at these step scales instead of its own")
    parser.add_argument("--control-scales", type=float, nargs="+", default=None,
                        help="score each adapter policy with its noise prediction's departure "
                             "from the base's times each of these scales")
    parser.add_argument("--scales-from-profile", default=None, metavar="FILE:NAME",
                        help="score each adapter policy with each step's control at the "
                             "first-order best size an adjoint_step_profile.py run measured")
    parser.add_argument("--profile-fractions", type=float, nargs="+", default=[1.0],
                        help="with --scales-from-profile: how far to move each step's scale "
                             "from 1 toward it (0 = the policy as trained)")
    args = parser.parse_args()
    if args.scales_from_profile and (args.step_scales or args.control_scales):
        parser.error("--scales-from-profile replaces --step-scales / --control-scales")
    try:   # read before any model is built or rollout drawn
        profiled = {f"per-step sizes x{fraction:g} of the way":
                    profile_scales(args.scales_from_profile, fraction)
                    for fraction in args.profile_fractions} if args.scales_from_profile else {}
    except (OSError, ValueError, KeyError) as error:
        parser.error(f"--scales-from-profile {args.scales_from_profile}: no profile there "
                     f"({error!r}); expected FILE:NAME of an adjoint_step_profile.py result")
    if args.by_target and not args.optimum:
        parser.error("--by-target needs --optimum (J* per row)")
    config = load_config(FinetuneConfig, args.config, args.overrides)
    setup = build_setup(config)   # the task's reward function and the model's shapes
    objective_config = config.objective
    seed = args.seed if args.calibration_of is None else args.calibration_of + CALIBRATION_SEED
    inputs = draw_inputs(setup.model, dataclasses.replace(
        objective_config, batch_size=args.rollouts), seed)
    models = {path: load_any(path).model.eval() for path in args.policies}
    for path, model in models.items():   # before the optimum's minutes of base rollouts
        if args.step_scales and getattr(model, "value_head", None) is None:
            parser.error(f"--step-scales: {path} has no value head to scale")
        if ((args.control_scales or args.scales_from_profile)
                and getattr(model, "value_head", None) is not None):
            flag = "--control-scales" if args.control_scales else "--scales-from-profile"
            parser.error(f"{flag}: {path} steers by a value head (--step-scales)")
    best = None
    if args.optimum:
        best_rows = optimum_objective_rows(args.config, args.overrides, inputs,
                                           setup.model.label_classes)
        best = best_rows.mean().item()
        print(f"optimum: J* {best:.3f} on the same rows", flush=True)
    for name, scales in profiled.items():
        print(f"{name}: " + ", ".join(f"t={t} x{s:.2f}" for t, s in scales.items()), flush=True)
    for path, model in models.items():
        for scale in args.step_scales or args.control_scales or list(profiled) or [None]:
            label = path
            if scale is not None and args.step_scales:   # a value policy at another scale
                model.value_head.spec.step_scale, label = scale, f"{path} x{scale:g}"
            elif scale in profiled:
                scale_control(model, profiled[scale])
                label = f"{path} control, {scale}"
            elif scale is not None:
                scale_control(model, scale)
                label = f"{path} control x{scale:g}"
            row = objective(model, setup.reward_fn, objective_config, inputs)
            gap = "" if best is None else f", J* - J {best - row['objective']:.3f}"
            print(f"{label}: J {row['objective']:.3f} +- {row['objective_se']:.3f}, E[log p] "
                  f"{row['log_likelihood']:.3f}, KL {row['kl']:.2f}{gap} ({args.rollouts} "
                  f"rollouts, seed {seed})", flush=True)
            if args.optimum and args.by_target:
                print("\n".join(by_target(inputs, setup.model.label_classes, best_rows, row)),
                      flush=True)


if __name__ == "__main__":
    main()
