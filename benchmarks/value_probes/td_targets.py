"""Would bootstrapped targets fit the head better than the Monte Carlo ones, early in the chain?

The value rule regresses every state x_k of a base rollout on lambda log p(y | x0): unbiased,
but early in the chain x0 is nearly independent of x_k, so the target is mostly noise. The
soft value also satisfies h_k(x) = E[h_{k+1}(x_{k+1}) | x_k = x], so the head's own value at
the next state is a target with one step's noise only (biased by the head's error there).
TD(lambda_td) mixes the two in h's linear space, G_k = (1 - lambda_td) h_{k+1}(x_{k+1}) +
lambda_td G_{k+1}, G_S = p(y | x0)^lambda, which keeps h as the fixed point for any lambda_td.

This probe draws N base rollouts (cached under outputs/probe), fits fresh heads on the same
rollouts with the same steps, rate and batches for each lambda_td (1 = the rule's Monte Carlo
targets), the bootstrap values refreshed from the head every `--refresh` steps, and scores each
on held-out rollouts by the Monte Carlo value loss: the loss is a proper scoring rule, so its
expectation is smallest at the true h whatever the head was trained on.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/value_probes/td_targets.py \
        [--task ink] [--rollouts 2048] [--steps 3000] [--td 1 0.9 0.7 0.5]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parent))
from rule_choice import TASKS  # noqa: E402
from trial_fit import base_payloads, task_setup  # noqa: E402

from ctrl_ray.finetune_setup import FinetuneConfig  # noqa: E402
from ctrl_ray.models.soft_value import (  # noqa: E402
    SoftValueNet,
    predicted_value_loss,
)
from ctrl_ray.objectives.value import forward_noised  # noqa: E402
from ctrl_ray.sampling.sampler import DenoisingSchedule  # noqa: E402


@dataclass
class Rollouts:
    """Base rollouts of a task drawn with the value rule's worker step, with their setup."""

    config: FinetuneConfig
    setup: object
    states: torch.Tensor          # (S+1, N, ...) x_T .. x_0
    log_targets: torch.Tensor     # (N, J) lambda log p(y | x0)
    contexts: torch.Tensor | None       # (N,) the base's conditioning
    head_contexts: torch.Tensor | None  # (N, ...) what the head reads
    timesteps: torch.Tensor       # (S+1,)

    @property
    def model(self):
        return self.setup.model

    @property
    def tilt(self) -> float:
        return self.config.objective.tilt_exponent(math.prod(self.model.sample_shape))


def rollouts_of(task: str, count: int, seed: int) -> Rollouts:
    """`count` base rollouts of `task` on the demo's base, cached under outputs/probe."""
    config, setup = task_setup(task)
    model, objective = setup.model.eval(), config.objective
    cache = Path("outputs/probe") / f"rollouts-{task.split(',')[0]}-{count}-{seed}.pt"
    if cache.exists():
        states, log_targets, contexts = torch.load(cache).values()
    else:
        payloads = base_payloads(setup, objective, count, seed)
        states = torch.cat([p["states"] for p in payloads], 1)
        log_targets = torch.cat([p["log_targets"] for p in payloads])
        contexts = None if payloads[0]["contexts"] is None else torch.cat(
            [p["contexts"] for p in payloads])
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"states": states, "log_targets": log_targets, "contexts": contexts}, cache)
    schedule = DenoisingSchedule.create(model.alphas_cumprod, states.shape[0] - 1, objective.eta)
    timesteps = torch.cat([schedule.timesteps, schedule.timesteps.new_zeros(1)]).long()
    head_contexts = None if contexts is None else model.head_context(contexts)
    return Rollouts(config, setup, states, log_targets, contexts, head_contexts, timesteps)


def probe_arguments(doc: str) -> argparse.ArgumentParser:
    """The probes' shared options: the task, its rollouts, the head's steps and the seed."""
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="ink", choices=list(TASKS))
    parser.add_argument("--rollouts", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def offline_arguments(parser: argparse.ArgumentParser, evaluation: int = 512) -> None:
    """The options of the probes that fit one head on the first `--count` cached rollouts and
    score its policy on `--evaluation` fresh ones, writing benchmarks/results/`--name`.json."""
    parser.add_argument("--count", type=int, default=1638)
    parser.add_argument("--heldout", type=int, default=512)
    parser.add_argument("--evaluation", type=int, default=evaluation)
    parser.add_argument("--name", default=None)


def forward_alphas(data: Rollouts) -> torch.Tensor:
    """a_t of each state x_T .. x_0 of the rollouts (1 at x_0), for `forward_noised`."""
    alphas_cumprod = data.model.alphas_cumprod
    return torch.cat([alphas_cumprod[data.timesteps[:-1]],
                      torch.ones(1, dtype=alphas_cumprod.dtype)])


def split(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(held-out rows, fit rows): a fifth of the rollouts held out."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return order[: count // 5], order[count // 5:]


def returns(head: SoftValueNet, states, log_targets, contexts, timesteps, rows,
            td: float) -> torch.Tensor:
    """log G_k (S+1, R, J) for the rollouts `rows`: the TD(td) mix of the head's log h at the
    next state and the return after it, ending in the Monte Carlo targets at x_0."""
    count = states.shape[0]
    if td == 1:
        return log_targets[rows].expand(count, -1, -1)
    out = [log_targets[rows]]
    with torch.no_grad():
        for k in range(count - 2, -1, -1):
            context = None if contexts is None else contexts[rows]
            log_q, log_m = head(states[k + 1, rows], timesteps[k + 1].expand(len(rows)), context)
            bootstrap = log_q + log_m[:, None]
            out.append(torch.logaddexp(math.log(1 - td) + bootstrap, math.log(td) + out[-1]))
    return torch.stack(out[::-1])


def policy_returns(head: SoftValueNet, states, log_targets, contexts, timesteps, rows,
                   targets: torch.Tensor, row_td: torch.Tensor,
                   step_log_weights: torch.Tensor) -> torch.Tensor:
    """`targets` (S+1, R, J) of the rollouts `rows`, those whose `row_td` is below 1 (a policy's)
    replaced by G_k = w_k ((1 - lambda) h_{k+1}(x_{k+1}) + lambda G_{k+1}), G_S = p(y | x0)^lambda
    exactly, w_k = p_pre / pi of step k: given h_{k+1}, E_pi[G_k | x_k] = E_pre[h_{k+1} | x_k]
    = h_k, with one step's weight (its variance that of one step's KL) where section 17's
    whole-path weights multiplied twenty."""
    chosen = (row_td[rows] < 1).nonzero().squeeze(1)
    if len(chosen) == 0:
        return targets
    sub, last = rows[chosen], states.shape[0] - 1
    td = row_td[sub][:, None].to(log_targets.dtype)
    context = None if contexts is None else contexts[sub]
    out = [log_targets[sub]]
    with torch.no_grad():
        for k in range(last - 1, -1, -1):
            if k + 1 == last:
                bootstrap = log_targets[sub]
            else:
                log_q, log_m = head(states[k + 1, sub], timesteps[k + 1].expand(len(sub)),
                                    context)
                bootstrap = log_q + log_m[:, None]
            mixed = torch.logaddexp(torch.log1p(-td) + bootstrap, td.log() + out[-1])
            out.append(step_log_weights[k, sub][:, None] + mixed)
    targets = targets.clone()
    targets[:, chosen] = torch.stack(out[::-1]).to(targets.dtype)
    return targets


def fit(head, states, log_targets, contexts, timesteps, fit_rows, held_rows, steps: int,
        seed: int, td: float = 1.0, refresh: int = 100, inputs: torch.Tensor | None = None,
        lr: float = 1e-3, batch: int = 128, offsets: torch.Tensor | None = None,
        forward_alphas: torch.Tensor | None = None,
        forward_fraction: float | torch.Tensor = 0.0,
        fit_timesteps: tuple[torch.Tensor, torch.Tensor] | None = None,
        shared_contexts: tuple[int, float] | None = None,
        first_states: torch.Tensor | None = None,
        row_log_weights: torch.Tensor | None = None,
        target_log_weights: torch.Tensor | None = None,
        extra_loss: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
        policy_td: tuple[torch.Tensor, torch.Tensor] | None = None
        ) -> tuple:
    """AdamW on random (rollout, state) pairs with TD(td) targets refreshed every `refresh`
    steps (td 1: the rule's Monte Carlo targets); every 100 steps the held-out Monte Carlo
    loss, whose best weights the head ends with. `inputs` (S+1, N, ...), if given, are a
    further input of the head at each state; `offsets` (S+1, N), if given, are added to every
    target of a state (a policy rollout's log importance weight from that state on). With
    `forward_alphas` (S+1,), the a_t of each state, a `forward_fraction` of every batch's states
    is drawn afresh by the forward process from the rollout's x_0 instead of read from its chain
    (the rule's own `forward_noised`). With `fit_timesteps` (timesteps, their a_t), every fit
    state is drawn by the forward process at one of those timesteps instead (any schedule:
    the held-out check stays on the chain's states). With `shared_contexts` (first state index
    k, probability), a state from index k on reads another fit rollout's context with that
    probability: late in the chain h hardly depends on the context, so every digit's rollouts
    teach every digit what a target looks like there. With `first_states` (N,), a rollout's
    states before its index are never fit and its x_0 never forward-noised (a chain whose steps
    before that index were not the base's: only its later states have h's targets; 0 for a
    base rollout). With `row_log_weights` too (N,), the log weight that makes such a rollout's
    x_0 a base sample, a `forward_fraction` of its states is drawn by the forward process from
    its x_0 at any timestep, their loss weighted by it. `target_log_weights` (N, J), if given,
    balances each rollout's targets in the cross-entropy (`balanced_value_loss`), in the fit and
    the held-out check alike. `extra_loss(rows, generator)`, if given, is added to every step's
    loss (rows: the batch's rollouts). `policy_td` (each rollout's TD lambda (N,), log p_pre / pi
    of each of its steps (S, N)), if given: the rollouts whose lambda is below 1 are a policy's,
    their targets per-decision importance-weighted TD returns (`policy_returns`) refreshed every
    `refresh` steps, their states read from the chain only.
    Returns (loss, step kept, loss by state)."""
    if row_log_weights is not None and first_states is None:
        raise ValueError("row_log_weights weights the restarted rows that first_states marks")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    count = states.shape[0]

    def loss(rows, which, targets) -> torch.Tensor:
        args = (states[which, rows], timesteps[which],
                None if contexts is None else contexts[rows])
        if inputs is not None:
            args = (*args, inputs[which, rows])
        return balanced_value_loss(*head(*args), targets, balance(rows))

    def balance(rows) -> torch.Tensor | None:
        return None if target_log_weights is None else target_log_weights[rows]

    def heldout() -> torch.Tensor:
        with torch.no_grad():
            return torch.stack([loss(held_rows, torch.full((len(held_rows),), i),
                                     log_targets[held_rows]) for i in range(count)])

    by_state = heldout()
    best, kept = float(by_state.mean()), 0
    best_state = copy.deepcopy(head.state_dict())
    targets = None
    for step in range(1, steps + 1):
        if targets is None or ((td < 1 or policy_td is not None) and step % refresh == 1):
            targets = returns(head, states, log_targets, contexts, timesteps, fit_rows, td)
            if offsets is not None:
                targets = targets + offsets[:, fit_rows, None]
            if policy_td is not None:
                targets = policy_returns(head, states, log_targets, contexts, timesteps,
                                         fit_rows, targets, *policy_td)
        pick = torch.randint(0, len(fit_rows), (batch,), generator=generator)
        which = torch.randint(0, count, (batch,), generator=generator)
        rows = fit_rows[pick]
        context = None if contexts is None else contexts[rows]
        log_weight = None
        if fit_timesteps is not None:   # forward-noised at another schedule's timesteps
            which = torch.randint(0, len(fit_timesteps[0]), (batch,), generator=generator)
            a = fit_timesteps[1][which].to(states.dtype).view(-1, *[1] * (states.dim() - 2))
            x = a.sqrt() * states[-1, rows] + (1 - a).sqrt() * torch.randn(
                (batch, *states.shape[2:]), generator=generator)
            arguments, batch_targets = (x, fit_timesteps[0][which], context), log_targets[rows]
        else:
            if first_states is not None:
                first = first_states[rows]
                which = first + (torch.rand(batch, generator=generator) * (count - first)).long()
            x = states[which, rows]
            if isinstance(forward_fraction, torch.Tensor) or forward_fraction > 0:
                noised = forward_noised(states, rows, which, forward_alphas, forward_fraction,
                                        generator)
                x = noised if first_states is None else torch.where(
                    (first == 0).view(-1, *[1] * (x.dim() - 1)), noised, x)
                if policy_td is not None:   # a policy's x_0 is no base sample
                    chain = (policy_td[0][rows] < 1).view(-1, *[1] * (x.dim() - 1))
                    x = torch.where(chain, states[which, rows], x)
            if row_log_weights is not None:   # restarted rows' forward-noised states, weighted
                coin = (torch.rand(batch, generator=generator) < forward_fraction) & (first > 0)
                anywhere = torch.randint(0, count, (batch,), generator=generator)
                a = forward_alphas[anywhere].to(x.dtype).view(-1, *[1] * (x.dim() - 1))
                fresh = a.sqrt() * states[-1, rows] + (1 - a).sqrt() * torch.randn(
                    x.shape, generator=generator, dtype=x.dtype)
                x = torch.where(coin.view(-1, *[1] * (x.dim() - 1)), fresh, x)
                which = torch.where(coin, anywhere, which)
                log_weight = torch.where(coin, row_log_weights[rows], 0.0)
            if shared_contexts is not None:
                first, probability = shared_contexts
                other = contexts[fit_rows[torch.randint(0, len(fit_rows), (batch,),
                                                        generator=generator)]]
                swap = (which >= first) & (torch.rand(batch, generator=generator) < probability)
                context = torch.where(swap, other, context)
            arguments = (x, timesteps[which], context)
            if inputs is not None:
                arguments = (*arguments, inputs[which, rows])
            batch_targets = targets[which, pick]
        log_q, log_m = head(*arguments)
        if log_weight is not None:
            # weight w on the whole loss: w mass CE + w m - w mass log m (the targets shifted by
            # log w give all but w m, hence the second term)
            batch_targets = batch_targets + log_weight[:, None]
            loss_value = balanced_value_loss(log_q, log_m, batch_targets, balance(rows)) + (
                (log_weight.exp() - 1) * log_m.exp()).mean()
        else:
            loss_value = balanced_value_loss(log_q, log_m, batch_targets, balance(rows))
        if extra_loss is not None:
            loss_value = loss_value + extra_loss(rows, generator)
        optimizer.zero_grad(set_to_none=True)
        loss_value.backward()
        optimizer.step()
        if step % 100 == 0:
            now = heldout()
            if now.mean() < best:
                best, kept, by_state = float(now.mean()), step, now
                best_state = copy.deepcopy(head.state_dict())
    head.load_state_dict(best_state)
    return best, kept, by_state


def balanced_value_loss(log_q: torch.Tensor, log_m: torch.Tensor, log_targets: torch.Tensor,
                        log_balance: torch.Tensor | None) -> torch.Tensor:
    """The rule's `predicted_value_loss` with `log_balance` (B, J), a log weight per target that
    does not depend on x0, on the targets and q alike in the cross-entropy: the minimiser is the
    same q (q' = softmax(log q + log w) is fit to E[w m s], so q to E[m s]), but each target's
    share of the loss is set by the weight instead of by how often the base reaches it; the
    Poisson term keeps the plain mass (docs/update_rules.md, section 22)."""
    if log_balance is None:
        return predicted_value_loss(log_q, log_m, log_targets)
    log_mass = torch.logsumexp(log_targets, dim=1)
    shifted = log_targets + log_balance
    return predicted_value_loss(torch.log_softmax(log_q + log_balance, 1), log_m, shifted) + (
        (torch.logsumexp(shifted, 1).exp() - log_mass.exp()) * log_m).mean()


def floor(log_targets: torch.Tensor) -> float:
    """The value loss at x_0 of the exact h there, p(y | x0)^lambda: the least a head can get."""
    log_mass = torch.logsumexp(log_targets, 1)
    return float(predicted_value_loss(log_targets - log_mass[:, None], log_mass, log_targets))


def main() -> None:
    parser = probe_arguments(__doc__)
    parser.add_argument("--td", type=float, nargs="+", default=[1.0, 0.9, 0.7, 0.5])
    parser.add_argument("--refresh", type=int, default=100)
    parser.add_argument("--channels", type=int, nargs="+", default=None,
                        help="the head's conv widths (default: the config's)")
    args = parser.parse_args()
    start = time.time()
    data = rollouts_of(args.task, args.rollouts, args.seed)
    held_rows, fit_rows = split(args.rollouts, args.seed)
    print(f"{args.task}: {args.rollouts} base rollouts ({time.time() - start:.0f} s); held-out "
          f"loss of h = the reward itself at x_0: {floor(data.log_targets[held_rows]):.4f}",
          flush=True)
    for td in args.td:
        torch.manual_seed(args.seed)
        spec = data.model.value_head.spec
        head = SoftValueNet(spec if args.channels is None else
                            dataclasses.replace(spec, channels=args.channels))
        start = time.time()
        best, kept, by_state = fit(head, data.states, data.log_targets, data.head_contexts,
                                   data.timesteps, fit_rows, held_rows, args.steps, args.seed,
                                   td, args.refresh)
        print(f"  TD({td:g}): held-out Monte Carlo loss {best:.4f} (kept {kept}; "
              f"{time.time() - start:.0f} s); by state x_T..x_0: "
              + " ".join(f"{v:.3f}" for v in by_state.tolist()), flush=True)


if __name__ == "__main__":
    main()
