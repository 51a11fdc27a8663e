"""Shared, session-scoped fixtures: one MLflow SQLite store, one 8x8 digits file, one tiny base
model (pre-trained here, registered in that store)."""

from __future__ import annotations

import os

import pytest
import torch

from ctrl_ray.config import load_config
from ctrl_ray.data.digits import build_digits
from ctrl_ray.pretrain import PretrainConfig, pretrain

torch.set_num_threads(2)

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
