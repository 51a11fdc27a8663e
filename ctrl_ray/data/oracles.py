"""Oracle labellers: exact functions of an image that define the new controls y.

Evaluation and rewards label generated samples with the same functions that labelled the
data, so no learned judge is needed for y. Images follow the project convention: float
arrays in [-1, 1] of shape (N, 1, H, W), (N, H, W) or a single (H, W); torch tensors are
accepted and converted. Values outside [-1, 1] (a sampler may overshoot) are clipped.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from ctrl_ray.errors import InputError

JPEG_QUALITY = 95


def as_image_batch(images: Any, field: str = "images") -> np.ndarray:
    """Return `images` as a float32 array of shape (N, H, W), rejecting bad shapes and NaN."""
    if hasattr(images, "detach") and hasattr(images, "cpu"):  # a torch tensor
        images = images.detach().cpu().float().numpy()
    array = np.asarray(images)
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise InputError(f"{field}: expected a numeric array, got dtype {array.dtype}")
    array = array.astype(np.float32, copy=False)
    if array.ndim == 2:
        array = array[None]
    elif array.ndim == 4:
        if array.shape[1] != 1:
            raise InputError(
                f"{field}: expected 1 channel in shape (N, 1, H, W), got shape {array.shape}"
            )
        array = array[:, 0]
    elif array.ndim != 3:
        raise InputError(
            f"{field}: expected shape (N, 1, H, W), (N, H, W) or (H, W), got shape {array.shape}"
        )
    if not np.isfinite(array).all():
        first = int(np.argwhere(~np.isfinite(array))[0][0])
        raise InputError(f"{field}: image {first} contains NaN or infinite values")
    return array


def to_uint8(images: Any) -> np.ndarray:
    """Map [-1, 1] to uint8 0..255 (clip, then round), shape (N, H, W)."""
    batch = np.clip(as_image_batch(images), -1.0, 1.0)
    return np.rint((batch + 1.0) * 127.5).astype(np.uint8)


def jpeg_bytes(images: Any) -> np.ndarray:
    """Byte size of each image saved as grayscale JPEG (quality 95): the paper's compressibility."""
    sizes = []
    for pixels in to_uint8(images):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=False)
        sizes.append(buffer.tell())
    return np.asarray(sizes, dtype=np.int64)


def ink(images: Any) -> np.ndarray:
    """Mean intensity of each image on [0, 1]: 0 for all -1 (black), 1 for all +1 (white)."""
    batch = np.clip(as_image_batch(images), -1.0, 1.0)
    return ((batch + 1.0) / 2.0).mean(axis=(1, 2), dtype=np.float64).astype(np.float32)


def quartile_edges(values: Any) -> list[float]:
    """The 25th, 50th and 75th percentiles of `values`: edges for 4 balanced classes."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0 or not np.isfinite(values).all():
        raise InputError(f"values: need a non-empty finite array, got {values.size} values")
    return [float(edge) for edge in np.percentile(values, [25, 50, 75])]


def check_edges(edges: Sequence[float], field: str = "edges") -> list[float]:
    """Validate class edges (finite, non-decreasing) and return them as a list of floats."""
    try:
        edges = [float(edge) for edge in edges]
    except (TypeError, ValueError) as error:
        raise InputError(f"{field}: expected a list of numbers, got {edges!r}") from error
    if not np.isfinite(edges).all() or (np.diff(edges) < 0).any():
        raise InputError(f"{field}: expected finite non-decreasing numbers, got {edges}")
    return edges


def bin_by_edges(values: Any, edges: Sequence[float]) -> np.ndarray:
    """Class of each value with np.digitize semantics: class i holds edges[i-1] <= v < edges[i].

    Class 0 holds the smallest values (for compressibility: the fewest JPEG bytes).
    """
    edges = check_edges(edges)
    return np.digitize(np.asarray(values, dtype=np.float64), edges).astype(np.int64)


class Oracle(NamedTuple):
    """A label's underlying attribute: its column name and the function computing it."""

    attribute: str
    function: Callable[[Any], np.ndarray]


ORACLES: dict[str, Oracle] = {
    "compress_class": Oracle("jpeg_bytes", jpeg_bytes),
    "ink_class": Oracle("ink", ink),
}

DESCRIPTIONS: dict[str, str] = {
    "compress_class": "JPEG (quality 95, grayscale) byte size binned at the train quartiles; "
    "class 0 = most compressible (fewest bytes)",
    "ink_class": "mean intensity on [0, 1] binned at the train quartiles; class 0 = least ink",
}


def get_oracle(label_name: str) -> Oracle:
    """The oracle for `label_name`, or InputError listing the valid names."""
    if label_name not in ORACLES:
        raise InputError(
            f"label: unknown label {label_name!r}; valid labels are {sorted(ORACLES)}"
        )
    return ORACLES[label_name]


def label_images(images: Any, label_name: str, edges: Sequence[float]) -> np.ndarray:
    """Label images with oracle `label_name` binned at `edges` (int64 classes, shape (N,))."""
    return bin_by_edges(get_oracle(label_name).function(images), edges)
