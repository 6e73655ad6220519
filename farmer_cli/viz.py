"""Pictures: image grids and labelled figures (PIL only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def grid(images: torch.Tensor, ncol: int, pad: int = 2, scale: int = 1, background: int = 255) -> Image.Image:
    """uint8 (B, C, H, W) -> one PIL image with ``ncol`` columns (row-major), ``pad`` pixels between cells,
    each cell enlarged ``scale`` times (nearest neighbour)."""
    B, C, H, W = images.shape
    rows = -(-B // ncol)
    h, w = H * scale, W * scale
    canvas = np.full((rows * (h + pad) + pad, ncol * (w + pad) + pad, 3), background, dtype=np.uint8)
    arr = images.permute(0, 2, 3, 1).cpu().numpy()
    if C == 1:
        arr = np.repeat(arr, 3, axis=-1)
    arr = arr.repeat(scale, axis=1).repeat(scale, axis=2)
    for i in range(B):
        r, c = divmod(i, ncol)
        canvas[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = arr[i]
    return Image.fromarray(canvas)


def labelled_figure(panel: Image.Image, title: str, row_labels: list[str], col_labels: list[str],
                    cell: tuple[int, int], pad: int = 2, top: int = 36) -> Image.Image:
    """Add a title, row labels (left) and column labels (top) around a grid made by :func:`grid`."""
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = max([int(measure.textlength(r, font=font)) for r in row_labels] + [0]) + 12
    title_width = int(measure.textlength(title, font=font)) + 8
    out = Image.new("RGB", (max(panel.width + left, title_width), panel.height + top + 6), "white")
    out.paste(panel, (left, top))
    draw = ImageDraw.Draw(out)
    draw.text((4, 2), title, fill="black", font=font)
    ch, cw = cell
    for r, label in enumerate(row_labels):
        draw.text((4, top + pad + r * (ch + pad) + ch // 2 - 5), label, fill="black", font=font)
    for c, label in enumerate(col_labels):
        draw.text((left + pad + c * (cw + pad), top - 14), label, fill="black", font=font)
    return out


def save_png(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
