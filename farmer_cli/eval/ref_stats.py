"""Reference-statistics files in the .npz layout of ADM's reference batches: mu/sigma/act, streamed arr_0 images."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import torch

from farmer_cli.eval.inception import sha256
from farmer_cli.storage import atomic_write, parse_json
from farmer_cli.eval.feature_metrics import feature_stats

IMAGES_KEY = "arr_0"  # ADM's reference batches: the reference images, uint8 (n, H, W, 3)


class StatsError(ValueError):
    """A --ref-stats file that is missing, unreadable or not in the expected format."""


def load_ref_stats(path: Path, feature_dim: int | None = None) -> dict:
    """Read ``mu`` (F,), ``sigma`` (F, F) and, when present, ``act`` (n, F) from an ``.npz`` in the format of
    ADM's reference batches (e.g. ``VIRTUAL_imagenet256_labeled.npz``) or of ``--save-ref-stats``; StatsError
    otherwise. Returns mu, sigma (float64), act (float64 tensor or None), images (the shape of the reference
    images ``arr_0`` that ADM's files ship instead of features, or None; read later by :func:`iter_npz_images`),
    path, sha256, and the protocol the file records (files written by this tool) or None."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_file():
        raise StatsError(f"--ref-stats {path}: not a regular file; give the .npz file")
    if not path.is_file():
        raise StatsError(f"--ref-stats {path}: no such file (download ADM's reference batch beforehand; nothing is "
                         "downloaded at run time)")
    if not zipfile.is_zipfile(path):
        raise StatsError(f"--ref-stats {path}: not an .npz archive (an .npz is a zip of arrays, as np.savez writes; "
                         "expected mu (F,) and sigma (F, F), as ADM's reference batches)")
    _refuse_bombs(path)
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
            protocol = parse_json(str(data["protocol"])) if "protocol" in keys else None
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
    if act is not None and not bool(torch.isfinite(act).all()):
        raise StatsError(f"--ref-stats {path}: act (the reference features) holds NaN or infinity")
    scale = max(float(np.abs(sigma).max()), 1e-300)
    if not np.allclose(sigma, sigma.T, rtol=0, atol=1e-8 * scale) or np.linalg.eigvalsh(sigma).min() < -1e-6 * scale:
        raise StatsError(f"--ref-stats {path}: sigma is not a covariance matrix (symmetric, no negative "
                         "eigenvalues), so no FID can be computed against it")
    return {"mu": mu, "sigma": sigma, "act": act, "images": images, "path": str(path), "sha256": sha256(path),
            "protocol": protocol}


BOMB_BYTES = 64 << 20  # an array may expand past this size only at a plain zip's ratio (np.savez stores, ADM's too)
BOMB_RATIO = 20.0  # float statistics and images compress a few times at most; a zip bomb, a thousand times


def _refuse_bombs(path: Path) -> None:
    """StatsError for an archive member that would expand to more than :data:`BOMB_BYTES` at more than
    :data:`BOMB_RATIO` times its stored size: a few MB on disk must not become GBs in memory."""
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if info.file_size > BOMB_BYTES and info.file_size > BOMB_RATIO * max(1, info.compress_size):
                raise StatsError(f"--ref-stats {path}: '{info.filename}' would expand from {info.compress_size:,} to "
                                 f"{info.file_size:,} bytes ({info.file_size / max(1, info.compress_size):,.0f}x), "
                                 "which no statistics file does; refusing to decompress it (write the file with "
                                 "np.savez or --save-ref-stats)")


def _npy_header(fh) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fh)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(fh)
    raise ValueError(f"unsupported .npy format version {version}")


def _npz_image_shape(path: Path, key: str) -> tuple[int, ...]:
    """Shape of the uint8 NHWC image array ``key`` of an .npz, read from its header only; StatsError otherwise."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as fh:
        shape, fortran, dtype = _npy_header(fh)
    if dtype != np.uint8 or fortran or len(shape) != 4 or shape[3] not in (1, 3):
        raise StatsError(f"--ref-stats {path}: '{key}' is {dtype} {shape}; expected reference images, uint8 "
                         "(n, H, W, 3) as in ADM's reference batches")
    return tuple(shape)


def iter_npz_images(path: Path, key: str = IMAGES_KEY, batch: int = 100):
    """The uint8 NHWC images ``key`` of an .npz as (b, C, H, W) tensors, ``batch`` at a time, read from the archive
    as a stream: the whole array (2 GB for ADM's 10,000 256x256 images) is never in memory."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as fh:
        shape, _, dtype = _npy_header(fh)
        row = int(np.prod(shape[1:])) * dtype.itemsize
        for start in range(0, shape[0], batch):
            b = min(batch, shape[0] - start)
            data = fh.read(b * row)
            if len(data) != b * row:
                raise StatsError(f"--ref-stats {path}: '{key}' is truncated")
            yield torch.from_numpy(np.frombuffer(data, dtype=dtype).reshape(b, *shape[1:]).copy()).permute(0, 3, 1, 2)


def write_arrays(path: str, arrays: dict[str, np.ndarray]) -> None:
    """``arrays`` as an .npz (or one array as an .npy) at exactly ``path``: numpy appends a suffix to a name, not to a
    file object."""
    with open(path, "wb") as fh:
        if set(arrays) == {""}:
            np.save(fh, arrays[""])
        else:
            np.savez(fh, **arrays)


def save_ref_stats(path: Path, features: torch.Tensor, protocol: dict, mu=None, sigma=None) -> None:
    """Write ``mu``, ``sigma`` (float64) and ``act`` (the features, float32 as ADM's files) to ``path`` (.npz), plus
    the protocol as a JSON string; readable by :func:`load_ref_stats` and by ADM's evaluator."""
    if mu is None or sigma is None:
        mu, sigma = feature_stats(features)
    arrays = {"mu": mu, "sigma": sigma, "act": features.float().numpy(), "protocol": np.array(json.dumps(protocol))}
    atomic_write(Path(path), lambda tmp: write_arrays(tmp, arrays))


def reference_resize(stats: dict) -> str:
    """The resize rule a loaded reference file was made with: the one it records (files farmer wrote), else
    ``tf-legacy`` (ADM's reference batches record none; they were made inside the TF Inception graph)."""
    from farmer_cli.eval.inception import RESIZE_RULES

    recorded = (stats.get("protocol") or {}).get("resize_name")
    return recorded if recorded in RESIZE_RULES else "tf-legacy"
