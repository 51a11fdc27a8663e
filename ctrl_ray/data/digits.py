"""The digits testbed: scikit-learn's bundled digits as a Parquet table with oracle labels.

The table holds every image once (flattened, [-1, 1]), its digit (the known condition c),
a train/val/test split, and for each new control y its raw attribute and class. Class
edges are the quartiles of the train split; they are stored in the schema metadata so
generated samples can be labelled the same way (see `oracles.label_images`).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ctrl_ray.data import oracles
from ctrl_ray.errors import InputError

SIZES = (8, 16, 32)
SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = {"train": 0.70, "val": 0.15, "test": 0.15}
NUM_DIGITS = 10
SOURCE = "sklearn.datasets.load_digits"
META_IMAGE_SHAPE = "ctrl_ray.image_shape"
META_LABELS = "ctrl_ray.labels"
META_SEED = "ctrl_ray.seed"
META_SOURCE = "ctrl_ray.source"


# ---------------------------------------------------------------- Parquet helpers


def write_table(table: pa.Table, path: str | os.PathLike) -> Path:
    """Write `table` to `path` atomically: a temp file in the same folder, then os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        pq.write_table(table, tmp_name)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def read_table(path: str | os.PathLike, field: str) -> pa.Table:
    """Read a Parquet file, turning a missing or unreadable file into InputError."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{field}: file not found: {path}")
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        raise InputError(f"{field}: {path} is not a readable Parquet file ({error})") from error


def encode_metadata(entries: dict[str, Any]) -> dict[bytes, bytes]:
    """Schema metadata as bytes JSON, keys sorted so the file bytes are reproducible."""
    return {
        key.encode(): json.dumps(value, sort_keys=True).encode() for key, value in entries.items()
    }


def read_metadata(table: pa.Table, key: str, path: str | os.PathLike) -> Any:
    """Decode one JSON schema-metadata entry, or InputError naming the key."""
    raw = (table.schema.metadata or {}).get(key.encode())
    if raw is None:
        raise InputError(f"metadata: {path} has no {key!r} entry (not written by ctrl-ray?)")
    try:
        return json.loads(raw)
    except ValueError as error:
        raise InputError(f"metadata: {key!r} in {path} is not valid JSON: {raw[:80]!r}") from error


def check_image_shape(shape: Any, path: str | os.PathLike) -> tuple[int, int, int]:
    """Validate a stored image shape [1, H, W]."""
    if (
        not isinstance(shape, list)
        or len(shape) != 3
        or not all(isinstance(dim, int) and dim > 0 for dim in shape)
        or shape[0] != 1
    ):
        raise InputError(f"{META_IMAGE_SHAPE}: expected [1, H, W] in {path}, got {shape!r}")
    return tuple(shape)


def image_column(images: np.ndarray) -> pa.FixedSizeListArray:
    """(N, 1, H, W) float images -> fixed_size_list<float32>[H*W] column."""
    flat = np.ascontiguousarray(images, dtype=np.float32).reshape(len(images), -1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), flat.shape[1])


def check_image_values(images: np.ndarray, field: str) -> None:
    """Reject NaN/inf and values outside [-1, 1], naming the first offending image."""
    flat = images.reshape(len(images), -1)
    bad = ~np.isfinite(flat).all(axis=1)
    if bad.any():
        raise InputError(f"{field}: image {int(np.argmax(bad))} contains NaN or infinite values")
    outside = (np.abs(flat) > 1.0).any(axis=1)
    if outside.any():
        row = int(np.argmax(outside))
        worst = float(flat[row][np.argmax(np.abs(flat[row]))])
        raise InputError(f"{field}: image {row} has value {worst} outside [-1, 1]")


def decode_image_column(
    table: pa.Table, shape: tuple[int, int, int], field: str = "image"
) -> np.ndarray:
    """Read the image column back as validated float32 images of shape (N, *shape)."""
    column = table.column(field).combine_chunks()
    expected = math.prod(shape)
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)
            or pa.types.is_fixed_size_list(column.type)):
        raise InputError(f"{field}: expected a list column of floats, got type {column.type}")
    if column.null_count:
        raise InputError(f"{field}: {column.null_count} rows are null")
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    if len(lengths) and (lengths != expected).any():
        row = int(np.argmax(lengths != expected))
        raise InputError(
            f"{field}: row {row} has {int(lengths[row])} values, expected {expected} "
            f"for image shape {list(shape)}"
        )
    values = column.flatten()
    if values.null_count:
        raise InputError(f"{field}: contains {values.null_count} null pixel values")
    try:
        pixels = values.to_numpy(zero_copy_only=False).astype(np.float32)
    except (pa.ArrowException, TypeError, ValueError) as error:
        raise InputError(f"{field}: values are not numeric ({values.type})") from error
    images = pixels.reshape(len(column), *shape)
    check_image_values(images, field)
    return images


def int_column(table: pa.Table, name: str, low: int, high: int) -> np.ndarray:
    """An integer column checked to lie in low..high (inclusive), naming the first bad row."""
    column = table.column(name)
    if not pa.types.is_integer(column.type) or column.null_count:
        raise InputError(f"{name}: expected non-null integers, got type {column.type}")
    values = column.to_numpy().astype(np.int64)
    bad = (values < low) | (values > high)
    if bad.any():
        row = int(np.argmax(bad))
        raise InputError(f"{name}: row {row} has value {int(values[row])}, expected {low}..{high}")
    return values


def require_columns(table: pa.Table, names: list[str], path: str | os.PathLike) -> None:
    """InputError naming the first column of `names` missing from `table`."""
    for name in names:
        if name not in table.column_names:
            raise InputError(f"{name}: column missing from {path} (has {table.column_names})")


def check_label_info(name: str, info: Any, path: str | os.PathLike) -> dict:
    """Validate one label entry of the metadata: attribute, edges, num_classes."""
    if not isinstance(info, dict) or not {"attribute", "edges", "num_classes"} <= set(info):
        raise InputError(
            f"{META_LABELS}: entry {name!r} in {path} needs attribute, edges and num_classes, "
            f"got {info!r}"
        )
    edges = oracles.check_edges(info["edges"], field=f"{META_LABELS}.{name}.edges")
    if info["num_classes"] != len(edges) + 1:
        raise InputError(
            f"{META_LABELS}.{name}.num_classes: {info['num_classes']!r} does not match "
            f"{len(edges)} edges in {path}"
        )
    return {**info, "edges": edges}


# ---------------------------------------------------------------- building


def digits_images(size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 sklearn digits as float32 (N, 1, size, size) in [-1, 1] and their digits."""
    if size not in SIZES:
        raise InputError(f"size: expected one of {list(SIZES)}, got {size!r}")
    import torch
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images.astype(np.float32) / 16.0 * 2.0 - 1.0)[:, None]
    if size != 8:
        upsampled = torch.nn.functional.interpolate(
            torch.from_numpy(images), size=(size, size), mode="bilinear", align_corners=False
        )
        images = upsampled.clamp(-1.0, 1.0).numpy()
    return np.ascontiguousarray(images, dtype=np.float32), bunch.target.astype(np.int64)


def split_assignment(digits: np.ndarray, seed: int) -> np.ndarray:
    """Stratified 70/15/15 train/val/test split: each digit is split in those proportions."""
    rng = np.random.default_rng(seed)
    split = np.empty(len(digits), dtype=object)
    for digit in np.unique(digits):
        rows = rng.permutation(np.flatnonzero(digits == digit))
        n_train = round(SPLIT_FRACTIONS["train"] * len(rows))
        n_val = round(SPLIT_FRACTIONS["val"] * len(rows))
        split[rows[:n_train]] = "train"
        split[rows[n_train : n_train + n_val]] = "val"
        split[rows[n_train + n_val :]] = "test"
    return split.astype(str)


def build_digits_table(size: int = 16, seed: int = 0) -> pa.Table:
    """Build the digits table (see module docstring); deterministic in (size, seed)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"seed: expected an integer, got {seed!r}")
    images, digits = digits_images(size)
    split = split_assignment(digits, seed)
    train = split == "train"

    columns: dict[str, pa.Array] = {
        "image": image_column(images),
        "digit": pa.array(digits, pa.int64()),
        "split": pa.array(split.tolist(), pa.string()),
    }
    labels_meta = {}
    for label_name, (attribute, function) in oracles.ORACLES.items():
        values = function(images)
        edges = oracles.quartile_edges(values[train])
        columns[attribute] = pa.array(values)
        columns[label_name] = pa.array(oracles.bin_by_edges(values, edges), pa.int64())
        labels_meta[label_name] = {
            "attribute": attribute,
            "edges": edges,
            "num_classes": len(edges) + 1,
            "description": oracles.DESCRIPTIONS[label_name],
        }
    metadata = encode_metadata({
        META_IMAGE_SHAPE: [1, size, size],
        META_LABELS: labels_meta,
        META_SEED: seed,
        META_SOURCE: SOURCE,
    })
    return pa.table(columns).replace_schema_metadata(metadata)


def build_digits(out_path: str | os.PathLike, size: int = 16, seed: int = 0) -> Path:
    """Build the digits table and write it atomically to `out_path` (Parquet)."""
    return write_table(build_digits_table(size=size, seed=seed), out_path)


# ---------------------------------------------------------------- loading


@dataclass
class DigitsDataset:
    """A loaded, validated digits table: images (N, 1, H, W) in [-1, 1] plus labels."""

    images: np.ndarray
    digits: np.ndarray
    split: np.ndarray
    attributes: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    label_info: dict[str, dict]
    image_shape: tuple[int, int, int]
    seed: int | None = None
    source: str = field(default="")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, split: str) -> DigitsDataset:
        """The rows of one split ("train", "val" or "test")."""
        if split not in SPLITS:
            raise InputError(f"split: expected one of {list(SPLITS)}, got {split!r}")
        rows = self.split == split
        return DigitsDataset(
            images=self.images[rows],
            digits=self.digits[rows],
            split=self.split[rows],
            attributes={name: values[rows] for name, values in self.attributes.items()},
            labels={name: values[rows] for name, values in self.labels.items()},
            label_info=self.label_info,
            image_shape=self.image_shape,
            seed=self.seed,
            source=self.source,
        )


def load_digits_dataset(path: str | os.PathLike) -> DigitsDataset:
    """Load and validate a digits table written by `build_digits`."""
    table = read_table(path, field="dataset")
    shape = check_image_shape(read_metadata(table, META_IMAGE_SHAPE, path), path)
    label_meta = read_metadata(table, META_LABELS, path)
    if not isinstance(label_meta, dict):
        raise InputError(f"{META_LABELS}: expected a mapping in {path}, got {label_meta!r}")
    label_info = {name: check_label_info(name, info, path) for name, info in label_meta.items()}
    attributes = [info["attribute"] for info in label_info.values()]
    require_columns(table, ["image", "digit", "split", *attributes, *label_info], path)

    split_column = table.column("split")
    if not pa.types.is_string(split_column.type) or split_column.null_count:
        raise InputError(f"split: expected non-null strings, got type {split_column.type}")
    split = np.asarray(split_column.to_pylist(), dtype=str)
    unknown = ~np.isin(split, SPLITS)
    if unknown.any():
        row = int(np.argmax(unknown))
        raise InputError(f"split: row {row} has value {split[row]!r}, expected one of {SPLITS}")

    attribute_values = {}
    for name in attributes:
        column = table.column(name)
        if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
            raise InputError(f"{name}: expected a numeric column in {path}, got {column.type}")
        values = column.to_numpy()
        if column.null_count or not np.isfinite(values).all():
            raise InputError(f"{name}: expected finite non-null numbers in {path}")
        attribute_values[name] = values
    return DigitsDataset(
        images=decode_image_column(table, shape),
        digits=int_column(table, "digit", 0, NUM_DIGITS - 1),
        split=split,
        attributes=attribute_values,
        labels={
            name: int_column(table, name, 0, info["num_classes"] - 1)
            for name, info in label_info.items()
        },
        label_info=label_info,
        image_shape=shape,
        seed=read_metadata(table, META_SEED, path),
        source=read_metadata(table, META_SOURCE, path),
    )


def ensure_digits(path: str | os.PathLike, size: int = 16, seed: int = 0) -> DigitsDataset:
    """Load the digits table at `path`, building it first if the file does not exist (the
    demo's documented default; every other command requires the file, `require_digits`)."""
    if not Path(path).exists():
        build_digits(path, size=size, seed=seed)
    return require_digits(path, size)


def require_digits(path: str | os.PathLike, size: int, key: str = "dataset") -> DigitsDataset:
    """Load the digits table at `path`; InputError naming `key` if it is missing or does not
    hold `size` x `size` images. A missing file is never built here: a typo stays a typo."""
    if not Path(path).is_file():
        hint = " (write it with `ctrl-ray data build-digits`)" if not Path(path).exists() else ""
        raise InputError(f"{key}: digits file not found: {str(path)!r}{hint}")
    dataset = load_digits_dataset(path)
    if dataset.image_shape[-1] != size:
        raise InputError(f"{key}: {str(path)!r} holds {dataset.image_shape[-1]}x"
                         f"{dataset.image_shape[-1]} images, but size={size} was asked for")
    return dataset


DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def digit_prompts(template: str = "a handwritten {}") -> list[str]:
    """Prompts for text-conditioned models, "a handwritten zero" .. "a handwritten nine":
    prompt i names digit i, so prompt indices are digits (and the digit judge applies)."""
    return [template.format(name) for name in DIGIT_NAMES]


DIGIT_NUMERALS = tuple(str(digit) for digit in range(NUM_DIGITS))
TRAINING_TEMPLATES = (
    "a handwritten {}",
    "the digit {}",
    "a drawing of the number {}",
    "{} written by hand",
)
"""The prompt templates the latent text-to-image testbed trains on (`ctrl_ray.latent_testbed`);
the first one, with digit names, gives its default prompts (`digit_prompts()`)."""
HELDOUT_TEMPLATES = (
    "a picture of the numeral {}",
    "someone wrote a {} on paper",
    "a sketch of a {}",
    "an image showing the figure {}",
)
"""Paraphrases no training prompt uses: whether a control holds for text never seen in training."""


def template_prompts(templates: tuple[str, ...] | list[str],
                     numerals: bool = True) -> tuple[list[str], list[int]]:
    """Every template filled with each digit's name (and, with `numerals`, its numeral "7"), in
    that order per template, and the digit each prompt names (so the digit judge applies)."""
    forms = [DIGIT_NAMES, DIGIT_NUMERALS] if numerals else [DIGIT_NAMES]
    prompts, digits = [], []
    for template in templates:
        for words in forms:
            prompts += [template.format(word) for word in words]
            digits += list(range(NUM_DIGITS))
    return prompts, digits
