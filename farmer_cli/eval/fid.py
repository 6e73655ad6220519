"""FID, precision/recall and Inception Score of sample features against a reference: cached split or --ref-stats."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import torch

from farmer_cli.data.batching import iterate_batches
from farmer_cli.config.schema import Config
from farmer_cli.data.dataset import ImageDataset
from farmer_cli.eval.inception import RESIZE_RULES, inception_features, logits_layer
from farmer_cli.eval.feature_metrics import feature_stats, frechet_distance, inception_score, precision_recall
from farmer_cli.eval.ref_stats import iter_npz_images, save_ref_stats as write_ref_stats, write_arrays
from farmer_cli.storage import WriteError, atomic_write, cache_dir


def _features(net, image_batches, batch: int, resize: str) -> torch.Tensor:
    """float32 Inception features (N, F) of an iterable of uint8 image batches, one batch in memory at a time."""
    parts = [inception_features(net, u, batch, resize=resize).float() for u in image_batches]
    return torch.cat(parts) if parts else torch.zeros(0, 0)


def _cache_path(key: dict, prefix: str, suffix: str) -> Path:
    """Where reference features keyed by ``key`` are cached: ``<cache>/farmer/fid-stats/<prefix><digest><suffix>``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir("fid-stats", f"{prefix}{digest}{suffix}")


def stream_features(net, dataset: ImageDataset, batch: int, limit: int = 0, resize: str = "antialias") -> torch.Tensor:
    """Inception features (N, F) float64 of the first ``limit`` images of ``dataset`` (0: all), one batch of images
    in memory at a time."""
    return _features(net, (u for u, _ in iterate_batches(dataset, batch, limit)), batch, resize).double()


def _split_key(cfg: Config, split: str, reference: ImageDataset) -> dict:
    """What the cached statistics of a data split are keyed by, besides the weights, limit and resize rule."""
    return {"source": cfg.data.source, "split": split, "resolution": cfg.model.image_size,
            "channels": cfg.model.channels, "split_seed": cfg.data.split_seed,
            "test_fraction": cfg.data.test_fraction, "content": reference.fingerprint()}


def _stats_cache_path(weights_sha: str, key: dict, limit: int, resize: str) -> tuple[dict, Path]:
    key = {**key, "weights_sha256": weights_sha, "limit": limit}
    if resize != "antialias":  # the default rule keeps the key (and the caches) of earlier releases
        key["resize"] = RESIZE_RULES[resize]
    return key, _cache_path(key, "", ".npz")


def _ref_file_cache_path(stats: dict, weights_sha: str, resize: str) -> tuple[dict, Path]:
    key = {"ref_file_sha256": stats["sha256"], "weights_sha256": weights_sha, "resize": RESIZE_RULES[resize]}
    return key, _cache_path(key, "ref-", ".npy")


def check_cache_writable(cfg: Config, metrics: list[str], split: str, reference: ImageDataset, weights_sha: str,
                         ref_stats: dict | None, resize: str = "antialias") -> None:
    """Before any sampling: where :func:`fid_metrics` will write reference features to the cache (they are not
    cached yet), the cache directory can be created and written; a WriteError naming it otherwise (instead of
    failing after all the samples were drawn)."""
    if ref_stats is None:
        path = _stats_cache_path(weights_sha, _split_key(cfg, split, reference), 0, resize)[1]
    elif ref_stats["act"] is None and ref_stats.get("images") is not None and "pr" in metrics:
        path = _ref_file_cache_path(ref_stats, weights_sha, resize)[1]
    else:
        return  # the file's own features: nothing is cached
    if path.exists():
        return
    import tempfile

    folder = path.parent
    existing = next(p for p in [folder, *folder.parents] if p.exists())
    why = None if existing.is_dir() else "a file, not a directory"
    if why is None:
        try:  # really create a file: permissions say yes to root on a read-only file system
            with tempfile.TemporaryFile(dir=existing, prefix=".farmer-probe-"):
                pass
        except OSError as err:
            why = err.strerror or str(err)
    if why is not None:
        raise WriteError(f"{folder}: the FID cache cannot be written ({existing}: {why}); evaluate keeps the "
                         "reference features there: set XDG_CACHE_HOME to a writable directory")


def reference_stats(net, weights_sha: str, dataset: ImageDataset, key: dict, batch: int, limit: int,
                    resize: str = "antialias"):
    """Inception features and (mean, cov) of real images, cached under the user's cache dir, keyed by the data
    source, split, resolution, channels, resize rule, image count, weights and the images' content
    (``key["content"]``: their files' resolved paths, sizes and times, or their bytes). Images are streamed:
    features are computed batch by batch and no more than one batch of images is held."""
    key, path = _stats_cache_path(weights_sha, key, limit, resize)
    cached = _read_cached_stats(path)
    if cached is not None:
        return (*cached, True)
    feats = stream_features(net, dataset, batch, limit, resize)
    mu, cov = feature_stats(feats)
    arrays = {"features": feats.numpy(), "mu": mu, "cov": cov, "key": np.array(json.dumps(key))}
    atomic_write(path, lambda tmp: write_arrays(tmp, arrays))
    return feats, mu, cov, False


def _read_cached_stats(path: Path):
    """(features, mu, cov) from a cache file written by :func:`reference_stats`, or None when it is missing or not
    such a file (then it is computed again and rewritten)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            feats, mu, cov = data["features"], data["mu"], data["cov"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    F = feats.shape[-1] if feats.ndim == 2 else -1
    if feats.dtype.kind != "f" or mu.shape != (F,) or cov.shape != (F, F):
        return None
    if not (np.isfinite(feats).all() and np.isfinite(mu).all() and np.isfinite(cov).all()):
        return None
    return torch.from_numpy(feats), mu, cov


def _read_cached_features(path: Path) -> torch.Tensor | None:
    """Features (n, F) float64 from a cache file written by :func:`ref_file_features`, or None when it is missing,
    damaged or not such a file (then they are computed again and the file rewritten)."""
    try:
        feats = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if not isinstance(feats, np.ndarray) or feats.ndim != 2 or feats.dtype.kind != "f" or not np.isfinite(feats).all():
        return None
    return torch.from_numpy(feats).double()


def ref_file_features(net, stats: dict, weights_sha: str, batch: int, resize: str = "antialias"):
    """Features of the reference images that a --ref-stats file ships instead of features (ADM's ``arr_0``),
    streamed from the archive and cached like :func:`reference_stats` (keyed by the file's and the weights'
    sha256 and the resize rule). -> (features (n, F) float64, cached?)"""
    key, path = _ref_file_cache_path(stats, weights_sha, resize)
    cached = _read_cached_features(path)
    if cached is not None:
        return cached, True
    feats = _features(net, iter_npz_images(stats["path"], batch=batch), batch, resize)
    atomic_write(path, lambda tmp: write_arrays(tmp, {"": feats.numpy()}))
    return feats.double(), False


def fid_metrics(cfg: Config, metrics: list[str], split: str, reference: ImageDataset, fake: torch.Tensor,
                batch: int, net, protocol: dict, ref_stats: dict | None, save_ref_stats, resize: str, on_stage):
    """(protocol record, {"fid", "precision_recall", "inception_score"}) from the gathered fake features."""
    if ref_stats is not None:
        mu_r, cov_r, real = ref_stats["mu"], ref_stats["sigma"], ref_stats["act"]
        recorded = ref_stats.get("protocol")
        described = {"kind": "file", "file": ref_stats["path"], "sha256": ref_stats["sha256"],
                     "n_act": None if real is None else len(real),
                     "protocol": recorded or "not recorded in the file (ADM's reference batches: TF 2015-12-05 "
                                             "Inception graph, its own resize_bilinear, N for mu/sigma not stored)"}
        differs = [f"{what} {recorded.get(key)!r} there, {protocol[key]!r} here" for key, what in
                   (("resize_name", "resize"), ("weights_sha256", "Inception weights sha256"))
                   if recorded and recorded.get(key) != protocol[key]]
        if not recorded and protocol["resize_name"] != "tf-legacy":
            differs.append(f"ADM's reference batches were resized by the TF graph (tf-legacy), "
                           f"{protocol['resize_name']!r} here")
        if differs:
            described["warning"] = "the file was made with another protocol (" + "; ".join(differs) + \
                                   "): these figures are not comparable"
        n_real_stats = recorded.get("n_real") if recorded else None
        if real is None and ref_stats.get("images") is not None and "pr" in metrics:
            on_stage(f"Inception features of the {ref_stats['images'][0]:,} reference images in the file")
            real, cached = ref_file_features(net, ref_stats, protocol["weights_sha256"], batch, resize)
            described["pr_features"] = (f"computed here from the file's {len(real):,} images ('arr_0', as ADM's "
                                        f"evaluator does), resize {resize}" + (" (cached)" if cached else ""))
        elif real is not None:
            described["pr_features"] = "the file's 'act'"
    else:
        on_stage(f"Inception features of the {split} split")
        key = _split_key(cfg, split, reference)
        real, mu_r, cov_r, cached = reference_stats(net, protocol["weights_sha256"], reference, key, batch, 0, resize)
        described = {"kind": "data", "source": cfg.data.split_source(split), "split": split, "n": len(real), "cached": cached}
        n_real_stats = len(real)
        if save_ref_stats is not None:
            write_ref_stats(save_ref_stats, real, protocol | {"reference": described, "n_real": len(real)}, mu_r, cov_r)
            described["saved_to"] = str(save_ref_stats)
    record = protocol | {"reference": described, "n_fake": len(fake), "n_real": n_real_stats}
    out: dict = {}
    if "fid" in metrics:
        on_stage("FID")
        mu_f, cov_f = feature_stats(fake)
        out["fid"] = {"value": frechet_distance(mu_f, cov_f, mu_r, cov_r), "n_fake": len(fake), "n_real": n_real_stats,
                      "reference": reference_label(described), "resize": resize}
        weight, why = logits_layer(net, fake.shape[1])
        out["inception_score"] = (f"unavailable: {why}" if weight is None
                                  else inception_score(fake, weight) | {"bias": False})
    if "pr" in metrics:
        if real is None:
            out["precision_recall"] = (f"unavailable: {ref_stats['path']} has neither 'act' (reference features) "
                                       "nor 'arr_0' (reference images); precision/recall needs one of them")
        else:
            on_stage("precision / recall")
            precision, recall = precision_recall(real, fake, 3)
            out["precision_recall"] = {"precision": precision, "recall": recall, "k": 3, "n_fake": len(fake),
                                       "n_real": len(real), "reference": reference_label(described)}
    return record, out


def reference_label(described: dict) -> str:
    """One line naming a reference: "<file> (sha256 <first 12>)" or "<source> <split> split"."""
    if described["kind"] == "file":
        return f"{described['file']} (sha256 {described['sha256'][:12]})"
    return f"{described['source']} {described['split']} split"
