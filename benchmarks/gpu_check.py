"""On a CUDA machine: rollouts per second of every update rule on an SD-1.5-shaped UNet
(diffusers `UNet2DConditionModel` with Stable Diffusion 1.5's config, random weights, no
download) with the UNet's calls in bf16 (`sampling.bf16`), and each rule's peak GPU memory.

The conditioning is random 77 x 768 token states (CLIP's shape); the reward is a fixed random
linear softmax over 4 classes of the pooled latents, so every rule has gradients to follow and
the numbers measure the machinery, not a task. Writes benchmarks/results/gpu_check.{json,md}.

    .venv/bin/python benchmarks/gpu_check.py [--batch 8] [--steps 20] [--updates 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

RULES = ("value", "adjoint", "pathwise", "ppo")
SD15_UNET = {   # runwayml/stable-diffusion-v1-5 unet/config.json, shapes only
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280), "cross_attention_dim": 768,
    "attention_head_dim": 8, "norm_num_groups": 32,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
}
SD15_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                 "beta_schedule": "scaled_linear", "clip_sample": False,
                 "prediction_type": "epsilon"}
LABELS = {"target": 4}


def build_policy(rule: str, device: str):
    """The SD-1.5-shaped UNet in fp32 weights with bf16 calls, augmented for `rule`."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from ctrl_ray.models.augmented import AugmentedModel
    from ctrl_ray.models.backbone import UNetBackbone
    from ctrl_ray.sampler_config import SamplingOptions

    torch.manual_seed(0)
    backbone = UNetBackbone(UNet2DConditionModel(**SD15_UNET), DDPMScheduler(**SD15_SCHEDULE))
    backbone.configure_calls(SamplingOptions(bf16=True))
    model = AugmentedModel(backbone, LABELS, adapter="value" if rule == "value" else "lora")
    return model.to(device)


def reward_function(device: str):
    """log p(y | x0): a fixed random linear softmax over the latents' channel means."""
    weights = torch.randn(4, LABELS["target"], generator=torch.Generator().manual_seed(1))
    weights = weights.to(device)

    def reward_fn(x0, labels, contexts):
        logits = x0.float().mean(dim=(2, 3)) @ weights
        return torch.log_softmax(logits, -1).gather(1, labels["target"][:, None]).squeeze(1)

    return reward_fn


def measure(rule: str, batch: int, steps: int, updates: int, device: str) -> dict:
    """Median seconds of `updates` updates of `rule` (worker and learner step) after one
    warm-up, rollouts per second and the peak memory."""
    from ctrl_ray.objectives import rule_config, update_rule
    from ctrl_ray.objectives.base import draw_inputs, make_optimizer

    module = update_rule(rule)
    config = rule_config(rule)(batch_size=batch, num_inference_steps=steps)
    model = build_policy(rule, device)
    optimizer = make_optimizer(model, config)
    reward_fn = reward_function(device)
    generator = torch.Generator().manual_seed(0)
    torch.cuda.reset_peak_memory_stats()
    seconds = []
    for update in range(updates + 1):
        inputs = draw_inputs(model, config, generator)
        inputs.contexts = torch.randn(batch, 77, 768, generator=generator)   # token states
        torch.cuda.synchronize()
        start = time.perf_counter()
        payload, _ = module.worker_step(model, reward_fn, inputs, config, batch, update)
        module.learner_step(model, optimizer, [payload], config, generator, update)
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds[1:])
    return {"rule": rule, "batch": batch, "steps": steps, "updates": updates,
            "seconds_per_update": median, "rollouts_per_second": batch / median,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--updates", type=int, default=5, help="timed, after one warm-up")
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it "
                 "on a machine with an NVIDIA GPU")
    sys.path.insert(0, str(Path(__file__).parent))
    from common import machine, publish

    rows = []
    for rule in args.rules:
        try:
            rows.append(measure(rule, args.batch, args.steps, args.updates, "cuda"))
        except Exception as error:   # one rule's failure must not hide the others' numbers
            traceback.print_exc()
            rows.append({"rule": rule, "error": f"{type(error).__name__}: {error}"})
        print(rows[-1], flush=True)
        torch.cuda.empty_cache()
    device = torch.cuda.get_device_name()
    data = {"machine": machine(), "device": device, "rows": rows, "unet": SD15_UNET}
    lines = ["# GPU check: an SD-1.5-shaped UNet", "",
             f"`python benchmarks/gpu_check.py --batch {args.batch} --steps {args.steps} "
             f"--updates {args.updates}` on {device}, {data['machine']['date']}: "
             f"UNet2DConditionModel with SD 1.5's shapes (random weights), 64x64x4 latents, "
             f"fp32 weights with bf16 calls (`sampling.bf16: true`); every rule with its "
             f"defaults (LoRA rank 4; the value rule's head), batch {args.batch}, "
             f"{args.steps} DDPM steps; median of {args.updates} updates after a warm-up.", "",
             "| rule | s / update | rollouts/s | peak memory (GiB) |", "|---|---|---|---|"]
    lines += [f"| {r['rule']} | failed: {r['error']} | | |" if "error" in r else
              f"| {r['rule']} | {r['seconds_per_update']:.2f} | {r['rollouts_per_second']:.2f} "
              f"| {r['peak_memory_gib']:.1f} |" for r in rows]
    publish("gpu_check", data, lines)


if __name__ == "__main__":
    main()
