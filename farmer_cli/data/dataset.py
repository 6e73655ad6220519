"""Data sets: a source's examples as (uint8 (C, S, S) tensor, class index), with a fixed held-out test split.

Every image is decoded by :mod:`farmer_cli.data.images`. A file that cannot be decoded is skipped with one warning
line; batches report how many were skipped so the trainer can print a total.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from farmer_cli.config.schema import DataConfig
from farmer_cli.data.images import IMAGE_ERRORS, to_uint8
from farmer_cli.storage import within
from farmer_cli.data.sources import (DataError, Source, Unlabelled, canonical_source, digest, first_images,
                                     open_source, shared_images)

log = logging.getLogger("farmer")


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
        index, item = self.indices[k], None
        try:
            item, label = self.source.get(index)  # a dataset row decodes its image here
            return to_uint8(item, self.channels, self.size), label
        except IMAGE_ERRORS as err:
            if k not in self.warned:
                self.warned.add(k)
                where = item if isinstance(item, (str, Path)) else f"row {index} of {self.source.name}"
                log.warning("skipping unreadable image %s: %s", where, err)
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
        both = [self.train.source] + ([self.test.source] if self.test.source is not self.train.source else [])
        layout = {"train": len(self.train), "test": len(self.test),
                  "digest": digest([self.class_names, *[s.layout() for s in both], self.train.indices,
                                    self.test.indices])}
        sizes, contents = [s.sizes() for s in both], [s.contents() for s in both]
        if any(sizes):  # image files: their sizes, and each class's first file's bytes, too
            layout |= {"sizes": digest(sizes), "contents": digest(contents),
                       "first_images": sorted(first_images(self.train.source))}  # what a copy would share
        return layout


LATER_LAYOUT_KEYS = ("sizes", "contents", "first_images")  # what runs of earlier releases may not have recorded


def layout_change(recorded, now: dict) -> str:
    """How the data ``now`` (:attr:`DataBundle.layout`) differs from the layout a run ``recorded`` in its
    config.json: "" when it is the same (or nothing was recorded), else e.g. "1617 train / 180 test images then,
    898 / 898 now"."""
    if not isinstance(recorded, dict) or \
            recorded == {k: v for k, v in now.items() if k in recorded or k not in LATER_LAYOUT_KEYS}:
        return ""  # runs of earlier releases recorded no file sizes, contents or first images
    counts = (recorded.get("train"), recorded.get("test"))
    if not all(isinstance(c, int) for c in counts):
        return "the recorded layout is not one farmer wrote: config.json was edited"
    if counts == (now["train"], now["test"]) and recorded.get("digest") == now["digest"]:
        return "the same file names, but other file sizes or contents: images replaced, or class folders swapped"
    return (f"{counts[0]} train / {counts[1]} test images then, {now['train']} / {now['test']} now"
            + (", or other files or split" if counts == (now["train"], now["test"]) else ""))


def relation_to_training(trained: DataConfig, now: DataConfig) -> str:
    """How the test split of the data settings ``now`` relates to the images a run trained with ``trained`` learned
    from (sources compared by :func:`canonical_source`):

    * ``"own"``: the run's own data, split its way: the run's test split while the data are unchanged (compare
      :attr:`DataBundle.layout` with the recorded one, :func:`layout_change`);
    * ``"resplit"``: the run's own data split another way (``split_seed``, ``test_fraction``): training images in
      the test split;
    * ``"training"``: a test split cut from, or made of, a folder the run trained on whole;
    * ``"other"``: images the run did not train on."""
    def same(a: str, b: str) -> bool:
        return bool(a) and canonical_source(a) == canonical_source(b)

    if now.test_source:
        if same(now.test_source, trained.source):
            return "training"
        return "own" if same(now.source, trained.source) and same(now.test_source, trained.test_source) else "other"
    if not same(now.source, trained.source):
        return "other"
    if trained.test_source:
        return "training"
    return "own" if (now.split_seed, now.test_fraction) == (trained.split_seed, trained.test_fraction) else "resplit"


PROBE_IMAGES = 16  # images per split decoded by load_data to make sure the data can be read at all


def check_readable(dataset: ImageDataset, split: str, probes: int = PROBE_IMAGES) -> None:
    """DataError when none of up to ``probes`` images spread evenly over ``dataset`` can be decoded (all of them in
    a small data set): a folder of unreadable files is refused in one line before any work, instead of training
    on empty batches. Stops at the first readable image, so a good data set costs one decode."""
    n = len(dataset)
    picks = sorted({k * n // min(n, probes) for k in range(min(n, probes))})
    first = None
    for k in picks:
        item, _ = dataset.source.get(dataset.indices[k])
        try:
            to_uint8(item, dataset.channels, dataset.size)
            return
        except IMAGE_ERRORS as err:
            first = first or f"{item if isinstance(item, (str, os.PathLike)) else f'image {k}'}: {err}"
    if picks:
        which = f"none of its {n} {split} images" if len(picks) == n else \
            f"none of {len(picks)} {split} images spread over its {n}"
        raise DataError(f"data source {dataset.source.name}: {which} can be read (e.g. {first}); replace or remove "
                        "the unreadable files, or choose another --data")


def load_data(cfg: DataConfig, channels: int, size: int) -> DataBundle:
    """Open the source and split it: with ``cfg.test_source`` (an official validation set) every training image of
    the source trains and the test split is all of ``test_source``; else the source's own train/test splits when it
    has them, else a fixed seeded hold-out of ``cfg.test_fraction`` (the same for every run with the same
    ``split_seed``). DataError when a split holds images none of which can be read (:func:`check_readable`)."""
    source = test_source = open_source(cfg) if cfg.use_labels else Unlabelled(open_source(cfg))
    if cfg.test_source:
        test_source = _open_test_source(cfg, source)
        train_idx = source.splits[0] if source.splits is not None else list(range(source.length))
        # a data set with its own splits (a DatasetDict with train and test) tests on its test split only
        test_idx = test_source.splits[1] if test_source.splits is not None else list(range(test_source.length))
    elif source.splits is not None:
        train_idx, test_idx = source.splits
    else:
        order = torch.randperm(source.length, generator=torch.Generator().manual_seed(cfg.split_seed)).tolist()
        n_test = max(1, int(round(source.length * cfg.test_fraction))) if source.length > 1 else 0
        if n_test >= source.length > 1:
            raise DataError(f"data.test_fraction={cfg.test_fraction:g} holds out all {source.length} images of "
                            f"{cfg.source}, leaving none to train on; lower it")
        # the test split in shuffled order: its first images (the subset training reports on) mix all classes
        test_idx, train_idx = order[:n_test], sorted(order[n_test:])
    bundle = DataBundle(ImageDataset(source, train_idx, channels, size),
                        ImageDataset(test_source, test_idx, channels, size), source.class_names)
    check_readable(bundle.train, "training")
    check_readable(bundle.test, "test")
    return bundle


def _open_test_source(cfg: DataConfig, source: Source) -> Source:
    """``cfg.test_source`` opened like the training source; its classes must be the training source's (a label is
    an index into one list), unless labels are not used. It must not be the training source itself (the test
    figures would be training figures)."""
    same = cfg.test_source == cfg.source or (Path(cfg.test_source).exists() and Path(cfg.source).exists()
                                            and Path(cfg.test_source).resolve() == Path(cfg.source).resolve())
    if same:
        raise DataError(f"data.test_source {cfg.test_source} is the training data (data.source {cfg.source}): its "
                        "bits/dim would be measured on training images; give the official test or validation set, "
                        "or leave it out to hold out part of the data")
    test_path, train_path = Path(cfg.test_source).expanduser(), Path(cfg.source).expanduser()
    if test_path.exists() and train_path.exists() and (within(test_path, train_path) or within(train_path, test_path)):
        raise DataError(f"data.test_source {cfg.test_source} and data.source {cfg.source}: one is, or lies inside, "
                        "the other, so the test images would include training images; give a separate test set")
    test = open_source(dataclasses.replace(cfg, source=cfg.test_source))
    shared = shared_images(source, test)
    if shared:
        raise DataError(f"data.test_source {cfg.test_source} holds training images of data.source {cfg.source} "
                        f"({shared}): its bits/dim would be measured on training images; give a separate test set")
    if not cfg.use_labels:
        return Unlabelled(test)
    if test.class_names != source.class_names:
        differ = sorted(set(test.class_names) ^ set(source.class_names))[:3]
        raise DataError(f"data.test_source {cfg.test_source}: its {len(test.class_names)} classes are not the "
                        f"{len(source.class_names)} of data.source {cfg.source} (e.g. {', '.join(differ) or 'order'}); "
                        "give a test set with the same class folders, or set data.use_labels=false")
    return test
