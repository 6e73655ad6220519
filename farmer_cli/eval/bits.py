"""Likelihood scoring: the exact bits/dim of images under a model (``score``, ``evaluate``, ``ood``, training), where
the bits go (per patch), and what a lossless coder driven by the model would need against PNG."""

from __future__ import annotations

import io
import math
from typing import Iterator

import torch
from PIL import Image

from farmer_cli.data.batching import iterate_batches
from farmer_cli.data.dataset import ImageDataset
from farmer_cli.model import check_finite, dequantize


IMAGES_PER_PASS = 1024  # the draws of a batch run in forward passes of at most this many images (or one draw)


def draw_passes(draws: int, batch: int) -> list[int]:
    """How many of ``draws`` dequantisations of a ``batch`` of images each forward pass takes: all at once while
    draws x batch <= IMAGES_PER_PASS, so memory does not grow with ``--samples`` / ``--bpd-draws``."""
    per = max(1, IMAGES_PER_PASS // max(1, batch))
    return [min(per, draws - start) for start in range(0, draws, per)]


@torch.no_grad()
def score_batch(model, u: torch.Tensor, y: torch.Tensor | None, draws: int,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (B, C, H, W) -> mean over ``draws`` uniform dequantisations of (NLL nats, bits/dim), each (B,) on the CPU.

    The draws run as batches of k·B images (:func:`draw_passes`); noise is drawn on the CPU from ``generator``
    (reproducible on any device) and moved to the model's device."""
    B = u.shape[0]
    nll = bpd = 0
    for k, x, labels in _dequantized(model, u, y, draws, generator):
        out = model.nll_continuous(x, labels)
        nll = nll + out["nll"].float().view(k, B).sum(0)
        bpd = bpd + out["bpd"].float().view(k, B).sum(0)
    return (nll / draws).cpu(), (bpd / draws).cpu()


def _dequantized(model, u: torch.Tensor, y: torch.Tensor | None, draws: int,
                 generator: torch.Generator | None) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]:
    """``draws`` uniform dequantisations of uint8 ``u`` (B, C, H, W) in passes (:func:`draw_passes`): yields
    (k, x (k·B, C, H, W) on the model's device, labels (k·B,) or None). Noise comes from ``generator`` on the CPU."""
    device = next(model.parameters()).device
    for k in draw_passes(draws, u.shape[0]):
        x = dequantize(u.repeat(k, 1, 1, 1), "uniform", generator=generator).to(device)
        yield k, x, None if y is None else y.repeat(k).to(device)


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
    v = check_finite(torch.cat(values).double(), "the bits/dim") if values else torch.zeros(0, dtype=torch.float64)
    return {"mean": v.mean().item() if len(v) else math.nan,
            "stderr": (v.std() / math.sqrt(len(v))).item() if len(v) > 1 else math.nan, "n": len(v), "draws": draws}


@torch.no_grad()
def patch_bits(model, u: torch.Tensor, y: torch.Tensor | None, draws: int,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 (B, C, H, W) -> bits of each patch (B, H/p, W/p), averaged over ``draws`` uniform dequantisations
    (see ``Farmer.patch_bits``); summed over patches it is the image's NLL in bits."""
    B, p = u.shape[0], model.cfg.patch_size
    bits = 0
    for k, x, labels in _dequantized(model, u, y, draws, generator):
        bits = bits + model.patch_bits(x, labels)["bits"].float().view(k, B, -1).sum(0)
    return (bits / draws).cpu().view(B, u.shape[-2] // p, u.shape[-1] // p)


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
