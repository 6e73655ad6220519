"""Image files and decoded images -> uint8 (C, S, S) tensors at the model's resolution.

Every image is converted to the model's channel count (16-bit grey scaled, EXIF orientation applied), resized
(shorter side, bicubic) and centre-cropped. :data:`IMAGE_ERRORS` is what an undecodable file raises.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from farmer_cli.data.folder_index import IMAGE_SUFFIXES
from farmer_cli.data.sources import DataError

# What a bad image file raises: truncated or unknown formats, and PIL's decompression-bomb guard (a tiny file that
# claims 20000x20000 pixels).
IMAGE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


MAX_RESIZED = 64  # an image is resized whole only while that makes at most 64 x size² pixels


def _eight_bit(img: Image.Image) -> Image.Image:
    """A 16- or 32-bit integer grey image scaled to 8 bits (PIL's own conversion clips every value above 255);
    other modes as they are. 16-bit files keep their high byte; 32-bit ones ("I") are read as 16-bit data when any
    value exceeds 255."""
    if not img.mode.startswith("I"):
        return img
    arr = np.asarray(img).astype(np.int64)
    if img.mode.startswith("I;16") or (arr.size and arr.max() > 255):
        arr = arr >> 8
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))  # a 2-D uint8 array is mode "L"


def to_uint8(item, channels: int, size: int) -> torch.Tensor:
    """PIL image / path / uint8 (C,H,W) tensor -> uint8 (channels, size, size): convert, resize, centre-crop."""
    if isinstance(item, torch.Tensor) and item.shape[-1] == size and item.shape[-2] == size and item.shape[0] == channels:
        return item
    if isinstance(item, torch.Tensor):
        item = Image.fromarray(item.squeeze(0).numpy() if item.shape[0] == 1 else item.permute(1, 2, 0).numpy())
    elif not isinstance(item, Image.Image):
        item = Image.open(item)
    img = _eight_bit(ImageOps.exif_transpose(item)).convert("L" if channels == 1 else "RGB")
    w, h = img.size
    scale = size / min(w, h)
    if (w * scale) * (h * scale) > MAX_RESIZED * size * size:  # a sliver (1 x 60,000,000): crop to its centre first
        side = min(w, h)
        img = img.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
        w, h = img.size
    if scale != 1:
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    arr = np.asarray(img, dtype=np.uint8)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(arr.copy())


def image_files(paths: list[Path]) -> list[Path]:
    """Files and directories (every image file inside, recursively, sorted) -> image files; DataError naming a
    path that does not exist or a directory without images."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DataError(f"{p}: directory holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            files += found
        elif not p.exists():
            raise DataError(f"{p}: no such file or directory")
        else:
            files.append(p)
    return files


def load_image(path: str | Path, channels: int, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """One file -> (uint8 (C, S, S), its original (width, height)); raises DataError naming the file when it is
    missing or not an image."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    try:
        with Image.open(p) as img:
            img.load()
            upright = ImageOps.exif_transpose(img)  # the size as the image is shown
            return to_uint8(upright, channels, size), upright.size
    except IMAGE_ERRORS as err:
        raise DataError(f"{p}: not a readable image ({err})") from None
