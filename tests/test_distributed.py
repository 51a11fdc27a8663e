"""Ray actor/learner training: sharded updates equal one process, fault tolerance, resume.
The runs keep their actors for the next (`distributed.keep_actors`) unless a test says not."""

from __future__ import annotations

import mlflow
import pytest
import torch
from conftest import tiny_finetune_overrides
from safetensors.torch import load_file

from ctrl_ray.checkpoint import ADAPTER_FILE, STATE_FILE
from ctrl_ray.config import load_config
from ctrl_ray.distributed.driver import train
from ctrl_ray.distributed.roles import Learner, RolloutWorker
from ctrl_ray.errors import InputError
from ctrl_ray.finetune import FinetuneConfig
from ctrl_ray.sampling.sampler import RolloutInputs


@pytest.fixture
def make_config(tiny_base, tiny_reward, tiny_judge, tmp_path):
    def make(name: str, *extra: str, mode: str = "pathwise") -> FinetuneConfig:
        overrides = tiny_finetune_overrides(tiny_base, tiny_reward, tiny_judge, tmp_path / name,
                                            mode)
        window = ["objective.truncation.mode=random", "objective.truncation.k=3"]
        return load_config(FinetuneConfig, overrides=[
            *overrides, "evaluate=false", *(window if mode == "pathwise" else []),
            "distributed.keep_actors=true", *extra])
    return make


def _adapter(result) -> dict[str, torch.Tensor]:
    return load_file(f"{result['policy_dir']}/{ADAPTER_FILE}")


def _assert_same_adapter(a, b, atol):
    assert a.keys() == b.keys()
    differences = {name: (a[name] - b[name]).abs().max().item() for name in a}
    worst = max(differences, key=differences.get)
    assert differences[worst] <= atol, (worst, differences[worst])


def test_two_ray_workers_with_half_batches_give_the_full_batch_gradient(make_config,
                                                                        ray_session):
    config = make_config("grads")
    learner = Learner(config)
    learner.setup.model.label_embeddings["compress_class"].weight.data[:4].normal_()
    version, state, _ = learner.publish()
    inputs = RolloutInputs.draw(0, batch_size=8, num_steps=4, sample_shape=(1, 8, 8),
                                label_classes={"compress_class": 4}, num_contexts=10,
                                truncation=config.objective.truncation)
    full, _ = RolloutWorker(config).work(version, [state], inputs, 8)
    workers = [ray_session.remote(num_cpus=0)(RolloutWorker).remote(config) for _ in range(2)]
    reference = ray_session.put(state)
    shards = ray_session.get([w.work.remote(version, [reference],
                                            inputs.slice(4 * i, 4 * i + 4), 8)
                              for i, w in enumerate(workers)])
    assert full.keys() == shards[0][0].keys()
    for name, gradient in full.items():
        error = (shards[0][0][name] + shards[1][0][name] - gradient).abs().max().item()
        assert error <= 1e-4 * gradient.abs().max().item() + 1e-8, (name, error,
                                                                   gradient.abs().max().item())
    assert full["label_embeddings.compress_class.weight"].abs().sum() > 0


def test_two_workers_with_half_batches_update_like_one_process(make_config, ray_session):
    local = train(make_config("local", "iterations=2"), progress=False)
    sharded = train(make_config("ray", "iterations=2", "distributed.workers=2"),
                    progress=False)
    # Adam divides by the gradient's running scale, so entries whose gradient is at the level
    # of float rounding may move differently; everything else must agree closely.
    _assert_same_adapter(_adapter(local), _adapter(sharded), atol=0.1 * 0.005)
    assert any(t.abs().sum() > 0 for t in _adapter(sharded).values())  # it did learn


def test_resume_ends_with_the_same_adapter_as_an_uninterrupted_run(make_config, tmp_path):
    straight = train(make_config("straight", "iterations=4"), progress=False)
    first_half = make_config("resumed", "iterations=2")
    train(first_half, progress=False)
    checkpoint = tmp_path / "resumed" / "checkpoints" / "000002"
    assert (checkpoint / STATE_FILE).is_file()
    resumed = train(make_config("resumed", "iterations=4"), progress=False, resume=True)
    _assert_same_adapter(_adapter(straight), _adapter(resumed), atol=1e-6)
    steps = mlflow.MlflowClient().get_metric_history(resumed["mlflow_run_id"], "reward")
    assert sorted(m.step for m in steps) == [1, 2, 3, 4]  # one MLflow run, continued


def test_a_fresh_start_over_an_earlier_runs_checkpoints_needs_overwrite(make_config, tmp_path):
    train(make_config("earlier", "iterations=4"), progress=False)  # checkpoints 2 and 4
    again = make_config("earlier", "iterations=2")
    with pytest.raises(InputError, match="earlier run's checkpoints"):
        train(again, progress=False)
    train(again, progress=False, overwrite=True)
    # Only the new run's checkpoint is left: a later --resume cannot pick up the old 000004.
    assert [p.name for p in (tmp_path / "earlier" / "checkpoints").iterdir()] == ["000002"]


def test_ppo_mode_on_two_workers_logs_staleness_and_clipping(make_config, ray_session):
    config = make_config("ppo", "iterations=2", "distributed.workers=2",
                         "objective.batch_size=8", "objective.num_inference_steps=4",
                         "objective.ppo_epochs=2", "objective.minibatch_size=16",
                         "objective.max_staleness=1", mode="ppo")
    result = train(config, progress=False)
    client = mlflow.MlflowClient()
    run_id = result["mlflow_run_id"]
    assert [m.value for m in client.get_metric_history(run_id, "version")] == [1.0, 2.0]
    assert [m.value for m in client.get_metric_history(run_id, "staleness_max")] == [0.0, 0.0]
    assert client.get_metric_history(run_id, "clip_fraction")
    assert len(client.get_metric_history(run_id, "sync_seconds")) == 2
    assert any(t.abs().sum() > 0 for t in _adapter(result).values())


def test_a_missing_input_fails_in_the_driver_with_one_clear_error(make_config, ray_session):
    missing_reward = make_config("no-reward", "distributed.workers=2",
                                 "rewards=[{path: /nonexistent/reward}]")
    with pytest.raises(InputError, match="nonexistent/reward"):
        train(missing_reward, progress=False)
    missing_base = make_config("no-base", "distributed.workers=2",
                               "base_model=/nonexistent/base")
    with pytest.raises(InputError, match="base_model"):
        train(missing_base, progress=False)


def test_resume_without_a_checkpoint_is_an_error_unless_asked_to_start_over(make_config):
    config = make_config("nothing-to-resume", "iterations=1")
    with pytest.raises(InputError, match="no checkpoint"):
        train(config, progress=False, resume=True)
    result = train(config, progress=False, resume="if-present")
    assert result["iterations"] == 1


def test_a_learner_without_cpus_of_its_own_updates_on_the_workers_threads(make_config,
                                                                          ray_session):
    """The workers wait while the learner updates (PPO's epochs run there), so a learner with
    `learner_cpus: 0` must not be held to one thread."""
    from ctrl_ray.distributed.actors import start_roles

    roles = start_roles(make_config("threads", "distributed.workers=2"))
    try:
        threads = ray_session.get(roles.learner.__ray_call__.remote(
            lambda learner: torch.get_num_threads()))
    finally:
        roles.stop(keep=True)   # idle: the next test's run takes them
    assert threads == 2


def test_the_value_rule_on_two_workers_updates_like_one_process(make_config, ray_session):
    value = ("adapter.kind=value", "objective.regression_steps=4",
             "objective.regression_batch_size=16", "iterations=2")
    local = train(make_config("value-local", *value, mode="value"), progress=False)
    sharded = train(make_config("value-ray", *value, "distributed.workers=2", mode="value"),
                    progress=False)
    # The learner pools the shards' base rollouts in order and draws the same minibatches.
    _assert_same_adapter(_adapter(local), _adapter(sharded), atol=1e-4)
    assert _adapter(sharded)["value_head.head.weight"].abs().sum() > 0   # it did learn
    assert all(name.startswith("value_head.") for name in _adapter(sharded))


def test_local_ray_workers_compute_at_the_drivers_priority(ray_session):
    """Ray starts workers at niceness +15 by default, so on a shared machine any other process
    starves the rollouts; a local Ray started by ctrl-ray keeps them at the driver's."""
    import os

    @ray_session.remote(num_cpus=0)
    def niceness() -> int:
        return os.getpriority(os.PRIO_PROCESS, 0)

    assert ray_session.get(niceness.remote()) == os.getpriority(os.PRIO_PROCESS, 0)


def test_kept_actors_serve_the_next_run_as_fresh_ones_would(make_config, ray_session):
    """`distributed.keep_actors`: a finished run leaves its actors idle and the next run of the
    same shape takes them (the same processes, another rule), reset, and updates bit for bit as
    one process does (as a fresh worker does), even when the kept worker dies mid-run: Ray
    rebuilds it from the first run's arguments and the driver resets it to this run's."""
    from ctrl_ray.distributed.actors import end_kept_actors

    pids = []

    def record_pid_then_kill_the_worker(iteration, roles):
        if iteration == 1:
            pids.append(roles.call(roles.workers[0], "pid"))
            if len(pids) == 2:
                ray_session.kill(roles.workers[0], no_restart=False)

    kept = ("iterations=3", "distributed.workers=1", "distributed.keep_actors=true")
    try:
        train(make_config("first", *kept), progress=False,
              on_iteration=record_pid_then_kill_the_worker)
        reused = train(make_config("second", *kept, mode="value"), progress=False,
                       on_iteration=record_pid_then_kill_the_worker)
    finally:
        end_kept_actors()
    local = train(make_config("local", "iterations=3", mode="value"), progress=False)
    assert pids[0] == pids[1], pids
    _assert_same_adapter(_adapter(reused), _adapter(local), atol=0.0)


def test_killed_worker_is_restarted_and_the_run_finishes(make_config, ray_session):
    """On fresh actors, as a run without `keep_actors` starts them (the kept-actor test above
    kills a reused one)."""
    from ctrl_ray.distributed.actors import end_kept_actors

    end_kept_actors()
    killed = []

    def kill_first_worker(iteration, roles):
        if iteration == 1:
            ray_session.kill(roles.workers[0], no_restart=False)
            killed.append(iteration)

    config = make_config("faulty", "iterations=3", "distributed.workers=2",
                         "distributed.keep_actors=false")
    result = train(config, progress=False, on_iteration=kill_first_worker)
    assert killed == [1]
    history = mlflow.MlflowClient().get_metric_history(result["mlflow_run_id"], "reward")
    assert [m.step for m in history] == [1, 2, 3]
    versions = mlflow.MlflowClient().get_metric_history(result["mlflow_run_id"], "version")
    assert [m.value for m in versions] == [1.0, 2.0, 3.0]
