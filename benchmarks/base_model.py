"""Benchmark the testbed's base model: fidelity, class histograms of its samples, train and
sampling time. Writes benchmarks/results/base_model.{json,md}.

    .venv/bin/python benchmarks/base_model.py [--set training.steps=3000 ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, publish  # noqa: E402

from ctrl_ray.config import load_config, to_dict  # noqa: E402
from ctrl_ray.data.digits import ensure_digits  # noqa: E402
from ctrl_ray.demo import DemoSamplingConfig, JudgeConfig, ensure_judge, sample_report  # noqa: E402
from ctrl_ray.pretrain import PretrainConfig, pretrain  # noqa: E402
from ctrl_ray.registry import load_base_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/pretrain_digits.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--samples-per-digit", type=int, default=50)
    parser.add_argument("--out", default="outputs/bench-base")
    args = parser.parse_args()

    config = load_config(PretrainConfig, args.config,
                         [f"output_dir={args.out}/base", "registered_model=", *args.overrides])
    dataset = ensure_digits(config.data.path, size=config.data.size, seed=config.data.seed)
    judge, judge_accuracy = ensure_judge(dataset, JudgeConfig(path=f"{args.out}/judge"))
    result = pretrain(config)
    base = load_base_model(result.model_dir)

    sampling = DemoSamplingConfig(samples_per_digit=args.samples_per_digit)
    report = sample_report(base, dataset, judge, sampling, Path(args.out) / "base_grid.png")
    batch = 64
    start = time.perf_counter()
    sample_report(base, dataset, judge, DemoSamplingConfig(samples_per_digit=batch // 10 + 1),
                  Path(args.out) / "timing_grid.png")
    seconds_per_batch = (time.perf_counter() - start) * batch / (10 * (batch // 10 + 1))

    data = {
        "config": to_dict(config),
        "machine": machine(),
        "num_parameters": sum(p.numel() for p in base.unet.parameters()),
        "judge_test_accuracy": judge_accuracy,
        "fidelity": report["fidelity"],
        "num_samples": report["num_samples"],
        "histograms": report["histograms"],
        "real_histograms": report["real_histograms"],
        "train_seconds": result.seconds,
        "train_steps_per_second": result.steps_per_second,
        "final_loss": result.final_loss,
        "sampling_seconds_per_batch_of_64": seconds_per_batch,
        "num_inference_steps": sampling.num_inference_steps,
    }
    lines = [
        "# Base model benchmark",
        "",
        f"`python benchmarks/base_model.py` on {data['machine']['date']} "
        f"({torch.get_num_threads()} CPU threads, torch {torch.__version__}).",
        "",
        "| metric | value |",
        "|---|---|",
        f"| UNet parameters | {data['num_parameters']:,} |",
        f"| image size | {config.model.image_size}x{config.model.image_size} |",
        f"| training steps (batch {config.training.batch_size}) | {config.training.steps} |",
        f"| training time | {result.seconds:.0f} s ({result.steps_per_second:.2f} steps/s) |",
        f"| final loss (noise MSE) | {result.final_loss:.4f} |",
        f"| sampling time, batch of 64, {sampling.num_inference_steps} DDIM steps | "
        f"{seconds_per_batch:.2f} s |",
        f"| judge test accuracy (real digits) | {judge_accuracy:.3f} |",
        f"| **fidelity** ({report['num_samples']} samples) | **{report['fidelity']:.3f}** |",
    ]
    for name, hist in report["histograms"].items():
        lines.append(f"| {name} histogram, samples / real | {hist} / "
                     f"{report['real_histograms'][name]} |")
    lines += ["", "Goal: fidelity at least 0.9 at 16x16."]
    publish("base_model", data, lines)


if __name__ == "__main__":
    main()
