"""Likelihood scoring shared by ``farmer score`` and ``farmer evaluate``."""

from __future__ import annotations

import torch

from .model import dequantize


@torch.no_grad()
def score_batch(model, u: torch.Tensor, y: torch.Tensor | None, draws: int,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (B, C, H, W) -> mean over ``draws`` uniform dequantisations of (NLL nats, bits/dim), each (B,).

    The draws run as one batch of B·draws images."""
    B = u.shape[0]
    device = next(model.parameters()).device
    rep = u.repeat(draws, 1, 1, 1)
    x = dequantize(rep, "uniform", generator=generator).to(device)
    labels = None if y is None else y.repeat(draws).to(device)
    out = model.nll_continuous(x, labels)
    return out["nll"].view(draws, B).mean(0).cpu(), out["bpd"].view(draws, B).mean(0).cpu()
