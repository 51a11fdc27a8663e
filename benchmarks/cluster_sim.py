"""Cluster-scale orchestration, simulated: the real training loop (`RolloutPipeline` over Ray
actors, a `torch.distributed` learner group, payloads by object reference) with rollout workers
and learner ranks whose compute is a fixed sleep, moving the real payload sizes of the SD-1.5
LoRA case.

What it measures, per setting (rollout workers x learner ranks x max_staleness):
- orchestration overhead: the iteration's wall time beyond its compute (rollout + update when
  synchronous, the longer of the two when they overlap), as a share of the iteration, split
  into driver hand-out, adapter publication (driver -> rank 0 -> object store -> workers),
  and the learner's fan-in (fetching every worker's payload);
- the throughput of max_staleness 1 over 0 when rollout and update take equal time.

Sleeping actors cost no CPU, so 64 of them run on a 2-core machine. Writes
benchmarks/results/cluster_sim.{json,md} and a plot.

    .venv/bin/python benchmarks/cluster_sim.py                 # the full run
    .venv/bin/python benchmarks/cluster_sim.py --workers 8 --iterations 4   # a quick one
    .venv/bin/python benchmarks/cluster_sim.py --workers 64 --learners 1 --payload-mib 0.001 \
        --results-name cluster_sim_small_payload   # what the payloads themselves cost
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import ray

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine, publish  # noqa: E402
from plots import line_plot  # noqa: E402

from ctrl_ray.config import load_config  # noqa: E402
from ctrl_ray.distributed.actors import Roles, start_learner_group  # noqa: E402
from ctrl_ray.distributed.pipeline import RolloutPipeline  # noqa: E402
from ctrl_ray.distributed.ray_runtime import connect  # noqa: E402
from ctrl_ray.finetune_config import FinetuneConfig  # noqa: E402

MB = 1 << 20
# SD-1.5 with a rank-4 LoRA on the attention projections: about 3 MB of adapter; one worker's
# trajectory batch: 4x64x64 latents x 50 steps, float32.
ADAPTER_BYTES = 3 * MB
PAYLOAD_SHAPE = (50, 4, 64, 64)


class SleepingWorker:
    """A rollout worker whose sampling is a sleep: it pulls the adapter once per version and
    returns a trajectory batch of the real size."""

    def __init__(self, rollout_seconds: float, payload_shape: tuple[int, ...] = PAYLOAD_SHAPE):
        self.rollout_seconds, self.payload_shape = rollout_seconds, payload_shape
        self.version = -1

    def work(self, version, published, rows, normaliser, report=True):
        start = time.perf_counter()
        if version != self.version:
            adapter = ray.get(published[0])
            assert adapter.nbytes == ADAPTER_BYTES
            self.version = version
        synced = time.perf_counter()
        time.sleep(self.rollout_seconds)
        # NumPy, so that 64 of these actors fit in memory without torch (0.06 GB each, 0.43
        # with torch); the learner copies each payload, as fetching a torch tensor does.
        payload = {"states": np.full(self.payload_shape, float(rows.start), dtype=np.float32)}
        return payload, {"num_samples": float(rows.stop - rows.start),
                         "sync_seconds": synced - start,
                         "work_seconds": time.perf_counter() - start}

    def pid(self):
        return os.getpid()


class SleepingLearner:
    """A learner rank whose update is a sleep after fetching every payload; ranks sum an
    adapter-sized gradient over `torch.distributed` as the real ones do; rank 0 publishes."""

    def __init__(self, update_seconds: float, num_threads: int, rank: int, world_size: int):
        self.update_seconds, self.rank, self.world_size = update_seconds, rank, world_size
        self.version = 0
        self.published = None

    def group_address(self):
        from ctrl_ray.distributed.roles import free_address

        return free_address()

    def join_group(self, address):
        from ctrl_ray import data_parallel

        data_parallel.join(address, self.rank, self.world_size)

    def publish(self, as_object_ref=True):
        if self.published is None or self.published[0] != self.version:
            adapter = np.zeros(ADAPTER_BYTES // 4, dtype=np.float32)
            self.published = (self.version, ray.put(adapter), ADAPTER_BYTES)
        return self.published

    def update(self, worker_metrics, payloads, seed):
        start = time.perf_counter()
        fetched = [{k: v.copy() for k, v in p.items()} for p in ray.get(list(payloads))]
        checksum = sum(float(p["states"].flat[0]) for p in fetched)
        fetch_seconds = time.perf_counter() - start
        time.sleep(self.update_seconds)
        if self.world_size > 1:
            import torch
            import torch.distributed as dist

            dist.all_reduce(torch.zeros(ADAPTER_BYTES // 4))
        self.version += 1
        return {"version": self.version, "fetch_seconds": fetch_seconds,
                "update_seconds": time.perf_counter() - start, "checksum": checksum,
                "sync_seconds": max(m["sync_seconds"] for m in worker_metrics)}


def run_setting(workers: list, num_learners: int, max_staleness: int, iterations: int,
                update_seconds: float) -> dict:
    """`iterations` updates of the real pipeline; per-iteration metrics after the first two
    (the pipeline fills and the actors warm up)."""
    config = load_config(FinetuneConfig, overrides=[
        "mode=value", f"objective.batch_size={len(workers)}", f"iterations={iterations}",
        "checkpoint_every=0", f"distributed.workers={len(workers)}",
        f"distributed.learners={num_learners}", f"distributed.max_staleness={max_staleness}"])
    learners, _ = start_learner_group(ray.remote(SleepingLearner),
                                      config.distributed, update_seconds)
    roles = Roles(learners, workers, remote=True)
    import torch

    pipeline = RolloutPipeline(roles, config, torch.Generator().manual_seed(0),
                               lambda iteration: True)
    rows = [pipeline.update(iteration) for iteration in range(iterations)]
    for learner in learners:
        ray.kill(learner)
    return {key: [row[key] for row in rows[2:]] for key in rows[0]}


def summarise(metrics: dict, compute_seconds: float) -> dict:
    """Mean iteration time and the overhead shares of one setting."""
    iteration = statistics.mean(metrics["iteration_seconds"])
    shares = {
        "overhead": max(0.0, iteration - compute_seconds) / iteration,
        "hand_out": statistics.mean(metrics["hand_out_seconds"]) / iteration,
        "publication": statistics.mean(
            p + s for p, s in zip(metrics["publish_seconds"], metrics["sync_seconds"],
                                  strict=True)) / iteration,
        "fan_in": statistics.mean(metrics["fetch_seconds"]) / iteration,
    }
    # The rest: scheduling and the round trips of each call, the workers' results into the
    # object store, the group's all-reduce.
    shares["other"] = max(0.0, shares["overhead"] - shares["hand_out"] - shares["publication"]
                          - shares["fan_in"])
    return {"iteration_seconds": iteration, "compute_seconds": compute_seconds,
            "staleness": sorted(set(metrics["staleness"])), "shares": shares,
            "iteration_seconds_all": metrics["iteration_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--learners", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--rollout-seconds", type=float, default=3.0)
    parser.add_argument("--update-seconds", type=float, default=3.0)
    parser.add_argument("--iterations", type=int, default=7)
    parser.add_argument("--payload-mib", type=float, default=np.prod(PAYLOAD_SHAPE) * 4 / MB,
                        help="one worker's payload (default: 4x64x64 x 50 steps, float32)")
    parser.add_argument("--results-name", default="cluster_sim")
    args = parser.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    connect("local", num_cpus=2, object_store_memory=4 * 1024**3, runtime_env=None)
    start = time.perf_counter()
    payload_shape = (max(1, round(args.payload_mib * MB / 4)),)
    if round(args.payload_mib * MB / 4) == np.prod(PAYLOAD_SHAPE):
        payload_shape = PAYLOAD_SHAPE
    pool = [ray.remote(SleepingWorker).options(num_cpus=0).remote(args.rollout_seconds,
                                                                  payload_shape)
            for _ in range(max(args.workers))]
    ray.get([worker.pid.remote() for worker in pool])
    startup = time.perf_counter() - start
    results = []
    for count in args.workers:
        for learners in args.learners:
            for staleness in (0, 1):
                metrics = run_setting(pool[:count], learners, staleness, args.iterations,
                                      args.update_seconds)
                compute = (args.rollout_seconds + args.update_seconds if staleness == 0
                           else max(args.rollout_seconds, args.update_seconds))
                row = {"workers": count, "learners": learners, "max_staleness": staleness,
                       **summarise(metrics, compute)}
                results.append(row)
                print({k: v for k, v in row.items() if k != "iteration_seconds_all"},
                      flush=True)
    ray.shutdown()
    write(results, args, startup)


def write(results: list[dict], args, startup: float) -> None:
    by = {(r["workers"], r["learners"], r["max_staleness"]): r for r in results}
    lines = [
        "# Cluster-scale orchestration, simulated",
        "",
        f"The real training loop (`RolloutPipeline`, Ray actors, a gloo learner group, "
        f"payloads by object reference) with sleeping actors: rollout {args.rollout_seconds} s,"
        f" update {args.update_seconds} s; adapter {ADAPTER_BYTES / MB:.0f} MiB, one "
        f"payload per worker of {args.payload_mib:.3g} MiB (3.12 MiB is one trajectory batch "
        f"of 4x64x64 latents x 50 steps, float32). Mean of iterations 3..{args.iterations}; "
        f"{max(args.workers)} actors started in {startup:.0f} s. Overhead = (iteration - "
        f"compute) / iteration; publication = the driver's publish call + the slowest "
        f"worker's adapter pull; fan-in = the learner fetching every payload; other = the "
        f"rest (scheduling and call round trips, results into the object store, the "
        f"all-reduce). Machine load average at the end: {os.getloadavg()[0]:.1f} on 2 cores "
        f"(other jobs were running).",
        f"Command: `.venv/bin/python benchmarks/cluster_sim.py {' '.join(sys.argv[1:])}`",
        "",
        "| workers | learner ranks | max_staleness | iteration (s) | compute (s) | overhead | "
        "hand-out | publication | fan-in | other |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        s = r["shares"]
        lines.append(f"| {r['workers']} | {r['learners']} | {r['max_staleness']} | "
                     f"{r['iteration_seconds']:.2f} | {r['compute_seconds']:.1f} | "
                     f"{s['overhead']:.1%} | {s['hand_out']:.1%} | {s['publication']:.1%} | "
                     f"{s['fan_in']:.1%} | {s['other']:.1%} |")
    lines += ["", "Throughput of max_staleness 1 over 0 (rollout = update):", ""]
    for count in args.workers:
        for learners in args.learners:
            if (count, learners, 0) in by and (count, learners, 1) in by:
                gain = (by[(count, learners, 0)]["iteration_seconds"]
                        / by[(count, learners, 1)]["iteration_seconds"])
                lines.append(f"- {count} workers, {learners} learner rank(s): {gain:.2f}x")
                by[(count, learners, 1)]["throughput_gain"] = gain
    plot = RESULTS / f"{args.results_name}.png"
    series = [(f"{learners} learner rank(s), max_staleness {staleness}",
               [float(c) for c in args.workers],
               [by[(c, learners, staleness)]["shares"]["overhead"] for c in args.workers],
               [0.0] * len(args.workers))
              for learners in args.learners for staleness in (0, 1)]
    line_plot(plot, series, "rollout workers", "orchestration overhead (share of iteration)",
              "Simulated cluster: orchestration overhead", log_x=True)
    lines += ["", f"![overhead]({plot.name})"]
    publish(args.results_name, {"machine": machine(), "settings": vars(args),
                                "startup_seconds": startup, "results": results}, lines)


if __name__ == "__main__":
    main()
