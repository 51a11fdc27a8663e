"""The offline label budget: N (image, label) pairs for one new control y, and nothing else.

The reward classifier and the baselines learn y only from these pairs (drawn from the
train split); the pre-trained model never sees y. The file carries the label's edges and
attribute, so samples can be labelled by the same oracle.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ctrl_ray.data import oracles
from ctrl_ray.data.digits import (
    META_IMAGE_SHAPE,
    META_SEED,
    META_SOURCE,
    check_image_shape,
    check_image_values,
    decode_image_column,
    encode_metadata,
    image_column,
    int_column,
    load_digits_dataset,
    read_metadata,
    read_table,
    require_columns,
    write_table,
)
from ctrl_ray.errors import InputError

META_LABEL = "ctrl_ray.label"


@dataclass
class PairSet:
    """Images (N, 1, H, W) in [-1, 1] with their class labels (N,) in 0..num_classes-1."""

    images: np.ndarray
    labels: np.ndarray
    label_name: str
    num_classes: int
    edges: list[float]
    image_shape: tuple[int, int, int]
    attribute: str

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def from_arrays(
        cls,
        images: Any,
        labels: Any,
        label_name: str,
        num_classes: int | None = None,
        edges: list[float] | None = None,
        attribute: str | None = None,
    ) -> PairSet:
        """Build a validated pair set in memory.

        Give `edges` (then num_classes = len(edges) + 1) or `num_classes`, or both if they
        agree. `attribute` defaults to the oracle's attribute for a known `label_name`.
        """
        batch = oracles.as_image_batch(images, field="images")[:, None]
        check_image_values(batch, "images")
        labels = np.asarray(labels)
        if labels.ndim != 1 or len(labels) != len(batch):
            raise InputError(
                f"labels: expected shape ({len(batch)},) to match the images, got {labels.shape}"
            )
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise InputError(f"labels: expected integer classes, got dtype {labels.dtype}")
        edges = oracles.check_edges(edges) if edges is not None else []
        if num_classes is None:
            if not edges:
                raise InputError("num_classes: give num_classes or edges")
            num_classes = len(edges) + 1
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise InputError(f"num_classes: expected an integer >= 2, got {num_classes!r}")
        if edges and num_classes != len(edges) + 1:
            raise InputError(f"num_classes: {num_classes} does not match {len(edges)} edges")
        outside = (labels < 0) | (labels >= num_classes)
        if outside.any():
            row = int(np.argmax(outside))
            raise InputError(
                f"labels: row {row} has label {int(labels[row])}, expected 0..{num_classes - 1}"
            )
        if attribute is None:
            known = oracles.ORACLES.get(label_name)
            attribute = known.attribute if known else ""
        return cls(
            images=np.ascontiguousarray(batch, dtype=np.float32),
            labels=labels.astype(np.int64),
            label_name=label_name,
            num_classes=num_classes,
            edges=edges,
            image_shape=(1, *batch.shape[2:]),
            attribute=attribute,
        )


def save_pairs(
    pairs: PairSet, out_path: str | os.PathLike, source: str = "", seed: int | None = None
) -> Path:
    """Write a pair set atomically as Parquet: columns image, label; label info in metadata."""
    table = pa.table({
        "image": image_column(pairs.images),
        "label": pa.array(pairs.labels, pa.int64()),
    })
    metadata = encode_metadata({
        META_IMAGE_SHAPE: list(pairs.image_shape),
        META_LABEL: {
            "name": pairs.label_name,
            "attribute": pairs.attribute,
            "edges": pairs.edges,
            "num_classes": pairs.num_classes,
        },
        META_SEED: seed,
        META_SOURCE: source,
    })
    return write_table(table.replace_schema_metadata(metadata), out_path)


def make_pairs(
    dataset_path: str | os.PathLike,
    label: str,
    n: int,
    out_path: str | os.PathLike,
    seed: int = 0,
) -> Path:
    """Draw `n` (image, label) pairs without replacement from the train split and save them."""
    dataset = load_digits_dataset(dataset_path)
    if label not in dataset.label_info:
        raise InputError(
            f"label: unknown label {label!r}; valid labels are {sorted(dataset.label_info)}"
        )
    train = dataset.subset("train")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"n: expected a positive integer, got {n!r}")
    if n > len(train):
        raise InputError(
            f"n: requested {n} pairs but the train split of {dataset_path} has {len(train)} images"
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"seed: expected an integer, got {seed!r}")
    rows = np.random.default_rng(seed).choice(len(train), size=n, replace=False)
    info = dataset.label_info[label]
    pairs = PairSet.from_arrays(
        train.images[rows],
        train.labels[label][rows],
        label_name=label,
        edges=info["edges"],
        attribute=info["attribute"],
    )
    return save_pairs(pairs, out_path, source=str(dataset_path), seed=seed)


def load_pairs(path: str | os.PathLike) -> PairSet:
    """Load and validate a pairs file written by `make_pairs` / `save_pairs`."""
    table = read_table(path, field="pairs")
    shape = check_image_shape(read_metadata(table, META_IMAGE_SHAPE, path), path)
    info = read_metadata(table, META_LABEL, path)
    if not isinstance(info, dict) or not {"name", "attribute", "edges", "num_classes"} <= set(info):
        raise InputError(
            f"{META_LABEL}: expected name, attribute, edges and num_classes in {path}, got {info!r}"
        )
    num_classes = info["num_classes"]
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise InputError(f"{META_LABEL}.num_classes: expected an integer >= 2, got {num_classes!r}")
    require_columns(table, ["image", "label"], path)
    images = decode_image_column(table, shape)
    labels = int_column(table, "label", 0, num_classes - 1)
    return PairSet.from_arrays(
        images,
        labels,
        label_name=str(info["name"]),
        num_classes=num_classes,
        edges=info["edges"] if info["edges"] else None,
        attribute=str(info["attribute"]),
    )
