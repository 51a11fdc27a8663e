"""Rollouts that overlap the learner's updates, at most `max_staleness` policy versions behind.

Batch i's randomness is two seeds drawn from the driver's generator in iteration order, the
batch's (each worker draws its rows' labels, contexts and noise from it) and the learner's, so
every staleness bound draws the same batches and the driver ships no tensors. With
bound k, batches i+1 .. i+k are already with the workers, sampled with the newest adapter
published when they were handed out, while the learner updates on batch i: the update of batch
i then sees a policy k versions newer than the one that sampled it, never more (k = 0 is the
synchronous loop). Hand-outs never run past a checkpoint, so a resumed run samples exactly what
an uninterrupted one does.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

import torch

from ctrl_ray.distributed.actors import Roles
from ctrl_ray.distributed.batches import BatchRows, split_rows
from ctrl_ray.finetune_config import FinetuneConfig


@dataclass
class HandedOut:
    """A batch with the workers: its iteration, the policy version it samples with, the
    learner's seed for its update, the workers' calls and their futures."""

    iteration: int
    version: int
    seed: int
    calls: list[tuple]
    futures: list[tuple[Any, Any]]


class RolloutPipeline:
    """Hands batches to the workers ahead of the learner and applies the updates in order."""

    def __init__(self, roles: Roles, config: FinetuneConfig, generator: torch.Generator,
                 report_at, first_iteration: int = 0):
        self.roles, self.config = roles, config
        self.generator = generator
        self.report_at = report_at           # iteration -> whether workers measure the policy
        self.max_staleness = config.distributed.max_staleness
        self.in_flight: deque[HandedOut] = deque()
        self.next_iteration = first_iteration   # the next batch to hand out
        self.published: tuple[int, Any, int] | None = None
        self.staleness = Counter()

    def update(self, iteration: int) -> dict[str, float]:
        """The update of batch ``iteration``: hand out what the bound allows, wait for this
        batch's workers, update every learner rank on its payloads; the metrics to log."""
        start = time.perf_counter()
        publish_seconds, hand_out_seconds = self._hand_out(iteration)
        batch = self.in_flight.popleft()
        if batch.iteration != iteration:
            raise RuntimeError(f"batch {batch.iteration} came up for update {iteration}")
        payloads, worker_metrics = self.roles.collect(batch.futures, batch.calls,
                                                      self.config.distributed.max_restarts)
        collected = time.perf_counter()
        metrics = self.roles.on_learners("update", worker_metrics, payloads, batch.seed)
        seconds = time.perf_counter() - start
        staleness = int(metrics["version"]) - (0 if metrics.get("skipped") else 1) - batch.version
        self.staleness[staleness] += 1
        busy = sum(m.get("work_seconds", 0.0) for m in worker_metrics) / len(worker_metrics)
        metrics.update(
            staleness=float(staleness), publish_seconds=publish_seconds,
            hand_out_seconds=hand_out_seconds,
            sync_bytes=float(self.published[2]), iteration_seconds=seconds,
            collect_seconds=collected - start - publish_seconds - hand_out_seconds,
            worker_idle_share=max(0.0, 1 - busy / seconds),
            learner_idle_share=max(0.0, 1 - metrics["update_seconds"] / seconds),
            sync_fraction=(publish_seconds + metrics.get("sync_seconds", 0.0)) / seconds)
        return metrics

    def _hand_out(self, iteration: int) -> tuple[float, float]:
        """Give the workers every batch up to ``iteration`` + max_staleness that stays before
        the next checkpoint and the end of the run; seconds spent publishing the adapter and
        handing out the calls."""
        publish_seconds = hand_out_seconds = 0.0
        last = min(iteration + self.max_staleness, self.config.iterations - 1)
        every = self.config.checkpoint_every
        if every:
            last = min(last, (iteration // every + 1) * every - 1)
        while self.next_iteration <= last:
            started = time.perf_counter()
            self.published = self.roles.call(self.roles.learner, "publish", self.roles.remote)
            published = time.perf_counter()
            self._hand_out_one(self.next_iteration)
            self.next_iteration += 1
            publish_seconds += published - started
            hand_out_seconds += time.perf_counter() - published
        return publish_seconds, hand_out_seconds

    def _hand_out_one(self, iteration: int) -> None:
        """Hand batch ``iteration`` out: each worker gets the batch's seed and its rows (it
        draws its own noise), the adapter's reference and the policy version."""
        batch_seed, seed = (int(torch.randint(0, 2**62, (), generator=self.generator))
                            for _ in range(2))   # the batch's randomness, the learner's
        version, state, _ = self.published
        batch_size = self.config.objective.batch_size
        calls = [(version, [state], BatchRows(batch_seed, start, stop), batch_size,
                  self.report_at(iteration))
                 for start, stop in split_rows(batch_size, len(self.roles.workers))]
        futures = [self.roles.submit(index, call) for index, call in enumerate(calls)]
        self.in_flight.append(HandedOut(iteration, version, seed, calls, futures))

    def staleness_counts(self) -> dict[str, float]:
        """How many updates saw a batch that many versions old, as metrics."""
        return {f"updates_at_staleness_{s}": float(n) for s, n in sorted(self.staleness.items())}
