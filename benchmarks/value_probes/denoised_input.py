"""Does the head fit h better when it also sees the base's denoised estimate of the step before?

h_{k+1}(x) = E_pre[p(y | x0)^lambda | x_{k+1} = x] does not change when x_k is conditioned on
too (the chain is Markov), so a head h(x_{k+1}, x0_hat(x_k)) has the same target, and
x0_hat(x_k), the base network's own denoised estimate, is computed by the sampler anyway. This
probe draws N base rollouts with the value rule's worker step, recomputes x0_hat at every step,
fits two fresh heads on the same rollouts (the same steps, rate and batches; best held-out
weights kept), one on x alone and one on [x, x0_hat of the step before], and prints their
held-out value loss overall and by step, beside the best constant head's.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/value_probes/denoised_input.py \
        [--tasks ink slant] [--rollouts 2048] [--steps 3000] [--ensemble 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from td_targets import fit, rollouts_of, split  # noqa: E402
from trial_fit import TASKS, constant_loss  # noqa: E402

from ctrl_ray.models.soft_value import SoftValueNet, predicted_value_loss  # noqa: E402
from ctrl_ray.sampling.sampler import DenoisingSchedule  # noqa: E402


def denoised(model, states: torch.Tensor, contexts, eta: float) -> torch.Tensor:
    """x0_hat(x_k) of the base network at every step k of the rollouts, (S, B, ...)."""
    schedule = DenoisingSchedule.create(model.alphas_cumprod, states.shape[0] - 1, eta)
    with torch.no_grad():
        return torch.stack([schedule.denoised(
            k, states[k], model.reference_noise(states[k], schedule.timesteps[k].expand(
                states.shape[1]), contexts), model.clip_sample)
            for k in range(states.shape[0] - 1)])


def probe(task: str, rollouts: int, steps: int, seed: int, ensemble: int) -> None:
    start = time.time()
    data = rollouts_of(task, rollouts, seed)
    model, states, log_targets = data.model, data.states, data.log_targets
    held_rows, fit_rows = split(rollouts, seed)
    print(f"{task}: {rollouts} base rollouts, {states.shape[0]} states each "
          f"({time.time() - start:.0f} s); constant head held-out "
          f"{constant_loss(log_targets, fit_rows, held_rows):.4f}", flush=True)
    spec = model.value_head.spec
    variants = [("x", states, spec.sample_shape)]
    if not ensemble:
        previous = torch.cat([torch.zeros_like(states[:1]),   # x_T has no step before
                              denoised(model, states, data.contexts, data.config.objective.eta)])
        variants.append(("x + x0_hat before", torch.cat([states, previous], 2),
                         [2 * spec.sample_shape[0], *spec.sample_shape[1:]]))
    for name, inputs, shape in variants:
        torch.manual_seed(seed)
        head = SoftValueNet(dataclasses.replace(spec, sample_shape=list(shape)))
        start = time.time()
        best, kept, by_state = fit(head, inputs, log_targets, data.head_contexts,
                                   data.timesteps, fit_rows, held_rows, steps, seed)
        print(f"  head on {name:18s}: held-out {best:.4f} (kept {kept}; {time.time() - start:.0f}"
              f" s); by state x_T..x_0: " + " ".join(f"{v:.3f}" for v in by_state.tolist()),
              flush=True)
    if ensemble > 1:
        heads = []
        for member in range(ensemble):   # each ends with its best held-out weights
            torch.manual_seed(seed + 1 + member)
            heads.append(SoftValueNet(spec))
            fit(heads[-1], states, log_targets, data.head_contexts, data.timesteps, fit_rows,
                held_rows, steps, seed + 1 + member)
        with torch.no_grad():
            by_state = torch.stack([ensemble_loss(heads, states[i, held_rows],
                                                  data.timesteps[i].expand(len(held_rows)),
                                                  None if data.head_contexts is None
                                                  else data.head_contexts[held_rows],
                                                  log_targets[held_rows])
                                    for i in range(states.shape[0])])
        print(f"  {ensemble} heads on x, log h averaged: held-out {by_state.mean():.4f}; by state "
              + " ".join(f"{v:.3f}" for v in by_state.tolist()), flush=True)


def ensemble_loss(heads, x, t, contexts, log_targets) -> torch.Tensor:
    """The value loss of the heads' averaged log q (renormalised) and log m."""
    outputs = [head(x, t, contexts) for head in heads]
    log_q = torch.log_softmax(torch.stack([q for q, _ in outputs]).mean(0), dim=-1)
    log_m = torch.stack([m for _, m in outputs]).mean(0)
    return predicted_value_loss(log_q, log_m, log_targets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["ink"], choices=list(TASKS))
    parser.add_argument("--rollouts", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ensemble", type=int, default=0,
                        help="fit this many more heads on x and score their averaged log h "
                             "(instead of the x0_hat head)")
    args = parser.parse_args()
    for task in args.tasks:
        probe(task, args.rollouts, args.steps, args.seed, args.ensemble)


if __name__ == "__main__":
    main()
