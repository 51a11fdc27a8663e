"""Two exact labellers of the 16x16 digits that no config was tuned on, as a user would write
them for `labeller: benchmarks/new_labels_labellers.py:centre_x` (images (N, C, H, W) in [-1, 1]
in, classes out): where the ink's centre of mass sits left to right, and which way the strokes
lean. Both cut at the tertiles of the 1,797 real digits (data/digits16.parquet), so the three
classes are equally common in the data, though not for every digit."""

from __future__ import annotations

import numpy as np

CENTRE_X_CLASSES = ("left", "centre", "right")
CENTRE_X_EDGES = (7.3767, 7.8561)       # column of the ink's centre of mass (0..15)
SLANT_CLASSES = ("left", "upright", "right")
SLANT_EDGES = (-0.0907, 0.0110)         # -mu11 / mu02: columns the ink moves right per row up


def _ink(images: np.ndarray) -> np.ndarray:
    """Ink in [0, 1], (N, H, W): the channels' mean mapped from [-1, 1]."""
    array = np.asarray(images, dtype=np.float64)
    return np.clip((array.mean(axis=1) + 1.0) / 2.0, 0.0, 1.0)


def _moments(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Centre of mass (column, row) and the central moments mu11, mu02 of the ink."""
    ink = _ink(images)
    mass = ink.sum(axis=(1, 2)) + 1e-9
    rows = np.arange(ink.shape[1], dtype=np.float64)[None, :, None]
    cols = np.arange(ink.shape[2], dtype=np.float64)[None, None, :]
    centre_col = (ink * cols).sum(axis=(1, 2)) / mass
    centre_row = (ink * rows).sum(axis=(1, 2)) / mass
    dx = cols - centre_col[:, None, None]
    dy = rows - centre_row[:, None, None]
    mu11 = (ink * dx * dy).sum(axis=(1, 2)) / mass
    mu02 = (ink * dy * dy).sum(axis=(1, 2)) / mass + 1e-9
    return centre_col, centre_row, mu11, mu02


def centre_x(images: np.ndarray) -> np.ndarray:
    """0 left, 1 centre, 2 right: the column of the ink's centre of mass, cut at its tertiles."""
    centre_col, _, _, _ = _moments(images)
    return np.digitize(centre_col, CENTRE_X_EDGES).astype(np.int64)


def slant(images: np.ndarray) -> np.ndarray:
    """0 leaning left, 1 upright, 2 leaning right (its top to the right, as a 7's stroke): the
    shear -mu11 / mu02 of the ink (rows count down the image), cut at its tertiles."""
    _, _, mu11, mu02 = _moments(images)
    return np.digitize(-mu11 / mu02, SLANT_EDGES).astype(np.int64)
