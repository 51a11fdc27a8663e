"""Choose the value head's step scale by CTRL's own objective, once the head is fitted.

The fit of h does not depend on the scale s of the step the policy takes by it
(`adapter.value_head.step_scale`), and a head fitted with early stopping is flatter than h
(docs/update_rules.md, section 9), so s is the one free parameter the fit leaves. For any
policy pi, J(pi) = gamma E[log p(y | x0, c)] - kl_weight KL(pi || pi_pre) falls short of the
optimum's by exactly kl_weight KL(pi || pi*), so among the scales the one with the largest J,
measured on calibration rollouts of the training distribution, is the policy closest to the
exact optimum. Every scale samples the same noise, so the comparison is paired.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ctrl_ray.objectives.base import draw_inputs
from ctrl_ray.objectives.configs import ValueConfig
from ctrl_ray.objectives.pathwise import RewardFn
from ctrl_ray.sampling.sampler import sample

CALIBRATION_SEED = 7_777_777   # offset from the run's seed: no training batch draws it
EXTENSION_RATIO = 1.5          # a scale past the grid's edge, times the last one


def calibrate_step_scale(model, reward_fn: RewardFn, config: ValueConfig, seed: int) -> dict:
    """Sample ``calibration_rollouts`` of the policy at every scale of ``step_scales``, and,
    while the best is the grid's largest (smallest) scale, at up to ``step_scale_extensions``
    more, each ``EXTENSION_RATIO`` times past the last (a head fitted to heavy-tailed targets
    can be flat by more than the grid spans: docs/update_rules.md, section 15); set the head's
    scale to the one with the largest objective J, and return it with the table (J with its
    standard error, the mean log-likelihood and the mean KL per scale, by scale)."""
    head = model.value_head
    configured = head.spec.step_scale
    if head.is_flat():   # every scale is the base model: nothing to choose
        return {"step_scale": configured, "rollouts": 0, "table": []}
    inputs = draw_inputs(model, dataclasses.replace(
        config, batch_size=config.calibration_rollouts), seed + CALIBRATION_SEED)

    def measure(scale: float) -> dict:
        head.spec.step_scale = scale
        log_likelihood, kl = [], []
        for start in range(0, inputs.batch_size, config.batch_size):
            with torch.no_grad():
                policy = sample(model, inputs.slice(start, start + config.batch_size),
                                eta=config.eta, kl_reduction=config.kl_reduction)
                log_likelihood.append(reward_fn(policy.x0, policy.labels,
                                                policy.contexts).float().cpu())
            kl.append(policy.path_kl.float().cpu())
        log_likelihood, kl = torch.cat(log_likelihood), torch.cat(kl)
        objective = config.gamma * log_likelihood - config.kl_weight * kl
        return {"step_scale": scale, "objective": objective.mean().item(),
                "objective_se": objective.std().item() / math.sqrt(len(objective)),
                "log_likelihood": log_likelihood.mean().item(), "kl": kl.mean().item()}

    table = [measure(scale) for scale in config.step_scales]
    for _ in range(config.step_scale_extensions if len(table) > 1 else 0):
        scales = sorted(row["step_scale"] for row in table)
        best = _best(table, configured)["step_scale"]
        if best not in (scales[0], scales[-1]):
            break
        table.append(measure(float(f"{scales[-1] * EXTENSION_RATIO:.3g}") if best == scales[-1]
                             else float(f"{scales[0] / EXTENSION_RATIO:.3g}")))
    table.sort(key=lambda row: row["step_scale"])
    best = _best(table, configured)
    head.spec.step_scale = best["step_scale"]
    return {"step_scale": best["step_scale"], "rollouts": inputs.batch_size, "table": table,
            "extended": len(table) - len(config.step_scales)}


def describe(calibration: dict) -> str:
    """One line for the run's output: what was chosen, and why."""
    rows = calibration["table"]
    if not rows:
        return (f"step scale x{calibration['step_scale']:g} kept: the head is untrained, so "
                f"every scale samples the base model")
    best = next(row for row in rows if row["step_scale"] == calibration["step_scale"])
    cells = ", ".join(f"x{row['step_scale']:.3g}: {row['objective']:.3f}" for row in rows)
    extended = (f"; {calibration['extended']} past the grid's edge, where J still rose"
                if calibration.get("extended") else "")
    return (f"step scale x{best['step_scale']:g}: the largest objective J = gamma E[log p] - "
            f"kl_weight KL on {calibration['rollouts']} calibration rollouts, the policy "
            f"closest to the exact optimum among ({cells}{extended}); KL {best['kl']:.2f} nats")


def _best(table: list[dict], configured: float) -> dict:
    """The row with the largest objective; among equal ones, the scale nearest the configured."""
    return max(table, key=lambda row: (row["objective"], -abs(row["step_scale"] - configured)))
