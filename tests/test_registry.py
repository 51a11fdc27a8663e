"""The model registry: register a CTRL policy, pull it through models:/ in a fresh process."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_finetune_overrides
from PIL import Image

from ctrl_ray import registry
from ctrl_ray.cli import main
from ctrl_ray.evaluation import generate
from ctrl_ray.grids import grid_labels, image_grid
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


ALIASES = ["champion", "a-b_c", "va", "\u65e5\u672c", "x" * 255, "x" * 256, "", "a b", "a.b",
           "latest", "LATEST", "v1", "V22"]
NAMES = ["ok", "a b", "x.", "\u65e5\u672c", " ", "a/b", "a:b", ".", "..", "..x", "../x", "./a",
         "a/../b"]


def _accepted(check, value) -> bool:
    try:
        check(value)
    except (registry.InputError, mlflow.exceptions.MlflowException):
        return False
    return True


def test_name_and_alias_checks_refuse_exactly_what_the_mlflow_registry_refuses(tmp_path):
    """Our up-front checks against the real store's own validation, so an MLflow change shows."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    client.create_registered_model("alias-rules")
    client.create_model_version("alias-rules", source=str(tmp_path))
    for alias in ALIASES:
        store = _accepted(lambda a: client.set_registered_model_alias("alias-rules", a, "1"), alias)
        assert _accepted(registry.check_alias, alias) == store, alias[:12]
    for name in NAMES:
        store = _accepted(client.create_registered_model, name)
        assert _accepted(registry.check_name, name) == store, name


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
    names = load_any(tiny_run[0] / "policy").label_info["compress_class"]["class_names"]
    # The grid names its row (y, by class name), its columns (seeds) and its context.
    assert grid_labels(grid) == {"rows": [f"compress_class: {names[1]}"],
                                 "columns": ["seed 0", "seed 1", "seed 2", "seed 3"],
                                 "title": "c = 3"}
    assert main(["evaluate", "--model", "models:/ctrl-digits@champion",
                 "--set", f"judge={tiny_judge}", "--set", "evaluation.samples_per_target=1",
                 "--set", "evaluation.contexts=[0, 2]", "--set",
                 "evaluation.num_inference_steps=4", "--set", f"output_dir={tmp_path}"]) == 0
    evaluated = tmp_path / "evaluate_grid.png"
    assert grid_labels(evaluated) == {"rows": [f"compress_class: {name}" for name in names],
                                      "columns": ["c = 0", "c = 2"]}
    # A margin for the labels: wider and taller than the 4 x 2 tiles of 8 px (x 4) alone.
    unlabelled = image_grid(np.zeros((8, 1, 8, 8), np.float32), rows=4)
    with Image.open(evaluated) as image:
        assert image.width >= unlabelled.width + 40 and image.height >= unlabelled.height + 10


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



LABELLER = '''
import numpy as np

def stroke(images):
    """Four classes by the mean pixel (an exact labeller of the test's own)."""
    mean = images.reshape(len(images), -1).mean(axis=1)
    return np.digitize(mean, [-0.8, -0.6, -0.4]).astype(np.int64)
'''


def test_registered_policy_carries_its_labeller_and_evaluates_after_its_folders_moved(
        digits8, tiny_base, tiny_reward, tiny_judge, tmp_path, monkeypatch, capsys):
    """A policy scored by a labeller file: registered, its base, reward, labeller and judge
    folders moved away, pulled into a fresh directory from another working directory and
    evaluated there (by the CLI, and through the pyfunc model) with nothing at the old paths."""
    import shutil

    from ctrl_ray.config import load_config
    from ctrl_ray.finetune import FinetuneConfig, finetune
    from ctrl_ray.reward_training import RewardJobConfig, train_reward_job

    site = tmp_path / "site"
    shutil.copytree(tiny_base.model_dir, site / "base")
    shutil.copytree(tiny_judge, site / "judge")
    (site / "labeller.py").write_text(LABELLER)
    train_reward_job(load_config(RewardJobConfig, overrides=[
        f"dataset={digits8}", "size=8", f"pairs={tiny_reward.parent / 'pairs.parquet'}",
        "training.epochs=2",
        f"labeller={site / 'labeller.py'}:stroke", f"output_dir={site / 'reward'}"]))
    overrides = tiny_finetune_overrides(tiny_base, tiny_reward, tiny_judge, site / "run")
    overrides += [f"base_model={site / 'base'}", f"rewards=[{{path: {site / 'reward'}}}]",
                  f"judge={site / 'judge'}", "iterations=2", "optimum_samples_per_context=0"]
    finetune(load_config(FinetuneConfig, overrides=overrides), progress=False)
    uri = registry.register_policy(site / "run" / "policy", "ctrl-portable", "champion")

    site.rename(tmp_path / "moved")  # nothing left at the paths the policy was trained with
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    pulled = mlflow.artifacts.download_artifacts(artifact_uri=uri,
                                                 dst_path=str(elsewhere / "pulled"))
    capsys.readouterr()
    assert main(["evaluate", "--model", pulled, "--set", "judge=",
                 "--set", "evaluation.samples_per_target=1", "--set", "evaluation.contexts=[0]",
                 "--set", "evaluation.num_inference_steps=4", "--set", "output_dir=eval"]) == 0
    printed = capsys.readouterr().out
    carried = f"{Path(pulled).resolve() / 'artifacts/adapter/scorers/compress_class.py'}:stroke"
    assert f"scored by labeller {carried}" in printed
    assert str(site) not in printed and (elsewhere / "eval" / "evaluate_grid.png").is_file()

    images = mlflow.pyfunc.load_model(uri).predict(
        pd.DataFrame({"c": [2], "y": [1], "seed": [0]}))
    assert images.shape == (1, 1, 8, 8)
