"""Sample grids as PNGs: tiles in rows and columns, each row and column named in a margin (the
target y and the context c a tile was drawn for), the names also stored as the PNG's text."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

PAD = 4            # pixels around a label
MAX_LINES = 3      # a column label wraps to at most this many lines under its column


def image_grid(images: np.ndarray | torch.Tensor, rows: int, scale: int = 4,
               row_labels: Sequence[str] | None = None,
               column_labels: Sequence[str] | None = None,
               title: str | None = None) -> Image.Image:
    """Tile (rows*cols, C, H, W) images in [-1, 1] into one PIL image, row-major: grayscale
    for C = 1, RGB for C = 3; `row_labels` go in a left margin, `column_labels` (wrapped to a
    column's width) and `title` in a top margin."""
    array = images.detach().cpu().float().numpy() if isinstance(images, torch.Tensor) else images
    count, channels, height, width = array.shape
    cols = count // rows
    if rows * cols != count:
        raise ValueError(f"{count} images do not fill a grid of {rows} rows")
    for given, expected, what in ((row_labels, rows, "row"), (column_labels, cols, "column")):
        if given is not None and len(given) != expected:
            raise ValueError(f"{len(given)} {what} labels for {expected} {what}s")
    rgb = channels == 3
    pixels = np.clip((array[:, :3 if rgb else 1] + 1) * 127.5, 0, 255).round().astype(np.uint8)
    pixels = pixels.transpose(0, 2, 3, 1)  # (N, H, W, C)
    pad = 1
    canvas = np.full((rows * (height + pad) + pad, cols * (width + pad) + pad, pixels.shape[-1]),
                     255, np.uint8)
    for index, tile in enumerate(pixels):
        r, c = divmod(index, cols)
        top, left = pad + r * (height + pad), pad + c * (width + pad)
        canvas[top:top + height, left:left + width] = tile
    grid = Image.fromarray(canvas if rgb else canvas[..., 0], mode="RGB" if rgb else "L")
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    if row_labels is None and column_labels is None and title is None:
        return grid
    return _with_margins(grid, rows, cols, list(row_labels or []), list(column_labels or []),
                         title)


def _with_margins(grid: Image.Image, rows: int, cols: int, row_labels: list[str],
                  column_labels: list[str], title: str | None) -> Image.Image:
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(grid)
    line_height = int(measure.textbbox((0, 0), "Ag", font=font)[3]) + 2
    cell_width, cell_height = grid.width / cols, grid.height / rows
    wrapped = [_wrap(label, cell_width - 2, measure, font) for label in column_labels]
    left = max((int(measure.textlength(label, font=font)) for label in row_labels),
               default=0) + (2 * PAD if row_labels else 0)
    title_height = line_height + PAD if title else 0
    columns_height = (max(map(len, wrapped)) * line_height + PAD) if wrapped else 0
    top = title_height + columns_height
    width = left + grid.width
    if title:
        width = max(width, int(measure.textlength(title, font=font)) + 2 * PAD)
    white = (255, 255, 255) if grid.mode == "RGB" else 255
    black = (0, 0, 0) if grid.mode == "RGB" else 0
    labelled = Image.new(grid.mode, (width, top + grid.height), white)
    labelled.paste(grid, (left, top))
    draw = ImageDraw.Draw(labelled)
    if title:
        draw.text((PAD, PAD // 2), title, fill=black, font=font)
    for index, lines in enumerate(wrapped):
        for line_index, line in enumerate(lines):
            x = left + index * cell_width + (cell_width - measure.textlength(line, font=font)) / 2
            draw.text((x, title_height + line_index * line_height), line, fill=black, font=font)
    for index, label in enumerate(row_labels):
        y = top + index * cell_height + (cell_height - line_height) / 2
        draw.text((PAD, y), label, fill=black, font=font)
    return labelled


def _wrap(text: str, width: float, draw: ImageDraw.ImageDraw, font) -> list[str]:
    """`text` in lines no wider than `width` (words kept whole where they fit), at most
    MAX_LINES, the last one cut with '...' if the text does not fit."""
    lines: list[str] = []
    for word in str(text).split() or [""]:
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
            continue
        while draw.textlength(word, font=font) > width and len(word) > 1:
            cut = len(word) - 1
            while cut > 1 and draw.textlength(word[:cut], font=font) > width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    if len(lines) > MAX_LINES:
        last = lines[MAX_LINES - 1]
        while last and draw.textlength(last + "...", font=font) > width:
            last = last[:-1]
        lines = lines[:MAX_LINES - 1] + [last + "..."]
    return lines


def save_grid(images: np.ndarray | torch.Tensor, rows: int, path: str | Path,
              row_labels: Sequence[str] | None = None,
              column_labels: Sequence[str] | None = None, title: str | None = None) -> Path:
    """Write `image_grid` as a PNG (parent directories created), its labels also as the PNG's
    text entries `rows`, `columns` (JSON lists) and `title`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = PngInfo()
    for key, value in (("rows", row_labels), ("columns", column_labels)):
        if value is not None:
            text.add_text(key, json.dumps(list(value)))
    if title:
        text.add_text("title", title)
    image_grid(images, rows, row_labels=row_labels, column_labels=column_labels,
               title=title).save(path, pnginfo=text)
    return path


def grid_labels(path: str | Path) -> dict[str, list[str] | str]:
    """The labels `save_grid` stored in a PNG: `rows`, `columns` (lists) and `title`."""
    with Image.open(path) as image:
        text = dict(image.text)
    return {key: json.loads(value) if key in ("rows", "columns") else value
            for key, value in text.items() if key in ("rows", "columns", "title")}
