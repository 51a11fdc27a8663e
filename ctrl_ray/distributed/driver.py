"""The training driver: one loop over the learner ranks and N rollout workers, in-process or
on Ray, with checkpoints, resume and MLflow.

The loop hands batches to the workers through `ctrl_ray.distributed.pipeline` (at most
`distributed.max_staleness` versions ahead of the learner) and applies the updates in order.
Because each batch's randomness is drawn here and split, 2 workers with B/2 each make the same
update as one process with B, and N learner ranks the same update as one. A worker that dies
is restarted by Ray (`max_restarts`), its shard is redone, and it re-syncs on its next call.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import torch
from tqdm.auto import tqdm

from ctrl_ray import tracking
from ctrl_ray.checkpoint import (
    LEARNER_STATE_FILE,
    latest_checkpoint,
    read_checkpoint,
    read_learner_state,
    save_checkpoint,
)
from ctrl_ray.config import flatten, scalar_metrics, to_dict
from ctrl_ray.config_changes import RESUME_CHANGES_TAG, check_resume, describe, resolved_config
from ctrl_ray.distributed.actors import Roles, start_roles
from ctrl_ray.distributed.pipeline import RolloutPipeline
from ctrl_ray.errors import InputError
from ctrl_ray.finetune_setup import FinetuneConfig
from ctrl_ray.objectives.step_scale import describe as describe_calibration
from ctrl_ray.run_lock import output_dir_lock


def train(config: FinetuneConfig, progress: bool = True, resume: bool | str = False,
          on_iteration: Callable[[int, Roles], None] | None = None,
          parent_run_id: str | None = None, overwrite: bool = False,
          allow_config_change: bool = False, rule_choice: dict | None = None) -> dict[str, Any]:
    """Run CTRL for `config.iterations` updates; checkpoint, evaluate, log everything to MLflow.

    The output folder is locked for the run (`ctrl_ray.run_lock`: a second run into it is
    refused). `resume=True` continues from the newest checkpoint under `output_dir/checkpoints`
    (an InputError if there is none; `resume="if-present"` then starts over): adapter,
    optimizer, policy version, the rule's learner state (the value rule's replay), the driver's
    RNG state and the MLflow run, so the run ends as an uninterrupted one would. A config that
    differs from the checkpoint's in a key that changes training is refused unless
    `allow_config_change` (`ctrl_ray.config_changes`). A fresh start over an earlier run's
    checkpoints is refused unless `overwrite` (then they are removed, so a later resume cannot
    pick one up). `parent_run_id` makes the run a child of that MLflow run (a Ray Tune trial
    under its sweep). `rule_choice` (`ctrl_ray.rule_choice`) is logged as the `rule_choice` tag
    and metrics.
    """
    config.check_evaluation_chain()
    out = Path(config.output_dir)
    with output_dir_lock(out):
        _clear_earlier_checkpoints(out / "checkpoints", resume, overwrite)
        checkpoint = _checkpoint_to_resume(out / "checkpoints", resume)
        restored = changes = None
        if checkpoint is not None:
            restored = (*read_checkpoint(checkpoint), read_learner_state(checkpoint))
            if "config" not in restored[2]:
                print(f"{checkpoint} records no config (written by an older version): the "
                      f"resumed config is not compared with it")
            changes = check_resume(restored[2].get("config"), config, allow_config_change)
        roles = start_roles(config)
        finished = False
        try:
            result = _run(roles, config, out, progress, checkpoint, restored, changes,
                          on_iteration, parent_run_id, rule_choice)
            finished = True
            return result
        finally:   # only a finished run's actors are kept: a failed one's may be mid-call
            roles.stop(keep=finished and config.distributed.keep_actors)


def _checkpoint_to_resume(directory: Path, resume: bool | str) -> Path | None:
    """The checkpoint a resume continues from (None: a fresh start)."""
    checkpoint = latest_checkpoint(directory) if resume else None
    if resume and checkpoint is None:
        if resume != "if-present":
            raise InputError(f"--resume: no checkpoint under {str(directory)!r} to resume from "
                             f"(--resume-if-present starts over when there is none)")
        print(f"no checkpoint under {directory}: starting from scratch")
    return checkpoint


def _run(roles: Roles, config: FinetuneConfig, out: Path, progress: bool,
         checkpoint: Path | None, restored: tuple | None, changes: list | None,
         on_iteration: Callable[[int, Roles], None] | None,
         parent_run_id: str | None, rule_choice: dict | None) -> dict[str, Any]:
    """The run proper, in the locked output folder: restore, train, save, evaluate."""
    info = roles.call(roles.learner, "describe")
    generator = torch.Generator().manual_seed(config.seed)
    start, run_id = 0, None
    if checkpoint is not None:
        adapter, optimizer_state, state, learner_state = restored
        roles.on_learners("restore", adapter, optimizer_state, state["optimizer_layout"],
                          state["version"], learner_state)
        generator.set_state(torch.tensor(state["generator_state"], dtype=torch.uint8))
        start, run_id = state["iteration"], state.get("mlflow_run_id")
        print(f"resumed from {checkpoint} (iteration {start}, version {state['version']})"
              + (f" with changes: {describe(changes)}" if changes else ""))

    params = flatten(to_dict(config))
    params["trainable_parameters"] = info["trainable_parameters"]
    tracking.use_experiment(config.experiment)
    tags = {"mlflow.parentRunId": parent_run_id} if parent_run_id else None
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else "finetune",
                          tags=tags) as active:
        if run_id is None:
            mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})
        if changes:
            _record_changes(active.info.run_id, start, changes)
        if rule_choice:
            mlflow.set_tag("rule_choice", rule_choice["reason"][:5000])
            mlflow.log_metrics({f"rule_choice_{key}": rule_choice[key]
                                for key in ("mass_ess_per_sample", "threshold")})
        train_start = time.perf_counter()
        bar = tqdm(range(start, config.iterations), desc=f"ctrl {config.mode}",
                   initial=start, total=config.iterations, disable=not progress)
        report_every = getattr(config.objective, "report_every", 1)

        def report_at(iteration: int) -> bool:
            """The first update of this process and the last are always measured."""
            done = iteration + 1
            return iteration == start or done % report_every == 0 or done == config.iterations

        pipeline = RolloutPipeline(roles, config, generator, report_at, start)
        measured = start   # the update the latest reward and KL were measured at
        latest = {"reward": float("nan"), "kl": float("nan")}
        for iteration in bar:
            done = iteration + 1
            metrics = pipeline.update(iteration)
            if "reward" in metrics:
                measured, latest = done, metrics
            metrics["report_age"] = float(done - measured)
            mlflow.log_metrics(metrics, step=done)
            bar.set_postfix(reward=f"{latest['reward']:.3f}", kl=f"{latest['kl']:.2f}",
                            **({"age": done - measured} if report_every > 1 else {}))
            if config.checkpoint_every and done % config.checkpoint_every == 0:
                _save_training_checkpoint(roles, config, info,
                                          out / "checkpoints" / f"{done:06d}", done,
                                          generator, active.info.run_id)
            if on_iteration is not None:
                on_iteration(done, roles)
        train_seconds = time.perf_counter() - train_start
        mlflow.log_metrics(pipeline.staleness_counts())

        final_fit = roles.on_learners("final_fit")
        if final_fit:
            mlflow.log_metrics(final_fit)
            print(f"final fit of the value head on its {final_fit['final_fit_replay_rollouts']:.0f}"
                  f" rollouts: kept step {final_fit.get('final_fit_kept_steps', 0):.0f} of "
                  f"{final_fit['final_fit_head_steps']:.0f} "
                  f"({final_fit['final_fit_seconds']:.0f} s)")
        calibration = _calibrate_step_scale(roles)
        final_state = roles.call(roles.learner, "trainable_state")
        spec = roles.call(roles.learner, "describe")["spec"]
        policy_dir = save_checkpoint(out / "policy", final_state, spec)
        mlflow.log_artifacts(str(policy_dir), artifact_path="policy")
        result = {"policy_dir": str(policy_dir), "train_seconds": train_seconds,
                  "iterations": config.iterations, "mlflow_run_id": active.info.run_id,
                  **({"step_calibration": calibration} if calibration else {})}
        if config.evaluate:  # on the learner, which holds the final policy (on its GPU if any)
            result.update(roles.call(roles.learner, "evaluate", str(out.resolve())))
            for report in (result.get("base", {}), result.get("ctrl", {})):
                if report.get("grid") and Path(report["grid"]).exists():
                    mlflow.log_artifact(report["grid"])
        for name in ("base", "ctrl", "optimum", "against_optimum"):
            if name in result:
                mlflow.log_metrics(scalar_metrics(result[name], f"eval_{name}_"))
        if "optimum" in result:   # whose samples the optimum was weighted from
            mlflow.set_tag("optimum_proposal", result["optimum"]["proposal"])
    return result


def _calibrate_step_scale(roles: Roles) -> dict | None:
    """The value rule's step scale, chosen on the learner by the objective; logged to MLflow
    (the chosen scale, and J per scale) and printed with the reason."""
    calibration = roles.call(roles.learner, "calibrate_step_scale")
    if calibration:
        mlflow.log_metric("step_scale", calibration["step_scale"])
        for row in calibration["table"]:
            mlflow.log_metrics({f"calibration_{key}_x{row['step_scale']:g}": row[key]
                                for key in ("objective", "log_likelihood", "kl")})
        print(describe_calibration(calibration))
    return calibration


def _record_changes(run_id: str, iteration: int, changes: list) -> None:
    """Add one line per resume with changes to the run's `resume_changes` tag."""
    earlier = mlflow.get_run(run_id).data.tags.get(RESUME_CHANGES_TAG)
    line = f"at update {iteration}: {describe(changes)}"
    mlflow.set_tag(RESUME_CHANGES_TAG, line if not earlier else f"{earlier}\n{line}")


def _clear_earlier_checkpoints(directory: Path, resume: bool | str, overwrite: bool) -> None:
    """Before a fresh start: refuse, or with `overwrite` remove, an earlier run's checkpoints."""
    if resume or latest_checkpoint(directory) is None:
        return  # a resume continues from them; "if-present" with none starts over
    if not overwrite:
        raise InputError(f"output_dir: {str(directory)!r} holds an earlier run's checkpoints; "
                         f"resume it (--resume), choose another output_dir, or pass "
                         f"--overwrite to start over")
    print(f"removing the earlier run's checkpoints under {directory} (--overwrite)")
    shutil.rmtree(directory)


def _save_training_checkpoint(roles: Roles, config: FinetuneConfig, info: dict, path: Path,
                              iteration: int, generator: torch.Generator, run_id: str) -> None:
    """Everything a resume needs to continue exactly: the learner's state (the value rule's
    replay included), the driver's RNG (it seeds the learner's) and the resolved config. The
    MLflow copy leaves out the learner state (up to ``replay_bytes`` per checkpoint); a
    resume reads the local checkpoint."""
    adapter, optimizer_state, version, learner_state = roles.call(roles.learner,
                                                                  "checkpoint_state")
    state = {"iteration": iteration, "version": version, "mlflow_run_id": run_id,
             "generator_state": generator.get_state().tolist(),
             "config": resolved_config(config)}
    save_checkpoint(path, adapter, info["spec"], state, optimizer_state, learner_state)
    for file in sorted(path.iterdir()):
        if file.name != LEARNER_STATE_FILE:
            mlflow.log_artifact(str(file), artifact_path=f"checkpoints/{path.name}")
