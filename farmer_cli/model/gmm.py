"""Diagonal Gaussian mixtures: the GMM head, log-density and sampling (NOTES §1.3, §3).

A mixture over R^D with K components is (logits (..., K), means (..., K, D), stds (..., K, D)):

    log p(z) = logsumexp_k [ log_softmax(logits)_k + sum_j log N(z_j; mu_kj, std_kj²) ]

Two temperature knobs act on it, as one representation for every caller:
    ``logit_scale``  multiplies the mixture logits (Algorithm 1's T_pi; the CLI's mixture temperature T gives 1/T)
    ``std_scale``    multiplies every component std (Algorithm 1's T_sigma; a variance scale s gives sqrt(s))
Everything here is computed in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LOG_2PI = math.log(2 * math.pi)


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
        """z (..., S, D) scored under mixtures (..., K, D), S points per mixture -> (..., S).

        The leading dims of z and of the mixture must match; S points share one mixture (S = 1 for per-token
        mixtures, S = N for the shared redundant mixture)."""
        z = z.float()[..., :, None, :]  # (..., S, 1, D)
        means, stds = self.means[..., None, :, :], self.stds[..., None, :, :]  # (..., 1, K, D)
        comp = -0.5 * (((z - means) / stds) ** 2 + LOG_2PI) - torch.log(stds)
        log_w = F.log_softmax(self.logits.float(), dim=-1)[..., None, :]  # (..., 1, K)
        return torch.logsumexp(log_w + comp.sum(-1), dim=-1)

    def pick_components(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``count`` component indices per mixture: (..., count) int64."""
        lead, K = self.logits.shape[:-1], self.logits.shape[-1]
        probs = F.softmax(self.logits.float(), dim=-1).reshape(-1, K)
        return torch.multinomial(probs, count, replacement=True, generator=generator).reshape(*lead, count)

    def components(self, comp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Means and stds of components ``comp`` (..., S) -> each (..., S, D)."""
        pick = comp[..., None].expand(*comp.shape, self.means.shape[-1])
        return self.means.gather(-2, pick), self.stds.gather(-2, pick)

    def sample(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``count`` i.i.d. points from each mixture: (..., count, D)."""
        mu, sd = self.components(self.pick_components(count, generator))
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + sd * eps


def square_plus(x: torch.Tensor) -> torch.Tensor:
    """(x + sqrt(x² + 4)) / 2: smooth, positive, ~x for large x, 1 at x = 0 (JetFormer's scale map)."""
    return 0.5 * (x + torch.sqrt(x * x + 4.0))


class GMMHead(nn.Module):
    """Linear map from a hidden state (..., W) to a K-component diagonal GMM over R^D.

    std = min_scale + square_plus(raw): positive, smooth, bounded below. Weights start small (std 0.02·init_gain)
    so an untrained head is close to a standard normal yet the components' symmetry is broken.
    """

    def __init__(self, width: int, components: int, dim: int, min_scale: float, init_gain: float = 1.0) -> None:
        super().__init__()
        self.K, self.D, self.min_scale = components, dim, min_scale
        self.proj = nn.Linear(width, components * (1 + 2 * dim))
        nn.init.normal_(self.proj.weight, std=0.02 * init_gain)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h: torch.Tensor) -> GMM:
        out = self.proj(h).float()
        logits, rest = out.split([self.K, 2 * self.K * self.D], dim=-1)
        means, raw = rest.unflatten(-1, (self.K, 2 * self.D)).chunk(2, dim=-1)
        return GMM(logits, means, self.min_scale + square_plus(raw))
