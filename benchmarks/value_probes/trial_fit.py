"""Can the value head learn h from base rollouts on this task? Before any training: draw N base
rollouts with the value rule's own worker step, fit a fresh head on them as the rule's final fit
does (best held-out weights kept), and compare its held-out value loss with the best constant
head's (log m and q fitted to the fit rollouts' mean) and the flat head's it starts from; then
sample the policy with that head and record, step by step, the effective number of the step's
2K candidates (1 / sum of squared self-normalised weights h_t(x') / sum h_t) and the KL.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/value_probes/trial_fit.py \
        [--tasks ink slant ...] [--rollouts 512] [--seeds 0 1]

A head no better than the constant steers nowhere (on compressibility at gamma/alpha 10 every
online fit kept the flat head: docs/update_rules.md, section 14); the question is whether that
shows on a few hundred base rollouts, before training. Tasks as `benchmarks/rule_choice.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
from rule_choice import DEMO_BASE, TASKS  # noqa: E402

from ctrl_ray.config import load_raw  # noqa: E402
from ctrl_ray.finetune_setup import build_setup  # noqa: E402
from ctrl_ray.models.soft_value import SoftValueNet, predicted_value_loss  # noqa: E402
from ctrl_ray.objectives import value  # noqa: E402
from ctrl_ray.rule_choice import value_config  # noqa: E402
from ctrl_ray.sampling.sampler import RolloutInputs, sample  # noqa: E402


def constant_loss(log_targets: torch.Tensor, fit: torch.Tensor, held: torch.Tensor) -> float:
    """The value loss on the held-out rows of the best head that ignores x and t: m the fit
    rows' mean mass, q their mass-weighted mean of the normalised targets."""
    log_mass = torch.logsumexp(log_targets[fit], dim=1)
    log_m = log_mass.exp().mean().log()
    log_q = ((log_targets[fit] - log_mass[:, None]).exp() * log_mass.exp()[:, None]).sum(0).log() \
        - log_mass.exp().sum().log()
    return float(predicted_value_loss(log_q.expand(len(held), -1), log_m.expand(len(held)),
                                      log_targets[held]))


def task_setup(task: str):
    """(the task's config as the value rule runs it on the demo's base, its setup)."""
    path, extra = TASKS[task]
    config = value_config({**load_raw(path, [f"base_model={DEMO_BASE}", *extra]),
                           "mode": "value"})
    return config, build_setup(config)


def batch_inputs(model, objective, count: int, first_seed: int) -> list[RolloutInputs]:
    """The randomness of `count` rollouts of the training distribution, in batches of 256
    (the last one shorter), batch i drawn from seed first_seed + i."""
    return [RolloutInputs.draw(first_seed + i, min(256, count - start),
                               objective.num_inference_steps, model.sample_shape,
                               model.label_classes, num_contexts=model.num_contexts)
            for i, start in enumerate(range(0, count, 256))]


def base_payloads(setup, objective, rollouts: int, seed: int) -> list[dict]:
    """`rollouts` base rollouts as the value rule's worker step draws them, in batches of 256
    (seeds 1000 seed + 1, + 2, ...)."""
    model = setup.model.eval()
    return [value.worker_step(model, setup.reward_fn, inputs, objective, inputs.batch_size, 0,
                              report=False)[0]
            for inputs in batch_inputs(model, objective, rollouts, 1000 * seed + 1)]


def trial(task: str, rollouts: int, seed: int, steps: int) -> dict:
    config, setup = task_setup(task)
    objective = config.objective
    model = setup.model.eval()
    start = time.time()
    payloads = base_payloads(setup, objective, rollouts, seed)
    drawn = time.time() - start
    replay = value._replay(model.value_head, objective)
    replay.add(payloads)
    slots = replay.slots()
    held = replay.heldout_buffer[slots]
    log_targets = replay.buffers["log_targets"]
    constant = constant_loss(log_targets, slots[~held], slots[held])
    start = time.time()
    fit = value.final_fit(model, dataclasses.replace(objective, final_fit_steps=steps), seed)
    fitted = time.time() - start
    candidate_ess, kl, log_likelihood = policy_steps(model, setup.reward_fn, objective, seed)
    return {"candidate_ess": candidate_ess, "kl_per_step": kl, "log_likelihood": log_likelihood,
            "task": task, "rollouts": rollouts, "seed": seed, "steps": steps,
            "constant": constant, "flat": fit["final_fit_heldout_loss_before"],
            "fit": fit["final_fit_heldout_loss"], "kept": fit["final_fit_kept_steps"],
            "draw_s": drawn, "fit_s": fitted}


def policy_steps(model, reward_fn, objective, seed: int, rollouts: int = 64):
    """The policy's candidates' effective number / count at each step (mean over rows), KL per
    step and its mean log-likelihood, on `rollouts` rollouts of a seed the fit never saw."""
    recorded = []
    log_value = SoftValueNet.log_value

    def recording(self, x, t, contexts, labels):
        out = log_value(self, x, t, contexts, labels)
        candidates = x.shape[0] // rollouts
        if candidates > 1:
            weights = torch.softmax(out[0].detach().view(candidates, -1), 0)
            recorded.append(f"{(1 / (weights ** 2).sum(0)).mean().item():.1f}/{candidates}")
        return out

    inputs = RolloutInputs.draw(10_000 + seed, rollouts, objective.num_inference_steps,
                                model.sample_shape, model.label_classes,
                                num_contexts=model.num_contexts)
    SoftValueNet.log_value = recording
    try:
        with torch.no_grad():
            policy = sample(model, inputs, eta=objective.eta)
    finally:
        SoftValueNet.log_value = log_value
    log_likelihood = reward_fn(policy.x0, policy.labels, policy.contexts).mean().item()
    return recorded, policy.kl.mean(1).tolist(), log_likelihood


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--rollouts", type=int, nargs="+", default=[512])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--out", default="outputs/trial_fit.jsonl")
    args = parser.parse_args()
    for task in args.tasks:
        for rollouts in args.rollouts:
            for seed in args.seeds:
                row = trial(task, rollouts, seed, args.steps)
                gain = (row["constant"] - row["fit"]) / abs(row["constant"])
                print(f"{task:34s} n={rollouts:5d} seed {seed}: constant {row['constant']:.4f} "
                      f"flat {row['flat']:.4f} fit {row['fit']:.4f} (kept {row['kept']:.0f}; "
                      f"gain over constant {gain:+.3f}; {row['draw_s']:.0f}+{row['fit_s']:.0f} s)",
                      flush=True)
                ess = row["candidate_ess"]
                print(f"  policy: log p {row['log_likelihood']:.3f}, KL "
                      f"{sum(row['kl_per_step']):.2f}; candidates' ESS / count, x_T, then by step: "
                      + " ".join(ess), flush=True)
                with open(args.out, "a") as handle:
                    handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
