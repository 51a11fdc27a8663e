"""The update rule of a run whose config names none (no `mode:`, or `mode: auto`): chosen
before training from the exact optimum's importance weights on base samples, and said with its
reason.

The default (value) rule regresses the soft value h_t(x) = E_pre[p(y | x0, c)^lambda | x_t]
(lambda = gamma / alpha) on base rollouts. What one base rollout tells it about a target is the
optimum's effective sample size per base sample, ESS / n = E[w]^2 / E[w^2] with w = p^lambda:
the regression's targets have a relative variance of about n / ESS. It is measured reward by
reward (each reward's own tilt; on the compress x ink pair the joint targets' ESS was as low as
compressibility's at gamma/alpha 10, yet the value rule did far better there). Where the
smallest ESS / n over a reward's targets is below `MIN_ESS_PER_SAMPLE` (one effective sample in
two hundred base rollouts: the optimum's weights collapse on one or two of 300 base samples),
the optimum sits where base rollouts almost never go, the head has next to nothing to fit
there, and the run takes Adjoint Matching, which steers by the reward's gradient along its own
rollouts, with the settings measured for it (configs/ctrl_digits_compress.yaml). The
measurements behind the threshold are in docs/update_rules.md, section 11.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

from ctrl_ray.checkpoint_index import latest_checkpoint, saved_config
from ctrl_ray.config import from_dict
from ctrl_ray.finetune_config import FinetuneConfig
from ctrl_ray.models.adapter_config import AdapterConfig
from ctrl_ray.objectives.configs import DEFAULT_RULE

AUTO = "auto"
MIN_ESS_PER_SAMPLE = 0.005
MEASURE_SAMPLES = 300   # base samples per context at least (ESS 1.5 at the threshold)
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


def decide(ess_per_sample: float, tilt: float) -> dict:
    """The rule for the optimum's smallest ESS per base sample, with one line saying why."""
    rule = DEFAULT_RULE if ess_per_sample >= MIN_ESS_PER_SAMPLE else FALLBACK_RULE
    relation = ">=" if rule == DEFAULT_RULE else "<"
    reason = (f"rule {rule}: at gamma/alpha {tilt:g} the exact optimum keeps {ess_per_sample:.4f} "
              f"effective samples per base sample where it reaches furthest ({relation} "
              f"{MIN_ESS_PER_SAMPLE:g}), so the value head's regression targets there have a "
              f"relative variance of about {1 / max(ess_per_sample, 1e-12):.0f}")
    if rule != DEFAULT_RULE:
        reason += ": too noisy to learn h from base rollouts; Adjoint Matching steers by the " \
                  "reward's gradient"
    return {"mode": rule, "ess_per_sample": ess_per_sample, "gamma_over_alpha": tilt,
            "threshold": MIN_ESS_PER_SAMPLE, "reason": reason}


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
    """The exact optimum at the run's gamma/alpha from base samples, reward by reward: the
    evaluation's estimate, with at least MEASURE_SAMPLES per context (topped up as the run's
    optimum is); the reward whose optimum keeps the fewest effective samples per base sample.
    Each reward draws its pool again (the same seeds, so the same first samples; its own
    top-ups): k rewards cost k estimates."""
    from ctrl_ray.finetune_setup import build_setup, run_optimum

    samples = max(config.optimum_samples_per_context, MEASURE_SAMPLES)
    measured = []
    for reward in config.rewards:
        single = dataclasses.replace(config, rewards=[reward],
                                     optimum_samples_per_context=samples)
        setup = build_setup(single)
        setup.model.eval()
        result = run_optimum(setup, single, judge=None)
        measured.append({"level": result["levels"][0], "reward": reward.path,
                         "samples_drawn": result["samples_drawn"]})
    return min(measured, key=lambda m: m["level"]["ess_per_sample_min"])


def choose_rule(raw: dict[str, Any]) -> tuple[FinetuneConfig, dict]:
    """Parse a config that leaves the rule open: measure the optimum at the run's tilt, decide,
    and build the config of the chosen rule; the choice with its reason."""
    config = value_config(raw)
    measured = measure(config)
    level = measured["level"]
    choice = decide(level["ess_per_sample_min"], level["gamma_over_alpha"])
    if len(config.rewards) > 1:
        choice["reason"] += f" (the sharpest of the rewards: {measured['reward']})"
    chosen, dropped = with_rule(raw, choice["mode"])
    if dropped:
        choice["reason"] += (f" (not used by {choice['mode']}, which takes its own settings: "
                             f"{', '.join(dropped)})")
    return chosen, {**choice, "dropped": dropped, "optimum_ess_min": level["ess_min"],
                    "optimum_kl": level["kl"], "reward": measured["reward"],
                    "samples_drawn": measured["samples_drawn"]}


__all__ = ["AUTO", "FALLBACK_SETTINGS", "MIN_ESS_PER_SAMPLE", "choose_rule", "decide", "measure",
           "resolve", "wants_choice", "with_rule"]
