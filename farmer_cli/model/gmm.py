"""Diagonal Gaussian mixtures: the GMM head, log-density and sampling (arXiv v2 §3.2; §3.4, Algorithm 1).

A mixture over R^D with K components is (logits (..., K), means (..., K, D), stds (..., K, D)):

    log p(z) = logsumexp_k [ log_softmax(logits)_k + sum_j log N(z_j; mu_kj, std_kj²) ]

Two temperature knobs act on it, as one representation for every caller:
    ``logit_scale``  multiplies the mixture logits (Algorithm 1's T_pi; the CLI's mixture temperature T gives 1/T)
    ``std_scale``    multiplies every component std (Algorithm 1's T_sigma; a variance scale s gives sqrt(s))
Log-densities are float32; the quadratic form inside :meth:`GMM.log_prob` is accumulated in float64 (see there).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from farmer_cli.model.randomness import RandomSource, as_randomness, categorical, normal

LOG_2PI = math.log(2 * math.pi)
EXPANSION_BYTES = 64 << 20  # largest float64 copy of z that :meth:`GMM.log_prob` makes at once


@dataclass
class GMM:
    """Mixture parameters; leading dims (...) index independent mixtures (batch, token)."""

    logits: torch.Tensor  # (..., K)
    means: torch.Tensor  # (..., K, D)
    stds: torch.Tensor  # (..., K, D)

    def tempered(self, logit_scale: float = 1.0, std_scale: float = 1.0) -> "GMM":
        if logit_scale == 1.0 and std_scale == 1.0:
            return self
        return GMM(self.logits * logit_scale, self.means, self.stds * std_scale)

    def index(self, idx) -> "GMM":
        """Select along the leading (batch) dim."""
        return GMM(self.logits[idx], self.means[idx], self.stds[idx])

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """z (..., S, D) scored under mixtures (..., K, D), S points per mixture -> (..., S) float32.

        The leading dims of z and of the mixture must match; S points share one mixture (S = 1 for
        per-token mixtures, S = N for the shared redundant mixture).

        No (..., S, K, D) tensor larger than the mixture itself is built, forward or backward:

        * S = 1: the differences z - mu (..., 1, K, D) are the size of the means; computed directly, in float32.
        * S > 1: with p = 1/std² the Gaussian quadratic expands to

              sum_j ((z_j - mu_kj) / std_kj)² = (z²) @ pᵀ - 2 z @ (mu·p)ᵀ + sum_j mu_kj² p_kj       (..., S, K)

          two (S, D) x (D, K) matmuls plus a per-component constant. For the patch-8 redundant term (S = 256,
          K = 200, D = 640) each intermediate of the broadcast form took 131 MB per image; here the largest is
          (S, D) in float64, 1.3 MB. The three terms are each of order sum_j z_j²/std_kj² while near a
          component's mean their sum is ~D, so they cancel: in float32 that costs up to ~1e2 nats at std 1e-3.
          Centring z and mu on a per-mixture reference does not help (the terms stay of order |z - ref|²/std²,
          and points spread over the mixture by far more than one std). The expansion therefore runs in
          float64, outside autocast, which keeps it within ~1e-6 nats of the exact value at those scales.
          z is expanded in slices of S of at most :data:`EXPANSION_BYTES` in float64 (guided sampling scores a
          pool of 2048 redundant candidates per image: 671 MB at batch 64 in one piece).
          (float64 is unsupported on MPS.) For S = 1 the float64 copies would cost more than the differences.

        Weights, normalisers and the logsumexp are float32.
        """
        if z.shape[-2] == 1:
            quad = (((z.float() - self.means.float()) / self.stds.float()) ** 2).sum(-1)[..., None, :]  # (..., 1, K)
        else:
            with _no_autocast(z.device):
                mu, prec = self.means.double(), self.stds.double().pow(-2)
                const = (mu * mu * prec).sum(-1)[..., None, :]  # (..., 1, K)
                rows = max(1, EXPANSION_BYTES // (8 * z[..., 0, :].numel()))  # points per float64 slice of z
                quad = torch.cat([_expanded_quadratic(part.double(), mu, prec, const)
                                  for part in z.split(rows, dim=-2)], dim=-2)  # (..., S, K)
        log_norm = -0.5 * z.shape[-1] * LOG_2PI - torch.log(self.stds.float()).sum(-1)  # (..., K)
        log_w = F.log_softmax(self.logits.float(), dim=-1)  # (..., K)
        return torch.logsumexp((log_w + log_norm)[..., None, :] - 0.5 * quad, dim=-1)

    def pick_components(self, count: int, rng: RandomSource = None) -> torch.Tensor:
        """Draw ``count`` component indices per mixture (leading dim B, the batch): (..., count) int64.
        ``rng``: a generator on the mixture's device, per-image streams, or None (torch's global generator)."""
        return categorical(as_randomness(rng, self.logits.device), F.softmax(self.logits.float(), dim=-1), count)

    def components(self, comp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Means and stds of components ``comp`` (..., S) -> each (..., S, D)."""
        pick = comp[..., None].expand(*comp.shape, self.means.shape[-1])
        return self.means.gather(-2, pick), self.stds.gather(-2, pick)

    def sample(self, count: int, rng: RandomSource = None) -> torch.Tensor:
        """Draw ``count`` i.i.d. points from each mixture (leading dim B, the batch): (..., count, D)."""
        rng = as_randomness(rng, self.logits.device)
        mu, sd = self.components(self.pick_components(count, rng))
        return mu + sd * normal(rng, mu.shape, mu.dtype)


def _expanded_quadratic(z64: torch.Tensor, mu: torch.Tensor, prec: torch.Tensor, const: torch.Tensor) -> torch.Tensor:
    """sum_j (z_j - mu_kj)² p_kj = (z²) @ pᵀ - 2 z @ (mu·p)ᵀ + const for float64 z (..., S, D), mu and p
    (..., K, D), const = sum_j mu² p (..., 1, K) -> float32 (..., S, K)."""
    return ((z64 * z64) @ prec.mT - 2 * z64 @ (mu * prec).mT + const).float()


def _no_autocast(device: torch.device):
    """Leave autocast for a block (the meta device, used to plan memory, has no autocast to leave)."""
    return contextlib.nullcontext() if device.type == "meta" else torch.autocast(device.type, enabled=False)


def square_plus(x: torch.Tensor) -> torch.Tensor:
    """(x + sqrt(x² + 4)) / 2: smooth, positive, ~x for large x, 1 at x = 0 (JetFormer's scale map)."""
    return 0.5 * (x + torch.sqrt(x * x + 4.0))


class GMMHead(nn.Module):
    """Linear map from a hidden state (..., W) to a K-component diagonal GMM over R^D.

    std = min_scale + square_plus(raw): positive, smooth, bounded below. Weights start small (std 0.02)
    so an untrained head is close to a standard normal yet the components' symmetry is broken.
    """

    def __init__(self, width: int, components: int, dim: int, min_scale: float) -> None:
        super().__init__()
        self.K, self.D, self.min_scale = components, dim, min_scale
        self.proj = nn.Linear(width, components * (1 + 2 * dim))
        nn.init.normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h: torch.Tensor) -> GMM:
        out = self.proj(h).float()
        logits, rest = out.split([self.K, 2 * self.K * self.D], dim=-1)
        means, raw = rest.unflatten(-1, (self.K, 2 * self.D)).chunk(2, dim=-1)
        return GMM(logits, means, self.min_scale + square_plus(raw))
