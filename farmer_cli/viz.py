"""Pictures: image grids (torchvision), labelled figures and per-patch bits maps (PIL)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
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


def class_grid_pixels(classes: int, per_class: int, size: int, scale: int, max_columns: int = 16,
                      pad: int = 2) -> int:
    """Pixels of the :func:`grid` of :func:`class_blocks` for ``classes`` x ``per_class`` images of ``size``² px
    enlarged ``scale`` times: known before any image is made."""
    cell, columns = size * scale + pad, min(per_class, max_columns)
    rows = classes * -(-per_class // max_columns)
    return (columns * cell + pad) * (rows * cell + pad)


def class_blocks(images: torch.Tensor, per_class: int, max_columns: int = 16,
                 background: int = 255) -> tuple[torch.Tensor, int]:
    """Images (K·n, C, H, W), class-major with n = ``per_class`` -> (cells, columns) for :func:`grid`: one row per
    class, or with n > ``max_columns`` a block of ceil(n / max_columns) rows per class, its last row filled with
    blank cells so every class starts a new row."""
    if per_class <= max_columns:
        return images, per_class
    rows = -(-per_class // max_columns)
    blank = images.new_full((rows * max_columns - per_class, *images.shape[1:]), background)
    return torch.cat([torch.cat([block, blank]) for block in images.split(per_class)]), max_columns


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
    """Write ``image`` in the format its suffix names, atomically (:func:`farmer_cli.storage.atomic_write`): a
    symbolic link at ``path`` is replaced, never written through, and a killed write leaves no half image."""
    from farmer_cli.storage import atomic_write

    kind = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    atomic_write(path, lambda tmp: image.save(tmp, format=kind))


INFERNO = np.array([(0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99), (212, 72, 66), (245, 125, 21),
                    (250, 193, 39), (252, 255, 164)], dtype=np.float64)  # anchors of matplotlib's "inferno"


def colormap(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """values (...) -> uint8 RGB (..., 3) on the inferno scale from ``low`` (dark) to ``high`` (bright)."""
    t = np.clip((values - low) / max(high - low, 1e-12), 0, 1) * (len(INFERNO) - 1)
    i = np.minimum(t.astype(int), len(INFERNO) - 2)
    frac = (t - i)[..., None]
    return (INFERNO[i] * (1 - frac) + INFERNO[i + 1] * frac).round().astype(np.uint8)


def bits_figure(image: torch.Tensor, bits_per_dim: np.ndarray, title: str, size: int = 256) -> Image.Image:
    """The image beside its per-patch bits/dim map, with a colour bar: uint8 (C, H, W) and (h, w) -> PIL image.

    Both panels are enlarged to at least ``size`` pixels (nearest neighbour, so patches stay sharp)."""
    C, H, W = image.shape
    scale = max(1, -(-size // max(H, W)))
    img = image.permute(1, 2, 0).cpu().numpy()
    img = np.repeat(img, 3, axis=-1) if C == 1 else img
    img = img.repeat(scale, 0).repeat(scale, 1)
    low, high = float(np.min(bits_per_dim)), float(np.max(bits_per_dim))
    heat = colormap(bits_per_dim, low, high)
    heat = heat.repeat(img.shape[0] // heat.shape[0], 0).repeat(img.shape[1] // heat.shape[1], 1)
    font = ImageFont.load_default()
    pad, top, bar_w = 10, 30, 16
    panel_h, panel_w = img.shape[0], img.shape[1]
    out = Image.new("RGB", (3 * pad + 2 * panel_w + bar_w + 70, top + panel_h + pad + 16), "white")
    draw = ImageDraw.Draw(out)
    draw.text((pad, 6), title, fill="black", font=font)
    out.paste(Image.fromarray(img), (pad, top))
    out.paste(Image.fromarray(heat), (2 * pad + panel_w, top))
    draw.text((pad, top + panel_h + 3), "image", fill="black", font=font)
    draw.text((2 * pad + panel_w, top + panel_h + 3), "bits/dim of each patch", fill="black", font=font)
    ramp = colormap(np.linspace(high, low, panel_h)[:, None].repeat(bar_w, 1), low, high)
    bar_x = 3 * pad + 2 * panel_w
    out.paste(Image.fromarray(ramp), (bar_x, top))
    for frac in (0.0, 0.5, 1.0):
        y = top + int(frac * (panel_h - 1))
        draw.line([(bar_x + bar_w, y), (bar_x + bar_w + 4, y)], fill="black")
        draw.text((bar_x + bar_w + 7, y - 6), f"{high - frac * (high - low):.2f}", fill="black", font=font)
    return out


def histogram_figure(values: dict[str, list[float]], title: str, bins: int = 40, size: tuple[int, int] = (520, 260)
                     ) -> Image.Image:
    """Overlaid histograms of named sets of numbers (e.g. {"in": [...], "out": [...]}) with a shared x axis."""
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44)]
    data = {k: np.asarray(v, dtype=np.float64) for k, v in values.items()}
    finite = np.concatenate([v[np.isfinite(v)] for v in data.values()])
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    high = high if high > low else low + 1.0
    edges = np.linspace(low, high, bins + 1)
    counts = {k: np.histogram(v[np.isfinite(v)], edges)[0] / max(1, np.isfinite(v).sum()) for k, v in data.items()}
    peak = max(float(c.max()) for c in counts.values()) or 1.0
    w, h = size
    left, right, top, bottom = 40, 10, 34, 30
    out = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(out, "RGBA")
    font = ImageFont.load_default()
    draw.text((left, 6), title, fill="black", font=font)
    plot_w, plot_h = w - left - right, h - top - bottom
    for (name, c), colour in zip(counts.items(), colours):
        for i, frac in enumerate(c):
            x0 = left + plot_w * i / bins
            x1 = left + plot_w * (i + 1) / bins
            draw.rectangle([x0, top + plot_h * (1 - frac / peak), x1, top + plot_h], fill=(*colour, 110))
    draw.line([(left, top + plot_h), (left + plot_w, top + plot_h)], fill="black")
    for frac in (0.0, 0.5, 1.0):
        x = left + plot_w * frac
        draw.text((x - 12, top + plot_h + 4), f"{low + frac * (high - low):.2f}", fill="black", font=font)
    for i, ((name, v), colour) in enumerate(zip(data.items(), colours)):
        draw.rectangle([w - 120, top + 4 + 14 * i, w - 110, top + 14 + 14 * i], fill=colour)
        draw.text((w - 104, top + 2 + 14 * i), f"{name} (n={len(v)})", fill="black", font=font)
    return out
