"""Image files and decoded images -> uint8 (C, S, S) tensors at the model's resolution.

Every image is converted to the model's channel count (16-bit grey scaled to 8 bits, floating-point images in
[0, 1] or 0..255 scaled, transparency composited onto black, EXIF orientation applied), resized (shorter side,
bicubic) and centre-cropped. Images of more than PIL's limit of pixels (about 89 million) are refused: they would
take gigabytes to decode. :data:`IMAGE_ERRORS` is what an undecodable file raises.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from farmer_cli.data.folder_index import IMAGE_SUFFIXES, passed_over
from farmer_cli.data.sources import DataError

log = logging.getLogger("farmer")

# What a bad image file raises: truncated or unknown formats, and PIL's decompression-bomb guard (a small file that
# claims more pixels than Image.MAX_IMAGE_PIXELS; PIL only warns up to twice that, farmer refuses).
IMAGE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError,
                Image.DecompressionBombWarning)


MAX_RESIZED = 64  # an image is resized whole only while that makes at most 64 x size² pixels


def open_image(path: str | Path) -> Image.Image:
    """``Image.open`` with PIL's decompression-bomb warning raised as an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(path)


def _eight_bit(img: Image.Image) -> Image.Image:
    """An image as 8-bit data PIL can convert: a 16- or 32-bit integer grey image scaled to 8 bits (PIL's own
    conversion clips every value above 255: 16-bit files keep their high byte, 32-bit ones ("I") are read as
    16-bit data when any value exceeds 255); a floating-point one ("F") scaled from [0, 1], or read as 0..255 when
    a value exceeds 1 (ValueError outside 0..255); transparency composited onto black (a transparent pixel gives
    no light); other modes as they are."""
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        low, high = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if not (np.isfinite(low) and np.isfinite(high) and low >= 0 and high <= 255):
            raise ValueError(f"a floating-point image with values from {low:g} to {high:g}; farmer reads float "
                             "images in [0, 1] or 0..255")
        return Image.fromarray(np.round(arr * (255 if high <= 1 else 1)).astype(np.uint8))
    if img.mode.startswith("I"):
        arr = np.asarray(img).astype(np.int64)
        if img.mode.startswith("I;16") or (arr.size and arr.max() > 255):
            arr = arr >> 8
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))  # a 2-D uint8 array is mode "L"
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
    return img


def to_uint8(item, channels: int, size: int) -> torch.Tensor:
    """PIL image / path / uint8 (C,H,W) tensor -> uint8 (channels, size, size): convert, resize, centre-crop."""
    if isinstance(item, torch.Tensor) and item.shape[-1] == size and item.shape[-2] == size and item.shape[0] == channels:
        return item
    if isinstance(item, torch.Tensor):
        item = Image.fromarray(item.squeeze(0).numpy() if item.shape[0] == 1 else item.permute(1, 2, 0).numpy())
    elif not isinstance(item, Image.Image):
        item = open_image(item)
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
    path that does not exist, a directory without images, or a file that the arguments name twice (the same path
    twice, a file inside a folder also given, nested folders; paths made absolute, links not followed)."""
    files: list[Path] = []
    seen: dict[str, Path] = {}  # absolute path -> the file as listed
    for p in map(Path, paths):
        top = os.path.abspath(p)
        inside = top.rstrip(os.sep) + os.sep
        twice = seen.get(top) or (next((f for path, f in seen.items() if path.startswith(inside)), None)
                                  if p.is_dir() else None)
        if twice is not None:
            raise DataError(f"{p}: {twice} is given twice (the same file twice, or a file inside a folder also "
                            "given); each image is read once: drop the repeat")
        if p.is_dir():
            found = _folder_images(p)
            if not found:
                raise DataError(f"{p}: directory holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        elif not p.exists():
            raise DataError(f"{p}: no such file or directory")
        else:
            found = [p]
        files += found
        seen.update((os.path.abspath(f), f) for f in found)
    return files


def _folder_images(top: Path) -> list[Path]:
    """Every image name below ``top`` (sorted; hidden files and folders aside). An image name that is no regular
    file (a broken link, a FIFO) is kept, so that reading it names it; a linked folder is not entered, with a
    warning naming it (:func:`farmer_cli.data.folder_index.passed_over`)."""
    found, linked = [], []
    for here, subfolders, files in os.walk(top):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        linked += [path for path, _ in passed_over(here, subfolders, [])]  # no files given: the linked folders
        found += [Path(here, f) for f in files if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES]
    if linked:
        log.warning("%s: %d linked folder(s) below it not entered: %s%s; give the linked folder itself, or copy the "
                    "images", top, len(linked), ", ".join(linked[:3]), ", ..." if len(linked) > 3 else "")
    return sorted(found)


def _broken_link(path: Path) -> str:
    """Why a symbolic link leads to no file: a loop of links, or a missing target."""
    import errno

    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "a loop of symbolic links; remove it"
    return "a link to a missing file; remove it or restore its target"


def load_image(path: str | Path, channels: int, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """One file -> (uint8 (C, S, S), its original (width, height)); raises DataError naming the file when it is
    missing or not an image."""
    p = Path(path)
    if p.is_dir():
        raise DataError(f"{p} is a folder; give one image file")
    if not p.is_file():
        raise DataError(f"{p}: " + ("not a regular file (a device, FIFO or socket); give an image file" if p.exists()
                                    else _broken_link(p) if p.is_symlink() else "no such file"))
    try:
        with open_image(p) as img:
            img.load()
            upright = ImageOps.exif_transpose(img)  # the size as the image is shown
            return to_uint8(upright, channels, size), upright.size
    except IMAGE_ERRORS as err:
        raise DataError(f"{p}: not a readable image ({err})") from None
