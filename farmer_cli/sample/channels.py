"""What the informative and redundant channels hold (arXiv v2 §4.3, Fig. 7; supplement Fig. 8), as images and numbers.

Noise interpolation: encode an image, take the latent Z^t after AF block t, regroup it like the AR tokens
(merge, final permute) so "redundant" means the same channels the prior treats as redundant, then

    z' = sqrt(1 - a²)·z + a·eps,   eps ~ N(0, I), level a in [0, 1]

on the redundant channels only ("partial") or on all channels ("full"), and map z' back to pixels with the
inverse of blocks t..1. The same eps is used for every block and for partial and full, so rows and panels
differ only by what is noised. Level 0 reproduces the input; full noise at level 1 forgets it.

Variance sweep (arXiv v2 Fig. 7): sample the informative tokens once per column, then every redundant vector from
the shared mixture with each component's variance multiplied by a factor f (std x sqrt(f); f = 0 gives the
component means), with the same component picks and eps for every factor, and decode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from farmer_cli.config.schema import SamplingConfig
from farmer_cli.model import Farmer, dequantize, quantize


@dataclass
class Interpolation:
    partial: torch.Tensor  # uint8 (blocks, levels, C, H, W)
    full: torch.Tensor  # uint8 (blocks, levels, C, H, W)
    mse_partial: torch.Tensor  # (blocks, levels): mean squared pixel error vs the input, pixels in [0, 1]
    mse_full: torch.Tensor


@torch.no_grad()
def noise_interpolation(model: Farmer, u: torch.Tensor, blocks: list[int], levels: list[float], seed: int = 0,
                        student=None) -> Interpolation:
    """u: uint8 (C, H, W); blocks: 1-based AF block indices; levels in [0, 1]."""
    d_I = model.prior.d_I
    if model.prior.d_R == 0:
        raise ValueError("this model has no redundant channels (model.channel_split = false)")
    device = model.device
    x = dequantize(u[None], "none").to(device)
    _, _, states = model.flow(model.to_tokens(x), return_intermediates=True)
    gen = torch.Generator().manual_seed(seed)  # noise drawn on the CPU: the same figure on every device
    eps = torch.randn(model.to_ar_tokens(states[-1]).shape, generator=gen).to(device)
    a = torch.tensor(levels, device=device).view(-1, 1, 1)
    keep = (1 - a**2).sqrt()
    redundant = torch.zeros_like(eps[0])
    redundant[:, d_I:] = 1.0
    results = {"partial": [], "full": []}
    for t in blocks:
        z = model.to_ar_tokens(states[t])  # (1, n, D_ar)
        noised_full = keep * z + a * eps
        noised_partial = torch.where(redundant.bool(), noised_full, z.expand_as(noised_full))
        for name, zz in (("partial", noised_partial), ("full", noised_full)):
            tokens = model.from_ar_tokens(zz)
            if student is not None:
                back = student.one_pass_inverse(tokens, upto=t)
            else:
                back = model.flow.inverse(tokens, upto=t)
            results[name].append(quantize(model.from_tokens(back)).cpu())
    partial, full = torch.stack(results["partial"]), torch.stack(results["full"])
    ref = u.float() / 255.0

    def mse(images: torch.Tensor) -> torch.Tensor:
        return ((images.float() / 255.0 - ref) ** 2).mean(dim=(-3, -2, -1))

    return Interpolation(partial, full, mse(partial), mse(full))


@dataclass
class VarianceSweep:
    images: torch.Tensor  # uint8 (factors, columns, C, H, W)
    redundant: torch.Tensor  # (factors, columns, N, d_R): the redundant vectors decoded in each row
    means: torch.Tensor  # (columns, N, d_R): means of the mixture components picked for each vector


@torch.no_grad()
def variance_sweep(model: Farmer, label: int, factors: list[float], columns: int, s: SamplingConfig,
                   seed: int = 0, student=None) -> VarianceSweep:
    """Each column one informative sample, each row one variance factor (denoised as ``s.denoise`` says)."""
    if model.prior.d_R == 0:
        raise ValueError("this model has no redundant channels (model.channel_split = false)")
    gen = torch.Generator(model.device).manual_seed(seed)
    y = torch.full((columns,), label, device=model.device)
    z_info, red, _ = model.sample_informative(y, s, gen)  # red: the conditional shared mixture
    comp = red.pick_components(model.prior.N, gen)  # (columns, N): the same picks for every factor
    mu, sd = red.components(comp)
    eps = torch.randn(mu.shape, generator=gen, device=mu.device)
    rows, reds = [], []
    for f in factors:
        z_red = mu + sd * (f**0.5) * eps
        x = model.decode(torch.cat([z_info, z_red], dim=-1), y, student=student)
        rows.append(quantize(model.denoise(x, y, model.denoise_sigma(s))).cpu())
        reds.append(z_red.cpu())
    return VarianceSweep(torch.stack(rows), torch.stack(reds), mu.cpu())
