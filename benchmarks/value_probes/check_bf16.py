"""Probe: the value learner's held-out check, and its whole fit, in bf16 against fp32, on the
demo's run (configs/demo.yaml's finetune section on the demo's base, one thread). Each variant
takes the same 20 learner steps on the same base rollouts of 32; it prints the learner's median
seconds per step over the last 10 and the fp32 loss of the head it leaves on 256 fresh base
rollouts, per timestep. Writes benchmarks/results/check_bf16.{json,md}.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/value_probes/check_bf16.py
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import statistics
import sys
import time

import torch

sys.path.insert(0, "benchmarks")
from common import machine, publish  # noqa: E402

from ctrl_ray.config import from_dict, read_yaml  # noqa: E402
from ctrl_ray.finetune import FinetuneConfig, build_setup  # noqa: E402
from ctrl_ray.models.soft_value import value_loss  # noqa: E402
from ctrl_ray.objectives import value as value_rule  # noqa: E402
from ctrl_ray.objectives.base import draw_inputs  # noqa: E402
from ctrl_ray.sampling.sampler import DenoisingSchedule, sample  # noqa: E402

UPDATES = 20
VARIANTS = {   # name -> (check_bf16, the whole learner step under bf16 autocast)
    "fp32 check, fp32 fit": (False, False),
    "bf16 check, fp32 fit (check_bf16, the default)": (True, False),
    "bf16 check, bf16 fit": (True, True),
}


def payload(setup, objective, seed: int, batch: int) -> dict:
    """Base rollouts and their targets, as a worker ships them."""
    model = setup.model
    inputs = draw_inputs(model, dataclasses.replace(objective, batch_size=batch), seed)
    with torch.no_grad():
        base = sample(model, inputs, eta=objective.eta, compute_kl=False, from_reference=True)
        tilt = objective.tilt_exponent(base.x0[0].numel())
        targets = tilt * value_rule.target_log_likelihoods(model, setup.reward_fn, base.x0,
                                                            base.contexts)
    return {"states": base.states, "log_targets": targets, "contexts": base.contexts}


def main() -> None:
    torch.set_num_threads(1)
    raw = copy.deepcopy(read_yaml("configs/demo.yaml")["finetune"])
    raw.update(base_model="outputs/base-digits16-demo", output_dir="outputs/probe-check-bf16",
               evaluate=False)
    config = from_dict(FinetuneConfig, raw)
    rows = []
    for name, (check_bf16, fit_bf16) in VARIANTS.items():
        setup = build_setup(config)
        objective = dataclasses.replace(config.objective, check_bf16=check_bf16)
        generator, seconds = torch.Generator().manual_seed(0), []
        for version in range(UPDATES):
            shard = payload(setup, objective, version, objective.batch_size)
            autocast = torch.autocast("cpu", dtype=torch.bfloat16) if fit_bf16 else \
                contextlib.nullcontext()
            start = time.perf_counter()
            with autocast:
                value_rule.learner_step(setup.model, setup.optimizer, [shard], objective,
                                        generator, version)
            seconds.append(time.perf_counter() - start)
        fresh = payload(setup, objective, 999, 256)
        head, states = setup.model.value_head, fresh["states"]
        schedule = DenoisingSchedule.create(setup.model.alphas_cumprod, states.shape[0] - 1,
                                            objective.eta)
        timesteps = torch.cat([schedule.timesteps, schedule.timesteps.new_zeros(1)]).long()
        with torch.no_grad():
            losses = [value_loss(head, states[k], timesteps[k].expand(len(states[k])),
                                 setup.model.head_context(fresh["contexts"]),
                                 fresh["log_targets"]).item() for k in range(len(timesteps))]
        rows.append({"variant": name, "learner_seconds": statistics.median(seconds[-10:]),
                     "fresh_loss": statistics.mean(losses), "fresh_loss_per_step": losses})
        print(rows[-1]["variant"], round(rows[-1]["learner_seconds"], 3),
              round(rows[-1]["fresh_loss"], 4), flush=True)
    lines = ["# The value learner's check and fit in bf16", "",
             f"`python benchmarks/value_probes/check_bf16.py` on {machine()['date']} (1-minute "
             f"load average {machine()['load_average_1min']:.1f}): the demo's run, {UPDATES} "
             "learner steps on the same base rollouts of 32, one thread; learner seconds: "
             "median of the last 10; fresh loss: the fp32 value loss of the head it leaves on 256 "
             "fresh base rollouts, mean over the 21 states (and at x_T / x_0).", "",
             "| variant | learner s | fresh fp32 loss | at x_T | at x_0 |", "|---|---|---|---|---|"]
    for row in rows:
        per_step = row["fresh_loss_per_step"]
        lines.append(f"| {row['variant']} | {row['learner_seconds']:.3f} | "
                     f"{row['fresh_loss']:.4f} | {per_step[0]:.3f} | {per_step[-1]:.3f} |")
    publish("check_bf16", {"machine": machine(), "updates": UPDATES, "rows": rows}, lines)


if __name__ == "__main__":
    main()
