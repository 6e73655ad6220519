"""Batches: the example order of training (seeded, sharded over processes, resumable at any step) and plain
in-order batches for evaluation."""

from __future__ import annotations

import os
from typing import Iterator

import torch

from farmer_cli.data.dataset import ImageDataset, collate


def iterate_batches(dataset: ImageDataset, batch: int, limit: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``limit`` examples (0: all) in order, as (uint8 (b, C, S, S), labels (b,)) batches."""
    n = len(dataset) if limit <= 0 else min(limit, len(dataset))
    subset = torch.utils.data.Subset(dataset, range(n))
    for u, y, _ in torch.utils.data.DataLoader(subset, batch_size=batch, collate_fn=collate):
        yield u, y


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


def make_loader(dataset: ImageDataset, batch: int, world: int, rank: int, seed: int, start_step: int, workers: int,
                pin_memory: bool = False):
    """A DataLoader yielding (uint8 images, labels, skipped count) batches in :func:`batch_indices` order, with at
    most one worker per CPU core this process may use; ``pin_memory`` (for a CUDA device) makes batches in
    page-locked memory, so ``.to(device, non_blocking=True)`` copies them without stopping the host."""
    workers = min(workers, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batch_indices(len(dataset), batch, world, rank, seed, start_step),
        collate_fn=collate, num_workers=workers, persistent_workers=workers > 0, pin_memory=pin_memory,
    )
