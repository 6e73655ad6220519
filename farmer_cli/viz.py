"""Pictures: image grids (torchvision) and labelled figures (PIL)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont


def grid(images: torch.Tensor, ncol: int, pad: int = 2, scale: int = 1, background: int = 255) -> Image.Image:
    """uint8 (B, C, H, W) -> one RGB PIL image with ``ncol`` columns (row-major), ``pad`` pixels between cells,
    each cell enlarged ``scale`` times (nearest neighbour)."""
    from torchvision.utils import make_grid

    cells = images.cpu()
    if scale > 1:
        cells = cells.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    if cells.shape[1] == 1:
        cells = cells.expand(-1, 3, -1, -1)
    if cells.shape[0] == 1:  # make_grid returns a lone image unpadded
        canvas = torch.nn.functional.pad(cells[0], (pad,) * 4, value=background)
    else:
        canvas = make_grid(cells, nrow=ncol, padding=pad, pad_value=background)
    return Image.fromarray(canvas.permute(1, 2, 0).contiguous().numpy())


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
