"""The model registry: register a CTRL policy, pull it through models:/ in a fresh process."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings

import mlflow
import numpy as np
import pytest
import torch

from ctrl_ray import registry
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
    return registry.register_policy(out / "policy", "ctrl-digits", "champion")


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


class _Messages(logging.Handler):
    """Collects what MLflow logs at WARNING and above (its loggers do not propagate)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_registration_logs_a_signature_and_an_input_example_without_warnings(tiny_run):
    """`mlflow models serve` needs both; MLflow warns at registration when either is missing,
    and warns too when the input example fails to predict (it runs it once while logging)."""
    handler = _Messages()
    logging.getLogger("mlflow").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            uri = registry.register_policy(tiny_run[0] / "policy", "ctrl-digits-signed", None)
    finally:
        logging.getLogger("mlflow").removeHandler(handler)
    said = handler.messages + [str(warning.message) for warning in caught]
    assert not [m for m in said if "signature" in m.lower() or "input example" in m.lower()]

    info = mlflow.models.get_model_info(uri)
    assert info.signature is not None
    assert [column.name for column in info.signature.inputs.inputs] == [
        "c", "seed", "compress_class", "y"]
    assert info.signature.inputs.required_input_names() == ["c"]
    assert info.saved_input_example_info is not None

