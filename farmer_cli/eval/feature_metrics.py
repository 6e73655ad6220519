"""Sample-quality statistics of feature sets: Fréchet distance, k-NN precision/recall, Inception Score."""

from __future__ import annotations

import numpy as np
import torch

from farmer_cli.eval.inception import WeightsError

__all__ = ["PR_BLOCK_BYTES", "WeightsError", "feature_stats", "frechet_distance", "inception_score", "pr_chunk",
           "precision_recall"]  # WeightsError: re-exported for farmer_cli.commands, which imports it from here


def feature_stats(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(N, F) -> mean (F,), covariance (F, F) in float64 (unbiased)."""
    f = features.double().numpy()
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """||mu1 - mu2||² + tr(C1 + C2 - 2 (C1 C2)^(1/2)).

    tr (C1 C2)^(1/2) = Σ sqrt(eig(S C2 S)) with S = C1^(1/2): a symmetric PSD eigenproblem, so no complex
    round-off as with a general matrix square root."""
    w, v = np.linalg.eigh(cov1)
    s = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(s @ cov2 @ s)
    trace_sqrt = np.sqrt(np.clip(cross, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * trace_sqrt)


# ----- k-NN precision / recall, in row blocks -----
PR_BLOCK_BYTES = 128 << 20  # one (rows, N) block of squared distances; peak memory ~ 2-3 blocks + the inputs


def pr_chunk(n: int, dtype: torch.dtype = torch.float64, block_bytes: int = PR_BLOCK_BYTES) -> int:
    """Rows per block so that a (rows, n) distance block takes at most ``block_bytes``."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return max(1, min(max(n, 1), block_bytes // (max(n, 1) * itemsize)))


def _sq_dist(a: torch.Tensor, a_sq: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances of rows of a (r, F) to rows of b (N, F): (r, N), clamped at 0."""
    d = torch.addmm(b_sq[None], a, b.T, alpha=-2.0)  # |b|² - 2 a·b, written into one (r, N) buffer
    return d.add_(a_sq[:, None]).clamp_(min=0)


def _kth_radius(x: torch.Tensor, k: int, chunk: int | None = None) -> torch.Tensor:
    """Squared distance of every row of x to its k-th nearest other row: (N,). Memory O(N · chunk)."""
    chunk = chunk or pr_chunk(len(x), x.dtype)
    sq = (x * x).sum(1)
    out = torch.empty(len(x), dtype=x.dtype)
    for s in range(0, len(x), chunk):
        d = _sq_dist(x[s:s + chunk], sq[s:s + chunk], x, sq)
        out[s:s + chunk] = d.topk(k + 1, dim=1, largest=False).values[:, k]  # +1: the point itself, at 0
    return out


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, chunk: int | None = None,
                     dtype: torch.dtype = torch.float64) -> tuple[float, float]:
    """k-NN manifold precision/recall (Kynkäänniemi et al. 2019).

    precision: share of fake points inside some real point's k-NN ball; recall: share of real points inside some
    fake point's k-NN ball (a ball's radius: the distance to the k-th nearest other point of its own set).

    Computed in blocks of ``chunk`` rows (default: :func:`pr_chunk`, a 128 MB block) against all N columns:
    memory O(N · chunk) besides the inputs, never an N x N matrix. Distances come from |a|² + |b|² - 2 a·b in
    ``dtype`` (float64 by default) and are compared squared."""
    if len(real) <= k or len(fake) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} real and fake points")
    real, fake = real.to(dtype), fake.to(dtype)
    chunk = chunk or pr_chunk(max(len(real), len(fake)), dtype)
    r_real, r_fake = _kth_radius(real, k, chunk), _kth_radius(fake, k, chunk)
    real_sq, fake_sq = (real * real).sum(1), (fake * fake).sum(1)
    fake_inside = torch.zeros(len(fake), dtype=torch.bool)  # inside some real ball: precision
    real_inside = torch.zeros(len(real), dtype=torch.bool)  # inside some fake ball: recall
    for s in range(0, len(fake), chunk):
        d = _sq_dist(fake[s:s + chunk], fake_sq[s:s + chunk], real, real_sq)  # (rows of fake, all real)
        fake_inside[s:s + chunk] = (d <= r_real[None]).any(dim=1)
        real_inside |= (d <= r_fake[s:s + chunk, None]).any(dim=0)
    return fake_inside.double().mean().item(), real_inside.double().mean().item()


# ----- Inception Score -----
def inception_score(features: torch.Tensor, weight: torch.Tensor, split_size: int = 5000) -> dict:
    """Inception Score from pool features (N, F) and the classifier weight (classes, F) of
    :func:`farmer_cli.eval.inception.logits_layer`: p(y|x) = softmax(f W^T)
    without the bias (as the TF implementation, ADM's evaluator and StyleGAN's metrics do), exp(E KL(p(y|x) ||
    p(y))) per split of ``split_size`` images, averaged over splits (ADM's evaluator: 5000)."""
    scores = []
    for s in range(0, len(features), split_size):
        logits = features[s:s + split_size].double() @ weight.double().T
        logp = torch.log_softmax(logits, dim=1)
        log_marginal = torch.logsumexp(logp, dim=0) - np.log(len(logp))
        kl = (logp.exp() * (logp - log_marginal[None])).sum(1).mean()
        scores.append(kl.exp().item())
    return {"value": float(np.mean(scores)), "splits": len(scores), "split_size": split_size, "n": len(features)}
