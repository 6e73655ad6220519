"""Drawing latent tokens from the prior's mixtures: unguided, resampling CFG (Algorithm 1) or simple CFG.

Target of guidance with weight w (arXiv v2 §3.4, Algorithm 1): p'(z) ∝ p_c(z)^(w+1) / p_u(z)^w.

* ``draw_unguided``: decoupled GMM sampling (supplement Table 5): mixture logits / T, component variance x s.
* ``draw_resampled`` (Algorithm 1): s_c candidates from the conditional mixture and s_u from the unconditional
  one (proposal temperatures: logits x T_pi, std x T_sigma); log-weights w·(log p_c − log p_u) for conditional
  candidates and (w+1)·(log p_c − log p_u) for unconditional ones, with densities at the evaluation temperatures
  (logits x T_pi,v, std x T_sigma,v); times T_s; softmax over all candidates; draw ``draws`` indices with
  replacement (1 for an informative token, N for the redundant step's shared pool).
* ``draw_simple`` (JetFormer-style; arXiv v2 Table 3, the 'naive' CFG row): pick a component k from the conditional mixture, then
  sample each dimension from N_c,k^(1+w) / N_u,k^w. For Gaussians this density is itself Gaussian with precision
  (1+w)/σ_c² − w/σ_u² and is sampled exactly (JetFormer uses rejection sampling for the same density); where that
  precision is not positive the conditional component is used, as JetFormer's fallback does.
"""

from __future__ import annotations

import torch

from farmer_cli.config.schema import SamplingConfig
from farmer_cli.model.gmm import GMM
from farmer_cli.model.randomness import RandomSource, as_randomness, categorical, normal


def draw_unguided(g: GMM, draws: int, s: SamplingConfig, rng: RandomSource) -> torch.Tensor:
    """(B,)-batched mixture -> (B, draws, D)."""
    return g.tempered(1.0 / s.temperature, s.var_scale**0.5).sample(draws, rng)


def draw_resampled(g_c: GMM, g_u: GMM, draws: int, n_cond: int, n_uncond: int, s: SamplingConfig,
                   rng: RandomSource, ess: list | None = None) -> torch.Tensor:
    """Algorithm 1: conditional/unconditional mixtures (B,) -> (B, draws, D). ``ess``: where to append the
    effective sample size of the resampling weights, (sum w)² / sum w² per mixture, as a (B,) tensor (left on the
    device: read once when the caller reports it)."""
    w, rng = s.cfg, as_randomness(rng, g_c.logits.device)
    cand = torch.cat([
        g_c.tempered(s.t_pi, s.t_sigma).sample(n_cond, rng),
        g_u.tempered(s.t_pi, s.t_sigma).sample(n_uncond, rng),
    ], dim=-2)  # (B, S, D)
    log_ratio = (g_c.tempered(s.t_pi_eval, s.t_sigma_eval).log_prob(cand)
                 - g_u.tempered(s.t_pi_eval, s.t_sigma_eval).log_prob(cand))  # (B, S)
    factor = torch.cat([log_ratio.new_full((n_cond,), w), log_ratio.new_full((n_uncond,), w + 1.0)])
    log_w = log_ratio * factor * s.t_resample
    weights = torch.softmax(log_w, dim=-1)
    if ess is not None:
        ess.append(1.0 / weights.double().pow(2).sum(-1))  # the weights sum to 1
    idx = categorical(rng, weights, draws)
    return cand.gather(1, idx[..., None].expand(-1, -1, cand.shape[-1]))


RESAMPLING_BYTES = 32  # per candidate and per (dimension + component): eight float32 values (measured, see below)


def resampling_bytes(mixtures: int, candidates: int, dims: int, components: int) -> int:
    """Peak working memory of one :func:`draw_resampled` over ``mixtures`` mixtures of ``components`` Gaussians in
    ``dims`` dimensions with ``candidates`` (s_c + s_u) each: the candidates with their picked means and stds
    (B, S, D) and their log-densities under both tempered mixtures (B, S, K), with temporaries. Measured peaks
    (B, S, D, K: 8, 1e5, 16, 64 / 8, 1e5, 64, 8 / 2, 2e5, 4, 200 / 1, 4e4, 640, 200) are 0.5 to 1.0 of this."""
    return RESAMPLING_BYTES * mixtures * candidates * (dims + components)


def draw_simple(g_c: GMM, g_u: GMM, draws: int, s: SamplingConfig, rng: RandomSource) -> torch.Tensor:
    """JetFormer-style guidance on one shared component index: (B,) mixtures -> (B, draws, D)."""
    w, rng = s.cfg, as_randomness(rng, g_c.logits.device)
    g_c, g_u = g_c.tempered(s.t_pi, s.t_sigma), g_u.tempered(s.t_pi, s.t_sigma)
    comp = g_c.pick_components(draws, rng)
    mu_c, sd_c = g_c.components(comp)
    mu_u, sd_u = g_u.components(comp)
    prec_c, prec_u = sd_c.pow(-2), sd_u.pow(-2)
    prec = (1 + w) * prec_c - w * prec_u
    ok = prec > 0
    safe = torch.where(ok, prec, prec_c)
    mean = torch.where(ok, ((1 + w) * prec_c * mu_c - w * prec_u * mu_u) / safe, mu_c)
    return mean + normal(rng, mean.shape, mean.dtype) * safe.rsqrt()


def draw(g_c: GMM, g_u: GMM | None, draws: int, pool: int, s: SamplingConfig,
         rng: RandomSource, ess: list | None = None) -> torch.Tensor:
    """Draw from conditional mixtures g_c (B,), guided by the unconditional ones g_u (B,) when s.cfg > 0.

    pool: candidates per proposal for resampling (0: s_c and s_u). Returns (B, draws, D). ``ess``: see
    :func:`draw_resampled` (resampling guidance only)."""
    if s.cfg <= 0 or g_u is None:
        return draw_unguided(g_c, draws, s, rng)
    if s.guidance == "simple":
        return draw_simple(g_c, g_u, draws, s, rng)
    n_c, n_u = (s.cond_candidates, s.uncond_candidates) if pool == 0 else (pool, pool)
    return draw_resampled(g_c, g_u, draws, n_c, n_u, s, rng, ess)


def draw_tokens(g: GMM, draws: int, pool: int, s: SamplingConfig, rng: RandomSource,
                ess: list | None = None) -> torch.Tensor:
    """:func:`draw` for mixtures predicted for one batch that is [conditional; unconditional] when s.cfg > 0
    (leading dim 2B; B unguided). Returns (B, draws, D)."""
    if s.cfg <= 0:
        return draw_unguided(g, draws, s, rng)
    B = g.logits.shape[0] // 2
    return draw(g.index(slice(0, B)), g.index(slice(B, 2 * B)), draws, pool, s, rng, ess)
