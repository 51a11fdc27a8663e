"""The update rule of a run whose config names none (no `mode:`, or `mode: auto`): chosen
before training from the value rule's own regression targets on base rollouts, and said with
its reason.

The default (value) rule regresses the soft value h_t(x) = E_pre[p(y | x0, c)^lambda | x_t]
(lambda = gamma / alpha) on base rollouts, for every target y at once: its loss is a
cross-entropy over targets weighted by, plus a Poisson regression of, the targets' mass
m(x0, c) = sum_y p(y | x0, c)^lambda. At lambda = 1 the mass is 1 for any classifier reward
(and any product of them): h is the classifier p(y | x_t, c) of noisy states, which base
rollouts teach like any classifier's training set, however rare a class. Above 1 the mass is a
moment of p dominated by the rollouts on which the reward is confident; where the reward is
weak (compressibility, 0.53 accuracy, at lambda = 10) a few base rollouts in a hundred carry
it, the head learns little beyond its mean, and Adjoint Matching, which steers by the reward's
gradient along its own rollouts, does better. What is measured is the effective sample size per
base rollout of m, ESS / n = E[m]^2 / E[m^2], context by context; below
`MIN_MASS_ESS_PER_SAMPLE` the run takes Adjoint Matching with the settings measured for it
(configs/ctrl_digits_compress.yaml). The measurements behind it are in docs/update_rules.md,
sections 11 and 15 (the optimum's own ESS, the earlier criterion, ranked the labels otherwise
once the head improved).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Any

from ctrl_ray.checkpoint_index import latest_checkpoint, saved_config
from ctrl_ray.config import from_dict
from ctrl_ray.finetune_config import FinetuneConfig
from ctrl_ray.models.adapter_config import AdapterConfig
from ctrl_ray.objectives.configs import DEFAULT_RULE

AUTO = "auto"
MIN_MASS_ESS_PER_SAMPLE = 0.1
MEASURE_SAMPLES = 300   # base rollouts per context on average
MEASURE_MAX = 3000      # base rollouts at most
MEASURE_BATCH = 256
MEASURE_SEED = 9_999_999
MIN_CONTEXT_ROWS = 50   # a context with fewer rollouts is measured with the rest, pooled
FALLBACK_RULE = "adjoint"
# What a run that falls back takes: the settings configs/ctrl_digits_compress.yaml measured.
FALLBACK_SETTINGS = {
    "adapter": {"kind": "lora", "rank": 4, "min_timestep": 200},
    "objective": {"lr_embedding": 0.03, "lr_adapter": 0.003, "max_grad_norm": 1.0},
}
# The objective's keys every rule reads the same way; a rule's learning rates are its own.
SHARED_KEYS = ("gamma", "kl_weight", "kl_reduction", "batch_size", "num_inference_steps", "eta",
               "label_distribution", "context_distribution")


def wants_choice(raw: dict[str, Any]) -> bool:
    """Whether a raw config (YAML and overrides, before parsing) leaves the rule to ctrl-ray."""
    return raw.get("mode", AUTO) == AUTO


def resolve(raw: dict[str, Any], resume: bool | str = False) -> tuple[FinetuneConfig, bool]:
    """The config to check before any work, and whether its rule is still to be chosen: as
    given when it names one; the rule its checkpoint ran on a resume; else the default rule's
    config (checked as such; `choose_rule` decides once the checks pass)."""
    if not wants_choice(raw):
        return from_dict(FinetuneConfig, raw), False
    config = value_config(raw)
    checkpoint = latest_checkpoint(Path(config.output_dir) / "checkpoints") if resume else None
    saved = saved_config(checkpoint) if checkpoint is not None else None
    if saved and saved.get("mode"):
        print(f"rule {saved['mode']}: the rule the resumed run chose")
        return with_rule(raw, saved["mode"])[0], False
    return config, True


def value_config(raw: dict[str, Any]) -> FinetuneConfig:
    """The config as the default rule would run it (what the choice measures against)."""
    return with_rule(raw, DEFAULT_RULE)[0]


def decide(mass_ess_per_sample: float, tilt: float, exact: bool = False) -> dict:
    """The rule for the smallest ESS per base rollout of the value targets' mass, with one line
    saying why (``exact``: known without drawing, `mass_is_one`)."""
    rule = DEFAULT_RULE if mass_ess_per_sample >= MIN_MASS_ESS_PER_SAMPLE else FALLBACK_RULE
    if exact:
        reason = (f"rule {rule}: at gamma/alpha {tilt:g} each reward's p(y | x0) enters the value "
                  f"head's targets to the power 1, so their mass over targets is 1 on every "
                  f"rollout (nothing to measure) and h is a classifier of noisy states")
    else:
        relation = ">=" if rule == DEFAULT_RULE else "<"
        reason = (f"rule {rule}: at gamma/alpha {tilt:g} the value head's regression targets on "
                  f"base rollouts, p(y | x0)^{tilt:g} summed over targets, keep "
                  f"{mass_ess_per_sample:.3f} effective rollouts per base rollout ({relation} "
                  f"{MIN_MASS_ESS_PER_SAMPLE:g})")
        if rule != DEFAULT_RULE:
            reason += (": a few rollouts where the reward is confident carry them, too few to "
                       "learn h from; Adjoint Matching steers by the reward's gradient")
    return {"mode": rule, "mass_ess_per_sample": mass_ess_per_sample, "gamma_over_alpha": tilt,
            "threshold": MIN_MASS_ESS_PER_SAMPLE, "reason": reason}


def with_rule(raw: dict[str, Any], rule: str) -> tuple[FinetuneConfig, list[str]]:
    """The config for `rule`: the objective's shared keys as given, the rest of the objective
    and the adapter from the rule's measured settings; also the given keys it does not take
    as given."""
    if rule == DEFAULT_RULE:   # the value head is its adapter: another kind is left out
        adapter = dict(raw.get("adapter") or {})
        from_dict(AdapterConfig, adapter, prefix="adapter.")   # a bad value is refused first
        dropped = ["adapter.kind"] if adapter.pop("kind", None) not in (None, "value") else []
        return from_dict(FinetuneConfig, {**raw, "mode": rule, "adapter": adapter}), dropped
    given = dict(raw.get("objective") or {})
    objective = {**FALLBACK_SETTINGS["objective"],
                 **{key: value for key, value in given.items() if key in SHARED_KEYS}}
    settings = {**copy.deepcopy(raw), "mode": rule, "objective": objective,
                "adapter": dict(FALLBACK_SETTINGS["adapter"])}
    config = from_dict(FinetuneConfig, settings)
    dropped = [f"{section}.{key}"
               for section, values in (("objective", given), ("adapter", raw.get("adapter") or {}))
               for key, value in values.items()
               if getattr(getattr(config, section), key, None) != value]
    return config, dropped


def measure(config: FinetuneConfig) -> dict:
    """The smallest ESS per base rollout of the value targets' mass (`mass_ess_per_sample`) at
    the run's tilt, on `base_log_likelihoods`; exactly 1, with nothing drawn, where every
    reward's exponent is 1 (`mass_is_one`)."""
    if mass_is_one(config):
        objective = config.objective
        return {"mass_ess_per_sample": 1.0, "gamma_over_alpha": objective.gamma /
                objective.kl_weight, "rollouts": 0, "groups": 0}
    log_likelihoods, contexts, tilt = base_log_likelihoods(config)
    fractions = mass_ess_per_sample(tilt * log_likelihoods, contexts)
    return {"mass_ess_per_sample": min(fractions), "gamma_over_alpha": tilt,
            "rollouts": len(log_likelihoods), "groups": len(fractions)}


def mass_is_one(config: FinetuneConfig) -> bool:
    """Whether each reward's exponent in the targets, gamma / kl_weight times its weight, is 1
    (KL summed over pixels): a classifier's p(. | x0, c) sums to 1 over its classes, and so does
    a product of them over the joint targets, so the mass is 1 on every rollout."""
    objective = config.objective
    return objective.kl_reduction == "sum" and all(
        math.isclose(objective.gamma / objective.kl_weight * reward.weight, 1.0)
        for reward in config.rewards)


def base_log_likelihoods(config: FinetuneConfig):
    """log p(y | x0, c) for every target of the value head (all rewards jointly, as it regresses
    them) on base rollouts of the training distribution of labels and contexts, MEASURE_SAMPLES
    per context on average (MEASURE_MAX at most): (N, J) float64, the (N,) class-id contexts
    (None where contexts are not class ids), and the run's tilt gamma / alpha."""
    import torch  # the CLI's checks import this module: the heavy imports wait for a measurement

    from ctrl_ray.finetune_setup import build_setup
    from ctrl_ray.objectives.base import draw_inputs
    from ctrl_ray.objectives.value import target_log_likelihoods
    from ctrl_ray.sampling.sampler import sample

    setup = build_setup(config)
    model = setup.model.eval()
    objective = config.objective
    total = min(MEASURE_MAX, MEASURE_SAMPLES * max(1, model.num_contexts or 1))
    log_likelihoods, contexts = [], []
    for start in range(0, total, MEASURE_BATCH):
        inputs = draw_inputs(model, dataclasses.replace(
            objective, batch_size=min(MEASURE_BATCH, total - start)), MEASURE_SEED + start)
        with torch.no_grad():
            base = sample(model, inputs, eta=objective.eta, compute_kl=False,
                          from_reference=True)
            log_likelihoods.append(target_log_likelihoods(
                model, setup.reward_fn, base.x0, base.contexts).double().cpu())
        contexts.append(None if inputs.contexts is None or inputs.contexts.dim() != 1
                        else inputs.contexts)
    tilt = objective.tilt_exponent(math.prod(model.sample_shape))
    return (torch.cat(log_likelihoods),
            torch.cat(contexts) if all(c is not None for c in contexts) else None, tilt)


def mass_ess_per_sample(log_targets, contexts) -> list[float]:
    """ESS per rollout of the targets' mass sum_y exp(log_targets) (N, J), context by context
    for the contexts with MIN_CONTEXT_ROWS rollouts or more, the others pooled."""
    import torch

    log_mass = torch.logsumexp(log_targets, 1)
    if contexts is None:
        return [ess_per_sample(log_mass)]
    values, counts = contexts.unique(return_counts=True)
    large = values[counts >= MIN_CONTEXT_ROWS]
    rest = ~torch.isin(contexts, large)
    return [ess_per_sample(log_mass[contexts == c]) for c in large] + (
        [ess_per_sample(log_mass[rest])] if rest.any() else [])


def ess_per_sample(log_weights) -> float:
    """E[w]^2 / E[w^2] of weights given by their logs: the effective sample size of the
    self-normalised weights (`ctrl_ray.optimum.normalised`) over their number; 1 when all are
    equal, 1/n at worst."""
    from ctrl_ray.optimum import normalised

    weights = normalised(log_weights.double().cpu().numpy())
    return float(1.0 / (weights**2).sum() / len(weights))


def choose_rule(raw: dict[str, Any]) -> tuple[FinetuneConfig, dict]:
    """Parse a config that leaves the rule open: measure the optimum at the run's tilt, decide,
    and build the config of the chosen rule; the choice with its reason."""
    config = value_config(raw)
    measured = measure(config)
    choice = decide(measured["mass_ess_per_sample"], measured["gamma_over_alpha"],
                    exact=not measured["rollouts"])
    chosen, dropped = with_rule(raw, choice["mode"])
    if dropped:
        choice["reason"] += (f" (not used by {choice['mode']}, which takes its own settings: "
                             f"{', '.join(dropped)})")
    return chosen, {**choice, "dropped": dropped, "rollouts": measured["rollouts"]}


__all__ = ["AUTO", "FALLBACK_SETTINGS", "MIN_MASS_ESS_PER_SAMPLE", "choose_rule", "decide",
           "base_log_likelihoods", "ess_per_sample", "mass_ess_per_sample", "mass_is_one",
           "measure", "resolve", "wants_choice", "with_rule"]
