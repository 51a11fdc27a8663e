"""Does a head that reads the reward at the state itself bring the policy closer to the optimum?

At x_0 the exact h is the reward, p(y | x0)^lambda, yet the head re-learns it from the
rollouts' soft labels and falls 0.11 short of it there (docs/update_rules.md, section 16;
`reward_input.py` measured the held-out loss only). This probe gives the head lambda log p(y |
x_t) for every target y, the reward at the noisy state, added to its logits through a gate per
timestep, fits it like the rule (forward-noised states, held-out check on the chain's) and
scores the policy by CTRL's objective, J* - J on fresh rollouts, against the plain head fit
the same way. Gates start at zero (the head starts flat) or at a_t (the reward at x_0, fading
to nothing at x_T).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/value_probes/reward_gate.py --task slant \
        [--rollouts 8192] [--count 1638] [--steps 6000] [--gates plain zero alpha]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parent))
from policy_objective import objective  # noqa: E402
from policy_targets import fresh_rollouts  # noqa: E402
from td_targets import (  # noqa: E402
    fit,
    forward_alphas,
    offline_arguments,
    probe_arguments,
    rollouts_of,
    split,
)

from ctrl_ray.models.soft_value import SoftValueNet  # noqa: E402
from ctrl_ray.objectives.value import target_log_likelihoods  # noqa: E402


class RewardGatedHead(SoftValueNet):
    """log q = log_softmax(the head's logits + gate(t) lambda log p(y | x_t)); log m the head's."""

    def __init__(self, spec, model, reward_fn, tilt: float, gate_start: str):
        super().__init__(spec)
        self.reward = (model, reward_fn, tilt)   # a tuple: not registered as submodules
        self.gate = nn.Embedding(len(model.alphas_cumprod), 1)
        start = model.alphas_cumprod if gate_start == "alpha" else torch.zeros(
            len(model.alphas_cumprod))
        with torch.no_grad():
            self.gate.weight.copy_(start.float().view(-1, 1))

    def forward(self, x, t, contexts):
        log_q, log_m = super().forward(x, t, contexts)
        model, reward_fn, tilt = self.reward
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0]).long()
        reward_logits = tilt * target_log_likelihoods(model, reward_fn, x, contexts)
        return F.log_softmax(log_q + self.gate(t) * reward_logits, dim=-1), log_m


def policy_rows(model, head, reward_fn, config, inputs, best: float, scales, **info) -> list:
    """Install `head` on the model and score its policy at each step scale on `inputs`: J, its
    s.e., E[log p], KL and J* - J (printed, and returned as rows carrying `info`)."""
    model.value_head, rows = head, []
    for scale in scales:
        head.spec.step_scale = scale
        row = objective(model.eval(), reward_fn, config, inputs)
        rows.append({**info, "scale": scale, "optimum": best, "distance": best - row["objective"],
                     **{k: row[k] for k in ("objective", "objective_se", "log_likelihood",
                                            "kl")}})
        print(f"  x{scale:g}: J {row['objective']:.3f} +- {row['objective_se']:.3f} "
              f"(E[log p] {row['log_likelihood']:.3f}, KL {row['kl']:.2f}), J* - J "
              f"{best - row['objective']:.3f}", flush=True)
    head.spec.step_scale = 1.0
    return rows


def main() -> None:
    parser = probe_arguments(__doc__)
    offline_arguments(parser)
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--gates", nargs="+", default=["plain", "zero", "alpha"])
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.35])
    args = parser.parse_args()
    data = rollouts_of(args.task, args.rollouts, args.seed)
    held, fit_rows = split(args.rollouts, args.seed)
    model, config, alphas = data.model, data.config.objective, forward_alphas(data)
    inputs, best_rows = fresh_rollouts(model, config, args.task, args.evaluation)
    best = best_rows.mean().item()
    print(f"{args.task}: J* {best:.3f} on {args.evaluation} fresh rollouts", flush=True)
    spec, rows = model.value_head.spec, []
    for gate in args.gates:
        torch.manual_seed(args.seed)
        head = SoftValueNet(spec) if gate == "plain" else RewardGatedHead(
            spec, model, data.setup.reward_fn, data.tilt, gate)
        start = time.time()
        loss, kept, by_state = fit(head, data.states, data.log_targets, data.head_contexts,
                                   data.timesteps, fit_rows[:args.count], held[:args.heldout],
                                   args.steps, args.seed, forward_alphas=alphas,
                                   forward_fraction=args.fraction)
        gates = [] if gate == "plain" else head.gate(data.timesteps).flatten().tolist()
        print(f"{gate}: held-out {loss:.4f} (kept {kept}; {time.time() - start:.0f} s); by state "
              + " ".join(f"{v:.3f}" for v in by_state.tolist())
              + ("; gates x_T..x_0 " + " ".join(f"{g:.2f}" for g in gates) if gates else ""),
              flush=True)
        rows += policy_rows(model, head, data.setup.reward_fn, config, inputs, best,
                            args.scales, gate=gate, heldout_loss=loss, kept=kept, gates=gates)
    out = Path("benchmarks/results") / f"{args.name or 'reward_gate_' + args.task}.json"
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
