"""Where a denoiser call's time goes, by kind of operation, next to a fp32 matmul peak measured
in the same process: why a rollout's UNet calls stay below the peak on this CPU.

One thread. For the digits demo's UNet (batch 16, a worker's shard) and, with --text-base, the
text testbed's (batch 32, CFG doubling it): torch.profiler's self time per aten op and
FlopCounterMode's FLOPs per op, grouped into convolutions, attention, matrix products and the
rest (normalisation, activations, additions, copies: memory-bound at these sizes).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/unet_ops.py

Writes benchmarks/results/unet_ops.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
import types
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, publish  # noqa: E402
from throughput import GlobalFlopCounter, demo_config, matmul_peak  # noqa: E402

from ctrl_ray.config import from_dict, read_yaml  # noqa: E402
from ctrl_ray.finetune_setup import FinetuneConfig, build_setup  # noqa: E402
from ctrl_ray.objectives.base import draw_inputs  # noqa: E402

GROUPS = {"convolution": ("convolution",), "attention": ("attention", "scaled_dot_product"),
          "matrix products": ("bmm", "addmm", "aten::mm", "aten.mm", "matmul")}
OTHER = "everything else (norms, activations, adds, copies)"


def group_of(op: str) -> str:
    return next((group for group, keys in GROUPS.items() if any(k in op for k in keys)), OTHER)


def breakdown(config: FinetuneConfig, batch: int, calls: int) -> dict:
    """Self time and FLOPs per group of one denoiser call (the mean over `calls`)."""
    setup = build_setup(config)
    model, objective = setup.model, config.objective
    objective.batch_size = batch
    inputs = draw_inputs(model, objective, 0)
    x, contexts = inputs.initial_noise, inputs.contexts
    timestep = model.alphas_cumprod.new_tensor(500).long()

    def call():
        with torch.no_grad():
            model.reference_noise(x, timestep, contexts)

    for _ in range(3):
        call()
    with GlobalFlopCounter() as counter:
        call()
    flops: dict[str, float] = {}
    for op, count in counter.get_flop_counts()["Global"].items():
        flops[group_of(str(op))] = flops.get(group_of(str(op)), 0.0) + count
    start = time.perf_counter()
    for _ in range(calls):
        call()
    seconds = (time.perf_counter() - start) / calls
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            call()
    self_us: dict[str, float] = {}
    for event in prof.key_averages():
        group = group_of(event.key)
        self_us[group] = self_us.get(group, 0.0) + event.self_cpu_time_total / calls
    total_us = sum(self_us.values())
    groups = {}
    for group in [*GROUPS, OTHER]:
        share = self_us.get(group, 0.0) / total_us
        group_seconds = share * seconds
        groups[group] = {"time_share": share, "gflop": flops.get(group, 0.0) / 1e9,
                         "gflops": flops.get(group, 0.0) / group_seconds / 1e9
                         if group_seconds and flops.get(group) else None}
    return {"batch": batch, "seconds": seconds, "gflop": sum(flops.values()) / 1e9,
            "gflops": sum(flops.values()) / seconds / 1e9, "groups": groups}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--base", default="outputs/base-digits16-demo")
    parser.add_argument("--text-config", default="configs/ctrl_text2image_ink.yaml")
    parser.add_argument("--text-base", default="outputs/base-text2image")
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    command = " ".join(["python", *sys.argv])
    peaks = [matmul_peak()]
    digits = demo_config(types.SimpleNamespace(config=args.config, base=args.base), "value", 0,
                         1, "outputs/bench-unet-ops")
    results = {"digits demo": breakdown(digits, 16, args.calls)}
    if args.text_base:
        raw = read_yaml(args.text_config)
        raw.update(base_model=args.text_base, evaluate=False)
        text = from_dict(FinetuneConfig, raw)
        results["text testbed"] = breakdown(text, text.objective.batch_size, args.calls)
    peaks.append(matmul_peak())
    peak = max(p["best_gflops"] for p in peaks)
    data = {"machine": machine(), "command": command, "matmul_peak_gflops": peak,
            "peaks": peaks, "models": results}
    lines = [
        "# Where a denoiser call's time goes", "",
        f"`{command}` on {data['machine']['date']}, one thread (1-minute load average "
        f"{data['machine']['load_average_1min']:.1f}). Matmul peak: a 2048x2048 fp32 matmul, "
        f"best of 7 before and after: **{peak:.1f} GFLOP/s**. Time shares: torch.profiler's "
        "self time per aten op; FLOPs: FlopCounterMode; a group's GFLOP/s = its FLOPs over its "
        "share of the call's wall time (FlopCounterMode counts no FLOPs for CPU attention, so "
        "its row and the call's total leave them out; they are small at these sequence "
        "lengths).", "",
        "| model | batch | call | GFLOP/s (% of peak) | group | share of time | GFLOP | "
        "GFLOP/s (% of peak) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        for i, (group, g) in enumerate(r["groups"].items()):
            head = (f"| {name} | {r['batch']} | {1000 * r['seconds']:.1f} ms "
                    f"({r['gflop']:.2f} GFLOP) | {r['gflops']:.1f} "
                    f"({100 * r['gflops'] / peak:.0f}%) |") if i == 0 else "| | | | |"
            rate = (f"{g['gflops']:.1f} ({100 * g['gflops'] / peak:.0f}%)"
                    if g["gflops"] else "-")
            lines.append(f"{head} {group} | {100 * g['time_share']:.0f}% | {g['gflop']:.3f} | "
                         f"{rate} |")
    publish("unet_ops", data, lines)


if __name__ == "__main__":
    main()
