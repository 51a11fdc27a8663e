"""`ctrl-ray data import`: a user's own labelled images -> a validated pair set.

Two sources, both conventions of Hugging Face `datasets`:

- an image folder with a CSV of `file,label` rows (the imagefolder + metadata convention; the
  file column may be called `file_name`, `file` or `image`, paths are relative to the folder);
- a Parquet table with an image column (PNG/JPEG bytes, the `{bytes, path}` struct `datasets`
  writes, or a string path relative to the table) and a label column.

Labels are integers or class names. Declared names (`classes`) fix the class order; otherwise
integer labels give classes 0..max and names are sorted, and a Parquet table written by
`datasets` lends the names of its `ClassLabel` feature. Images are decoded with PIL, converted
to grayscale or RGB, optionally resized to a square size, and mapped to [-1, 1]. A stratified
share of every class is held out (`split` column). Every check runs before the output is
written (atomically), and a bad row stops the import with one line naming the row and value.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from ctrl_ray.data import oracles
from ctrl_ray.data.pairs import PairSet, save_pairs
from ctrl_ray.errors import InputError
from ctrl_ray.preflight import check_output

FILE_COLUMNS = ("file_name", "file", "image", "path")
CHANNEL_MODES = {1: "L", 3: "RGB"}
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F", "P;L"}


@dataclass
class ImportOptions:
    """How raw images and labels become a pair set."""

    label_name: str | None = None   # the new control's name (default: the label column's)
    classes: list[str] | None = None  # declared class names, in class order
    size: int | None = None          # resize to size x size (default: keep; must agree)
    channels: int | None = None      # 1 grayscale, 3 RGB (default: RGB if any image has colour)
    heldout_fraction: float = 0.2    # stratified share of every class held out
    seed: int = 0
    overwrite: bool = False

    def check(self) -> None:
        if self.size is not None and (isinstance(self.size, bool) or not isinstance(self.size, int)
                                      or not 4 <= self.size <= 1024):
            raise InputError(f"--size: expected an integer in 4..1024, got {self.size!r}")
        if self.channels not in (None, 1, 3):
            raise InputError(f"--channels: expected 1 (grayscale) or 3 (RGB), got "
                             f"{self.channels!r}")
        if not (isinstance(self.heldout_fraction, (int, float))
                and 0.0 < float(self.heldout_fraction) < 1.0):
            raise InputError(f"--heldout: expected a fraction in (0, 1), got "
                             f"{self.heldout_fraction!r}")
        if self.classes is not None:
            names = [str(name).strip() for name in self.classes]
            if len(names) < 2 or not all(names):
                raise InputError(f"--classes: expected at least 2 non-empty names, got "
                                 f"{self.classes!r}")
            duplicates = sorted({name for name in names if names.count(name) > 1})
            if duplicates:
                raise InputError(f"--classes: name {duplicates[0]!r} is declared twice")
            self.classes = names
        if self.label_name is not None:
            check_label_name(self.label_name)


@dataclass
class RawRow:
    """One source row: where it came from (for messages), how to read its image, its label."""

    where: str
    source: str
    read: Callable[[], bytes]
    label: Any


def check_label_name(name: str) -> str:
    """A new control's name: non-empty, and not a built-in oracle label (whose oracle would
    then score a different attribute)."""
    if not isinstance(name, str) or not name.strip() or any(c.isspace() for c in name):
        raise InputError(f"--name: expected a label name without spaces, got {name!r}")
    if name in oracles.ORACLES:
        raise InputError(f"--name: {name!r} is a built-in oracle label of the digits testbed; "
                         f"choose another name for your label")
    return name


# ---------------------------------------------------------------- sources


def rows_from_folder(images_dir: str | os.PathLike, labels_csv: str | os.PathLike,
                     label_column: str | None = None) -> tuple[list[RawRow], str]:
    """The rows of a `file,label` CSV whose files live under `images_dir`; the label column."""
    folder, table = Path(images_dir), Path(labels_csv)
    if not folder.is_dir():
        raise InputError(f"--images: folder not found: {str(folder)!r}")
    if not table.is_file():
        raise InputError(f"--labels: file not found: {str(table)!r}")
    try:
        text = table.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"--labels: {str(table)!r} is not a readable UTF-8 CSV "
                         f"({error})") from None
    reader = csv.reader(io.StringIO(text))
    try:
        records = [row for row in reader]
    except csv.Error as error:
        raise InputError(f"{table}: not a valid CSV ({error})") from None
    if not records or not any(cell.strip() for cell in records[0]):
        raise InputError(f"{table}: empty CSV; expected a header such as file_name,label")
    header = [cell.strip() for cell in records[0]]
    file_column = next((name for name in FILE_COLUMNS if name in header), None)
    if file_column is None:
        raise InputError(f"{table}: no image-file column; expected one of {list(FILE_COLUMNS)} "
                         f"in the header, got {header}")
    if label_column is None:
        others = [name for name in header if name != file_column and name]
        label_column = "label" if "label" in others else (others[0] if len(others) == 1 else None)
        if label_column is None:
            raise InputError(f"{table}: cannot tell the label column among {others}; "
                             f"give --label-column")
    if label_column not in header:
        raise InputError(f"--label-column: {label_column!r} is not in the header of {table}: "
                         f"{header}")
    file_index, label_index = header.index(file_column), header.index(label_column)
    rows, seen = [], {}
    for line, record in enumerate(records[1:], start=2):
        if not any(cell.strip() for cell in record):
            continue  # a blank line
        where = f"{table.name} line {line}"
        if len(record) != len(header):
            raise InputError(f"{where}: {len(record)} fields, the header has {len(header)}: "
                             f"{record}")
        name = record[file_index].strip()
        if not name:
            raise InputError(f"{where}: no image file in column {file_column!r} "
                             f"(label {record[label_index]!r})")
        path = folder / name
        key = os.path.normpath(name)
        if key in seen:
            raise InputError(f"{where}: duplicate file {name!r}, already listed on "
                             f"{seen[key]}")
        seen[key] = f"line {line}"
        if not path.is_file():
            raise InputError(f"{where}: image file {name!r} not found in {str(folder)!r}")
        rows.append(RawRow(f"{where} ({name})", name, path.read_bytes, record[label_index]))
    if not rows:
        raise InputError(f"{table}: no data rows under the header")
    return rows, label_column


def rows_from_parquet(table_path: str | os.PathLike, image_column: str = "image",
                      label_column: str = "label") -> tuple[list[RawRow], list[str] | None]:
    """The rows of a Parquet table, and the class names its `datasets` metadata declares."""
    import pyarrow.parquet as pq

    path = Path(table_path)
    if not path.is_file():
        raise InputError(f"--parquet: file not found: {str(path)!r}")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        raise InputError(f"--parquet: {str(path)!r} is not a readable Parquet file "
                         f"({error})") from None
    for option, name in (("--image-column", image_column), ("--label-column", label_column)):
        if name not in table.column_names:
            raise InputError(f"{option}: column {name!r} not in {path.name} "
                             f"(has {table.column_names})")
    if table.num_rows == 0:
        raise InputError(f"{path}: the table has no rows")
    images = table.column(image_column).combine_chunks()
    labels = table.column(label_column).combine_chunks()
    if pa.types.is_dictionary(labels.type):
        labels = labels.cast(labels.type.value_type)
    label_values = labels.to_pylist()
    if pa.types.is_floating(labels.type):
        label_values = [float("nan") if v is None else v for v in label_values]
    reads: list[tuple[str, Callable[[], bytes]]] = []
    if pa.types.is_struct(images.type):
        fields = {images.type.field(i).name for i in range(images.type.num_fields)}
        if not fields & {"bytes", "path"}:
            raise InputError(f"--image-column: struct column {image_column!r} has no 'bytes' or "
                             f"'path' field (fields {sorted(fields)})")
        entries = images.to_pylist()
    elif pa.types.is_binary(images.type) or pa.types.is_large_binary(images.type):
        entries = [None if v is None else {"bytes": v} for v in images.to_pylist()]
    elif pa.types.is_string(images.type) or pa.types.is_large_string(images.type):
        entries = [None if v is None else {"path": v} for v in images.to_pylist()]
    else:
        raise InputError(f"--image-column: {image_column!r} has type {images.type}; expected "
                         f"PNG/JPEG bytes, a {{bytes, path}} struct or file paths")
    seen: dict[str, int] = {}
    for row, entry in enumerate(entries):
        where = f"{path.name} row {row}"
        data = (entry or {}).get("bytes")
        source = (entry or {}).get("path") or ""
        if source:
            if source in seen:
                raise InputError(f"{where}: duplicate file {source!r}, already in row "
                                 f"{seen[source]}")
            seen[source] = row
        if data:
            reads.append((f"{where}" + (f" ({source})" if source else ""),
                          lambda data=data: data))
        elif source:
            file = path.parent / source
            if not file.is_file():
                raise InputError(f"{where}: no image bytes, and file {source!r} not found next "
                                 f"to {path.name}")
            reads.append((f"{where} ({source})", file.read_bytes))
        else:
            raise InputError(f"{where}: no image (column {image_column!r} is empty)")
    rows = [RawRow(where, where, read, label)
            for (where, read), label in zip(reads, label_values, strict=True)]
    return rows, datasets_class_names(table.schema, label_column)


def datasets_class_names(schema: pa.Schema, label_column: str) -> list[str] | None:
    """The `names` of a `datasets` ClassLabel feature stored in the table's metadata, if any."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if raw is None:
        return None
    try:
        feature = json.loads(raw)["info"]["features"][label_column]
        names = feature.get("names") if feature.get("_type") == "ClassLabel" else None
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return [str(name) for name in names] if isinstance(names, list) and names else None


# ---------------------------------------------------------------- labels and images


def parse_labels(rows: Sequence[RawRow], declared: list[str] | None) -> tuple[np.ndarray,
                                                                                list[str]]:
    """Class indices and class names from raw labels (ints, integral floats or names)."""
    def as_int(value: Any) -> int | None:
        if isinstance(value, bool):
            return None
        if isinstance(value, (int, np.integer)):
            return int(value)
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            text = value.strip()
            if text.lstrip("+-").isdigit():
                return int(text)
        return None

    def bad(row: RawRow, why: str) -> InputError:
        return InputError(f"{row.where}: label {row.label!r} {why}")

    for row in rows:
        value = row.label
        if value is None or (isinstance(value, str) and not value.strip()):
            raise bad(row, "is empty")
        if isinstance(value, float) and math.isnan(value):
            raise bad(row, "is NaN")
        if isinstance(value, str) and value.strip().lower() in {"nan", "none", "null", "na"}:
            raise bad(row, "is NaN or missing")
    if declared:
        lookup = {name: index for index, name in enumerate(declared)}
        indices = []
        for row in rows:
            text = str(row.label).strip()
            index = lookup.get(text)
            if index is None:
                number = as_int(row.label)
                if number is None or not 0 <= number < len(declared):
                    raise bad(row, f"is neither a declared class name {declared} nor an "
                                   f"integer 0..{len(declared) - 1}")
                index = number
            indices.append(index)
        return np.asarray(indices, np.int64), list(declared)
    numbers = [as_int(row.label) for row in rows]
    if all(number is not None for number in numbers):
        negative = next((row for row, n in zip(rows, numbers, strict=True) if n < 0), None)
        if negative is not None:
            raise bad(negative, "is negative; integer classes are 0, 1, ...")
        count = max(numbers) + 1
        return np.asarray(numbers, np.int64), [str(k) for k in range(count)]
    not_int = [row for row, number in zip(rows, numbers, strict=True) if number is None]
    if len(not_int) < len(rows):  # some integers, some not
        raise bad(not_int[0], "is not an integer, and no class names were declared (--classes)")
    not_name = next((row for row in rows if not isinstance(row.label, str)), None)
    if not_name is not None:
        raise bad(not_name, "is neither an integer nor a class name")
    names = sorted({str(row.label).strip() for row in rows})
    lookup = {name: index for index, name in enumerate(names)}
    return np.asarray([lookup[str(row.label).strip()] for row in rows], np.int64), names


def decode_images(rows: Sequence[RawRow], size: int | None, channels: int | None,
                  progress: bool = False) -> tuple[np.ndarray, int]:
    """Decode every image with PIL -> float32 (N, C, S, S) in [-1, 1], and C."""
    opened = []
    iterator = rows
    if progress and len(rows) > 2000:
        from tqdm.auto import tqdm

        iterator = tqdm(rows, desc="images", unit="img")
    for row in iterator:
        try:
            image = Image.open(io.BytesIO(row.read()))
            image.load()
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError,
                SyntaxError) as error:
            raise InputError(f"{row.where}: not a readable image ({error})") from None
        opened.append(image)
    if channels is None:
        channels = 3 if any(has_colour(image) for image in opened) else 1
    mode = CHANNEL_MODES[channels]
    if size is None:
        first = opened[0].size
        for row, image in zip(rows, opened, strict=True):
            if image.size != first:
                raise InputError(f"{row.where}: image is {image.width}x{image.height}, but "
                                 f"{rows[0].where} is {first[0]}x{first[1]}; give --size to "
                                 f"resize them all")
        if first[0] != first[1]:
            raise InputError(f"{rows[0].where}: images are {first[0]}x{first[1]}, not square; "
                             f"give --size to resize them")
        if first[0] < 4:
            raise InputError(f"{rows[0].where}: images are {first[0]}x{first[1]}; need at "
                             f"least 4x4 (or give --size)")
    out = []
    for image in opened:
        image = image.convert("RGBA").convert(mode) if image.mode in ("P", "PA") else \
            image.convert(mode)
        if size is not None and image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.LANCZOS)
        pixels = np.asarray(image, dtype=np.float32)
        out.append(pixels[None] if channels == 1 else pixels.transpose(2, 0, 1))
    images = np.stack(out) / 127.5 - 1.0
    return np.clip(images, -1.0, 1.0).astype(np.float32), channels


def has_colour(image: Image.Image) -> bool:
    """Whether an image holds colour (an RGB image whose channels all agree counts as gray)."""
    if image.mode in GRAY_MODES:
        return False
    if image.mode == "P":
        palette = image.convert("RGB")
    elif image.mode in ("RGB", "RGBA", "CMYK", "YCbCr", "PA"):
        palette = image.convert("RGB")
    else:
        return True
    pixels = np.asarray(palette)
    return bool((pixels[..., 0] != pixels[..., 1]).any()
                or (pixels[..., 1] != pixels[..., 2]).any())


def stratified_heldout(labels: np.ndarray, names: list[str], fraction: float,
                       seed: int) -> np.ndarray:
    """A bool mask holding out round(fraction * n_k) rows of each class k (at least one, and
    at least one left to train on); every class needs 2 rows."""
    rng = np.random.default_rng(seed)
    heldout = np.zeros(len(labels), bool)
    for index, name in enumerate(names):
        members = np.flatnonzero(labels == index)
        if len(members) == 0:
            raise InputError(f"class {name!r} (class {index}) has no images; every class needs "
                             f"at least 2 (one to train on, one held out)")
        if len(members) < 2:
            raise InputError(f"class {name!r} (class {index}) has 1 image; every class needs at "
                             f"least 2 (one to train on, one held out)")
        take = min(max(1, int(round(fraction * len(members)))), len(members) - 1)
        heldout[rng.permutation(members)[:take]] = True
    return heldout


# ---------------------------------------------------------------- the import


def build_pair_set(rows: Sequence[RawRow], options: ImportOptions, label_name: str,
                   declared: list[str] | None = None, progress: bool = False) -> PairSet:
    """Validate labels, decode images, hold out a stratified split: a `PairSet` in memory."""
    options.check()
    check_label_name(label_name)
    labels, names = parse_labels(rows, options.classes or declared)
    images, _ = decode_images(rows, options.size, options.channels, progress)
    heldout = stratified_heldout(labels, names, float(options.heldout_fraction), options.seed)
    return PairSet.from_arrays(images, labels, label_name=label_name, num_classes=len(names),
                               attribute="", class_names=names, heldout=heldout)


def import_folder(images_dir: str | os.PathLike, labels_csv: str | os.PathLike,
                  out: str | os.PathLike, options: ImportOptions | None = None,
                  label_column: str | None = None, progress: bool = False) -> PairSet:
    """Import an image folder + `file,label` CSV into the pair set `out`; returns it."""
    options = options or ImportOptions()
    out = check_output(out, "--out", kind="file", overwrite=options.overwrite,
                       inputs=[("--images", images_dir), ("--labels", labels_csv)],
                       suffixes=(".parquet",))
    options.check()
    rows, column = rows_from_folder(images_dir, labels_csv, label_column)
    pairs = build_pair_set(rows, options, options.label_name or column, progress=progress)
    save_pairs(pairs, out, source=f"{images_dir} + {labels_csv}", seed=options.seed)
    return pairs


def import_parquet(table_path: str | os.PathLike, out: str | os.PathLike,
                   options: ImportOptions | None = None, image_column: str = "image",
                   label_column: str = "label", progress: bool = False) -> PairSet:
    """Import a Parquet table with an image column and a label column into `out`."""
    options = options or ImportOptions()
    out = check_output(out, "--out", kind="file", overwrite=options.overwrite,
                       inputs=[("--parquet", table_path)], suffixes=(".parquet",))
    options.check()
    rows, declared = rows_from_parquet(table_path, image_column, label_column)
    pairs = build_pair_set(rows, options, options.label_name or label_column, declared,
                           progress=progress)
    save_pairs(pairs, out, source=str(table_path), seed=options.seed)
    return pairs


def describe(pairs: PairSet) -> list[str]:
    """Lines summarising a pair set: shape, and per class its name and train/held-out rows."""
    channels = {1: "grayscale", 3: "RGB"}[pairs.image_shape[0]]
    train, heldout = pairs.class_counts("train"), pairs.class_counts("heldout")
    lines = [f"{len(pairs)} pairs labelled {pairs.label_name!r}: {pairs.num_classes} classes, "
             f"{pairs.image_shape[1]}x{pairs.image_shape[2]} {channels}, "
             f"{sum(heldout.values())} held out"]
    for index, name in enumerate(pairs.names):
        lines.append(f"  class {index} {name!r}: {train[name]} train, {heldout[name]} held out")
    return lines
