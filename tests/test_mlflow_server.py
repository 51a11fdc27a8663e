"""The same tracking and registry path against a real `mlflow server` on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import mlflow
import numpy as np
import pytest
from conftest import tiny_finetune_overrides

from ctrl_ray import registry
from ctrl_ray.config import load_config
from ctrl_ray.finetune import FinetuneConfig, finetune

PULL = """
import sys, numpy as np, pandas as pd, mlflow
model = mlflow.pyfunc.load_model("models:/ctrl-digits-remote@champion")
np.save(sys.argv[1], model.predict(pd.DataFrame({"c": [2], "y": [1], "seed": [5]})))
"""


@pytest.fixture
def mlflow_server(tmp_path, monkeypatch):
    """A tracking server with its own SQLite store and proxied artifacts; the env points at it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "mlflow"), "server",
         "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
         "--artifacts-destination", f"{tmp_path}/artifacts",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("mlflow server did not come up") from None
            time.sleep(1)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    yield uri
    os.killpg(server.pid, 15)
    server.wait(timeout=30)


def test_finetune_registers_and_pulls_through_a_tracking_server(
        mlflow_server, tiny_base, tiny_reward, tiny_judge, tmp_path):
    config = load_config(FinetuneConfig, overrides=[
        *tiny_finetune_overrides(tiny_base, tiny_reward, tiny_judge, tmp_path / "run"),
        "iterations=2", "evaluate=false"])
    result = finetune(config, progress=False)
    client = mlflow.MlflowClient(mlflow_server)
    assert [m.step for m in client.get_metric_history(result["mlflow_run_id"], "reward")] == [1, 2]
    artifacts = [a.path for a in client.list_artifacts(result["mlflow_run_id"], "policy")]
    assert "policy/adapter.safetensors" in artifacts

    uri = registry.register_policy(result["policy_dir"], "ctrl-digits-remote", "champion")
    assert uri == "models:/ctrl-digits-remote/1"
    pulled_file = tmp_path / "pulled.npy"
    subprocess.run([sys.executable, "-c", PULL, str(pulled_file)], check=True,
                   env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_server})
    assert np.load(pulled_file).shape == (1, 1, 8, 8)
