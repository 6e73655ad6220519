"""Guidance (arXiv v2 §3.4, Algorithm 1): drawing tokens from the prior's mixtures with and without CFG.

Target of guidance with weight w: p'(z) ∝ p_c(z)^(w+1) / p_u(z)^w. References are computed here from the
formulas: numerical integration (scipy) for the guided moments, closed-form Gaussian products for the simple
guidance, and softmax(T_s · log ω) with Algorithm 1's per-proposal weights for the resampler's choice.
"""

import numpy as np
import pytest
import torch
from scipy import integrate, special, stats

from farmer_cli.config.schema import SamplingConfig
from farmer_cli.model import GMM
from farmer_cli.model.guidance import draw_resampled, draw_simple, draw_tokens, draw_unguided

pytestmark = pytest.mark.usefixtures("single_thread")

PLAIN = dict(temperature=1.0, var_scale=1.0, t_pi=1.0, t_sigma=1.0, t_pi_eval=1.0, t_sigma_eval=1.0,
             t_resample=1.0)


def gauss(mu, sd, batch, dim=1):
    """K=1 mixture N(mu, sd²) per dim, repeated over a batch of `batch` rows."""
    return GMM(torch.zeros(batch, 1), torch.full((batch, 1, dim), float(mu)), torch.full((batch, 1, dim), float(sd)))


def random_gmm(B, K, D, seed):
    g = torch.Generator().manual_seed(seed)
    return GMM(torch.randn(B, K, generator=g), 2 * torch.randn(B, K, D, generator=g),
               0.3 + torch.rand(B, K, D, generator=g))


def cat(a: GMM, b: GMM) -> GMM:
    return GMM(torch.cat([a.logits, b.logits]), torch.cat([a.means, b.means]), torch.cat([a.stds, b.stds]))


def guided_moments(log_pc, log_pu, w, lo=-30.0, hi=30.0):
    """Mean and variance of p' ∝ exp((w+1) log p_c - w log p_u) by quadrature."""
    f = lambda z: np.exp((w + 1) * log_pc(z) - w * log_pu(z))
    Z = integrate.quad(f, lo, hi, points=[0.0, 1.0], limit=200)[0]
    m = integrate.quad(lambda z: z * f(z), lo, hi, points=[0.0, 1.0], limit=200)[0] / Z
    v = integrate.quad(lambda z: (z - m) ** 2 * f(z), lo, hi, points=[0.0, 1.0], limit=200)[0] / Z
    return m, v


def mix_logpdf_1d(logits, means, stds):
    logw = special.log_softmax(np.asarray(logits, dtype=np.float64))
    return lambda z: special.logsumexp(logw + stats.norm.logpdf(np.asarray(z)[..., None], means, stds), axis=-1)


# --------------------------------------------------------------------------------------------- unguided


def test_cfg_zero_draw_tokens_equals_unguided():
    torch.manual_seed(0)
    g = random_gmm(3, 4, 2, 0)
    s = SamplingConfig(cfg=0.0, temperature=1.3, var_scale=0.9)
    a = draw_tokens(g, 5, 10, s, torch.Generator().manual_seed(42))
    b = draw_unguided(g, 5, s, torch.Generator().manual_seed(42))
    assert a.shape == (3, 5, 2)
    assert torch.equal(a, b)


@pytest.mark.parametrize("T,var_scale", [(1.0, 1.0), (2.0, 0.5), (0.7, 1.5)])
def test_unguided_temperature_and_variance_scale(T, var_scale):
    """Decoupled unguided sampling: mixture logits / T, every component variance x s (std x sqrt(s))."""
    torch.manual_seed(1)
    logits = torch.tensor([[1.5, -0.5, 0.0]])
    means = torch.tensor([[[-3.0], [0.0], [2.5]]])
    stds = torch.tensor([[[0.5], [1.0], [0.7]]])
    s = SamplingConfig(temperature=T, var_scale=var_scale)
    x = draw_unguided(GMM(logits, means, stds), 20000, s, torch.Generator().manual_seed(3))
    assert x.shape == (1, 20000, 1)
    w = special.softmax(logits[0].double().numpy() / T)
    sd = stds[0, :, 0].double().numpy() * np.sqrt(var_scale)
    cdf = lambda v: np.sum(w * stats.norm.cdf(np.asarray(v)[..., None], means[0, :, 0].double().numpy(), sd), -1)
    assert stats.kstest(x[0, :, 0].double().numpy(), cdf).pvalue > 1e-3


# --------------------------------------------------------------------------------------------- resampling CFG


def test_resampler_is_uniform_when_ratios_vanish():
    """g_c == g_u: every log-weight is 0, so the shared pool of s_c + s_u candidates is drawn uniformly."""
    torch.manual_seed(2)
    g = random_gmm(1, 3, 2, 2)
    s = SamplingConfig(cfg=2.0, t_resample=1.1, t_pi_eval=0.2, t_sigma_eval=0.9, cond_candidates=5,
                       uncond_candidates=5)
    x = draw_resampled(g, g, 20000, 5, 5, s, torch.Generator().manual_seed(9))
    assert x.shape == (1, 20000, 2)
    values, counts = torch.unique(x[0], dim=0, return_counts=True)
    assert len(values) == 10, "draws must come from the 5 + 5 candidates"
    assert stats.chisquare(counts.numpy()).pvalue > 1e-3


def test_effective_sample_size_of_the_resampling_weights():
    """(sum w)² / sum w²: all 10 candidates when the weights are uniform (g_c == g_u), and fewer when the guided
    weights favour some; one value per mixture, left on the device."""
    torch.manual_seed(3)
    g_c, g_u = random_gmm(4, 3, 2, 2), random_gmm(4, 3, 2, 2)
    s = SamplingConfig(cfg=3.0, cond_candidates=5, uncond_candidates=5)
    uniform, guided = [], []
    draw_resampled(g_c, g_c, 1, 5, 5, s, torch.Generator().manual_seed(1), uniform)
    draw_resampled(g_c, g_u, 1, 5, 5, s, torch.Generator().manual_seed(1), guided)
    assert uniform[0].shape == (4,) and torch.allclose(uniform[0], torch.full((4,), 10.0, dtype=torch.float64))
    assert ((guided[0] >= 1) & (guided[0] < 10)).all()


def test_resampler_weights_follow_algorithm_1():
    """Exact categorical: with narrow proposals (T_sigma small) the origin of each candidate is its sign
    (conditional components sit at +0.2/+0.5, unconditional at -0.2/-0.5). Then P(candidate) must be
    softmax_j T_s · ω_j with ω_j = w·r(z_j) (conditional origin) or (w+1)·r(z_j) (unconditional origin),
    r = log G_c - log G_u at the evaluation temperatures (logits x T_pi,v, std x T_sigma,v)."""
    torch.manual_seed(3)
    w, t_pi_v, t_sigma_v, t_s = 1.5, 0.2, 0.9, 1.1
    c_logits, c_means, c_stds = torch.tensor([[0.5, -0.5]]), torch.tensor([[[0.2], [0.5]]]), torch.tensor([[[1.0], [0.8]]])
    u_logits, u_means, u_stds = torch.tensor([[0.0, 1.0]]), torch.tensor([[[-0.2], [-0.5]]]), torch.tensor([[[1.2], [1.5]]])
    g_c, g_u = GMM(c_logits, c_means, c_stds), GMM(u_logits, u_means, u_stds)
    s = SamplingConfig(cfg=w, t_pi=1.0, t_sigma=0.02, t_pi_eval=t_pi_v, t_sigma_eval=t_sigma_v, t_resample=t_s)
    x = draw_resampled(g_c, g_u, 40000, 3, 3, s, torch.Generator().manual_seed(4))[0, :, 0]
    values, counts = torch.unique(x, return_counts=True)
    values = values.double().numpy()
    assert len(values) <= 6 and (values > 0).sum() >= 2 and (values < 0).sum() >= 2
    log_c = mix_logpdf_1d(c_logits[0].numpy() * t_pi_v, c_means[0, :, 0].numpy(), c_stds[0, :, 0].numpy() * t_sigma_v)
    log_u = mix_logpdf_1d(u_logits[0].numpy() * t_pi_v, u_means[0, :, 0].numpy(), u_stds[0, :, 0].numpy() * t_sigma_v)
    r = log_c(values) - log_u(values)
    log_omega = np.where(values > 0, w * r, (w + 1) * r)
    # Candidates never drawn are unknown; compare the drawn ones conditioned on being drawn. A candidate with
    # probability > 1e-3 is drawn with certainty in 40000 tries, so this is at most a tiny truncation.
    p = special.softmax(t_s * log_omega)
    assert stats.chisquare(counts.numpy(), p * counts.sum().item()).pvalue > 1e-3
    # The rival reading (Appendix A.2's single weight w·r for every candidate) is rejected by the same data.
    p_wrong = special.softmax(t_s * w * r)
    assert stats.chisquare(counts.numpy(), p_wrong * counts.sum().item()).pvalue < 1e-6


def test_resampled_distribution_converges_to_guided_density():
    """1-D toy: p_c = N(1, 1), p_u = N(0, 1.5²), w = 1, all temperatures 1. Self-normalised importance
    resampling converges to p_c²/p_u as the pool grows."""
    torch.manual_seed(4)
    w = 1.0
    m_ref, v_ref = guided_moments(lambda z: stats.norm.logpdf(z, 1, 1), lambda z: stats.norm.logpdf(z, 0, 1.5), w)
    assert abs(m_ref - 9 / 7) < 1e-6 and abs(v_ref - 4.5 / 7) < 1e-6  # closed form: precision 2 - 1/2.25
    s = SamplingConfig(cfg=w, **PLAIN)
    B = 20000
    errs = {}
    for n in (1, 32):
        x = draw_resampled(gauss(1, 1, B), gauss(0, 1.5, B), 1, n, n, s, torch.Generator().manual_seed(10 + n))
        assert x.shape == (B, 1, 1)
        x = x[:, 0, 0].double()
        errs[n] = (abs(x.mean().item() - m_ref), abs(x.var().item() - v_ref))
    assert errs[32][0] < 0.03 and errs[32][1] < 0.04, errs
    assert errs[1][0] > errs[32][0] and errs[1][1] > errs[32][1], errs  # bias shrinks with the pool


def test_draw_tokens_resample_dispatch_targets_guided_density():
    """draw_tokens with g = [cond; uncond] (2B rows) and s.cfg > 0 resamples towards p_c^(w+1)/p_u^w.
    pool == s_c == s_u, so it does not matter which of them the informative step uses."""
    torch.manual_seed(5)
    w = 2.0
    m_ref, v_ref = guided_moments(lambda z: stats.norm.logpdf(z, 0.5, 1), lambda z: stats.norm.logpdf(z, -0.5, 1.3), w)
    s = SamplingConfig(cfg=w, guidance="resample", cond_candidates=32, uncond_candidates=32, **PLAIN)
    B = 20000
    x = draw_tokens(cat(gauss(0.5, 1, B), gauss(-0.5, 1.3, B)), 1, 32, s, torch.Generator().manual_seed(6))
    assert x.shape == (B, 1, 1)
    x = x[:, 0, 0].double()
    assert abs(x.mean().item() - m_ref) < 0.03 and abs(x.var().item() - v_ref) < 0.04, (x.mean(), x.var(), m_ref, v_ref)


def test_redundant_step_draws_many_from_one_pool():
    """draws > 1 shares one pool per row: at most s_c + s_u distinct values, and rows are independent."""
    torch.manual_seed(6)
    g_c, g_u = random_gmm(2, 3, 2, 6), random_gmm(2, 3, 2, 7)
    s = SamplingConfig(cfg=1.0)
    x = draw_resampled(g_c, g_u, 50, 4, 3, s, torch.Generator().manual_seed(1))
    assert x.shape == (2, 50, 2)
    for b in range(2):
        assert 1 <= len(torch.unique(x[b], dim=0)) <= 7
    assert not torch.equal(x[0], x[1])


# --------------------------------------------------------------------------------------------- simple CFG


def gaussian_product(mc, sc, mu, su, w):
    prec = (1 + w) / sc**2 - w / su**2
    return ((1 + w) * mc / sc**2 - w * mu / su**2) / prec, 1 / np.sqrt(prec)


def test_simple_guidance_k1_is_closed_form_gaussian_product():
    torch.manual_seed(7)
    w = 1.0
    mc, sc = np.array([1.0, -0.5]), np.array([1.0, 0.8])
    mu, su = np.array([0.0, 0.5]), np.array([1.5, 1.2])
    g_c = GMM(torch.zeros(1, 1), torch.tensor(mc, dtype=torch.float32)[None, None], torch.tensor(sc, dtype=torch.float32)[None, None])
    g_u = GMM(torch.zeros(1, 1), torch.tensor(mu, dtype=torch.float32)[None, None], torch.tensor(su, dtype=torch.float32)[None, None])
    s = SamplingConfig(cfg=w, guidance="simple", **PLAIN)
    x = draw_simple(g_c, g_u, 20000, s, torch.Generator().manual_seed(8))
    assert x.shape == (1, 20000, 2)
    m_ref, sd_ref = gaussian_product(mc, sc, mu, su, w)
    for j in range(2):
        assert stats.kstest(x[0, :, j].double().numpy(), stats.norm(m_ref[j], sd_ref[j]).cdf).pvalue > 1e-3
    # and it agrees with the quadrature of p_c^(w+1)/p_u^w (independent of the closed form)
    m_q, v_q = guided_moments(lambda z: stats.norm.logpdf(z, mc[0], sc[0]), lambda z: stats.norm.logpdf(z, mu[0], su[0]), w)
    assert abs(m_q - m_ref[0]) < 1e-6 and abs(v_q - sd_ref[0] ** 2) < 1e-6


def test_simple_guidance_falls_back_to_conditional_when_precision_not_positive():
    torch.manual_seed(8)
    # (1+w)/sc² - w/su² = 2 - 4 < 0: the guided "density" is not normalisable.
    s = SamplingConfig(cfg=1.0, guidance="simple", **PLAIN)
    x = draw_simple(gauss(1.0, 1.0, 1), gauss(0.0, 0.5, 1), 20000, s, torch.Generator().manual_seed(2))
    assert torch.isfinite(x).all()
    assert stats.kstest(x[0, :, 0].double().numpy(), stats.norm(1.0, 1.0).cdf).pvalue > 1e-3


def test_simple_guidance_mixture_picks_component_from_conditional():
    """K=2: component k ~ conditional weights, then the product of component k of both mixtures."""
    torch.manual_seed(9)
    w = 0.5
    c_logits, u_logits = torch.tensor([[1.0, -1.0]]), torch.tensor([[-2.0, 2.0]])  # uncond weights must not matter
    c_means, u_means = torch.tensor([[[-2.0], [3.0]]]), torch.tensor([[[-1.0], [2.0]]])
    c_stds, u_stds = torch.tensor([[[0.7], [1.0]]]), torch.tensor([[[1.0], [1.5]]])
    s = SamplingConfig(cfg=w, guidance="simple", **PLAIN)
    x = draw_simple(GMM(c_logits, c_means, c_stds), GMM(u_logits, u_means, u_stds), 20000, s,
                    torch.Generator().manual_seed(3))[0, :, 0].double().numpy()
    pis = special.softmax(c_logits[0].double().numpy())
    m, sd = gaussian_product(c_means[0, :, 0].double().numpy(), c_stds[0, :, 0].double().numpy(),
                             u_means[0, :, 0].double().numpy(), u_stds[0, :, 0].double().numpy(), w)
    cdf = lambda v: np.sum(pis * stats.norm.cdf(np.asarray(v)[..., None], m, sd), -1)
    assert stats.kstest(x, cdf).pvalue > 1e-3


def test_draw_tokens_simple_dispatch_equals_draw_simple():
    torch.manual_seed(10)
    B = 3
    g_c, g_u = random_gmm(B, 2, 2, 10), random_gmm(B, 2, 2, 11)
    s = SamplingConfig(cfg=1.5, guidance="simple")
    a = draw_tokens(cat(g_c, g_u), 4, 8, s, torch.Generator().manual_seed(5))
    b = draw_simple(g_c, g_u, 4, s, torch.Generator().manual_seed(5))
    assert a.shape == (B, 4, 2)
    assert torch.equal(a, b)
