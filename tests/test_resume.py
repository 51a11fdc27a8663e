"""A run interrupted after a checkpoint and resumed ends bit-identical to an uninterrupted one,
for every update rule (the value rule's replay travels in the checkpoint); a resume with a
config that changes training is refused unless allowed; an output folder holds one run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from conftest import rule_config_factory

from ctrl_ray.checkpoint import ADAPTER_FILE, STATE_FILE, latest_checkpoint, read_checkpoint
from ctrl_ray.cli import main
from ctrl_ray.config import load_config, to_dict
from ctrl_ray.config_changes import RESUME_CHANGES_TAG
from ctrl_ray.distributed.driver import train
from ctrl_ray.errors import InputError
from ctrl_ray.objectives.replay import Replay

RULES = {
    "value": ["objective.regression_steps=3", "objective.regression_batch_size=8",
              "objective.heldout_every=3", "objective.report_every=2"],
    "adjoint": ["objective.lr_schedule=constant"],
    "pathwise": ["objective.truncation.mode=random", "objective.truncation.k=2"],
    "ppo": ["objective.minibatch_size=4", "objective.ppo_epochs=2"],
}


class Interrupted(Exception):
    """Raised from `on_iteration`: the driver stops as if killed."""


@pytest.fixture
def make_config(tiny_base, tiny_reward, tiny_judge, tmp_path):
    return rule_config_factory(tiny_base, tiny_reward, tiny_judge, tmp_path, RULES,
                               "objective.batch_size=4")


def _adapter_bytes(result_or_dir) -> bytes:
    directory = result_or_dir["policy_dir"] if isinstance(result_or_dir, dict) else \
        result_or_dir
    return (Path(directory) / ADAPTER_FILE).read_bytes()


def _stop_at(iteration: int):
    def stop(done, roles):
        if done == iteration:
            raise Interrupted
    return stop


@pytest.mark.parametrize("rule, workers", [("value", 1), ("pathwise", 0), ("ppo", 0)])
def test_an_interrupted_run_resumes_bit_identical_to_an_uninterrupted_one(
        rule, workers, make_config, request):
    """The value run is interrupted and resumed on Ray (its replay lives on the learner actor)
    and compared with one process: one worker samples the whole batch as the process does."""
    if workers:
        request.getfixturevalue("ray_session")
    straight = train(make_config("straight", rule), progress=False)
    interrupted = make_config("resumed", rule, f"distributed.workers={workers}")
    try:   # checkpoints at 2 (and 4); stopped after update 3, which the resume redoes
        train(interrupted, progress=False, on_iteration=_stop_at(3))
    except Interrupted:
        pass
    checkpoint = latest_checkpoint(Path(interrupted.output_dir) / "checkpoints")
    assert checkpoint.name == "000002"
    resumed = train(interrupted, progress=False, resume=True)
    assert _adapter_bytes(resumed) == _adapter_bytes(straight)
    assert any(t.abs().sum() > 0 for t in read_checkpoint(checkpoint)[0].values())
    if rule == "value":   # the replay was in the checkpoint: 2 updates of 4 rollouts
        assert (checkpoint / "learner_state.safetensors").is_file()
        runs = mlflow.MlflowClient()
        replayed = runs.get_metric_history(resumed["mlflow_run_id"], "replay_rollouts")
        assert sorted((m.step, m.value) for m in replayed)[-1] == (4, 16.0)


def test_a_killed_driver_holds_its_folder_and_resumes_bit_identical(make_config, tmp_path,
                                                                     capsys):
    """A real `ctrl-ray finetune` killed with SIGKILL after a checkpoint: while it runs, a second
    run into its folder is refused; the resume ends like a run that was never killed."""
    config = make_config("killed", "adjoint", "iterations=100000")
    config_file = tmp_path / "killed.yaml"
    config_file.write_text(yaml.safe_dump(to_dict(config)))
    exe = shutil.which("ctrl-ray") or str(Path(sys.executable).with_name("ctrl-ray"))
    log = tmp_path / "killed.log"
    with log.open("w") as stderr:
        driver = subprocess.Popen([exe, "finetune", "--config", str(config_file)],
                                  stdout=subprocess.DEVNULL, stderr=stderr,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
    checkpoints = Path(config.output_dir) / "checkpoints"
    try:
        deadline = time.monotonic() + 180
        while not (checkpoints / "000002" / STATE_FILE).is_file():
            assert driver.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint within 3 minutes"
            time.sleep(0.05)
        capsys.readouterr()
        assert main(["finetune", "--config", str(config_file), "--overwrite"]) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and "in use by another run" in error, error
        assert str(config.output_dir) in error and f"pid {driver.pid}" in error
        assert (checkpoints / "000002" / STATE_FILE).is_file()   # nothing was removed
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    stopped_at = read_checkpoint(latest_checkpoint(checkpoints))[2]["iteration"]
    length = f"iterations={stopped_at + 2}"
    assert main(["finetune", "--config", str(config_file), "--resume", "--set", length]) == 0
    straight = train(make_config("never-killed", "adjoint", length), progress=False)
    assert _adapter_bytes(Path(config.output_dir) / "policy") == _adapter_bytes(straight)


def test_resume_refuses_a_config_that_changes_training_unless_allowed(make_config, tmp_path,
                                                                      capsys):
    train(make_config("changed", "adjoint", "iterations=2"), progress=False)
    config_file = tmp_path / "changed.yaml"
    changed = make_config("changed", "adjoint", "iterations=4", "objective.gamma=2.0")
    config_file.write_text(yaml.safe_dump(to_dict(changed)))
    capsys.readouterr()
    assert main(["finetune", "--config", str(config_file), "--resume"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "objective.gamma: 1.0 -> 2.0" in error, error
    assert "iterations" not in error   # running longer is what a resume is for
    result = train(changed, progress=False, resume=True, allow_config_change=True)
    tag = mlflow.get_run(result["mlflow_run_id"]).data.tags[RESUME_CHANGES_TAG]
    assert tag == "at update 2: iterations: 2 -> 4, objective.gamma: 1.0 -> 2.0"
    # The new checkpoint records the new config: resuming it again with that config is no change.
    assert read_checkpoint(latest_checkpoint(Path(changed.output_dir) / "checkpoints"))[2][
        "config"]["objective"]["gamma"] == 2.0


def test_a_second_run_into_a_folder_in_use_is_refused(make_config):
    config = make_config("busy", "pathwise", "iterations=2")
    refusals = []

    def second_run(done, roles):
        with pytest.raises(InputError, match="in use by another run") as refused:
            train(config, progress=False, overwrite=True)
        refusals.append(str(refused.value))

    train(config, progress=False, on_iteration=second_run)
    assert len(refusals) == 2
    assert not (Path(config.output_dir) / ".ctrl-ray.lock").exists()   # released at the end
    train(config, progress=False, overwrite=True)   # free again


def test_the_replay_keeps_the_newest_rollouts_within_both_bounds_and_round_trips():
    def payload(first, rows):
        ids = torch.arange(first, first + rows, dtype=torch.float32)
        return {"states": ids.view(1, rows, 1).expand(3, rows, 4), "contexts": ids.long(),
                "log_targets": ids.view(rows, 1).expand(rows, 2).clone()}

    row_bytes = 3 * 4 * 4 + 2 * 4 + 8 + 1   # states, targets, context, held-out flag
    replay = Replay(100, heldout_every=3, max_bytes=5 * row_bytes + 10)
    for first in range(0, 12, 3):
        replay.add([payload(first, 3)])
    assert replay.capacity == 5 and replay.count == 5 and replay.added == 12
    assert replay.contexts.tolist() == [7, 8, 9, 10, 11]
    assert replay.states[2, :, 3].tolist() == [7, 8, 9, 10, 11]
    assert replay.heldout.tolist() == [False, False, True, False, False]
    again = Replay(100, heldout_every=3, max_bytes=5 * row_bytes + 10)
    again.load_state_dict(replay.state_dict())
    replay.add([payload(12, 2)])
    again.add([payload(12, 2)])
    for name in ("states", "log_targets", "contexts", "heldout"):
        assert torch.equal(getattr(again, name), getattr(replay, name)), name
    assert again.heldout.tolist() == [True, False, False, True, False]   # 9 and 12 held out
    assert Replay(2, max_bytes=10**9).bound(row_bytes) == 2   # the count bound holds too


def test_a_key_the_checkpoint_predates_counts_as_its_default():
    from ctrl_ray.config_changes import config_changes, resolved_config
    from ctrl_ray.finetune_config import FinetuneConfig

    saved = resolved_config(load_config(FinetuneConfig, None, []))
    del saved["sampling"]                       # a checkpoint written before `sampling` existed
    assert config_changes(saved, load_config(FinetuneConfig, None, [])) == []
    changed = load_config(FinetuneConfig, None, ["sampling.bf16=true"])
    assert config_changes(saved, changed) == [("sampling.bf16", False, True)]
