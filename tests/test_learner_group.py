"""The learner as a data-parallel group and rollouts that overlap its updates."""

from __future__ import annotations

import mlflow
import pytest
from conftest import rule_config_factory
from safetensors.torch import load_file

from ctrl_ray.checkpoint import ADAPTER_FILE
from ctrl_ray.distributed.driver import train
from ctrl_ray.errors import InputError
from ctrl_ray.finetune import FinetuneConfig

RULE_SETTINGS = {
    "pathwise": ("objective.truncation.mode=random", "objective.truncation.k=3"),
    "adjoint": ("objective.regression_steps=3",),
    "ppo": ("objective.ppo_epochs=2", "objective.minibatch_size=12"),
    "value": ("adapter.kind=value", "objective.regression_steps=4",
              "objective.regression_batch_size=15", "objective.check_every=2"),
}


@pytest.fixture
def make_config(tiny_base, tiny_reward, tiny_judge, tmp_path):
    return rule_config_factory(tiny_base, tiny_reward, tiny_judge, tmp_path, RULE_SETTINGS,
                               "iterations=2", "distributed.keep_actors=true")


def _adapter(result) -> dict:
    return load_file(f"{result['policy_dir']}/{ADAPTER_FILE}")


def _largest_difference(a: dict, b: dict) -> tuple[str, float]:
    assert a.keys() == b.keys()
    differences = {name: (a[name] - b[name]).abs().max().item() for name in a}
    worst = max(differences, key=differences.get)
    return worst, differences[worst]


def _interrupted_then_resumed(config: FinetuneConfig) -> dict:
    """Run `config` (checkpoints at 2 and 4 of 4 updates), stop it after update 3, resume."""
    def stop_after_update_3(done, roles):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, progress=False, on_iteration=stop_after_update_3)
    return train(config, progress=False, resume=True)


def _history(result, metric: str) -> list[float]:
    return [m.value for m in mlflow.MlflowClient().get_metric_history(
        result["mlflow_run_id"], metric)]


@pytest.mark.parametrize("mode", list(RULE_SETTINGS))
def test_two_learner_ranks_update_like_one(make_config, ray_session, mode):
    """Each rank computes on its share of every minibatch and the gradients are summed across
    ranks, so 2 ranks take the step 1 rank takes, up to the order of float additions."""
    one = train(make_config(f"{mode}-one", mode), progress=False)
    two = train(make_config(f"{mode}-two", mode, "distributed.workers=1",
                            "distributed.learners=2"), progress=False)
    a, b = _adapter(one), _adapter(two)
    worst, difference = _largest_difference(a, b)
    # Adam divides each entry's step by its gradient's running scale, so an entry whose gradient
    # is at the level of float rounding (a LoRA A factor while B is ~0) may move up to ~lr
    # either way; everything else agrees to rounding.
    assert difference <= 0.1 * 0.005, (worst, difference)
    total = sum(((a[n] - b[n]) ** 2).sum() for n in a).sqrt()
    assert total <= 1e-4 * sum((a[n] ** 2).sum() for n in a).sqrt()
    assert any(t.abs().sum() > 0 for t in _adapter(two).values())   # it did learn
    assert _history(two, "learner_ranks") == [2.0, 2.0]   # the group really took the steps


def _group_member(rank: int, address: str, results) -> None:
    """One rank of a 2-process gloo group: its share, a summed gradient, sums and maxima."""
    import torch

    from ctrl_ray import data_parallel

    data_parallel.join(address, rank, 2)
    (rows,), weight = data_parallel.share(list(range(5)))
    reached, missed = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    reached.grad = torch.full((3,), float(rank + 1)) if rank == 0 else None
    data_parallel.sum_gradients([reached, missed])
    results[rank] = (rows, weight, reached.grad.tolist(), missed.grad,
                     data_parallel.total(rank + 1.0), data_parallel.largest(float(rank)))


def test_ranks_take_their_shares_and_sum_their_gradients():
    """Without this, 2 ranks that each took the whole batch would still pass the test above:
    Adam barely sees a doubled gradient."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    results = mp.Manager().dict()
    mp.spawn(_group_member, args=(address, results), nprocs=2)
    assert results[0] == ([0, 1], 0.4, [1.0, 1.0, 1.0], None, 3.0, 1.0)
    assert results[1] == ([2, 3, 4], 0.6, [1.0, 1.0, 1.0], None, 3.0, 1.0)


def test_rollouts_one_version_ahead_overlap_the_update_and_resume_exactly(make_config):
    """max_staleness 1: every update after the first sees a batch its policy sampled one
    version earlier; hand-outs stop at a checkpoint, so a resumed run ends as an uninterrupted
    one does."""
    settings = ("distributed.max_staleness=1", "checkpoint_every=2")
    straight = train(make_config("ahead", "pathwise", *settings, "iterations=4"),
                     progress=False)
    assert _history(straight, "staleness") == [0.0, 1.0, 0.0, 1.0]
    synchronous = train(make_config("sync", "pathwise", "iterations=4"), progress=False)
    _, difference = _largest_difference(_adapter(straight), _adapter(synchronous))
    assert difference > 1e-4   # a stale batch is a different update

    resumed = _interrupted_then_resumed(make_config("resumed", "pathwise", *settings,
                                                    "iterations=4"))
    _, difference = _largest_difference(_adapter(straight), _adapter(resumed))
    assert difference == 0.0


def test_the_value_rule_trains_the_same_whatever_the_staleness(make_config, ray_session):
    """Its regression data are base rollouts, which no policy version changes: overlapping
    them with the update costs nothing in what is learned."""
    synchronous = train(make_config("value-sync", "value", "iterations=3",
                                    "distributed.workers=1"), progress=False)
    ahead = train(make_config("value-ahead", "value", "iterations=3", "distributed.workers=1",
                              "distributed.max_staleness=2", "checkpoint_every=0"),
                  progress=False)
    assert _history(ahead, "staleness") == [0.0, 1.0, 2.0]
    _, difference = _largest_difference(_adapter(synchronous), _adapter(ahead))
    assert difference == 0.0
    for metric in ("worker_idle_share", "learner_idle_share", "collect_seconds",
                   "fetch_seconds"):
        assert len(_history(ahead, metric)) == 3, metric


def test_learner_ranks_need_ray(make_config):
    with pytest.raises(InputError, match="distributed.learners"):
        make_config("no-ray", "pathwise", "distributed.learners=2")


def test_a_learner_group_resumes_bit_identically(make_config, ray_session):
    """Rank 0 writes the checkpoint; every rank restores it, so the group continues exactly."""
    group = ("distributed.workers=1", "distributed.learners=2", "checkpoint_every=2",
             "iterations=4")
    straight = train(make_config("group-straight", "value", *group), progress=False)
    resumed = _interrupted_then_resumed(make_config("group-resumed", "value", *group))
    _, difference = _largest_difference(_adapter(straight), _adapter(resumed))
    assert difference == 0.0


def test_overlapping_an_uncorrected_rule_is_warned_about(make_config, capsys):
    from ctrl_ray.preflight import warn_stale_gradients

    for rule, warned in (("adjoint", True), ("pathwise", True), ("ppo", False), ("value", False)):
        warn_stale_gradients(make_config(f"warn-{rule}", rule, "distributed.max_staleness=1"))
        assert ("uncorrected" in capsys.readouterr().out) == warned, rule
    warn_stale_gradients(make_config("warn-sync", "adjoint"))
    assert capsys.readouterr().out == ""
