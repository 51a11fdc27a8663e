"""Why CTRL hardly moves on the digits testbed: the reward on base samples, and the size of the
reward's gradient against the KL's after a small move of the adapter.

    .venv/bin/python benchmarks/reward_diagnostics.py --base outputs/bench-base/base \
        --reward outputs/bench-control/reward

1. 128 base-model samples (20 DDIM steps, y = 0..3 requested in turn, digits 0..9): the
   reward's mean log p(y | x0) against log(1/K), and how often its argmax equals y.
2. One batch of 16 (20 steps, the two final steps gated off with adapter.min_timestep = 100,
   gradients through the last 8 adapted steps) after a small random move of the label embedding
   and the LoRA up-projections: gradient norms of the reward term and of the KL term.
Writes benchmarks/results/reward_diagnostics.{json,md}.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def reward_on_base_samples(setup, count: int = 128) -> dict:
    from ctrl_ray.evaluation import generate

    model, reward = setup.model, setup.reward
    label, num_classes = next(iter(model.label_classes.items()))
    ys = torch.arange(count) % num_classes
    contexts = (torch.arange(count) // num_classes) % (model.num_contexts or 1)
    images, _ = generate(model, contexts, {label: ys}, list(range(count)),
                         num_inference_steps=20, from_reference=True)
    with torch.no_grad():
        log_probs = reward.log_probs(images)
    return {"samples": count,
            "mean_log_likelihood": log_probs.gather(1, ys[:, None]).mean().item(),
            "chance_log_likelihood": math.log(1 / num_classes),
            "argmax_agrees_with_y": (log_probs.argmax(1) == ys).float().mean().item()}


def gradient_norms(setup, config) -> dict:
    from ctrl_ray.objectives.pathwise import draw_inputs, pathwise_loss

    model, objective = setup.model, config.objective
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_B." in name:
                parameter.normal_(0, 0.002)
            elif name.startswith("label_embeddings."):
                parameter[:-1].normal_(0, 0.05)
    inputs = draw_inputs(model, objective, 0)
    norms, kl = {}, None
    for term, (gamma, kl_weight) in {"reward": (1.0, 0.0), "kl": (0.0, 1.0)}.items():
        objective.gamma, objective.kl_weight = gamma, kl_weight
        model.zero_grad(set_to_none=True)
        loss, metrics = pathwise_loss(model, setup.reward_fn, inputs, objective,
                                      inputs.batch_size)
        loss.backward()
        kl = metrics["kl"]
        norms[term] = {group: torch.cat([p.grad.flatten() for p in params]).norm().item()
                       for group, params in model.trainable_parameter_groups().items()}
    return {"batch_size": inputs.batch_size, "path_kl_after_move": kl, "norms": norms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="outputs/bench-base/base")
    parser.add_argument("--reward", default="outputs/bench-control/reward")
    args = parser.parse_args()
    from ctrl_ray.config import load_config
    from ctrl_ray.finetune import FinetuneConfig, build_setup

    config = load_config(FinetuneConfig, ROOT / "configs" / "ctrl_digits_compress.yaml", [
        f"base_model={args.base}", f"rewards=[{{path: {args.reward}}}]",
        "adapter.min_timestep=100", "objective.batch_size=16",
        "objective.num_inference_steps=20", "objective.truncation.mode=fixed",
        "objective.truncation.k=8"])
    setup = build_setup(config)
    samples = reward_on_base_samples(setup)
    gradients = gradient_norms(setup, config)
    data = {"machine": machine(), "base": args.base, "reward": args.reward,
            "reward_on_base_samples": samples, "gradients": gradients}
    reward_norms, kl_norms = gradients["norms"]["reward"], gradients["norms"]["kl"]
    markdown = "\n".join([
        "# Reward diagnostics: the reward on base samples, reward vs KL gradients", "",
        f"`python benchmarks/reward_diagnostics.py --base {args.base} --reward {args.reward}`"
        f" on {data['machine']['date']}.", "",
        f"- Base-model samples ({samples['samples']}, 20 steps): mean log p(y | x0) "
        f"**{samples['mean_log_likelihood']:.2f}** (chance: "
        f"{samples['chance_log_likelihood']:.2f}); the reward's argmax equals the requested y "
        f"for {samples['argmax_agrees_with_y']:.0%} of them.",
        f"- After a small random move (path KL {gradients['path_kl_after_move']:.3f} nats, "
        f"batch {gradients['batch_size']}), gradient norms embedding / LoRA: reward "
        f"{reward_norms['embedding']:.3f} / {reward_norms['adapter']:.3f}, KL "
        f"{kl_norms['embedding']:.3f} / {kl_norms['adapter']:.3f} (ratio "
        f"{kl_norms['embedding'] / reward_norms['embedding']:.1f}x / "
        f"{kl_norms['adapter'] / reward_norms['adapter']:.1f}x).", ""])
    json_path, md_path = write_results("reward_diagnostics", data, markdown)
    print(markdown)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
