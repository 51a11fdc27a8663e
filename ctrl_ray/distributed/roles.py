"""The two roles of CTRL training as plain classes: a learner and rollout workers.

They run in one process as they are, or as Ray actors (`ctrl_ray.distributed.actors`); the
driver in `ctrl_ray.distributed.driver` does not care which. Only the trainable state (LoRA + label
embeddings) ever travels: the learner publishes it once per policy version and workers pull it.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

import torch

from ctrl_ray import data_parallel
from ctrl_ray.checkpoint import optimizer_tensors, restore_optimizer
from ctrl_ray.distributed.batches import BatchRows
from ctrl_ray.evaluation import evaluate
from ctrl_ray.finetune_setup import FinetuneConfig, Setup, build_setup, evaluate_setup
from ctrl_ray.models.judge import DigitJudge
from ctrl_ray.objectives import update_rule
from ctrl_ray.objectives.base import draw_inputs, schedule_learning_rates
from ctrl_ray.objectives.step_scale import calibrate_step_scale
from ctrl_ray.sampling.sampler import RolloutInputs

_FRESH_RNG_STATE = torch.get_rng_state()   # torch's global RNG as this process started it


class KeptActor:
    """A role whose Ray actor can serve another run (`distributed.keep_actors`): `reset` makes
    the live process what a fresh actor built with these arguments would be, minus the start
    (imports of torch, diffusers and peft)."""

    def reset(self, *args: Any) -> None:
        if torch.distributed.is_initialized():   # a learner rank: its group is joined anew
            torch.distributed.destroy_process_group()
        torch.set_rng_state(_FRESH_RNG_STATE)
        self.__dict__.clear()
        gc.collect()   # the last run's model and optimizer go before this run's are built
        self.__init__(*args)


class Learner(KeptActor):
    """Holds the trainable state and the optimizer, applies updates, owns the policy version.

    One of ``world_size`` data-parallel ranks: every rank holds the same state, receives every
    payload and computes on its share of each minibatch (`ctrl_ray.data_parallel`); rank 0
    publishes the adapter.
    """

    def __init__(self, config: FinetuneConfig, num_threads: int = 1, rank: int = 0,
                 world_size: int = 1):
        torch.set_num_threads(max(1, num_threads))
        self.rank, self.world_size = rank, world_size
        self.config = config
        self.setup = _on_device(build_setup(config))
        self.rule = update_rule(config.mode)
        self.version = 0
        self._published: tuple[int, Any] | None = None
        self._judge = None

    def describe(self) -> dict[str, Any]:
        """What the driver needs to draw batches and write checkpoints."""
        model = self.setup.model
        return {"sample_shape": tuple(model.sample_shape), "label_classes": model.label_classes,
                "num_contexts": model.num_contexts, "spec": self.setup.spec,
                "trainable_parameters": model.num_trainable_parameters()}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return self.setup.model.trainable_state_dict()

    def publish(self, as_object_ref: bool = False) -> tuple[int, Any, int]:
        """(version, trainable state, bytes), made once per version.

        On Ray the state is `ray.put` once and its reference handed out; workers pull it.
        """
        if self._published is None or self._published[0] != self.version:
            state = self.trainable_state()
            nbytes = sum(t.numel() * t.element_size() for t in state.values())
            if as_object_ref:
                import ray

                state = ray.put(state)
            self._published = (self.version, state, nbytes)
        return self._published

    def group_address(self) -> str:
        return free_address()

    def join_group(self, address: str) -> None:
        """Join the learner group (`torch.distributed`) whose rank 0 listens at `address`."""
        data_parallel.join(address, self.rank, self.world_size)

    def update(self, worker_metrics: list[dict], payloads: list[Any], seed: int) -> dict:
        """Apply the update rule's learner step to the workers' payloads (fetched here when
        they are Ray object references) and average their metrics; ``seed`` seeds the
        learner's own randomness (e.g. PPO's minibatch shuffling), the same on every rank."""
        start = time.perf_counter()
        if payloads and _is_object_ref(payloads[0]):
            import ray

            payloads = ray.get(list(payloads))
        fetched = time.perf_counter()
        generator = torch.Generator().manual_seed(seed)
        metrics = _weighted_mean(worker_metrics)
        progress = self.version / max(1, self.config.iterations)
        metrics["lr_factor"] = schedule_learning_rates(self.setup.optimizer,
                                                       self.setup.objective, progress)
        metrics.update(self.rule.learner_step(self.setup.model, self.setup.optimizer, payloads,
                                              self.setup.objective, generator, self.version))
        if not metrics.get("skipped"):
            self.version += 1
        metrics.update(version=self.version, fetch_seconds=fetched - start,
                       update_seconds=time.perf_counter() - start,
                       learner_ranks=float(data_parallel.world_size()))
        return metrics

    def final_fit(self) -> dict[str, float]:
        """The rule's last fit after the last update (the value rule's; on every learner rank,
        which meet in its collectives); empty for the other rules."""
        final_fit = getattr(self.rule, "final_fit", None)
        if final_fit is None:
            return {}
        self.setup.model.train()
        start = time.perf_counter()
        metrics = final_fit(self.setup.model, self.setup.objective, self.config.seed)
        return {**metrics, "final_fit_seconds": time.perf_counter() - start} if metrics else {}

    def calibrate_step_scale(self) -> dict[str, Any] | None:
        """The value rule's last stage: its head's step scale chosen by the objective
        (`ctrl_ray.objectives.step_scale`), recorded in the policy spec; None for the other
        rules or with ``calibration_rollouts: 0``."""
        if not getattr(self.setup.objective, "calibration_rollouts", 0):
            return None
        self.setup.model.eval()
        calibration = calibrate_step_scale(self.setup.model, self.setup.reward_fn,
                                           self.setup.objective, self.config.seed)
        self.setup.spec["value_head"]["step_scale"] = calibration["step_scale"]
        return calibration

    def evaluate(self, out: str) -> dict[str, Any]:
        """The evaluation protocol on the current policy, the base model and the exact optimum
        at the run's gamma / alpha (grids written under ``out``)."""
        return evaluate_setup(self.setup, self.config, Path(out))

    def score(self, evaluation) -> dict[str, Any]:
        """The evaluation protocol ``evaluation`` on the current policy alone (no base model,
        no optimum, no grid): a sweep's intermediate scores, without a second copy of the
        model."""
        if self._judge is None and self.config.judge:
            self._judge = DigitJudge.load(self.config.judge)
        self.setup.model.eval()
        return evaluate(self.setup.model, self.setup.label_info, self._judge, evaluation)

    def checkpoint_state(self) -> tuple[dict, tuple[dict, dict], int, dict]:
        """Adapter tensors, optimizer (tensors, layout), version and the rule's own state on
        the learner (the value rule's replay; {} for the others), for the driver to save."""
        rule_state = getattr(self.rule, "learner_state", None)
        return (self.trainable_state(), optimizer_tensors(self.setup.optimizer), self.version,
                rule_state(self.setup.model) if rule_state else {})

    def restore(self, adapter: dict[str, torch.Tensor], optimizer: dict[str, torch.Tensor],
                layout: dict, version: int,
                learner_state: dict[str, torch.Tensor] | None = None) -> None:
        self.setup.model.load_trainable_state_dict(adapter)
        restore_optimizer(self.setup.optimizer, optimizer, layout)
        self.version = version
        restore_rule_state = getattr(self.rule, "restore_learner_state", None)
        if learner_state and restore_rule_state:
            restore_rule_state(self.setup.model, self.setup.objective, learner_state)


class RolloutWorker(KeptActor):
    """Holds the frozen backbone and a copy of the adapter; samples its share of each batch."""

    def __init__(self, config: FinetuneConfig, num_threads: int = 1, setup: Setup | None = None):
        torch.set_num_threads(max(1, num_threads))
        self.config = config
        self.setup = setup or _on_device(build_setup(config))
        self.rule = update_rule(config.mode)
        self.version = -1
        self.last_sync_seconds = 0.0

    def sync(self, version: int, published: list) -> float:
        """Pull the published state if this worker is behind `version`; seconds spent."""
        if version == self.version:
            return 0.0
        start = time.perf_counter()
        state = published[0]
        if not isinstance(state, dict):  # a Ray object ref: fetch it now, once per version
            import ray

            state = ray.get(state)
        self.setup.model.load_trainable_state_dict(state)
        self.version = version
        self.last_sync_seconds = time.perf_counter() - start
        return self.last_sync_seconds

    def work(self, version: int, published: list, inputs: RolloutInputs | BatchRows,
             normaliser: int, report: bool = True) -> tuple[Any, dict]:
        """Sync to ``version``, then the update rule's worker step on this shard of the batch
        (given, or drawn here from the batch's seed; ``normaliser`` = the full batch size);
        returns its payload and metrics. A rule with a ``report_every`` key measures the
        policy's reward and KL only when ``report``."""
        start = time.perf_counter()
        sync_seconds = self.sync(version, published)
        if isinstance(inputs, BatchRows):
            inputs = draw_inputs(self.setup.model, self.setup.objective, inputs.seed,
                                 rows=(inputs.start, inputs.stop))
        options = {"report": report} if hasattr(self.setup.objective, "report_every") else {}
        payload, metrics = self.rule.worker_step(self.setup.model, self.setup.reward_fn, inputs,
                                                 self.setup.objective, normaliser, self.version,
                                                 **options)
        metrics.update(sync_seconds=sync_seconds, policy_version=float(self.version),
                       work_seconds=time.perf_counter() - start)
        return payload, metrics

    def pid(self) -> int:
        import os

        return os.getpid()


def free_address() -> str:
    """host:port of a free port on this node, for a learner group's rank 0 to listen at."""
    import socket

    import ray

    with socket.socket() as probe:
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    return f"{ray.util.get_node_ip_address()}:{port}"


def _on_device(setup):
    """Move the policy and reward to the GPU when this process has one (a GPU worker)."""
    if torch.cuda.is_available():
        setup.model.to("cuda")
        setup.reward.to("cuda")
    return setup


def _is_object_ref(value: Any) -> bool:
    return type(value).__name__ == "ObjectRef"


def _weighted_mean(shard_metrics: list[dict]) -> dict[str, float]:
    """Average per-shard metrics weighted by their number of samples."""
    total = sum(m.get("num_samples", 1.0) for m in shard_metrics)
    keys = {k for m in shard_metrics for k in m if k != "num_samples"}
    averaged = {k: sum(m.get(k, 0.0) * m.get("num_samples", 1.0) for m in shard_metrics) / total
                for k in keys if k not in ("sync_seconds", "policy_version", "work_seconds")}
    if any("loss" in m for m in shard_metrics):
        averaged["loss"] = sum(m["loss"] for m in shard_metrics if "loss" in m)
    for slowest in ("sync_seconds", "work_seconds"):
        averaged[slowest] = max((m.get(slowest, 0.0) for m in shard_metrics), default=0.0)
    averaged["num_samples"] = total
    return averaged
