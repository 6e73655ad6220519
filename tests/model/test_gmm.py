"""Diagonal Gaussian mixtures (arXiv v2 §3.2; §3.4, Algorithm 1): density against scipy and against the broadcast
form it replaced (values and gradients, and that no (..., S, K, D) tensor is built), sampling against the density,
temperatures against their definition (logits x logit_scale, std x std_scale), and the GMM head's std floor."""

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import integrate, special, stats
from torch.utils._python_dispatch import TorchDispatchMode

from farmer_cli.model import GMM, GMMHead

pytestmark = pytest.mark.usefixtures("single_thread")


def ref_log_prob(logits, means, stds, z):
    """scipy reference: logits (K,), means/stds (K, D), z (S, D) -> (S,)."""
    logw = special.log_softmax(np.asarray(logits, dtype=np.float64))
    comps = np.stack([
        stats.multivariate_normal(mean=means[k], cov=np.diag(stds[k] ** 2)).logpdf(z).reshape(-1)
        for k in range(len(logw))
    ], axis=-1)  # (S, K)
    return special.logsumexp(comps + logw, axis=-1)


def mixture_cdf(logits, means, stds):
    """CDF of a 1-D mixture: logits (K,), means/stds (K,)."""
    w = special.softmax(np.asarray(logits, dtype=np.float64))
    return lambda x: np.sum(w * stats.norm.cdf(np.asarray(x)[..., None], means, stds), axis=-1)


def broadcast_log_prob(g: GMM, z: torch.Tensor) -> torch.Tensor:
    """The former GMM.log_prob, kept as a reference: z (..., S, D) -> (..., S) in z's dtype, through a
    (..., S, K, D) tensor. Each of its terms is computed before summing, so it has no cancellation."""
    z = z[..., :, None, :]  # (..., S, 1, D)
    means, stds = g.means[..., None, :, :], g.stds[..., None, :, :]  # (..., 1, K, D)
    comp = -0.5 * (((z - means) / stds) ** 2 + math.log(2 * math.pi)) - torch.log(stds)
    log_w = F.log_softmax(g.logits, dim=-1)[..., None, :]  # (..., 1, K)
    return torch.logsumexp(log_w + comp.sum(-1), dim=-1)


def double(g: GMM) -> GMM:
    return GMM(g.logits.double(), g.means.double(), g.stds.double())


def realistic_gmm(lead, K, D, S, min_std, z_from_mixture, seed, max_std=2.0):
    """Means ~ N(0, 1), stds ~ U[min_std, max_std], logits ~ N(0, 1); S points per mixture, either z ~ N(0, 1) or
    drawn from the mixture itself (points within a few stds of a mean: where an expanded quadratic cancels)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*lead, K, generator=g)
    means = torch.randn(*lead, K, D, generator=g)
    stds = min_std + (max_std - min_std) * torch.rand(*lead, K, D, generator=g)
    mix = GMM(logits, means, stds)
    z = mix.sample(S, g) if z_from_mixture else torch.randn(*lead, S, D, generator=g)
    return mix, z


def rel_norm_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


# Per-token mixtures (leading dims (B, N), S = 1: the informative term; GMM.log_prob's direct path) and one shared
# mixture per sample (S = N: the redundant term; the expanded path).
LAYOUTS = {"per-token": ((4, 6), 8, 24, 1), "shared": ((3,), 16, 48, 40)}


def random_gmm(lead, K, D, seed):
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(*lead, K, generator=g)
    means = 2 * torch.randn(*lead, K, D, generator=g)
    stds = 0.3 + torch.rand(*lead, K, D, generator=g) * 1.5
    return GMM(logits, means, stds)


def test_log_prob_matches_scipy_shared_mixture():
    torch.manual_seed(0)
    lead, K, D, S = (2, 3), 4, 3, 5
    g = random_gmm(lead, K, D, 0)
    z = 2 * torch.randn(*lead, S, D)
    got = g.log_prob(z)
    assert got.shape == (*lead, S)
    for a in range(lead[0]):
        for b in range(lead[1]):
            ref = ref_log_prob(g.logits[a, b].numpy(), g.means[a, b].numpy(), g.stds[a, b].numpy(),
                               z[a, b].numpy())
            np.testing.assert_allclose(got[a, b].double().numpy(), ref, rtol=1e-5, atol=1e-4)


def test_log_prob_single_point_per_mixture_and_logit_shift_invariance():
    torch.manual_seed(1)
    g = random_gmm((6,), 3, 2, 1)
    z = torch.randn(6, 1, 2)
    got = g.log_prob(z)
    assert got.shape == (6, 1)
    shifted = GMM(g.logits + 7.0, g.means, g.stds).log_prob(z)  # logits are unnormalised
    torch.testing.assert_close(got, shifted, rtol=1e-5, atol=1e-5)
    for i in range(6):
        ref = ref_log_prob(g.logits[i].numpy(), g.means[i].numpy(), g.stds[i].numpy(), z[i].numpy())
        np.testing.assert_allclose(got[i].double().numpy(), ref, rtol=1e-5, atol=1e-4)


def test_density_integrates_to_one_1d():
    torch.manual_seed(2)
    g = random_gmm((1,), 3, 1, 2)
    grid = torch.linspace(-15, 15, 30001)
    dens = g.log_prob(grid.reshape(1, -1, 1)).exp()[0].double().numpy()
    total = integrate.trapezoid(dens, grid.double().numpy())
    assert abs(total - 1.0) < 1e-4


def test_sampling_matches_density_ks():
    torch.manual_seed(3)
    logits = torch.tensor([[0.3, -1.0, 1.2]])
    means = torch.tensor([[[-2.0], [0.5], [3.0]]])
    stds = torch.tensor([[[0.5], [1.5], [0.8]]])
    g = GMM(logits, means, stds)
    gen = torch.Generator().manual_seed(123)
    x = g.sample(20000, gen)
    assert x.shape == (1, 20000, 1)
    cdf = mixture_cdf(logits[0].numpy(), means[0, :, 0].numpy(), stds[0, :, 0].numpy())
    res = stats.kstest(x[0, :, 0].double().numpy(), cdf)
    assert res.pvalue > 1e-3, res
    # A wrong mixture (weights ignored) must be rejected by the same test: the test has power.
    wrong = mixture_cdf(np.zeros(3), means[0, :, 0].numpy(), stds[0, :, 0].numpy())
    assert stats.kstest(x[0, :, 0].double().numpy(), wrong).pvalue < 1e-6


def test_sampling_batched_mixtures_are_independent_and_correct():
    torch.manual_seed(4)
    # Two different mixtures in the batch; each row must follow its own mixture.
    logits = torch.tensor([[0.0, 1.0], [2.0, -2.0]])
    means = torch.tensor([[[-1.0], [2.0]], [[5.0], [-5.0]]])
    stds = torch.tensor([[[1.0], [0.5]], [[0.7], [2.0]]])
    g = GMM(logits, means, stds)
    x = g.sample(20000, torch.Generator().manual_seed(7))
    assert x.shape == (2, 20000, 1)
    for b in range(2):
        cdf = mixture_cdf(logits[b].numpy(), means[b, :, 0].numpy(), stds[b, :, 0].numpy())
        assert stats.kstest(x[b, :, 0].double().numpy(), cdf).pvalue > 1e-3


def test_sampling_moments_multidim():
    """Mean and (full) covariance of a 2-D diagonal-component mixture: E = sum w mu,
    Cov = sum w (diag s² + mu mu^T) - E E^T (components are diagonal, the mixture is not)."""
    torch.manual_seed(5)
    logits = torch.tensor([0.5, -0.5])
    means = torch.tensor([[1.0, -1.0], [-2.0, 3.0]])
    stds = torch.tensor([[0.5, 1.0], [1.0, 0.3]])
    w = torch.softmax(logits.double(), 0)
    m = means.double()
    mean_ref = (w[:, None] * m).sum(0)
    second = sum(w[k] * (torch.diag(stds[k].double() ** 2) + torch.outer(m[k], m[k])) for k in range(2))
    cov_ref = second - torch.outer(mean_ref, mean_ref)
    x = GMM(logits[None], means[None], stds[None]).sample(40000, torch.Generator().manual_seed(0))[0].double()
    assert torch.allclose(x.mean(0), mean_ref, atol=0.05)
    assert torch.allclose(torch.cov(x.T), cov_ref, atol=0.1)
    assert cov_ref[0, 1] < -1.0  # the reference has strong cross-correlation: a diagonal sampler would fail


def test_pick_components_frequencies_chi_square():
    torch.manual_seed(6)
    logits = torch.tensor([[1.0, 0.0, -1.0, 0.5]])
    g = GMM(logits, torch.zeros(1, 4, 2), torch.ones(1, 4, 2))
    comp = g.pick_components(20000, torch.Generator().manual_seed(1))
    assert comp.shape == (1, 20000) and comp.dtype == torch.int64
    counts = np.bincount(comp[0].numpy(), minlength=4)
    expected = 20000 * special.softmax(logits[0].double().numpy())
    assert stats.chisquare(counts, expected).pvalue > 1e-3
    mu, sd = GMM(logits, torch.randn(1, 4, 2), torch.rand(1, 4, 2) + 0.1).components(comp[:, :5])
    assert mu.shape == (1, 5, 2) and sd.shape == (1, 5, 2)


def test_components_and_index_select_the_right_entries():
    torch.manual_seed(7)
    g = random_gmm((3,), 4, 2, 7)
    comp = torch.tensor([[0, 3], [2, 2], [1, 0]])
    mu, sd = g.components(comp)
    for b in range(3):
        for s in range(2):
            assert torch.equal(mu[b, s], g.means[b, comp[b, s]])
            assert torch.equal(sd[b, s], g.stds[b, comp[b, s]])
    sub = g.index(torch.tensor([2, 0]))
    assert torch.equal(sub.logits, g.logits[[2, 0]]) and torch.equal(sub.means, g.means[[2, 0]])
    assert torch.equal(sub.stds, g.stds[[2, 0]])


@pytest.mark.parametrize("logit_scale,std_scale", [(0.2, 0.9), (2.0, 1.5), (1.0, 0.5)])
def test_tempered_matches_formula(logit_scale, std_scale):
    torch.manual_seed(8)
    g = random_gmm((2,), 3, 2, 8)
    t = g.tempered(logit_scale, std_scale)
    assert torch.allclose(t.logits, g.logits * logit_scale)
    assert torch.allclose(t.stds, g.stds * std_scale)
    assert torch.equal(t.means, g.means)
    z = torch.randn(2, 4, 2)
    got = t.log_prob(z)
    for b in range(2):
        ref = ref_log_prob(g.logits[b].numpy() * logit_scale, g.means[b].numpy(), g.stds[b].numpy() * std_scale,
                           z[b].numpy())
        np.testing.assert_allclose(got[b].double().numpy(), ref, rtol=1e-5, atol=1e-4)
    # the original mixture is untouched
    np.testing.assert_allclose(
        g.log_prob(z)[0].double().numpy(),
        ref_log_prob(g.logits[0].numpy(), g.means[0].numpy(), g.stds[0].numpy(), z[0].numpy()), rtol=1e-5, atol=1e-4)


def test_tempered_sampling_ks():
    torch.manual_seed(9)
    logits = torch.tensor([[1.0, -1.0]])
    means = torch.tensor([[[-1.0], [2.0]]])
    stds = torch.tensor([[[0.6], [0.9]]])
    g = GMM(logits, means, stds).tempered(0.3, 0.7)
    x = g.sample(20000, torch.Generator().manual_seed(11))[0, :, 0].double().numpy()
    cdf = mixture_cdf(0.3 * logits[0].numpy(), means[0, :, 0].numpy(), 0.7 * stds[0, :, 0].numpy())
    assert stats.kstest(x, cdf).pvalue > 1e-3


def test_sampling_is_reproducible_with_generator():
    torch.manual_seed(10)
    g = random_gmm((2,), 3, 2, 10)
    a = g.sample(50, torch.Generator().manual_seed(5))
    b = g.sample(50, torch.Generator().manual_seed(5))
    c = g.sample(50, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_gmm_head_shapes_and_std_floor():
    torch.manual_seed(11)
    min_scale = 0.05
    head = GMMHead(width=16, components=3, dim=2, min_scale=min_scale)
    with torch.no_grad():
        head.proj.weight.normal_(std=10.0)  # drive raw scales very negative and very positive
    h = 50 * torch.randn(4, 5, 16)
    g = head(h)
    assert g.logits.shape == (4, 5, 3) and g.means.shape == (4, 5, 3, 2) and g.stds.shape == (4, 5, 3, 2)
    assert torch.all(g.stds >= min_scale)
    assert g.stds.min() < min_scale + 1e-2  # the floor is reached, not just respected
    assert torch.isfinite(g.log_prob(torch.randn(4, 5, 1, 2))).all()


def test_gmm_head_untrained_is_near_standard_normal():
    torch.manual_seed(12)
    head = GMMHead(width=16, components=3, dim=2, min_scale=1e-3)
    g = head(torch.randn(8, 16))
    # std = min_scale + square_plus(~0) = ~1, means ~0, nearly uniform weights, yet components differ.
    assert torch.allclose(g.stds, torch.ones_like(g.stds), atol=0.2)
    assert g.means.abs().max() < 0.5
    assert (g.means[:, 0] - g.means[:, 1]).abs().max() > 0


@pytest.mark.parametrize("z_from_mixture", [False, True], ids=["z~N(0,1)", "z~mixture"])
@pytest.mark.parametrize("min_std", [1e-3, 0.3])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_log_prob_and_gradients_match_broadcast_reference(layout, min_std, z_from_mixture):
    """Same values and gradients (w.r.t. z, means, stds, logits) as the broadcast form, both in float32.

    Tolerances are float32 rounding: values to rtol 1e-6 + atol 1e-5 (the two float32 computations differ by
    <= 4e-7 relative), gradients to 1e-5 in relative Frobenius norm (measured <= 3e-6)."""
    lead, K, D, S = LAYOUTS[layout]
    g, z = realistic_gmm(lead, K, D, S, min_std, z_from_mixture, seed=20)
    leaves = [g.logits, g.means, g.stds, z]
    for t in leaves:
        t.requires_grad_(True)
    got, ref = g.log_prob(z), broadcast_log_prob(g, z)
    assert got.shape == ref.shape == (*lead, S) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5)
    upstream = torch.randn(got.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((got * upstream).sum(), leaves)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), leaves)
    for name, a, b in zip(["logits", "means", "stds", "z"], grads, ref_grads):
        assert rel_norm_error(a, b) <= 1e-5, name


def test_log_prob_is_accurate_where_an_expanded_float32_quadratic_cancels():
    """Stds near the 1e-3 floor with points drawn from the mixture at the patch-8 redundant sizes (K = 200,
    D = 640): the expanded terms are ~|z|²/std² ~ 1e8 while the quadratic is ~D, which in float32 would be off by
    up to ~1e2 nats. Against the broadcast form in float64 the result must be as good as float32 rounding of
    the value itself (rtol 1e-6), and no worse than the float32 broadcast form."""
    g, z = realistic_gmm((2,), 200, 640, 32, 1e-3, True, seed=21, max_std=2e-3)
    truth = broadcast_log_prob(double(g), z.double())
    got = g.log_prob(z)
    torch.testing.assert_close(got.double(), truth, rtol=1e-6, atol=1e-5)
    old_err = (broadcast_log_prob(g, z).double() - truth).abs().max()
    assert (got.double() - truth).abs().max() <= 2 * old_err


class MaxNumel(TorchDispatchMode):
    """Records the largest tensor any aten op (forward or backward) returns."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def test_log_prob_builds_no_point_component_dim_tensor():
    """S > 1 points per mixture: no op, forward or backward, returns a tensor as large as one mixture's (S, K, D);
    the broadcast reference under the same recorder does (the recorder sees what it should)."""
    B, S, K, D = 2, 32, 24, 40
    g, z = realistic_gmm((B,), K, D, S, 0.1, False, seed=22)
    for t in (g.logits, g.means, g.stds, z):
        t.requires_grad_(True)
    for fn, expect_large in ((GMM.log_prob, False), (broadcast_log_prob, True)):
        with MaxNumel() as rec:
            fn(g, z).sum().backward()
        if expect_large:
            assert rec.max_numel == B * S * K * D
        else:  # nothing larger than z or the means
            assert rec.max_numel <= B * max(S, K) * D < S * K * D, rec.max_numel


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS reset needs Linux /proc")
def test_log_prob_peak_memory_at_patch8_redundant_sizes():
    """Forward + backward at B = 2, S = 256, K = 200, D = 640 in a fresh process: the peak RSS grows by less than
    100 MB, where one (B, S, K, D) float32 intermediate of the broadcast form alone is 262 MB. As a check of the
    measurement, the broadcast form's forward pass alone, in another fresh process, grows it by more than that."""
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_gmm import broadcast_log_prob, realistic_gmm
        torch.set_num_threads(1)
        peak_mb = lambda: next(int(line.split()[1]) for line in open("/proc/self/status")
                               if line.startswith("VmHWM:")) / 1e3  # kB -> MB
        g, z = realistic_gmm((2,), 200, 640, 256, 1e-3, True, seed=23)
        for t in (g.logits, g.means, g.stds, z):
            t.requires_grad_(True)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # peak RSS := current RSS
        before = peak_mb()
        if sys.argv[1] == "new":
            g.log_prob(z).sum().backward()
        else:
            with torch.no_grad():
                broadcast_log_prob(g, z)
        print(peak_mb() - before)
    """)

    def growth_mb(variant: str) -> float:
        out = subprocess.run([sys.executable, "-c", script, variant], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return float(out.stdout)

    assert growth_mb("new") < 100
    assert growth_mb("reference") > 262
