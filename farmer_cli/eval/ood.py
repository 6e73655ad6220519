"""Out-of-distribution scores from exact likelihoods, and how well they separate two sets (``farmer ood``).

Likelihood models famously give *higher* likelihood to simpler images from elsewhere (trained on Fashion-MNIST,
they prefer MNIST digits), because bits/dim is dominated by how compressible an image is. Scores, larger = more
out-of-distribution:

``combined``    the larger of two two-sided z-scores against the model's own training images: of bits/dim, and of
                the complexity-corrected bits/dim below. The default: on MNIST / Fashion-MNIST in both directions,
                uniform noise and constant images it separated every case with AUROC >= 0.98, where each single
                score fails somewhere (bench/ood.py; docs/benchmarks.md).
``bpd``         raw bits/dim (unconditional).
``complexity``  bits/dim minus the bits/dim of PNG on the same pixels: the likelihood corrected for the image's
                generic complexity (Serrà et al., ICLR 2020, "Input complexity and out-of-distribution detection
                with likelihood-based generative models").
``typicality``  |bits/dim − mean bits/dim of the model's own training images|: an image is suspicious when its
                likelihood is atypically high *or* low (Nalisnick et al. 2019, per image instead of per batch).
``ratio``       bits/dim minus the bits/dim under a background model (any second farmer run, e.g. one trained on
                other data): what the model knows beyond generic image statistics (Ren et al. 2019 and
                Schirrmeister et al. 2020 use such ratios).
"""

from __future__ import annotations

import numpy as np
import torch

from farmer_cli.data.batching import iterate_batches
from farmer_cli.data.dataset import ImageDataset
from farmer_cli.eval.bits import png_bytes, score_batch

SCORES = ("combined", "complexity", "bpd", "typicality", "ratio")
DEFAULT_SCORE = "combined"  # measured: bench/ood.py (docs/benchmarks.md)


@torch.no_grad()
def bits_per_dim_of(model, images: torch.Tensor, batch: int = 256, draws: int = 1, seed: int = 0) -> np.ndarray:
    """Unconditional bits/dim of uint8 images (N, C, H, W) -> (N,) float64."""
    gen = torch.Generator().manual_seed(seed)
    return torch.cat([score_batch(model, u, None, draws, gen)[1] for u in images.split(batch)]).double().numpy()


def png_bits_per_dim(images: torch.Tensor) -> np.ndarray:
    """Bits/dim of the PNG of every image (N, C, H, W) -> (N,)."""
    dims = images[0].numel()
    return np.array([png_bytes(u) * 8.0 / dims for u in images])


def training_statistics(model, train: ImageDataset, limit: int = 1000, batch: int = 256) -> dict[str, float]:
    """Mean and standard deviation of bits/dim and of complexity-corrected bits/dim over up to ``limit`` of the
    model's training images: the centre and scale of the two-sided scores."""
    images = torch.cat([u for u, _ in iterate_batches(train, batch, limit)])
    bpd = bits_per_dim_of(model, images, batch)
    corrected = bpd - png_bits_per_dim(images)
    return {"bpd_mean": float(bpd.mean()), "bpd_std": float(bpd.std()) or 1.0,
            "complexity_mean": float(corrected.mean()), "complexity_std": float(corrected.std()) or 1.0}


def scores(name: str, bpd: np.ndarray, images: torch.Tensor, train: dict[str, float] | None = None,
           background_bpd: np.ndarray | None = None) -> np.ndarray:
    """The score ``name`` (see the module doc) of each image from its bits/dim and what the score needs
    (``train``: :func:`training_statistics`; ``background_bpd``: bits/dim under a background model)."""
    if name == "bpd":
        return bpd
    if name == "complexity":
        return bpd - png_bits_per_dim(images)
    if name in ("typicality", "combined") and train is None:
        raise ValueError(f"the {name} score needs the statistics of the model's training images")
    if name == "typicality":
        return np.abs(bpd - train["bpd_mean"])
    if name == "combined":
        corrected = bpd - png_bits_per_dim(images)
        return np.maximum(np.abs(bpd - train["bpd_mean"]) / train["bpd_std"],
                          np.abs(corrected - train["complexity_mean"]) / train["complexity_std"])
    if name == "ratio":
        if background_bpd is None:
            raise ValueError("the ratio score needs a background model (--background CKPT)")
        return bpd - background_bpd
    raise ValueError(f"unknown OOD score '{name}'; choose from {', '.join(SCORES)}")


def separation(inside: np.ndarray, outside: np.ndarray) -> dict[str, float]:
    """How well a score (larger = more out-of-distribution) separates the two sets: AUROC (0.5 = chance, 1 =
    perfect) and the false-positive rate on in-distribution images at 95% true-positive rate on the others. Both
    depend on the scores' order only: an infinite score ranks beyond every finite one; a NaN score (a damaged
    checkpoint's likelihood) has no place in the order, so both figures are then NaN."""
    from sklearn.metrics import roc_auc_score, roc_curve

    labels = np.concatenate([np.zeros(len(inside)), np.ones(len(outside))])
    values = np.concatenate([inside, outside]).astype(np.float64)
    if np.isnan(values).any():
        return {"auroc": float("nan"), "fpr_at_95_tpr": float("nan"), "n_in": len(inside), "n_out": len(outside)}
    finite = values[np.isfinite(values)]
    if finite.size < values.size:  # the same order with finite numbers (sklearn refuses infinities)
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        values = np.where(values == np.inf, high + 1.0, np.where(values == -np.inf, low - 1.0, values))
    fpr, tpr, _ = roc_curve(labels, values)
    return {"auroc": float(roc_auc_score(labels, values)), "fpr_at_95_tpr": float(fpr[np.searchsorted(tpr, 0.95)]),
            "n_in": len(inside), "n_out": len(outside)}
