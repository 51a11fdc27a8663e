"""The digits testbed data layer: oracles, the Parquet table, the offline pairs, bad input."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ctrl_ray.data import (
    ORACLES,
    PairSet,
    bin_by_edges,
    build_digits,
    build_digits_table,
    ink,
    jpeg_bytes,
    label_images,
    load_digits_dataset,
    load_pairs,
    make_pairs,
    quartile_edges,
    save_pairs,
    to_uint8,
    write_table,
)
from ctrl_ray.errors import InputError

NUM_IMAGES = 1797


@pytest.fixture(scope="module")
def digits8(tmp_path_factory):
    return build_digits(tmp_path_factory.mktemp("digits") / "digits8.parquet", size=8, seed=0)


@pytest.fixture(scope="module")
def dataset8(digits8):
    return load_digits_dataset(digits8)


def blank(size=8, value=-1.0):
    return np.full((size, size), value, dtype=np.float32)


def checkerboard(size=8):
    rows, cols = np.indices((size, size))
    return np.where((rows + cols) % 2 == 0, 1.0, -1.0).astype(np.float32)


def rewrite(path, table):
    """Write a tampered table as-is (no validation) for the bad-input tests."""
    pq.write_table(table, path)
    return path


# ---------------------------------------------------------------- oracles


def test_blank_image_compresses_better_than_checkerboard():
    sizes = jpeg_bytes(np.stack([blank(), checkerboard()]))
    assert sizes.dtype == np.int64 and sizes.shape == (2,)
    assert sizes[0] < sizes[1]
    assert bin_by_edges(sizes, [sizes.mean()]).tolist() == [0, 1]  # class 0 = fewest bytes


def test_ink_of_known_images():
    values = ink(np.stack([blank(value=-1.0), blank(value=1.0), checkerboard()]))
    assert values.dtype == np.float32
    np.testing.assert_allclose(values, [0.0, 1.0, 0.5], atol=1e-7)


def test_to_uint8_maps_range_and_clips():
    pixels = to_uint8(np.array([[-1.0, 0.0, 1.0, 3.0, -2.0]], dtype=np.float32))
    assert pixels.dtype == np.uint8
    assert pixels.ravel().tolist() == [0, 128, 255, 255, 0]


def test_oracles_accept_all_layouts_and_torch(dataset8):
    images = dataset8.images[:5]
    expected = jpeg_bytes(images)
    assert (jpeg_bytes(images[:, 0]) == expected).all()
    assert (jpeg_bytes(torch.from_numpy(images)) == expected).all()
    assert jpeg_bytes(images[0, 0]).tolist() == [expected[0]]
    np.testing.assert_array_equal(ink(torch.from_numpy(images)), ink(images))


def test_bin_by_edges_follows_digitize():
    values = [0.0, 1.0, 1.5, 2.0, 9.0]
    assert bin_by_edges(values, [1.0, 2.0]).tolist() == [0, 1, 1, 2, 2]
    assert quartile_edges(np.arange(101)) == [25.0, 50.0, 75.0]


def test_label_images_reproduces_stored_labels(dataset8):
    for name, info in dataset8.label_info.items():
        np.testing.assert_array_equal(
            label_images(dataset8.images, name, info["edges"]), dataset8.labels[name]
        )


@pytest.mark.parametrize(
    "call, field",
    [
        (lambda: jpeg_bytes(np.full((2, 8, 8), np.nan)), "images"),
        (lambda: ink(np.zeros((2, 3, 8, 8))), "images"),
        (lambda: ink(np.zeros(8)), "images"),
        (lambda: label_images(np.zeros((2, 8, 8)), "sharpness", [0.5]), "compress_class"),
        (lambda: bin_by_edges([1.0], [2.0, 1.0]), "edges"),
    ],
)
def test_oracles_reject_bad_input(call, field):
    with pytest.raises(InputError, match=field):
        call()


# ---------------------------------------------------------------- the digits table


def test_build_is_deterministic(digits8, tmp_path):
    again = build_digits(tmp_path / "again.parquet", size=8, seed=0)
    assert again.read_bytes() == digits8.read_bytes()
    other_seed = build_digits_table(size=8, seed=1)
    assert other_seed.column("split").to_pylist() != pq.read_table(digits8)["split"].to_pylist()


def test_schema_and_metadata(digits8):
    table = pq.read_table(digits8)
    assert table.num_rows == NUM_IMAGES
    expected_types = {
        "image": pa.list_(pa.float32(), 64),
        "digit": pa.int64(),
        "split": pa.string(),
        "jpeg_bytes": pa.int64(),
        "compress_class": pa.int64(),
        "ink": pa.float32(),
        "ink_class": pa.int64(),
    }
    assert {name: table.schema.field(name).type for name in table.column_names} == expected_types

    meta = {key.decode(): json.loads(value) for key, value in table.schema.metadata.items()
            if key.startswith(b"ctrl_ray.")}
    assert meta["ctrl_ray.image_shape"] == [1, 8, 8]
    assert meta["ctrl_ray.seed"] == 0
    assert meta["ctrl_ray.source"] == "sklearn.datasets.load_digits"
    assert set(meta["ctrl_ray.labels"]) == set(ORACLES)
    train = np.asarray(table["split"].to_pylist()) == "train"
    for name, info in meta["ctrl_ray.labels"].items():
        attribute = ORACLES[name].attribute
        assert info["attribute"] == attribute and info["num_classes"] == 4 and info["description"]
        assert info["edges"] == quartile_edges(table[attribute].to_numpy()[train])


def test_images_in_range_and_match_source(dataset8):
    from sklearn.datasets import load_digits

    assert dataset8.images.shape == (NUM_IMAGES, 1, 8, 8) and dataset8.images.dtype == np.float32
    assert dataset8.images.min() == -1.0 and dataset8.images.max() == 1.0
    source = load_digits()
    np.testing.assert_allclose(dataset8.images[:, 0], source.images / 8.0 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(dataset8.digits, source.target)


def test_splits_partition_rows_with_stratified_sizes(dataset8):
    parts = {name: dataset8.subset(name) for name in ("train", "val", "test")}
    assert {name: len(part) for name, part in parts.items()} == {
        "train": 1258, "val": 269, "test": 270,
    }
    assert sum(len(part) for part in parts.values()) == len(dataset8)
    for digit in range(10):
        total = int((dataset8.digits == digit).sum())
        in_train = int((parts["train"].digits == digit).sum())
        assert abs(in_train - 0.7 * total) <= 1
    with pytest.raises(InputError, match="split"):
        dataset8.subset("validation")


def test_sizes_16_and_32_upsample(tmp_path):
    for size in (16, 32):
        dataset = load_digits_dataset(build_digits(tmp_path / f"d{size}.parquet", size=size))
        assert dataset.image_shape == (1, size, size)
        assert -1.0 <= dataset.images.min() and dataset.images.max() <= 1.0


def test_class_balance_at_16(tmp_path):
    # Measured (seed 0): compress train counts [313, 297, 326, 322], ink [314, 299, 321, 324].
    dataset = load_digits_dataset(build_digits(tmp_path / "d16.parquet", size=16))
    train = dataset.subset("train")
    for name in ORACLES:
        shares = np.bincount(train.labels[name], minlength=4) / len(train)
        assert shares.shape == (4,)
        assert (np.abs(shares - 0.25) < 0.03).all(), (name, shares)


def test_build_rejects_unsupported_size(tmp_path):
    out = tmp_path / "digits.parquet"
    with pytest.raises(InputError, match="size: .* 12"):
        build_digits(out, size=12)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_old_file_and_no_temp(digits8, tmp_path):
    out = tmp_path / "digits.parquet"
    out.write_bytes(digits8.read_bytes())
    with pytest.raises(AttributeError):  # pyarrow fails after the temp file was created
        write_table("not a table", out)
    assert [p.name for p in tmp_path.iterdir()] == ["digits.parquet"]
    assert out.read_bytes() == digits8.read_bytes()


# ---------------------------------------------------------------- loading bad files


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="dataset: file not found"):
        load_digits_dataset(tmp_path / "nope.parquet")
    with pytest.raises(InputError, match="pairs: file not found"):
        load_pairs(tmp_path / "nope.parquet")


def test_corrupted_file(tmp_path):
    path = tmp_path / "junk.parquet"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(InputError, match="dataset: .*not a readable Parquet file"):
        load_digits_dataset(path)
    with pytest.raises(InputError, match="pairs: .*not a readable Parquet file"):
        load_pairs(path)


def _with_images(table, images):
    column = pa.FixedSizeListArray.from_arrays(pa.array(images.ravel()), images.shape[1])
    return table.set_column(table.column_names.index("image"), "image", column)


def test_wrong_image_length(digits8, tmp_path):
    table = pq.read_table(digits8)
    images = np.stack(table["image"].to_numpy(zero_copy_only=False))[:, :63].copy()
    path = rewrite(tmp_path / "short.parquet", _with_images(table, images))
    with pytest.raises(InputError, match=r"image: row 0 has 63 values, expected 64"):
        load_digits_dataset(path)


@pytest.mark.parametrize("bad_value, message", [(np.nan, "NaN"), (1.5, "1.5 outside")])
def test_bad_pixel_values(digits8, tmp_path, bad_value, message):
    table = pq.read_table(digits8)
    images = np.stack(table["image"].to_numpy(zero_copy_only=False)).astype(np.float32)
    images[7, 3] = bad_value
    path = rewrite(tmp_path / "bad.parquet", _with_images(table, images))
    with pytest.raises(InputError, match=f"image: image 7 .*{message}"):
        load_digits_dataset(path)


def test_missing_column_and_metadata(digits8, tmp_path):
    table = pq.read_table(digits8)
    path = rewrite(tmp_path / "no_ink.parquet", table.drop_columns(["ink_class"]))
    with pytest.raises(InputError, match="ink_class: column missing"):
        load_digits_dataset(path)
    path = rewrite(tmp_path / "no_meta.parquet", table.replace_schema_metadata(None))
    with pytest.raises(InputError, match="ctrl_ray.image_shape"):
        load_digits_dataset(path)


def test_label_outside_classes_in_dataset(digits8, tmp_path):
    table = pq.read_table(digits8)
    labels = table["compress_class"].to_numpy().copy()
    labels[5] = 4
    index = table.column_names.index("compress_class")
    path = rewrite(tmp_path / "bad_label.parquet",
                   table.set_column(index, "compress_class", pa.array(labels)))
    with pytest.raises(InputError, match="compress_class: row 5 has value 4, expected 0..3"):
        load_digits_dataset(path)


# ---------------------------------------------------------------- pairs


def test_make_pairs_draws_from_train_without_replacement(digits8, dataset8, tmp_path):
    out = make_pairs(digits8, "compress_class", 300, tmp_path / "pairs.parquet", seed=3)
    pairs = load_pairs(out)
    assert len(pairs) == 300 and pairs.images.shape == (300, 1, 8, 8)
    info = dataset8.label_info["compress_class"]
    assert (pairs.label_name, pairs.num_classes, pairs.attribute) == (
        "compress_class", 4, "jpeg_bytes",
    )
    assert pairs.edges == info["edges"]
    np.testing.assert_array_equal(
        pairs.labels, label_images(pairs.images, "compress_class", pairs.edges)
    )
    # Every pair is a train image, and no train image is used more often than it occurs.
    train_counts = Counter(image.tobytes() for image in dataset8.subset("train").images)
    pair_counts = Counter(image.tobytes() for image in pairs.images)
    assert all(pair_counts[key] <= train_counts[key] for key in pair_counts)

    meta = pq.read_schema(out).metadata
    assert json.loads(meta[b"ctrl_ray.seed"]) == 3
    assert json.loads(meta[b"ctrl_ray.source"]) == str(digits8)

    again = make_pairs(digits8, "compress_class", 300, tmp_path / "again.parquet", seed=3)
    assert again.read_bytes() == out.read_bytes()


def test_make_pairs_bad_requests_write_nothing(digits8, tmp_path):
    out = tmp_path / "sub" / "pairs.parquet"
    with pytest.raises(InputError, match="n: requested 5000 pairs .* 1258 images"):
        make_pairs(digits8, "compress_class", 5000, out)
    with pytest.raises(InputError, match=r"label: unknown label 'sharpness'.*compress_class"):
        make_pairs(digits8, "sharpness", 10, out)
    with pytest.raises(InputError, match="n: expected a positive integer"):
        make_pairs(digits8, "ink_class", 0, out)
    assert not out.parent.exists()


def test_pairs_label_outside_declared_classes(digits8, tmp_path):
    out = make_pairs(digits8, "ink_class", 20, tmp_path / "pairs.parquet")
    table = pq.read_table(out)
    labels = table["label"].to_numpy().copy()
    labels[2] = 7
    path = rewrite(tmp_path / "bad.parquet", table.set_column(1, "label", pa.array(labels)))
    with pytest.raises(InputError, match="label: row 2 has value 7, expected 0..3"):
        load_pairs(path)


def test_pairset_from_arrays_validates():
    images = np.zeros((3, 8, 8), dtype=np.float32)
    pairs = PairSet.from_arrays(images, [0, 1, 3], "compress_class", edges=[1.0, 2.0, 3.0])
    assert pairs.images.shape == (3, 1, 8, 8) and pairs.num_classes == 4
    assert pairs.attribute == "jpeg_bytes"
    with pytest.raises(InputError, match="labels: row 2 has label 4"):
        PairSet.from_arrays(images, [0, 1, 4], "compress_class", num_classes=4)
    with pytest.raises(InputError, match=r"labels: expected shape \(3,\)"):
        PairSet.from_arrays(images, [0, 1], "compress_class", num_classes=4)
    with pytest.raises(InputError, match="num_classes: 3 does not match 3 edges"):
        PairSet.from_arrays(images, [0, 1, 2], "x", num_classes=3, edges=[1.0, 2.0, 3.0])
    images[1, 2, 2] = np.nan
    with pytest.raises(InputError, match="images: image 1"):
        PairSet.from_arrays(images, [0, 1, 2], "x", num_classes=4)


def test_pairset_class_names_and_heldout_split_round_trip(tmp_path):
    images = np.linspace(-1, 1, 4 * 3 * 8 * 8, dtype=np.float32).reshape(4, 3, 8, 8)  # RGB
    heldout = np.array([False, True, False, True])
    pairs = PairSet.from_arrays(images, [0, 0, 1, 1], "shade", num_classes=2,
                                class_names=["dark", "light"], heldout=heldout)
    loaded = load_pairs(save_pairs(pairs, tmp_path / "pairs.parquet"))
    assert loaded.image_shape == (3, 8, 8) and loaded.class_names == ["dark", "light"]
    assert loaded.heldout.tolist() == heldout.tolist()
    assert loaded.class_counts("heldout") == {"dark": 1, "light": 1}
    np.testing.assert_array_equal(loaded.subset("train").images, images[~heldout])
    with pytest.raises(InputError, match="class_names: names must be unique"):
        PairSet.from_arrays(images, [0, 0, 1, 1], "shade", num_classes=2,
                            class_names=["dark", "dark"])
    with pytest.raises(InputError, match="class_names: 1 names for 2 classes"):
        PairSet.from_arrays(images, [0, 0, 1, 1], "shade", num_classes=2, class_names=["a"])
    table = pq.read_table(tmp_path / "pairs.parquet")
    split = pa.array(["train", "test", "train", "heldout"])
    path = rewrite(tmp_path / "bad.parquet", table.set_column(2, "split", split))
    with pytest.raises(InputError, match="split: row 1 .* has 'test'"):
        load_pairs(path)
