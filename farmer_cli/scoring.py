"""Likelihood scoring: the exact bits/dim of images under a model, used by ``score``, ``evaluate`` and training."""

from __future__ import annotations

import math

import torch

from .data import ImageDataset, iterate_batches
from .model import dequantize


@torch.no_grad()
def score_batch(model, u: torch.Tensor, y: torch.Tensor | None, draws: int,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (B, C, H, W) -> mean over ``draws`` uniform dequantisations of (NLL nats, bits/dim), each (B,) on the CPU.

    The draws run as one batch of B·draws images; noise is drawn on the CPU from ``generator`` (reproducible on any
    device) and moved to the model's device."""
    B = u.shape[0]
    device = next(model.parameters()).device
    x = dequantize(u.repeat(draws, 1, 1, 1), "uniform", generator=generator).to(device)
    labels = None if y is None else y.repeat(draws).to(device)
    out = model.nll_continuous(x, labels)
    return out["nll"].float().view(draws, B).mean(0).cpu(), out["bpd"].float().view(draws, B).mean(0).cpu()


@torch.no_grad()
def bits_per_dim(model, dataset: ImageDataset, conditional: bool = True, draws: int = 1, batch: int = 64,
                 limit: int = 0, seed: int = 0) -> dict:
    """Mean and standard error of bits/dim over the first ``limit`` images of ``dataset`` (0: all), each averaged
    over ``draws`` dequantisations, with a fixed noise seed so figures compare across runs and checkpoints.
    ``conditional``: log p(x | true class); else the unconditional (null-class) likelihood."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    values = [score_batch(model, u, y if conditional else None, draws, gen)[1]
              for u, y in iterate_batches(dataset, batch, limit)]
    model.train(was_training)
    v = torch.cat(values).double() if values else torch.zeros(0, dtype=torch.float64)
    return {"mean": v.mean().item() if len(v) else math.nan,
            "stderr": (v.std() / math.sqrt(len(v))).item() if len(v) > 1 else math.nan, "n": len(v), "draws": draws}
