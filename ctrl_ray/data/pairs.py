"""The offline label budget: N (image, label) pairs for one new control y, and nothing else.

The reward classifier and the baselines learn y only from these pairs; the pre-trained model
never sees y. The file carries the label's name, its class names, and (for the built-in labels)
the edges and attribute, so samples can be labelled by the same oracle. A pair set imported
from a user's own files (`ctrl_ray.data.importing`) also records a stratified held-out split
(column `split`: "train" or "heldout"): the reward trains on the train rows only; the held-out
rows measure its accuracy and train the judge that scores samples of a label without an oracle.
A pair set without the column is all train rows.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ctrl_ray.data import oracles
from ctrl_ray.data.digits import (
    META_IMAGE_SHAPE,
    META_SEED,
    META_SOURCE,
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
SPLIT_TRAIN = "train"
SPLIT_HELDOUT = "heldout"
CHANNELS = (1, 3)


@dataclass
class PairSet:
    """Images (N, C, H, W) in [-1, 1] (C = 1 grayscale or 3 RGB) with their class labels (N,)
    in 0..num_classes-1, the classes' names, and which rows are held out."""

    images: np.ndarray
    labels: np.ndarray
    label_name: str
    num_classes: int
    edges: list[float]
    image_shape: tuple[int, int, int]
    attribute: str
    class_names: list[str] = field(default_factory=list)
    heldout: np.ndarray | None = None  # (N,) bool; None: every row is a train row

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def names(self) -> list[str]:
        """A name per class: the declared ones, else "0", "1", ..."""
        return list(self.class_names) or [str(k) for k in range(self.num_classes)]

    @property
    def heldout_mask(self) -> np.ndarray:
        return np.zeros(len(self), bool) if self.heldout is None else self.heldout

    def subset(self, split: str) -> PairSet:
        """The rows of one split ("train" or "heldout") as a pair set without a split."""
        if split not in (SPLIT_TRAIN, SPLIT_HELDOUT):
            raise InputError(f"split: expected {SPLIT_TRAIN!r} or {SPLIT_HELDOUT!r}, "
                             f"got {split!r}")
        rows = self.heldout_mask if split == SPLIT_HELDOUT else ~self.heldout_mask
        return dataclasses.replace(self, images=self.images[rows], labels=self.labels[rows],
                                   heldout=None)

    def class_counts(self, split: str | None = None) -> dict[str, int]:
        """Rows per class name (of one split, or all rows)."""
        labels = self.labels if split is None else self.subset(split).labels
        counts = np.bincount(labels, minlength=self.num_classes)
        return {name: int(count) for name, count in zip(self.names, counts, strict=True)}

    @classmethod
    def from_arrays(
        cls,
        images: Any,
        labels: Any,
        label_name: str,
        num_classes: int | None = None,
        edges: list[float] | None = None,
        attribute: str | None = None,
        class_names: list[str] | None = None,
        heldout: Any = None,
    ) -> PairSet:
        """Build a validated pair set in memory.

        Give `edges` (then num_classes = len(edges) + 1) or `num_classes`, or both if they
        agree. `attribute` defaults to the oracle's attribute for a known `label_name`.
        `class_names` (one unique name per class) and `heldout` ((N,) bool, the held-out rows)
        are optional. Images are (N, H, W), (N, 1, H, W) or (N, 3, H, W) (RGB).
        """
        batch = as_pair_images(images)
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
        if not isinstance(label_name, str) or not label_name.strip():
            raise InputError(f"label_name: need a non-empty name, got {label_name!r}")
        if attribute is None:
            known = oracles.ORACLES.get(label_name)
            attribute = known.attribute if known else ""
        class_names = check_class_names(class_names, num_classes)
        if heldout is not None:
            heldout = np.asarray(heldout)
            if heldout.dtype != bool or heldout.shape != labels.shape:
                raise InputError(f"heldout: expected a bool array of shape {labels.shape}, got "
                                 f"{heldout.dtype} {heldout.shape}")
        return cls(
            images=np.ascontiguousarray(batch, dtype=np.float32),
            labels=labels.astype(np.int64),
            label_name=label_name,
            num_classes=num_classes,
            edges=edges,
            image_shape=tuple(int(d) for d in batch.shape[1:]),
            attribute=attribute,
            class_names=class_names,
            heldout=heldout,
        )


def as_pair_images(images: Any, field_name: str = "images") -> np.ndarray:
    """Images as float32 (N, C, H, W) with C = 1 or 3; (N, H, W) and (H, W) gain C = 1."""
    if hasattr(images, "detach") and hasattr(images, "cpu"):  # a torch tensor
        images = images.detach().cpu().float().numpy()
    array = np.asarray(images)
    if array.ndim == 4 and array.shape[1] == 3:
        if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
            raise InputError(f"{field_name}: expected a numeric array, got dtype {array.dtype}")
        return array.astype(np.float32, copy=False)
    if array.ndim == 4 and array.shape[1] != 1:
        raise InputError(f"{field_name}: expected 1 (grayscale) or 3 (RGB) channels in shape "
                         f"(N, C, H, W), got shape {array.shape}")
    return oracles.as_image_batch(array, field=field_name)[:, None]


def check_class_names(class_names: Any, num_classes: int) -> list[str]:
    """No names, or one unique non-empty string per class."""
    if class_names is None or (isinstance(class_names, list) and not class_names):
        return []
    if not isinstance(class_names, (list, tuple)) or not all(
            isinstance(name, str) and name.strip() for name in class_names):
        raise InputError(f"class_names: expected a list of non-empty strings, got {class_names!r}")
    if len(class_names) != num_classes:
        raise InputError(f"class_names: {len(class_names)} names for {num_classes} classes: "
                         f"{list(class_names)}")
    if len(set(class_names)) != len(class_names):
        raise InputError(f"class_names: names must be unique, got {list(class_names)}")
    return list(class_names)


def check_pair_shape(shape: Any, path: str | os.PathLike) -> tuple[int, int, int]:
    """Validate a stored image shape [C, H, W] with C = 1 or 3."""
    if (
        not isinstance(shape, list)
        or len(shape) != 3
        or not all(isinstance(dim, int) and not isinstance(dim, bool) and dim > 0
                   for dim in shape)
        or shape[0] not in CHANNELS
    ):
        raise InputError(f"{META_IMAGE_SHAPE}: expected [C, H, W] with C = 1 or 3 in {path}, "
                         f"got {shape!r}")
    return tuple(shape)


def save_pairs(
    pairs: PairSet, out_path: str | os.PathLike, source: str = "", seed: int | None = None
) -> Path:
    """Write a pair set atomically as Parquet: columns image, label (and split when some rows
    are held out); the label's name, classes and names in the metadata."""
    columns = {
        "image": image_column(pairs.images),
        "label": pa.array(pairs.labels, pa.int64()),
    }
    if pairs.heldout is not None:
        columns["split"] = pa.array(np.where(pairs.heldout, SPLIT_HELDOUT, SPLIT_TRAIN))
    metadata = encode_metadata({
        META_IMAGE_SHAPE: list(pairs.image_shape),
        META_LABEL: {
            "name": pairs.label_name,
            "attribute": pairs.attribute,
            "edges": pairs.edges,
            "num_classes": pairs.num_classes,
            "class_names": pairs.class_names,
        },
        META_SEED: seed,
        META_SOURCE: source,
    })
    table = pa.table(columns).replace_schema_metadata(metadata)
    return write_table(table, out_path)


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
    if table.num_rows == 0:
        raise InputError(f"{str(path)!r} holds no pairs (0 rows)")
    shape = check_pair_shape(read_metadata(table, META_IMAGE_SHAPE, path), path)
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
    heldout = None
    if "split" in table.column_names:
        split = table.column("split")
        if not pa.types.is_string(split.type):
            raise InputError(f"split: expected a string column in {path}, got {split.type}")
        values = split.to_pylist()
        bad = [i for i, v in enumerate(values) if v not in (SPLIT_TRAIN, SPLIT_HELDOUT)]
        if bad:
            raise InputError(f"split: row {bad[0]} of {path} has {values[bad[0]]!r}, expected "
                             f"{SPLIT_TRAIN!r} or {SPLIT_HELDOUT!r}")
        heldout = np.asarray(values) == SPLIT_HELDOUT
    try:
        return PairSet.from_arrays(
            images,
            labels,
            label_name=str(info["name"]),
            num_classes=num_classes,
            edges=info["edges"] if info["edges"] else None,
            attribute=str(info["attribute"]),
            class_names=info.get("class_names") or None,
            heldout=heldout,
        )
    except InputError as error:
        raise InputError(f"{path}: {error}") from None
