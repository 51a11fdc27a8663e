"""A user's own pairs, end to end: a label ctrl-ray has never heard of (bar orientation, and bar
side for the multi-task case), imported from PNGs + a CSV through the CLI, a reward, CTRL on
Ray, evaluation by the held-out judge (and by the user's own labeller), the registry."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ctrl_ray.cli import main
from ctrl_ray.data.pairs import load_pairs
from ctrl_ray.models.reward import RewardTerm

SIZE = 8
PER_CLASS = 40

LABELLER = '''
import numpy as np

def orientation(images):
    """Exact labeller: 0 horizontal (a bright row), 1 vertical (a bright column)."""
    bright = images[:, 0] > 0
    rows, cols = bright.all(axis=2).any(axis=1), bright.all(axis=1).any(axis=1)
    return np.where(rows & ~cols, "horizontal", "vertical")
'''


def bar_image(vertical: bool, position: int, rng) -> np.ndarray:
    pixels = rng.integers(0, 40, (SIZE, SIZE)).astype(np.uint8)
    if vertical:
        pixels[:, position] = 255
    else:
        pixels[position, :] = 255
    return pixels


@pytest.fixture(scope="module")
def bars(tmp_path_factory):
    """A folder of 8x8 PNGs with two labels of their own: orientation (as names) and the side
    of the bar (as integers, 0 = first half), each in its CSV."""
    root = tmp_path_factory.mktemp("bars")
    folder = root / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    orientation, side = ["file_name,label"], ["file_name,side"]
    for index in range(2 * PER_CLASS):
        vertical = bool(index % 2)
        position = int(rng.integers(0, SIZE))
        name = f"bar_{index:03d}.png"
        Image.fromarray(bar_image(vertical, position, rng)).save(folder / name)
        orientation.append(f"{name},{'vertical' if vertical else 'horizontal'}")
        side.append(f"{name},{int(position >= SIZE // 2)}")
    (root / "labels.csv").write_text("\n".join(orientation) + "\n")
    (root / "side.csv").write_text("\n".join(side) + "\n")
    (root / "bars_labeller.py").write_text(LABELLER)
    return root


def _write_yaml(path, data: dict):
    import yaml

    path.write_text(yaml.safe_dump(data))
    return str(path)


def _reward(bars, pairs, name: str) -> str:
    out = bars / f"reward-{name}"
    config = _write_yaml(bars / f"reward-{name}.yaml", {
        "pairs": str(pairs), "label": name, "output_dir": str(out),
        "training": {"epochs": 8, "channels": [8, 16]},
        "judge": {"epochs": 15, "channels": [8, 16]},
    })
    assert main(["reward", "train", "--config", config]) == 0
    return str(out)


def _finetune_config(bars, tiny_base, rewards: list[str], out, **extra) -> str:
    return _write_yaml(bars / f"{out.name}.yaml", {
        "base_model": str(tiny_base.model_dir),
        "rewards": [{"path": path} for path in rewards],
        "judge": "",
        # the default rule, with its closing fit and step-scale search cut to test size
        "objective": {"batch_size": 4, "num_inference_steps": 4, "calibration_rollouts": 16,
                      "final_fit_steps": 20},
        "iterations": 2, "checkpoint_every": 2, "evaluate_base": False,
        "evaluation": {"samples_per_target": 1, "contexts": [0, 1], "num_inference_steps": 4},
        "output_dir": str(out), **extra,
    })


@pytest.fixture(scope="module")
def orientation(bars):
    """`data import` of the folder + CSV, then `reward train` on it."""
    pairs = bars / "orientation.parquet"
    assert main(["data", "import", "--images", str(bars / "images"), "--labels",
                 str(bars / "labels.csv"), "--out", str(pairs), "--name", "orientation"]) == 0
    return pairs, _reward(bars, pairs, "orientation")


def test_import_keeps_class_names_and_a_stratified_heldout_split(orientation, capsys):
    pairs = load_pairs(orientation[0])
    assert pairs.label_name == "orientation" and pairs.image_shape == (1, SIZE, SIZE)
    assert pairs.class_names == ["horizontal", "vertical"]
    assert pairs.class_counts("heldout") == {"horizontal": 8, "vertical": 8}
    assert pairs.class_counts("train") == {"horizontal": 32, "vertical": 32}
    assert pairs.images.min() >= -1 and pairs.images.max() == 1.0

    reward = RewardTerm.load(orientation[1])
    assert reward.class_names == ["horizontal", "vertical"]
    assert reward.meta["num_pairs_train"] == 64 and reward.meta["heldout"]["num_rows"] == 16
    assert {"accuracy", "nll", "ece"} <= set(reward.meta["heldout"])
    info = reward.label_info()
    assert info["scorer"] == {"kind": "judge", "path": str(reward.path / "judge")}
    # The judge never trained on the reward's train rows; they measure it.
    assert reward.meta["judge"]["num_rows"] == 16
    assert reward.meta["judge"]["train_rows_accuracy"] > 0.6


def test_own_label_end_to_end_on_ray_judge_labeller_registry(orientation, bars, tiny_base,
                                                              ray_session, tmp_path, capsys):
    from ctrl_ray.policy import load_any

    out = tmp_path / "ctrl-bars"
    config = _finetune_config(bars, tiny_base, [orientation[1]], out)
    assert main(["finetune", "--config", config, "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "scored by held-out judge" in printed and "horizontal" in printed

    policy = load_any(out / "policy")
    assert policy.label_info["orientation"]["class_names"] == ["horizontal", "vertical"]
    assert policy.label_info["orientation"]["scorer"]["kind"] == "judge"

    assert main(["registry", "register", "--policy", str(out / "policy"), "--name",
                 "ctrl-bars", "--alias", "champion"]) == 0
    grid = tmp_path / "grid.png"
    assert main(["sample", "--model", "models:/ctrl-bars@champion", "--c", "3", "--y",
                 "vertical", "--n", "3", "--out", str(grid)]) == 0
    assert Image.open(grid).size[0] > Image.open(grid).size[1]
    assert main(["sample", "--model", "models:/ctrl-bars@champion", "--c", "3", "--y",
                 "diagonal", "--n", "3", "--out", str(tmp_path / "no.png")]) == 2
    assert "'diagonal'" in capsys.readouterr().err

    model = mlflow.pyfunc.load_model("models:/ctrl-bars@champion")
    images = model.predict(pd.DataFrame({"c": [3, 3], "y": ["horizontal", 1], "seed": [0, 1]}))
    assert images.shape == (2, 1, SIZE, SIZE)

    evaluate = ["evaluate", "--model", "models:/ctrl-bars@champion", "--config", config,
                "--set", f"output_dir={tmp_path}"]
    capsys.readouterr()
    assert main(evaluate) == 0
    printed = capsys.readouterr().out
    assert "scored by held-out judge" in printed
    labeller = f"{bars / 'bars_labeller.py'}:orientation"
    assert main([*evaluate, "--overwrite",
                 "--set", f"evaluation.scorers.orientation={labeller}"]) == 0
    printed = capsys.readouterr().out
    assert f"scored by labeller {labeller}" in printed and '"scorers"' in printed


def test_two_imported_labels_two_rewards_one_policy(orientation, bars, tiny_base, tmp_path,
                                                     capsys):
    pairs = bars / "side.parquet"
    assert main(["data", "import", "--images", str(bars / "images"), "--labels",
                 str(bars / "side.csv"), "--out", str(pairs), "--classes", "first,second",
                 "--heldout", "0.25"]) == 0
    assert "class 1 'second'" in capsys.readouterr().out
    side = _reward(bars, pairs, "side")
    out = tmp_path / "ctrl-two"
    config = _finetune_config(bars, tiny_base, [orientation[1], side], out)
    assert main(["finetune", "--config", config]) == 0
    printed = capsys.readouterr().out
    assert "orientation" in printed and "side" in printed
    assert printed.count("scored by held-out judge") == 1 + 1  # one line per label
    from ctrl_ray.policy import load_any

    policy = load_any(out / "policy")
    assert policy.model.label_classes == {"orientation": 2, "side": 2}
    assert policy.label_info["side"]["class_names"] == ["first", "second"]
