"""Does the head fit h better when it also sees the base's denoised estimate of the step before?

h_{k+1}(x) = E_pre[p(y | x0)^lambda | x_{k+1} = x] does not change when x_k is conditioned on
too (the chain is Markov), so a head h(x_{k+1}, x0_hat(x_k)) has the same target, and
x0_hat(x_k), the base network's own denoised estimate, is computed by the sampler anyway. This
probe draws N base rollouts with the value rule's worker step, recomputes x0_hat at every step,
fits two fresh heads on the same rollouts (the same steps, rate and batches; best held-out
weights kept), one on x alone and one on [x, x0_hat of the step before], and prints their
held-out value loss overall and by step, beside the best constant head's.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/value_probes/denoised_input.py \
        [--tasks ink slant] [--rollouts 1024] [--steps 3000]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parent))
from rule_choice import DEMO_BASE, TASKS  # noqa: E402
from trial_fit import constant_loss  # noqa: E402

from ctrl_ray.config import load_raw  # noqa: E402
from ctrl_ray.finetune_setup import build_setup  # noqa: E402
from ctrl_ray.models.soft_value import (  # noqa: E402
    SoftValueNet,
    predicted_value_loss,
    value_loss,
)
from ctrl_ray.objectives import value  # noqa: E402
from ctrl_ray.rule_choice import value_config  # noqa: E402
from ctrl_ray.sampling.sampler import DenoisingSchedule, RolloutInputs  # noqa: E402


def denoised(model, states: torch.Tensor, contexts, eta: float) -> torch.Tensor:
    """x0_hat(x_k) of the base network at every step k of the rollouts, (S, B, ...)."""
    steps = states.shape[0] - 1
    schedule = DenoisingSchedule.create(model.alphas_cumprod, steps, eta)
    out = []
    with torch.no_grad():
        for k in range(steps):
            x, alpha = states[k], schedule.alphas[k]
            t = schedule.timesteps[k].expand(x.shape[0])
            eps = model.reference_noise(x, t, contexts)
            x0_hat = (x - (1 - alpha).sqrt() * eps) / alpha.sqrt()
            out.append(x0_hat.clamp(-1, 1) if model.clip_sample else x0_hat)
    return torch.stack(out)


def fit(head: SoftValueNet, inputs: torch.Tensor, timesteps, contexts, log_targets, fit_rows,
        held_rows, steps: int, seed: int, lr: float = 1e-3, batch: int = 128) -> tuple:
    """AdamW on random (rollout, state) pairs of fit_rows; best held-out weights kept. Returns
    (best held-out loss, step kept, held-out loss by state index at the best weights)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    count = inputs.shape[0]

    def losses(rows) -> torch.Tensor:
        with torch.no_grad():
            return torch.stack([
                value_loss(head, inputs[i, rows], timesteps[i].expand(len(rows)),
                           None if contexts is None else contexts[rows], log_targets[rows])
                for i in range(count)])

    best, kept, by_state = float(losses(held_rows).mean()), 0, losses(held_rows)
    for step in range(1, steps + 1):
        pick = fit_rows[torch.randint(0, len(fit_rows), (batch,), generator=generator)]
        which = torch.randint(0, count, (batch,), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss = value_loss(head, inputs[which, pick], timesteps[which],
                          None if contexts is None else contexts[pick], log_targets[pick])
        loss.backward()
        optimizer.step()
        if step % 100 == 0:
            now = losses(held_rows)
            if now.mean() < best:
                best, kept, by_state = float(now.mean()), step, now
    return best, kept, by_state


def probe(task: str, rollouts: int, steps: int, seed: int, ensemble: int) -> None:
    path, extra = TASKS[task]
    config = value_config({**load_raw(path, [f"base_model={DEMO_BASE}", *extra]),
                           "mode": "value"})
    objective = config.objective
    model = build_setup(config).model.eval()
    reward_fn = build_setup(config).reward_fn
    start = time.time()
    batch = min(256, rollouts)
    payloads = [value.worker_step(
        model, reward_fn,
        RolloutInputs.draw(1000 * seed + i + 1, batch, objective.num_inference_steps,
                           model.sample_shape, model.label_classes,
                           num_contexts=model.num_contexts),
        objective, batch, 0, report=False)[0] for i in range(rollouts // batch)]
    states = torch.cat([p["states"] for p in payloads], 1)
    log_targets = torch.cat([p["log_targets"] for p in payloads])
    contexts = None if payloads[0]["contexts"] is None else torch.cat(
        [p["contexts"] for p in payloads])
    x0_hat = denoised(model, states, contexts, objective.eta)
    previous = torch.cat([torch.zeros_like(states[:1]), x0_hat])   # x_T has no step before
    head_contexts = None if contexts is None else model.head_context(contexts)
    schedule = DenoisingSchedule.create(model.alphas_cumprod, states.shape[0] - 1, objective.eta)
    timesteps = torch.cat([schedule.timesteps, schedule.timesteps.new_zeros(1)]).long()
    order = torch.randperm(rollouts, generator=torch.Generator().manual_seed(seed))
    held_rows, fit_rows = order[: rollouts // 5], order[rollouts // 5:]
    print(f"{task}: {rollouts} base rollouts, {states.shape[0]} states each, drawn and denoised "
          f"in {time.time() - start:.0f} s; constant head held-out "
          f"{constant_loss(log_targets, fit_rows, held_rows):.4f}", flush=True)
    spec = model.value_head.spec
    for name, inputs, shape in (
            ("x", states, spec.sample_shape),
            ("x + x0_hat before", torch.cat([states, previous], 2),
             [2 * spec.sample_shape[0], *spec.sample_shape[1:]]))[:1 if ensemble else 2]:
        torch.manual_seed(seed)
        head = SoftValueNet(dataclasses.replace(spec, sample_shape=list(shape)))
        start = time.time()
        best, kept, by_state = fit(head, inputs, timesteps, head_contexts, log_targets,
                                   fit_rows, held_rows, steps, seed)
        print(f"  head on {name:18s}: held-out {best:.4f} (kept {kept}; {time.time() - start:.0f}"
              f" s); by state x_T..x_0: " + " ".join(f"{v:.3f}" for v in by_state.tolist()),
              flush=True)
    if ensemble > 1:
        heads = []
        for member in range(ensemble):
            torch.manual_seed(seed + 1 + member)
            heads.append(SoftValueNet(spec))
            fit(heads[-1], states, timesteps, head_contexts, log_targets, fit_rows, held_rows,
                steps, seed + 1 + member)
        with torch.no_grad():
            by_state = torch.stack([ensemble_loss(heads, states[i, held_rows],
                                                  timesteps[i].expand(len(held_rows)),
                                                  None if head_contexts is None
                                                  else head_contexts[held_rows],
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
    parser.add_argument("--rollouts", type=int, default=1024)
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
