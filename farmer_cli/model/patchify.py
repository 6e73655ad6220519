"""Image <-> token reshapes. All are exact permutations of entries (no learned parameters).

``patchify``: (B, C, H, W) -> (B, N, d) with N = (H/p)(W/p) tokens in raster order and d = C·p² channels,
ordered (channel, row-in-patch, col-in-patch). ``merge_tokens`` regroups an (h, w) grid of tokens into
(h/m, w/m) tokens of m²·d channels (lets a patch-8 AF feed a 256-token, 768-channel AR prior; not specified in
the paper, see docs/design.md, Choices the paper leaves open), its channels either one sub-token after another or
interleaved.
"""

from __future__ import annotations

import torch


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/p)(W/p), C·p²)."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(tokens: torch.Tensor, p: int, channels: int, size: int) -> torch.Tensor:
    """(B, N, C·p²) -> (B, C, size, size); inverse of :func:`patchify`."""
    B = tokens.shape[0]
    s = size // p
    x = tokens.reshape(B, s, s, channels, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, channels, size, size)


def merge_tokens(z: torch.Tensor, m: int, interleave: bool = False) -> torch.Tensor:
    """(B, h·w, d) on a square h x w grid -> (B, (h/m)(w/m), m²·d), merging m x m neighbours.

    Channel order of a merged token: ``interleave=False`` puts the m² sub-tokens one after the other
    ([sub 0 | sub 1 | ...], channel k·d + c); ``interleave=True`` puts channel c of every sub-token together
    (channel c·m² + k), so the first channels of the merged token (the informative ones) cover every sub-token."""
    if m == 1:
        return z
    B, N, d = z.shape
    s = int(round(N**0.5))
    z = z.reshape(B, s // m, m, s // m, m, d).permute(0, 1, 3, 2, 4, 5).reshape(B, (s // m) ** 2, m * m, d)
    return (z.transpose(-1, -2) if interleave else z).reshape(B, (s // m) ** 2, m * m * d)


def split_tokens(z: torch.Tensor, m: int, interleave: bool = False) -> torch.Tensor:
    """(B, (h/m)(w/m), m²·d) -> (B, h·w, d); inverse of :func:`merge_tokens` with the same ``interleave``."""
    if m == 1:
        return z
    B, n, D = z.shape
    s = int(round(n**0.5))
    d = D // (m * m)
    z = z.reshape(B, n, d, m * m).transpose(-1, -2) if interleave else z.reshape(B, n, m * m, d)
    z = z.reshape(B, s, s, m, m, d).permute(0, 1, 3, 2, 4, 5)
    return z.reshape(B, s * s * m * m, d)


def dct_basis(p: int, channels: int) -> torch.Tensor:
    """Orthonormal (d, d) matrix Q, d = C·p², taking a token in (channel, row, col) order to its per-channel 2-D
    DCT-II coefficients ordered from low to high spatial frequency (u + v, then u, then channel).

    tokens @ Q.T gives coefficients; coefficients @ Q gives tokens back. |det Q| = 1, so the likelihood is
    unchanged. With it the first channels of a token hold its coarse structure and the last ones fine detail."""
    n = torch.arange(p, dtype=torch.float64)
    D = torch.cos(torch.pi * (2 * n[None] + 1) * n[:, None] / (2 * p)) * (2.0 / p) ** 0.5
    D[0] /= 2**0.5
    per_channel = torch.kron(D, D)  # (p², p²): row u*p+v is the (u, v) basis image
    Q = torch.block_diag(*[per_channel] * channels)  # (d, d), rows ordered (channel, u, v)
    keys = [((u + v), u, c) for c in range(channels) for u in range(p) for v in range(p)]
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    return Q[order].float()


def whole_pixel_basis(p: int, channels: int) -> torch.Tensor:
    """Permutation matrix Q (d, d), d = C·p², reordering a token from (channel, row, col) to whole pixels (all C
    colours of one pixel side by side), pixels of coarse grids first: (0, 0), then the stride-p/2 grid, and so on
    (key: -gcd(row, col, p), row, col). The first k·C channels are k whole pixels spread over the patch; with a 2x2
    interleaved token merge at p = 2, the first 3 channels of every sub-token are one full-colour pixel per
    sub-token. |det Q| = 1: the likelihood is unchanged."""
    import math

    keys = [(-math.gcd(r, math.gcd(col, p)), r, col, c) for c in range(channels) for r in range(p) for col in range(p)]
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    return torch.eye(len(keys))[order]


def token_basis(name: str, p: int, channels: int) -> torch.Tensor | None:
    """The fixed orthonormal basis a token is expressed in before the AF (``model.token_basis``): None for
    "pixel", the plain (channel, row, col) order; else :func:`dct_basis` or :func:`whole_pixel_basis`."""
    bases = {"dct": dct_basis, "whole-pixel": whole_pixel_basis}
    return bases[name](p, channels) if name in bases else None
