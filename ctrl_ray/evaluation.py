"""Evaluation of generated samples: oracle labels, fidelity, class histograms and sample grids."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def image_grid(images: np.ndarray | torch.Tensor, rows: int, scale: int = 4) -> Image.Image:
    """Tile (rows*cols, 1, H, W) images in [-1, 1] into one grayscale PIL image, row-major."""
    array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else images
    count, _, height, width = array.shape
    cols = count // rows
    if rows * cols != count:
        raise ValueError(f"{count} images do not fill a grid of {rows} rows")
    pixels = np.clip((array[:, 0] + 1) * 127.5, 0, 255).round().astype(np.uint8)
    pad = 1
    canvas = np.full((rows * (height + pad) + pad, cols * (width + pad) + pad), 255, np.uint8)
    for index, tile in enumerate(pixels):
        r, c = divmod(index, cols)
        top, left = pad + r * (height + pad), pad + c * (width + pad)
        canvas[top:top + height, left:left + width] = tile
    grid = Image.fromarray(canvas, mode="L")
    return grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)


def save_grid(images: np.ndarray | torch.Tensor, rows: int, path: str | Path) -> Path:
    """Write `image_grid` as a PNG (parent directories created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, rows).save(path)
    return path


def class_histogram(labels: np.ndarray, num_classes: int) -> list[float]:
    """Fraction of `labels` in each class 0..num_classes-1."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    return (counts / max(1, counts.sum())).round(4).tolist()


def generate(model, contexts: torch.Tensor | None, labels: dict[str, torch.Tensor],
             seeds: Sequence[int], *, num_inference_steps: int = 50, eta: float = 1.0,
             from_reference: bool = False, batch_size: int = 256,
             compute_kl: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sample one image per row of (contexts, labels, seeds); each row depends only on its own
    seed, so a sample is reproducible alone or in any batch.

    Returns the images (N, C, H, W) and, when `compute_kl`, each path's KL to the reference.
    """
    from ctrl_ray.sampling.sampler import RolloutInputs, sample

    shape = tuple(model.sample_shape)
    initial, steps = [], []
    for seed in seeds:
        generator = torch.Generator().manual_seed(int(seed))
        initial.append(torch.randn(shape, generator=generator))
        steps.append(torch.randn((num_inference_steps, *shape), generator=generator))
    inputs = RolloutInputs(labels=dict(labels), contexts=contexts,
                           initial_noise=torch.stack(initial), step_noise=torch.stack(steps, 1))
    images, kls = [], []
    for start in range(0, len(initial), batch_size):
        trajectory = sample(model, inputs.slice(start, start + batch_size), eta=eta,
                            compute_kl=compute_kl, from_reference=from_reference)
        images.append(trajectory.x0.cpu())
        if compute_kl:
            kls.append(trajectory.path_kl.cpu())
    return torch.cat(images), (torch.cat(kls) if compute_kl else None)
