"""Batches: the example order of training (seeded, sharded over processes, resumable at any step) and plain
in-order batches for evaluation."""

from __future__ import annotations

import os
from typing import Iterator

import torch

from farmer_cli.data.dataset import ImageDataset, collate
from farmer_cli.data.sources import DataError


def iterate_batches(dataset: ImageDataset, batch: int, limit: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The readable ones of the first ``limit`` examples (0: all) in order, as (uint8 (b, C, S, S), labels (b,))
    batches; a batch none of whose images could be read is left out (never an empty batch)."""
    n = len(dataset) if limit <= 0 else min(limit, len(dataset))
    subset = torch.utils.data.Subset(dataset, range(n))
    for u, y, _ in torch.utils.data.DataLoader(subset, batch_size=batch, collate_fn=collate):
        if len(u):
            yield u, y


def first_readable(dataset: ImageDataset) -> torch.Tensor | None:
    """The first image of ``dataset`` that can be read, uint8 (C, S, S); None where there is none."""
    for u, _ in iterate_batches(dataset, 1):
        return u[0]
    return None


def batch_indices(n: int, batch: int, world: int, rank: int, seed: int, start_step: int) -> Iterator[list[int]]:
    """Index lists for this process from global step ``start_step`` on, forever.

    Epoch e shuffles with seed (seed, e); a global batch is ``batch x world`` examples, rank r takes slice r."""
    global_batch = batch * world
    per_epoch = max(1, n // global_batch)
    step = start_step
    while True:
        epoch, offset = divmod(step, per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
        if n < global_batch:  # tiny data sets: repeat the permutation to fill one batch
            perm = (perm * (global_batch // n + 1))[:global_batch]
        for b in range(offset, per_epoch):
            chunk = perm[b * global_batch : (b + 1) * global_batch]
            yield chunk[rank * batch : (rank + 1) * batch]
            step += 1


class TrainingLoader(torch.utils.data.DataLoader):
    """A DataLoader whose batches always hold an image: one whose every image is unreadable is a DataError naming
    the data source (a training step cannot run on no images, and skipping it would shift the batch order that
    resuming relies on)."""

    def __iter__(self):
        return self._checked(super().__iter__())  # the loader's own iterator starts here, as a plain DataLoader's

    def _checked(self, batches):
        for batch in batches:
            if not len(batch[0]):
                raise DataError(f"data source {self.dataset.source.name}: none of the {batch[2]} images of a "
                                "training batch could be read (the warnings above name them); replace or remove "
                                "the unreadable files, or use a larger --batch-size")
            yield batch


def make_loader(dataset: ImageDataset, batch: int, world: int, rank: int, seed: int, start_step: int, workers: int,
                pin_memory: bool = False):
    """A DataLoader yielding (uint8 images, labels, skipped count) batches in :func:`batch_indices` order, with at
    most one worker per CPU core this process may use; ``pin_memory`` (for a CUDA device) makes batches in
    page-locked memory, so ``.to(device, non_blocking=True)`` copies them without stopping the host. A batch of
    unreadable images only is a DataError (:class:`TrainingLoader`)."""
    workers = min(workers, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    return TrainingLoader(
        dataset, batch_sampler=batch_indices(len(dataset), batch, world, rank, seed, start_step),
        collate_fn=collate, num_workers=workers, persistent_workers=workers > 0, pin_memory=pin_memory,
    )
