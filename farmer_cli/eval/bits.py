"""Likelihood scoring: the exact bits/dim of images under a model (``score``, ``evaluate``, ``ood``, training), where
the bits go (per patch), and what a lossless coder driven by the model would need against PNG."""

from __future__ import annotations

import io
import math

import torch
from PIL import Image

from farmer_cli.data.batching import iterate_batches
from farmer_cli.data.dataset import ImageDataset
from farmer_cli.model import dequantize


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


@torch.no_grad()
def patch_bits(model, u: torch.Tensor, y: torch.Tensor | None, draws: int,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 (B, C, H, W) -> bits of each patch (B, H/p, W/p), averaged over ``draws`` uniform dequantisations
    (see ``Farmer.patch_bits``); summed over patches it is the image's NLL in bits."""
    B, p = u.shape[0], model.cfg.patch_size
    device = next(model.parameters()).device
    x = dequantize(u.repeat(draws, 1, 1, 1), "uniform", generator=generator).to(device)
    labels = None if y is None else y.repeat(draws).to(device)
    bits = model.patch_bits(x, labels)["bits"].float().view(draws, B, -1).mean(0).cpu()
    return bits.view(B, u.shape[-2] // p, u.shape[-1] // p)


def png_bytes(u: torch.Tensor) -> int:
    """Size of the PNG (best compression) of one uint8 (C, H, W) image: the generic lossless coder a model's
    bits/dim is compared with (and the complexity estimate of the OOD score)."""
    arr = u.permute(1, 2, 0).squeeze(-1).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(arr).save(buffer, format="PNG", optimize=True)
    return buffer.tell()


def model_bytes(bits_per_dim: float, dims: int) -> float:
    """What an entropy coder driven by the model would need for an image: bits/dim x D / 8 bytes (the bits/dim is
    on the 8-bit scale, so this is the length of a lossless code of the pixels, up to a few bytes of overhead)."""
    return bits_per_dim * dims / 8.0
