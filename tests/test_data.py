"""Decoding images as they are meant (farmer_cli/data.py): real bit depth, EXIF orientation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from farmer_cli.data import load_image


def test_16_bit_grey_is_scaled_not_clipped(tmp_path: Path):
    values = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)  # 0 .. 63,000
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I;16")
    u, size = load_image(tmp_path / "g16.png", 1, 8)
    assert size == (8, 8)
    np.testing.assert_array_equal(u[0].numpy(), (values >> 8).astype(np.uint8))  # PIL alone clips at 255


def test_exif_orientation_is_applied(tmp_path: Path):
    pixels = np.zeros((4, 8, 3), np.uint8)
    pixels[:, :4] = 255  # left half white, stored landscape
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    img.save(tmp_path / "o.png", exif=exif)
    u, size = load_image(tmp_path / "o.png", 3, 4)
    assert size == (4, 8)  # shown portrait
    shown = np.asarray(Image.open(tmp_path / "o.png").transpose(Image.Transpose.ROTATE_270))
    assert shown.shape[:2] == (8, 4) and shown[0, 0, 0] == 255  # white ends up on top
    assert u[0, 0, :].float().mean() > 200 and u[0, -1, :].float().mean() < 50  # top white, bottom black
