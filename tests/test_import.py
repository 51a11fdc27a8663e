"""`ctrl-ray data import`: Parquet tables (bytes, the `datasets` {bytes, path} struct, paths),
grayscale and RGB, resizing, and every bad input: exit 2, one line naming the row and value,
no output file (nor a temp sibling) left behind."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ctrl_ray.cli import main
from ctrl_ray.data.pairs import load_pairs

SIZE = 8


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def gray(value: int, size: int = SIZE) -> np.ndarray:
    pixels = np.full((size, size), 20, np.uint8)
    pixels[value % size, :] = 200 + value % 50
    return pixels


def write_folder(root, labels: list, files: list[str] | None = None, header="file_name,label",
                 sizes: dict[int, int] | None = None):
    """A folder of PNGs and a CSV listing `files` (default img_i.png) with `labels`."""
    folder = root / "images"
    folder.mkdir(exist_ok=True)
    files = files or [f"img_{i}.png" for i in range(len(labels))]
    for i, name in enumerate(files):
        if name and not (folder / name).exists():
            size = (sizes or {}).get(i, SIZE)
            (folder / name).write_bytes(png(gray(i, size)))
    rows = [header] + [f"{name},{label}" for name, label in zip(files, labels, strict=True)]
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder, root / "labels.csv"


def run_import(root, *extra: str) -> int:
    return main(["data", "import", "--images", str(root / "images"), "--labels",
                 str(root / "labels.csv"), "--out", str(root / "out" / "pairs.parquet"),
                 "--name", "stripe", *extra])


def assert_bad(code: int, root, capsys, *needles: str) -> None:
    """Exit 2, one line on stderr naming what is wrong, no output (nor a temp file) left."""
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ctrl-ray: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    out = root / "out"
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


LABELS = ["a", "b"] * 3


@pytest.mark.parametrize("case", [
    "unreadable", "mixed_sizes", "undeclared_name", "mixed_int_and_name", "empty_class",
    "nan", "duplicate_file", "row_without_image", "missing_file", "one_image_class",
])
def test_bad_folder_import_exits_2_with_one_line_and_writes_nothing(case, tmp_path, capsys):
    extra: list[str] = []
    if case == "unreadable":
        folder, _ = write_folder(tmp_path, LABELS)
        (folder / "img_3.png").write_bytes(b"not a png at all")
        needles = ["line 5", "img_3.png", "not a readable image"]
    elif case == "mixed_sizes":
        write_folder(tmp_path, LABELS, sizes={4: 10})
        needles = ["img_4.png", "10x10", "8x8", "--size"]
    elif case == "undeclared_name":
        write_folder(tmp_path, ["a", "b", "a", "c", "b", "a"])
        extra = ["--classes", "a,b"]
        needles = ["line 5", "'c'", "declared"]
    elif case == "mixed_int_and_name":
        write_folder(tmp_path, ["0", "1", "0", "one", "1", "0"])
        needles = ["line 5", "'one'", "not an integer"]
    elif case == "empty_class":
        write_folder(tmp_path, LABELS)
        extra = ["--classes", "a,b,c"]
        needles = ["'c'", "no images"]
    elif case == "nan":
        write_folder(tmp_path, ["a", "b", "nan", "a", "b", "a"])
        needles = ["line 4", "'nan'", "NaN"]
    elif case == "duplicate_file":
        write_folder(tmp_path, LABELS, files=["img_0.png", "img_1.png", "img_2.png",
                                              "img_1.png", "img_4.png", "img_5.png"])
        needles = ["line 5", "duplicate file 'img_1.png'", "line 3"]
    elif case == "row_without_image":
        write_folder(tmp_path, LABELS, files=["img_0.png", "img_1.png", "", "img_3.png",
                                              "img_4.png", "img_5.png"])
        needles = ["line 4", "no image file", "'a'"]
    elif case == "missing_file":
        folder, _ = write_folder(tmp_path, LABELS)
        (folder / "img_2.png").unlink()
        needles = ["line 4", "'img_2.png' not found"]
    else:  # one image of class b: nothing left to hold out
        write_folder(tmp_path, ["a", "a", "a", "b", "a", "a"])
        needles = ["'b'", "1 image"]
    assert_bad(run_import(tmp_path, *extra), tmp_path, capsys, *needles)


def test_existing_output_is_kept_without_overwrite(tmp_path, capsys):
    write_folder(tmp_path, LABELS)
    assert run_import(tmp_path) == 0
    out = tmp_path / "out" / "pairs.parquet"
    before = out.read_bytes()
    assert run_import(tmp_path, "--heldout", "0.5") == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == before
    assert run_import(tmp_path, "--heldout", "0.5", "--overwrite") == 0
    assert load_pairs(out).class_counts("heldout") == {"a": 2, "b": 2}


def test_integer_labels_mixed_sizes_resized_and_declared_names(tmp_path, capsys):
    write_folder(tmp_path, ["0", "1", "1", "0", "2", "2"], sizes={1: 12, 4: 16})
    assert run_import(tmp_path, "--size", "8", "--classes", "low,mid,high") == 0
    pairs = load_pairs(tmp_path / "out" / "pairs.parquet")
    assert pairs.image_shape == (1, 8, 8) and pairs.labels.tolist() == [0, 1, 1, 0, 2, 2]
    assert pairs.class_names == ["low", "mid", "high"]
    assert "class 2 'high': 1 train, 1 held out" in capsys.readouterr().out


def _table(labels, image_type: str, names=None):
    """A Parquet table as `datasets` writes it: image bytes, a {bytes, path} struct, or paths."""
    images = [png(gray(i)) for i in range(len(labels))]
    if image_type == "bytes":
        column = pa.array(images, pa.binary())
    else:
        column = pa.array([{"bytes": data, "path": f"img_{i}.png"} for i, data in
                           enumerate(images)],
                          pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    table = pa.table({"image": column, "label": pa.array(labels)})
    if names:
        features = {"image": {"_type": "Image"}, "label": {"_type": "ClassLabel", "names": names}}
        table = table.replace_schema_metadata(
            {"huggingface": json.dumps({"info": {"features": features}})})
    return table


def test_parquet_struct_with_datasets_class_names(tmp_path, capsys):
    pq.write_table(_table([0, 1, 0, 1, 1, 0], "struct", names=["left", "right"]),
                   tmp_path / "train.parquet")
    out = tmp_path / "pairs.parquet"
    assert main(["data", "import", "--parquet", str(tmp_path / "train.parquet"), "--out",
                 str(out), "--name", "side"]) == 0
    pairs = load_pairs(out)
    assert pairs.class_names == ["left", "right"] and pairs.label_name == "side"
    assert "'right'" in capsys.readouterr().out


@pytest.mark.parametrize("labels,needles", [
    ([0.0, 1.0, float("nan"), 1.0, 0.0, 1.0], ["row 2", "NaN"]),
    ([0, 1, -1, 1, 0, 1], ["row 2", "-1", "negative"]),
    ([0.5, 1.0, 0.0, 1.0, 0.0, 1.0], ["row 0", "0.5"]),
])
def test_bad_parquet_labels(labels, needles, tmp_path, capsys):
    pq.write_table(_table(labels, "bytes"), tmp_path / "in.parquet")
    code = main(["data", "import", "--parquet", str(tmp_path / "in.parquet"), "--out",
                 str(tmp_path / "out" / "pairs.parquet"), "--name", "stripe"])
    assert_bad(code, tmp_path, capsys, *needles)


def test_bad_parquet_image_cells(tmp_path, capsys):
    table = pa.table({"image": pa.array([png(gray(0)), None, png(gray(2)), png(gray(3))]),
                      "label": pa.array(["x", "y", "x", "y"])})
    pq.write_table(table, tmp_path / "in.parquet")
    code = main(["data", "import", "--parquet", str(tmp_path / "in.parquet"), "--out",
                 str(tmp_path / "out" / "pairs.parquet")])
    assert_bad(code, tmp_path, capsys, "row 1", "no image")
    code = main(["data", "import", "--parquet", str(tmp_path / "in.parquet"), "--out",
                 str(tmp_path / "out" / "pairs.parquet"), "--label-column", "y"])
    assert_bad(code, tmp_path, capsys, "--label-column", "'y'")
    code = main(["data", "import", "--parquet", str(tmp_path / "in.parquet"), "--out",
                 str(tmp_path / "in.parquet"), "--overwrite"])
    assert code == 2 and "is an input" in capsys.readouterr().err


def test_rgb_import_trains_a_three_channel_reward_and_judge(tmp_path):
    """Colour images stay RGB; the reward, its held-out judge and the scorer read 3 channels."""
    from ctrl_ray.classifier_training import LabelJudgeConfig
    from ctrl_ray.reward_training import RewardTrainingConfig, train_reward_from_pairs
    from ctrl_ray.scoring import label_images_for

    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    rows = ["file_name,label"]
    for i in range(24):
        pixels = rng.integers(0, 60, (SIZE, SIZE, 3)).astype(np.uint8)
        pixels[..., 0 if i % 2 else 2] += 150  # red or blue
        Image.fromarray(pixels).save(folder / f"c{i}.png")
        rows.append(f"c{i}.png,{'red' if i % 2 else 'blue'}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "colour.parquet"
    assert main(["data", "import", "--images", str(folder), "--labels",
                 str(tmp_path / "labels.csv"), "--out", str(out), "--name", "hue"]) == 0
    pairs = load_pairs(out)
    assert pairs.image_shape == (3, SIZE, SIZE) and pairs.class_names == ["blue", "red"]
    reward, _ = train_reward_from_pairs(out, tmp_path / "reward",
                                        RewardTrainingConfig(epochs=3, channels=(8,)),
                                        judge=LabelJudgeConfig(epochs=20, channels=(8,)))
    assert reward.classifier.config.in_channels == 3
    info = reward.label_info()
    assert info["scorer"]["kind"] == "judge"
    predicted = label_images_for(pairs.images, "hue", info)
    assert predicted.shape == (24,) and (predicted == pairs.labels).mean() > 0.75
    assert main(["data", "import", "--images", str(folder), "--labels",
                 str(tmp_path / "labels.csv"), "--out", str(tmp_path / "g.parquet"),
                 "--name", "hue", "--channels", "1"]) == 0
    assert load_pairs(tmp_path / "g.parquet").image_shape == (1, SIZE, SIZE)
