"""Where a fine-tuned policy spends its KL, step by step, and what it buys there.

For each trained ink policy (`benchmarks/adjoint_ablation.py` writes them), one batch of
rollouts of the policy with the lean adjoint a along them gives, per sampler step k,

    KL_k = E ||delta_k||^2 / (2 sigma_k^2)     delta_k = mu_theta(x_k) - mu_pre(x_k)
    gain_k = E [delta_k . a_{k+1}]             the first-order rise of the soft value

For the optimal control (delta* = sigma^2 grad V / alpha) gain_k = 2 KL_k at every step; a
ratio above 2 is a step that is under-controlled, below 2 one that spends KL the reward does not
pay for.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/adjoint_step_profile.py \
        --policy lora4=outputs/demo/ctrl --policy embedding=outputs/probe/none:adapter.kind=none \
        [--config configs/ctrl_digits_compress.yaml --set base_model=... --name NAME]

(outputs/demo/ctrl held the demo's Adjoint Matching policy when the committed results were
measured; the demo now trains a value policy there.)
Writes benchmarks/results/NAME.{json,md} (default adjoint_step_profile). The last column,
the best scale of each step's control to first order (s_k = gain_k / (2 KL_k)), and the rise of
J it predicts, say whether a per-step size would help or the direction is what is missing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, publish  # noqa: E402

from ctrl_ray.checkpoint import ADAPTER_FILE, read_tensors  # noqa: E402
from ctrl_ray.config import load_config  # noqa: E402
from ctrl_ray.finetune_setup import FinetuneConfig, build_setup  # noqa: E402
from ctrl_ray.objectives.adjoint import adjoint_rollout  # noqa: E402
from ctrl_ray.objectives.base import draw_inputs  # noqa: E402
from ctrl_ray.sampling.sampler import DenoisingSchedule, step_mean  # noqa: E402

CONFIG = "configs/ctrl_digits_ink.yaml"


def profile(directory: str, overrides: list[str], batch_size: int, seed: int,
            config_path: str = CONFIG) -> dict:
    """Per-step KL and gain of the policy saved under ``directory``/policy (a directory holding
    the adapter itself is taken as it is)."""
    config = load_config(FinetuneConfig, config_path,
                         [*overrides, f"objective.batch_size={batch_size}"])
    setup = build_setup(config)
    model = setup.model
    folder = Path(directory) if (Path(directory) / ADAPTER_FILE).is_file() \
        else Path(directory) / "policy"
    model.load_trainable_state_dict(read_tensors(folder / ADAPTER_FILE, "adapter weights"))
    model.eval()
    inputs = draw_inputs(model, config.objective, torch.Generator().manual_seed(seed))
    rollout = adjoint_rollout(model, setup.reward_fn, inputs, config.objective)
    schedule = DenoisingSchedule.create(model.alphas_cumprod, inputs.num_steps,
                                        config.objective.eta)
    steps = []
    for k in range(inputs.num_steps):
        with torch.no_grad():
            mean = step_mean(schedule, k,
                             lambda x, t, c: model.predict_noise(x, t, c, inputs.labels),
                             rollout.states[k], inputs.contexts, model.clip_sample)
        sigma = schedule.sigmas[k]
        delta = mean - rollout.reference_means[k]
        gain = (delta * rollout.targets[k] / sigma**2).flatten(1).sum(1).mean().item()
        steps.append({"step": k, "timestep": int(schedule.timesteps[k]), "sigma": float(sigma),
                      "kl": rollout.kl[k].mean().item(), "gain": gain})
    return {"policy": directory, "overrides": overrides,
            "reward": rollout.log_likelihood.mean().item(),
            "path_kl": rollout.kl.sum(0).mean().item(), "steps": steps}


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", action="append", required=True,
                        help="NAME=RUN_DIR[:override,override...] (the run's adapter overrides)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="a config override for every policy (base_model=..., rewards=...)")
    parser.add_argument("--name", default="adjoint_step_profile")
    args = parser.parse_args()
    torch.set_num_threads(1)
    profiles = {}
    for spec in args.policy:
        name, rest = spec.split("=", 1)
        directory, _, extra = rest.partition(":")
        profiles[name] = profile(directory, [*args.overrides, *(o for o in extra.split(",") if o)],
                                 args.batch_size, args.seed, args.config)
    names = list(profiles)
    lines = ["# Where the policy spends its KL, per sampler step", "",
             f"Generated by `benchmarks/adjoint_step_profile.py` on {machine()['date']}: "
             f"{args.batch_size} rollouts of each policy (`{args.config}`"
             f"{''.join(f', {o}' for o in args.overrides)}), KL_k in nats and "
             "gain_k = E[delta_k . a_{k+1}]; the optimal control has gain = 2 KL at every step. "
             "Per policy, the rise of J = gamma E[log p] - KL that the best scale of each "
             "step's control would buy to first order: sum_k (gain_k - 2 KL_k)^2 / (4 KL_k).",
             "", "| step | t | sigma | " + " | ".join(f"{n} KL | {n} gain/KL" for n in names)
             + " |", "|---" * (3 + 2 * len(names)) + "|"]
    first = profiles[names[0]]["steps"]
    for k, step in enumerate(first):
        cells = []
        for name in names:
            s = profiles[name]["steps"][k]
            ratio = f"{s['gain'] / s['kl']:.1f}" if s["kl"] > 1e-6 else "-"
            cells += [f"{s['kl']:.3f}", ratio]
        lines.append(f"| {k} | {step['timestep']} | {step['sigma']:.3f} | " + " | ".join(cells)
                     + " |")
    lines.append("| total | | | " + " | ".join(
        f"{p['path_kl']:.2f} | {sum(s['gain'] for s in p['steps']) / p['path_kl']:.1f}"
        for p in profiles.values()) + " |")
    lines += ["", "| policy | reward E[log p] | KL | J rise, one scale per step | "
              "J rise, one scale for all |", "|---|---|---|---|---|"]
    for name, p in profiles.items():
        rises = scale_rise(p["steps"]), scale_rise(p["steps"], per_step=False)
        lines.append(f"| {name} | {p['reward']:.3f} | {p['path_kl']:.2f} | {rises[0]:.3f} | "
                     f"{rises[1]:.3f} |")
    publish(args.name, {"machine": machine(), "config": args.config,
                        "overrides": args.overrides, "profiles": profiles}, lines)


def scale_rise(steps: list[dict], per_step: bool = True) -> float:
    """To first order, J(s) = J + sum_k (s_k - 1) gain_k - (s_k^2 - 1) KL_k; the rise at the best
    s_k = gain_k / (2 KL_k) (one s for every step when not `per_step`)."""
    active = [s for s in steps if s["kl"] > 1e-6]
    if per_step:
        return sum((s["gain"] - 2 * s["kl"])**2 / (4 * s["kl"]) for s in active)
    gain, kl = sum(s["gain"] for s in active), sum(s["kl"] for s in active)
    return (gain - 2 * kl)**2 / (4 * kl)


if __name__ == "__main__":
    main()
