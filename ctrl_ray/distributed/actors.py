"""Where the roles run: in this process, or as Ray actors (a learner group in a placement group
and N rollout workers), with the calls the training loop makes on them.

On Ray the driver handles object references and scalars only: a worker's call returns two
references (payload, metrics); the driver reads the metrics and hands the payload references
to the learner ranks, which fetch them from the object store themselves.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ctrl_ray.distributed.ray_runtime import connect
from ctrl_ray.distributed.roles import Learner, RolloutWorker
from ctrl_ray.errors import InputError
from ctrl_ray.finetune_setup import FinetuneConfig, load_rewards
from ctrl_ray.registry import is_uri


@dataclass
class Roles:
    """The learner ranks (rank 0 first) and the rollout workers: plain objects in one process
    (one learner, one worker sharing its model), or Ray actor handles."""

    learners: list[Any]
    workers: list[Any]
    remote: bool
    placement_group: Any = None
    kept: list[_Kept] = field(default_factory=list)   # the learner ranks', then the workers'

    @property
    def learner(self) -> Any:
        """Rank 0: it publishes the adapter, writes checkpoints and evaluates."""
        return self.learners[0]

    def call(self, actor: Any, method: str, *args: Any) -> Any:
        if not self.remote:
            return getattr(actor, method)(*args)
        import ray

        return ray.get(getattr(actor, method).remote(*args))

    def on_learners(self, method: str, *args: Any) -> Any:
        """`method(*args)` on every learner rank at once (they meet in collectives); rank 0's
        answer."""
        if not self.remote:
            return getattr(self.learner, method)(*args)
        import ray

        return ray.get([getattr(rank, method).remote(*args) for rank in self.learners])[0]

    def submit(self, index: int, args: tuple) -> tuple[Any, Any]:
        """Start worker `index` on `work(*args)`: (payload, metrics) in one process (run now),
        or their two object references on Ray."""
        if not self.remote:
            return self.workers[0].work(*args)
        return self.workers[index].work.options(num_returns=2).remote(*args)

    def collect(self, futures: list[tuple[Any, Any]], calls: list[tuple], retries: int
                ) -> tuple[list[Any], list[dict]]:
        """The payloads (references on Ray, not fetched) and metrics of submitted work; a call
        whose worker died is redone once its actor is back (at most `retries` times)."""
        if not self.remote:
            return [payload for payload, _ in futures], [metrics for _, metrics in futures]
        import ray
        from ray.exceptions import RayActorError

        futures = list(futures)
        try:   # one round trip for all of them, the usual case
            return [payload for payload, _ in futures], ray.get([m for _, m in futures])
        except RayActorError:
            pass
        metrics: list[dict | None] = [None] * len(futures)
        for index, call in enumerate(calls):
            for failures in range(retries + 1):
                try:
                    metrics[index] = ray.get(futures[index][1])
                    break
                except RayActorError as error:
                    if failures == retries:
                        raise RuntimeError(f"rollout worker {index} failed {failures + 1} "
                                           f"times: {error}") from error
                    print(f"rollout worker {index} failed ({type(error).__name__}); waiting "
                          f"for its restart to redo its shard")
                    _wait_until_alive(self.workers[index])
                    self._after_restart(index)
                    futures[index] = self.submit(index, call)
        return [payload for payload, _ in futures], metrics

    def _after_restart(self, index: int) -> None:
        """Ray rebuilds a restarted actor from the arguments it was created with: worker
        `index`, if kept from an earlier run, must be reset to this run's."""
        import ray

        kept = self.kept[len(self.learners) + index] if self.kept else None
        if kept is not None and kept.reused:
            ray.get(self.workers[index].reset.remote(*kept.args))

    def stop(self, keep: bool = False) -> None:
        """End the actors (a finished run frees its learner group's placement group too), or,
        with `keep`, leave them idle for the next run of this process (`distributed.keep_actors`;
        learner ranks placed in a placement group are always ended)."""
        if not self.remote:
            return
        import ray

        if keep and self.placement_group is None:
            _IDLE.extend(self.kept)
            return
        for actor in (*self.learners, *self.workers):
            ray.kill(actor)
        if self.placement_group is not None:
            ray.util.remove_placement_group(self.placement_group)


@dataclass
class _Kept:
    """A Ray actor with what it was built for: its class and options (the key another run must
    match to reuse it) and the arguments of its current run."""

    key: tuple
    actor: Any
    args: tuple
    reused: bool = False


_IDLE: list[_Kept] = []   # actors kept by finished runs of this process, waiting for the next


def end_kept_actors() -> None:
    """End every actor a finished run kept (`distributed.keep_actors`), freeing their CPUs and
    GPUs for other Ray work."""
    if _IDLE:
        import ray

        for kept in _IDLE:
            ray.kill(kept.actor)
        _IDLE.clear()


def _actors(requests: list[tuple[Any, dict, tuple]]) -> list[_Kept]:
    """One actor per (class, options, args): an idle kept actor of the same class and options,
    reset to `args`, else a new one. Kept actors that match no request are ended first, so the
    new ones find their resources."""
    import ray

    keys = [(cls.__name__, tuple(sorted(options.items()))) for cls, options, _ in requests]
    built: list[_Kept | None] = []
    resets = []
    for key, (_, _, args) in zip(keys, requests, strict=True):
        match = next((kept for kept in _IDLE if kept.key == key), None)
        if match is not None:
            _IDLE.remove(match)
            resets.append(match.actor.reset.remote(*args))
            match.args, match.reused = args, True
        built.append(match)
    end_kept_actors()
    for index, (key, (cls, options, args)) in enumerate(zip(keys, requests, strict=True)):
        if built[index] is None:
            built[index] = _Kept(key, ray.remote(cls).options(**options).remote(*args), args)
    ray.get(resets)   # a reset that fails (a bad config) fails here, as a constructor would
    return built


def _wait_until_alive(actor: Any, timeout_s: float = 300.0) -> None:
    """Block until a restarting actor answers (Ray re-runs its constructor); raise if it died
    for good (its restarts are used up) or does not come back in `timeout_s`."""
    import ray
    from ray.exceptions import ActorUnavailableError, GetTimeoutError

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.get(actor.pid.remote(), timeout=10)
            return
        except (ActorUnavailableError, GetTimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def start_roles(config: FinetuneConfig) -> Roles:
    """Build the learner ranks and workers: in this process, or as Ray actors (joining
    `address`); N > 1 learner ranks form a `torch.distributed` group in a placement group."""
    dist = config.distributed
    if dist.workers == 0:  # one process: the worker shares the learner's model and reward
        learner = Learner(config, num_threads=torch.get_num_threads())
        worker = RolloutWorker(config, torch.get_num_threads(), setup=learner.setup)
        return Roles([learner], [worker], remote=False)
    import ray

    _check_inputs(config)
    connect(dist.ray_address)
    config = _with_absolute_paths(config)
    worker = ({"num_cpus": dist.cpus_per_worker, "num_gpus": dist.gpus_per_worker,
               "max_restarts": dist.max_restarts, "max_task_retries": 0},
              (config, max(1, int(dist.cpus_per_worker))))
    if dist.learners > 1 and (dist.learner_cpus or dist.learner_gpus):   # a placement group
        end_kept_actors()
        learners, group = start_learner_group(ray.remote(Learner), dist, config)
        workers = [ray.remote(RolloutWorker).options(**worker[0]).remote(*worker[1])
                   for _ in range(dist.workers)]
        return Roles(learners, workers, remote=True, placement_group=group)
    # Actors a finished run kept (`distributed.keep_actors`) serve this one where they match.
    size, threads = dist.learners, _learner_threads(dist)
    options = {"num_cpus": dist.learner_cpus, "num_gpus": dist.learner_gpus}
    kept = _actors([*[(Learner, options, (config, threads, rank, size)) for rank in range(size)],
                    *[(RolloutWorker, *worker)] * dist.workers])
    learners = [k.actor for k in kept[:size]]
    _join_group(learners)
    return Roles(learners, [k.actor for k in kept[size:]], remote=True, kept=kept)


def start_learner_group(actor_class: Any, dist: Any, *args: Any) -> tuple[list[Any], Any]:
    """`dist.learners` ranks of `actor_class(*args, num_threads, rank, world_size)`, placed
    together (a PACK placement group when they reserve resources) and joined into one
    `torch.distributed` group whose rank 0 listens on a free port of its node; returns the
    ranks and the placement group (None without one)."""
    import ray

    size, threads = dist.learners, _learner_threads(dist)
    options: dict[str, Any] = {"num_cpus": dist.learner_cpus, "num_gpus": dist.learner_gpus}
    group = None
    if size > 1 and (dist.learner_cpus or dist.learner_gpus):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle = {key: value for key, value in (("CPU", dist.learner_cpus),
                                                ("GPU", dist.learner_gpus)) if value}
        group = ray.util.placement_group([bundle] * size, strategy="PACK")
        ray.get(group.ready())
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(group)
    ranks = [actor_class.options(**options).remote(*args, threads, index, size)
             for index in range(size)]
    _join_group(ranks)
    return ranks, group


def _join_group(ranks: list[Any]) -> None:
    """Join N > 1 learner ranks into one `torch.distributed` group (rank 0 listens)."""
    if len(ranks) > 1:
        import ray

        address = ray.get(ranks[0].group_address.remote())
        ray.get([rank.join_group.remote(address) for rank in ranks])


def _learner_threads(dist: Any) -> int:
    """Threads per learner rank. A synchronous loop leaves the workers waiting while the
    learner updates, so a learner that reserves no CPUs of its own computes on as many threads
    as they hold; with rollouts overlapping the update (max_staleness > 0) it takes one."""
    shared = dist.workers * dist.cpus_per_worker if dist.max_staleness == 0 else 1
    return max(1, int((dist.learner_cpus or shared) // dist.learners))


def _check_inputs(config: FinetuneConfig) -> None:
    """Fail in the driver, with one clear line, on inputs every actor would fail on."""
    load_rewards(config.rewards)
    if not is_uri(config.base_model) and not Path(config.base_model).exists():
        raise InputError(f"base_model: {str(config.base_model)!r} does not exist")


def _with_absolute_paths(config: FinetuneConfig) -> FinetuneConfig:
    """A copy of `config` whose local paths are absolute, so actors find them from any cwd."""
    config = copy.deepcopy(config)
    if Path(config.base_model).exists():
        config.base_model = str(Path(config.base_model).resolve())
    for reward in config.rewards:
        reward.path = str(Path(reward.path).resolve())
    return config
