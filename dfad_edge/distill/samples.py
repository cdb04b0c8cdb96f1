"""A grid of synthetic images, de-normalised, each labelled with the teacher's predicted class."""

from __future__ import annotations

import io
import math
from pathlib import Path

import torch

from ..io import atomic_write_bytes

TILE = 64
LABEL_HEIGHT = 12


def save_sample_grid(images: torch.Tensor, mean: list[float], std: list[float], labels: list[str], path: Path) -> None:
    from PIL import Image, ImageDraw

    mean_t = torch.tensor(mean).view(1, -1, 1, 1)
    std_t = torch.tensor(std).view(1, -1, 1, 1)
    pixels = (images.float().cpu() * std_t + mean_t).clamp(0, 1)
    pixels = torch.nn.functional.interpolate(pixels, size=(TILE, TILE), mode="nearest")
    columns = math.ceil(math.sqrt(len(pixels)))
    rows = math.ceil(len(pixels) / columns)
    grid = Image.new("RGB", (columns * TILE, rows * (TILE + LABEL_HEIGHT)), "white")
    draw = ImageDraw.Draw(grid)
    for index, (tile, label) in enumerate(zip(pixels, labels)):
        array = (tile.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        tile_image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).convert("RGB")
        x, y = (index % columns) * TILE, (index // columns) * (TILE + LABEL_HEIGHT)
        grid.paste(tile_image, (x, y))
        draw.text((x + 2, y + TILE), label[:10], fill="black")
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
