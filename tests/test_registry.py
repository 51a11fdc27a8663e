"""The model registry: register a CTRL policy, pull it through models:/ in a fresh process."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from ctrl_ray import tracking
from ctrl_ray.cli import main
from ctrl_ray.evaluation import generate
from ctrl_ray.policy import load_any

PULL = """
import sys, numpy as np, pandas as pd, mlflow
model = mlflow.pyfunc.load_model("models:/ctrl-digits@champion")
frame = pd.DataFrame({"c": [1, 4, 4], "y": [0, 3, -1], "seed": [11, 12, 13]})
np.save(sys.argv[1], model.predict(frame))
"""


@pytest.fixture(scope="module")
def registered(tiny_run):
    out, _ = tiny_run
    return tracking.register_policy(out / "policy", "ctrl-digits", "champion")


def test_registered_policy_pulled_in_a_fresh_process_equals_in_process_sample(
        registered, tiny_run, tmp_path):
    assert registered == "models:/ctrl-digits/1"
    images_file = tmp_path / "pulled.npy"
    subprocess.run([sys.executable, "-c", PULL, str(images_file)], check=True)
    pulled = np.load(images_file)

    policy = load_any(tiny_run[0] / "policy")
    labels = {"compress_class": torch.tensor([0, 3, 4])}  # -1 -> the null label K = 4
    local, _ = generate(policy.model, torch.tensor([1, 4, 4]), labels, [11, 12, 13],
                        **policy.sampling)
    assert pulled.shape == (3, 1, 8, 8)
    np.testing.assert_allclose(pulled, local.numpy(), atol=1e-5, rtol=0)


def test_registry_cli_list_promote_sample_and_evaluate(registered, tiny_run, tiny_judge,
                                                        tmp_path, capsys):
    assert main(["registry", "list"]) == 0
    assert "@champion" in capsys.readouterr().out
    assert main(["registry", "promote", "ctrl-digits", "1", "staging"]) == 0
    assert main(["registry", "promote", "ctrl-digits", "9", "staging"]) == 2
    grid = tmp_path / "grid.png"
    assert main(["sample", "--model", "models:/ctrl-digits@staging", "--c", "3", "--y", "1",
                 "--n", "4", "--out", str(grid)]) == 0
    assert grid.is_file()
    assert main(["evaluate", "--model", "models:/ctrl-digits@champion",
                 "--set", f"judge={tiny_judge}", "--set", "evaluation.samples_per_target=1",
                 "--set", "evaluation.contexts=[0]", "--set", "evaluation.num_inference_steps=4",
                 "--set", f"output_dir={tmp_path}"]) == 0
