"""A synthetic ImageNet-style folder for GPU smoke tests and CPU rehearsals: one smooth random 256x256 RGB image per
class folder (class-0000/0.png, ...), the same on every machine (seeded); existing images are kept.

    python bench/synthetic_folder.py DIR CLASSES
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image


def main() -> None:
    root, classes = Path(sys.argv[1]), int(sys.argv[2])
    rng = np.random.default_rng(0)
    for k in range(classes):
        folder = root / f"class-{k:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)  # drawn for every class: image k is fixed
        if not (folder / "0.png").exists():
            Image.fromarray(small).resize((256, 256), Image.Resampling.BICUBIC).save(folder / "0.png")


if __name__ == "__main__":
    main()
