"""Does the head fit h better when it reads the reward itself at the noisy state?

At x_0 the exact h is the reward, p(y | x0)^lambda, yet a head fit on 2,048 base rollouts
scores 0.11 worse than it there (docs/update_rules.md, section 16): it re-learns the reward
classifier from the rollouts' soft labels. This probe gives the head lambda log p(y | x_t) for
every target y, the reward evaluated at the state itself, added to its logits through a
zero-started gate per timestep (so the head still starts flat), and compares the held-out
value loss with the plain head's on the same rollouts, steps, rate and batches (the rollouts
of `td_targets.py`, cached under outputs/probe).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/value_probes/reward_input.py \
        [--task ink] [--rollouts 2048] [--steps 3000]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from td_targets import fit, floor, probe_arguments, rollouts_of, split  # noqa: E402

from ctrl_ray.models.soft_value import SoftValueNet  # noqa: E402
from ctrl_ray.objectives.value import target_log_likelihoods  # noqa: E402


class RewardInputHead(nn.Module):
    """log q = log_softmax(head logits + gate(t) * lambda log p(y | x_t)), log m the head's."""

    def __init__(self, head: SoftValueNet, num_timesteps: int, use_reward: bool):
        super().__init__()
        self.head, self.use_reward = head, use_reward
        self.gate = nn.Embedding(num_timesteps, 1)
        nn.init.zeros_(self.gate.weight)

    def forward(self, x, t, contexts, reward_logits):
        log_q, log_m = self.head(x, t, contexts)
        if self.use_reward:
            log_q = F.log_softmax(log_q + self.gate(t.long()) * reward_logits, dim=-1)
        return log_q, log_m


def main() -> None:
    args = probe_arguments(__doc__).parse_args()
    rollouts = rollouts_of(args.task, args.rollouts, args.seed)
    model, states = rollouts.model, rollouts.states
    start = time.time()
    with torch.no_grad():
        reward_logits = torch.stack([torch.cat([
            rollouts.tilt * target_log_likelihoods(
                model, rollouts.setup.reward_fn, states[i, j:j + 512],
                None if rollouts.contexts is None else rollouts.contexts[j:j + 512])
            for j in range(0, states.shape[1], 512)]) for i in range(states.shape[0])]).float()
    held, fit_rows = split(args.rollouts, args.seed)
    print(f"{args.task}: {args.rollouts} rollouts, the reward at every state in "
          f"{time.time() - start:.0f} s; exact h at x_0: "
          f"{floor(rollouts.log_targets[held]):.4f}", flush=True)
    for use_reward in (False, True):
        torch.manual_seed(args.seed)
        head = RewardInputHead(SoftValueNet(model.value_head.spec), len(model.alphas_cumprod),
                               use_reward)
        began = time.time()
        best, kept, by_state = fit(head, states, rollouts.log_targets, rollouts.head_contexts,
                                   rollouts.timesteps, fit_rows, held, args.steps, args.seed,
                                   inputs=reward_logits)
        name = "with the reward's logits" if use_reward else "plain"
        gates = head.gate(rollouts.timesteps).flatten().tolist() if use_reward else []
        print(f"  head {name}: held-out {best:.4f} (kept {kept}; {time.time() - began:.0f} s); "
              f"by state x_T..x_0: " + " ".join(f"{v:.3f}" for v in by_state.tolist())
              + ("; gates x_T..x_0: " + " ".join(f"{g:.2f}" for g in gates) if gates else ""),
              flush=True)


if __name__ == "__main__":
    main()
