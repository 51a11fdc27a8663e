"""Benchmark CTRL on Stable-Diffusion-format (latent text-to-image) pipelines: trajectories/s and
peak memory of pathwise and ppo updates, with bf16 autocast and UNet gradient checkpointing on.

Two pipeline sizes, built offline with random weights (`ctrl_ray.models.tiny_pipeline`):
`tiny` (16x16 RGB, latents 4x4x4, 32-d text encoder) and `mid` (64x64 RGB, VAE 8x down so
latents 4x8x8, UNet 64/128/256, 256-d 4-layer text encoder). Each (size, mode) runs in its own
process, in-process training (no Ray: this measures the model's compute), classifier-free
guidance 2.0, the reward reading the VAE-decoded images. The first update (warm-up) is not
timed. Peak memory is `torch.cuda.max_memory_allocated` on a GPU and the process's peak
resident set size on CPU. bf16 autocast applies to CUDA tensors only: on CPU the runs are fp32.

Writes benchmarks/results/text_to_image.{json,md}.

    .venv/bin/python benchmarks/text_to_image.py --sizes tiny          # CPU
    python benchmarks/text_to_image.py --sizes tiny mid                # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_results  # noqa: E402

SIZES = {
    "tiny": {"pipeline": {"image_size": 16, "vae_channels": [8, 16, 16],
                          "unet_channels": [16, 32], "text_hidden_size": 32},
             "batch_size": 8, "num_inference_steps": 10, "iterations": 3},
    "mid": {"pipeline": {"image_size": 64, "vae_channels": [32, 64, 128, 128],
                         "unet_channels": [64, 128, 256], "attention_head_dim": 32,
                         "norm_num_groups": 32, "text_hidden_size": 256, "text_layers": 4,
                         "text_heads": 4},
            "batch_size": 16, "num_inference_steps": 20, "iterations": 3},
}
MODES = ("pathwise", "ppo")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny"], choices=sorted(SIZES))
    parser.add_argument("--reward", default="outputs/bench-control/reward",
                        help="a 16x16 compressibility reward (trained here when missing)")
    parser.add_argument("--out", default="outputs/bench-text-to-image")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per run (1 on a shared CPU: no OpenMP thrashing)")
    parser.add_argument("--single", nargs=2, metavar=("SIZE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        print(json.dumps(run_one(*args.single, Path(args.reward), Path(args.out),
                                 args.threads)))
        return

    ensure_reward(Path(args.reward), Path(args.out))
    rows = []
    for size in args.sizes:
        for mode in MODES:
            command = [sys.executable, __file__, "--single", size, mode,
                       "--reward", args.reward, "--out", args.out,
                       "--threads", str(args.threads)]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(output.strip().splitlines()[-1]))
            print(rows[-1])
    device = rows[0]["device"]
    data = {"machine": machine(), "device": device, "rows": rows,
            "gpu_numbers_taken": device != "cpu"}
    write_results("text_to_image", data, markdown(data, args.sizes))


def ensure_reward(path: Path, out: Path) -> None:
    """Train a quick 16x16 compressibility reward at `path` when there is none."""
    if path.is_dir():
        return
    from ctrl_ray.config import load_config
    from ctrl_ray.reward_training import RewardJobConfig, train_reward_job

    train_reward_job(load_config(RewardJobConfig, overrides=[
        f"dataset={out}/digits16.parquet", f"pairs={out}/pairs.parquet", "num_pairs=500",
        "training.epochs=10", f"output_dir={path}"]), progress=False)


def run_one(size: str, mode: str, reward: Path, out: Path, threads: int) -> dict:
    """Build the pipeline, time `iterations` updates after one warm-up update."""
    from ctrl_ray.config import load_config
    from ctrl_ray.finetune import FinetuneConfig, build_setup
    from ctrl_ray.models.tiny_pipeline import TinyPipelineConfig, build_tiny_pipeline
    from ctrl_ray.objectives import pathwise, ppo
    from ctrl_ray.objectives.pathwise import draw_inputs

    spec = SIZES[size]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(threads)
    pipeline_dir = out / f"pipeline-{size}"
    if not (pipeline_dir / "model_index.json").is_file():
        build_tiny_pipeline(TinyPipelineConfig(**spec["pipeline"]), pipeline_dir)
    batch, steps = spec["batch_size"], spec["num_inference_steps"]
    config = load_config(FinetuneConfig, overrides=[
        f"base_model={pipeline_dir}", f"rewards=[{{path: {reward}}}]", f"mode={mode}",
        "backbone.prompts=[a handwritten three, a handwritten seven]",
        "backbone.guidance_scale=2.0", "backbone.mixed_precision=bf16",
        "backbone.gradient_checkpointing=true",
        f"objective.batch_size={batch}", f"objective.num_inference_steps={steps}",
        "objective.truncation.mode=fixed", "objective.truncation.k=3",
        f"objective.batch_size={batch}", f"objective.num_inference_steps={steps}",
        f"objective.minibatch_size={batch * steps // 2}",
    ])
    setup = build_setup(config)
    setup.model.to(device)
    setup.reward.to(device)
    generator = torch.Generator().manual_seed(0)

    def update(version: int) -> None:
        if mode == "pathwise":
            inputs = draw_inputs(setup.model, setup.objective, generator)
            pathwise.train_step(setup.model, setup.optimizer, setup.reward_fn, inputs,
                                setup.objective)
        else:
            ppo.train_iteration(setup.model, setup.optimizer, setup.reward_fn, setup.objective,
                                generator, version)

    update(0)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for version in range(1, spec["iterations"] + 1):
        update(version)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
        peak_kind = "cuda max_memory_allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peak_kind = "process peak RSS"
    unet = setup.model.backbone.network
    return {
        "size": size, "mode": mode, "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "autocast_bf16_active": device == "cuda", "gradient_checkpointing": True,
        "image_shape": list(setup.model.backbone.image_shape),
        "latent_shape": list(setup.model.sample_shape),
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "trainable_parameters": setup.model.num_trainable_parameters(),
        "batch_size": batch, "num_inference_steps": steps, "guidance_scale": 2.0,
        "timed_iterations": spec["iterations"], "seconds": round(seconds, 3), "threads": threads,
        "load_average_1min_after": round(os.getloadavg()[0], 2),
        "trajectories_per_second": round(batch * spec["iterations"] / seconds, 3),
        "peak_memory_mib": round(peak / 2**20, 1), "peak_memory_kind": peak_kind,
    }


def markdown(data: dict, sizes: list[str]) -> str:
    rows = data["rows"]
    device = data["device"]
    lines = ["# Text-to-image (latent, Stable-Diffusion-format) throughput and memory", "",
             f"`python benchmarks/text_to_image.py --sizes {' '.join(sizes)}` on "
             f"{data['machine']['date']}, device: {rows[0]['device_name']}. In-process updates "
             "(no Ray), CFG 2.0 on the prompt, VAE decode inside the reward (checkpointed in "
             "pathwise), UNet gradient checkpointing on, LoRA rank 4 on the attention layers; "
             "one warm-up update excluded.", ""]
    if device == "cpu":
        lines += ["**No GPU numbers: no GPU device was lent to the session that ran this**, so "
                  f"only the tiny configuration was run, on CPU ({rows[0]['threads']} thread(s); "
                  f"1-minute load average {data['machine']['load_average_1min']:.1f} at the start "
                  "on this shared 2-core machine, so the times are noisy), where bf16 autocast "
                  "is not applied (the switch acts on CUDA tensors only): these are fp32 "
                  "numbers. Peak memory is the process's peak resident set size, which includes "
                  "Python, torch and the libraries. The `mid` configuration and the bf16 GPU "
                  "numbers are still to be taken (`python benchmarks/text_to_image.py --sizes "
                  "tiny mid` on a GPU machine).", ""]
    lines += ["| size | mode | image | latents | UNet params | batch x steps | "
              "trajectories/s | peak memory (MiB) |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['size']} | {row['mode']} | {'x'.join(map(str, row['image_shape']))} | "
            f"{'x'.join(map(str, row['latent_shape']))} | {row['unet_parameters']:,} | "
            f"{row['batch_size']} x {row['num_inference_steps']} | "
            f"{row['trajectories_per_second']:.2f} | {row['peak_memory_mib']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
