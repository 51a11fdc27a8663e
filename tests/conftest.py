"""Shared, session-scoped fixtures: one MLflow SQLite store, one 8x8 digits file, one tiny base
model (pre-trained here, registered in that store)."""

from __future__ import annotations

import os

import pytest
import torch

from ctrl_ray.config import load_config
from ctrl_ray.data.digits import build_digits
from ctrl_ray.pretrain import PretrainConfig, pretrain

torch.set_num_threads(1)  # tiny tensors: a second thread only adds contention

TINY_PRETRAIN = [
    "data.size=8",
    "model.image_size=8",
    "model.block_out_channels=[16, 32]",
    "training.steps=300",
    "training.batch_size=32",
    "training.log_every=100",
]


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory) -> str:
    """Every test talks to one SQLite MLflow store in a tmp dir (never the working directory)."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    return uri


@pytest.fixture(scope="session")
def digits8(tmp_path_factory):
    """The 8x8 digits testbed as a Parquet file."""
    return build_digits(tmp_path_factory.mktemp("data") / "digits8.parquet", size=8)


@pytest.fixture(scope="session")
def tiny_base(digits8, tmp_path_factory):
    """A tiny 8x8 base model pre-trained for a few hundred steps and registered as version 1."""
    out = tmp_path_factory.mktemp("base") / "base-digits8"
    config = load_config(PretrainConfig, overrides=[
        *TINY_PRETRAIN, f"data.path={digits8}", f"output_dir={out}",
    ])
    return pretrain(config, progress=False)


@pytest.fixture(scope="session")
def tiny_reward(digits8, tmp_path_factory):
    """A compressibility reward on 8x8 images from 300 pairs (a few epochs)."""
    from ctrl_ray.reward_training import RewardJobConfig, train_reward_job

    root = tmp_path_factory.mktemp("reward")
    config = load_config(RewardJobConfig, overrides=[
        f"dataset={digits8}", "size=8", "num_pairs=300", f"pairs={root}/pairs.parquet",
        "training.epochs=5", f"output_dir={root}/reward",
    ])
    train_reward_job(config, progress=False)
    return root / "reward"


@pytest.fixture(scope="session")
def tiny_judge(digits8, tmp_path_factory):
    """A digit judge on the 8x8 train split (a few epochs)."""
    from ctrl_ray.data.digits import load_digits_dataset
    from ctrl_ray.demo import JudgeConfig, ensure_judge

    path = tmp_path_factory.mktemp("judge") / "judge"
    ensure_judge(load_digits_dataset(digits8), JudgeConfig(path=str(path), epochs=3))
    return path


def tiny_finetune_overrides(tiny_base, tiny_reward, tiny_judge, out,
                            mode: str = "adjoint") -> list[str]:
    """A CTRL run small enough for a test: 8x8, batch 8, 4 DDIM steps, a few iterations."""
    truncation = ["objective.truncation.mode=fixed", "objective.truncation.k=2"]
    return [
        f"base_model={tiny_base.model_dir}",
        f"rewards=[{{path: {tiny_reward}}}]",
        f"judge={tiny_judge}",
        f"mode={mode}",
        "objective.batch_size=8",
        "objective.num_inference_steps=4",
        *(truncation if mode == "pathwise" else []),
        *(["objective.calibration_rollouts=16", "objective.final_fit_steps=20"]
          if mode == "value" else []),
        "adapter.min_timestep=100",  # the last of the 4 steps (t = 1) stays pre-trained
        "adapter.time_buckets=2",
        "objective.lr_embedding=0.05",
        "objective.lr_adapter=0.005",
        "iterations=4",
        "checkpoint_every=2",
        "evaluation.samples_per_target=1",
        "evaluation.contexts=[0, 1]",
        "evaluation.num_inference_steps=4",
        "optimum_samples_per_context=16",
        f"output_dir={out}",
    ]


def rule_config_factory(tiny_base, tiny_reward, tiny_judge, root, settings, *common: str):
    """`make(name, rule, *extra)`: a tiny CTRL config of `rule` under `root / name`, with the
    rule's `settings[rule]` overrides, then `common`, then `extra`."""
    from ctrl_ray.config import load_config
    from ctrl_ray.finetune import FinetuneConfig

    def make(name: str, rule: str, *extra: str):
        overrides = tiny_finetune_overrides(tiny_base, tiny_reward, tiny_judge, root / name,
                                            rule)
        return load_config(FinetuneConfig, overrides=[
            *overrides, *settings[rule], "evaluate=false", *common, *extra])
    return make


@pytest.fixture(scope="module", autouse=True)
def end_kept_actors_with_the_module():
    """Actors kept by a test's runs (`distributed.keep_actors`) hold their CPUs: they end with
    their test module, so no later module's Ray work waits for them."""
    yield
    import sys

    if "ctrl_ray.distributed.actors" in sys.modules:
        sys.modules["ctrl_ray.distributed.actors"].end_kept_actors()


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray runtime for the whole session (2 logical CPUs, own short temp dir)."""
    import tempfile

    import ray

    from ctrl_ray.distributed.ray_runtime import connect

    temp_dir = tempfile.mkdtemp(prefix="crt-", dir="/tmp")
    connect("local", num_cpus=2, _temp_dir=temp_dir,
            runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_run(tiny_base, tiny_reward, tiny_judge, tmp_path_factory):
    """One tiny single-process CTRL run (4 updates, evaluated) shared by the tests."""
    from ctrl_ray.finetune import FinetuneConfig, finetune

    out = tmp_path_factory.mktemp("ctrl") / "run"
    config = load_config(FinetuneConfig, overrides=[*tiny_finetune_overrides(
        tiny_base, tiny_reward, tiny_judge, out), "objective.lr_schedule=cosine",
        "optimum_policy_samples=16"])
    return out, finetune(config, progress=False)


TINY_TEXT_TESTBED = [
    "data.size=8",
    "vae.block_out_channels=[8, 8]",
    "vae.steps=40",
    "vae.batch_size=32",
    "vae.log_every=20",
    "unet.block_out_channels=[16, 32]",
    "unet.steps=40",
    "unet.batch_size=32",
    "unet.warmup_steps=5",
    "unet.log_every=20",
    "registered_model=",
]


@pytest.fixture(scope="session")
def trained_text_testbed(digits8, tmp_path_factory):
    """A tiny latent text-to-image testbed (`ctrl_ray.latent_testbed`) trained for a few steps on
    the 8x8 digits: 4x4x4 latents, MiniLM prompts, SD layout. Returns its directory."""
    from ctrl_ray.latent_testbed import LatentTestbedConfig, build_latent_testbed

    out = tmp_path_factory.mktemp("text2image") / "testbed"
    config = load_config(LatentTestbedConfig, overrides=[
        *TINY_TEXT_TESTBED, f"data.path={digits8}", f"output_dir={out}",
    ])
    return build_latent_testbed(config, progress=False).model_dir
