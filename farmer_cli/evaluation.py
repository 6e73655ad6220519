"""The computations behind ``farmer evaluate``: test bits/dim, generative-classifier accuracy, generated samples,
their recognisability by a reference classifier, and FID / precision-recall features with cached reference
statistics."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

import numpy as np
import torch

from .config import Config, SamplingConfig
from .batching import iterate_batches
from .data import DataBundle, ImageDataset
from .model import Farmer, dequantize
from .scoring import bits_per_dim

METRICS = ("fid", "pr", "bpd", "classify", "sample-acc")


@torch.no_grad()
def generative_classifier(model: Farmer, dataset: ImageDataset, max_classes: int, batch: int, limit: int,
                          seed: int = 0) -> dict:
    """Accuracy of argmax_y log p(x | y) (Bayes' rule with a uniform class prior) on test images.

    With more than ``max_classes`` classes, only images of the first ``max_classes`` classes are used and the
    argmax runs over those classes (reported)."""
    K = min(model.cfg.num_classes, max_classes)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    classes = torch.arange(K, device=device)
    correct = total = 0
    for u, y in iterate_batches(dataset, batch):
        keep = y < K
        u, y = u[keep], y[keep]
        if len(y) == 0:
            continue
        if limit > 0 and total >= limit:
            break
        x = dequantize(u, "uniform", generator=gen).to(device)
        pred = model.class_log_likelihoods(x, classes).argmax(1).cpu()
        correct += (pred == y).sum().item()
        total += len(y)
    return {"accuracy": correct / max(1, total), "n": total, "classes": K, "capped": K < model.cfg.num_classes}


@torch.no_grad()
def generate(model: Farmer, n: int, s: SamplingConfig, seed: int, batch: int, student=None, on_batch=None):
    """n class-balanced samples (labels 0,1,...,K-1,0,1,...) -> (uint8 (n, C, H, W), labels (n,))."""
    gen = torch.Generator(model.device).manual_seed(seed)
    labels = torch.arange(n) % model.cfg.num_classes
    images = []
    for y in labels.split(batch):
        images.append(model.sample(y, s, gen, student=student).cpu())
        if on_batch is not None:
            on_batch(len(y))
    return torch.cat(images), labels


def reference_classifier_accuracy(train: ImageDataset, images: torch.Tensor, labels: torch.Tensor,
                                  limit: int = 5000) -> dict:
    """Share of generated images that a logistic regression fitted on real training pixels reads as the class
    asked for: "would a simple classifier recognise these samples?" (scikit-learn)."""
    from sklearn.linear_model import LogisticRegression

    xs, ys = [], []
    for u, y in iterate_batches(train, 256, limit):
        xs.append(u.flatten(1).float() / 255.0)
        ys.append(y)
    clf = LogisticRegression(max_iter=300, C=0.05)
    clf.fit(torch.cat(xs).numpy(), torch.cat(ys).numpy())
    pred = clf.predict(images.flatten(1).float().numpy() / 255.0)
    return {"accuracy": float((pred == labels.numpy()).mean()), "n": len(labels), "fitted_on": sum(len(y) for y in ys)}


def reference_stats(net, weights_sha: str, dataset: ImageDataset, key: dict, batch: int, limit: int):
    """Inception features and (mean, cov) of real images, cached under the user's cache dir, keyed by the data
    source, split, resolution, channels, resize rule, image count and weights."""
    from .metrics import cache_dir, feature_stats, inception_features

    key = {**key, "weights_sha256": weights_sha, "limit": limit}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / "fid-stats" / f"{digest}.npz"
    if path.exists():
        data = np.load(path)
        return torch.from_numpy(data["features"]), data["mu"], data["cov"], True
    images = torch.cat([u for u, _ in iterate_batches(dataset, batch, limit)])
    feats = inception_features(net, images)
    mu, cov = feature_stats(feats)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, features=feats.numpy(), mu=mu, cov=cov, key=json.dumps(key))
    tmp.replace(path)
    return feats, mu, cov, False


def fid_and_pr(net, fake_images: torch.Tensor, real_feats: torch.Tensor, mu_r, cov_r, k: int = 3) -> dict:
    from .metrics import feature_stats, frechet_distance, inception_features, precision_recall

    fake = inception_features(net, fake_images)
    mu_f, cov_f = feature_stats(fake)
    precision, recall = precision_recall(real_feats, fake, k)
    return {"fid": frechet_distance(mu_f, cov_f, mu_r, cov_r), "precision": precision, "recall": recall,
            "n_fake": len(fake), "n_real": len(real_feats), "k": k}


def evaluate(model: Farmer, cfg: Config, data: DataBundle, metrics: list[str], *, split: str = "test",
             n_samples: int = 1000, batch: int = 100, bpd_draws: int = 1, limit: int = 0, max_classes: int = 100,
             seed: int = 0, student=None, inception=None, on_stage=lambda name: None,
             on_samples=lambda k: None) -> dict:
    """The evaluation protocol: every requested metric of ``METRICS`` as one JSON-ready dict.

    ``inception``: (network, protocol dict) from :mod:`farmer_cli.metrics`, needed for fid and pr;
    ``on_stage(name)`` / ``on_samples(k)`` report progress. Non-finite figures become None."""
    reference = data.test if split == "test" else data.train
    result: dict = {"data": cfg.data.source, "split": split, "seed": seed, "metrics": {}}
    m = result["metrics"]
    if "bpd" in metrics:
        on_stage("scoring test bits/dim")
        m["bpd_unconditional"] = bits_per_dim(model, reference, False, bpd_draws, batch, limit, seed)
        m["bpd_conditional"] = bits_per_dim(model, reference, True, bpd_draws, batch, limit, seed)
    if "classify" in metrics:
        on_stage("generative classifier")
        m["classify"] = generative_classifier(model, reference, max_classes, batch, limit, seed)
    if any(x in metrics for x in ("fid", "pr", "sample-acc")):
        on_stage("sampling")
        images, labels = generate(model, n_samples, cfg.sampling, seed, batch, student, on_batch=on_samples)
        result["sampling"] = dataclasses.asdict(cfg.sampling) | {
            "student": student is not None, "n_samples": n_samples, "denoise_sigma": model.denoise_sigma(cfg.sampling)}
        if "sample-acc" in metrics:
            m["sample_acc"] = reference_classifier_accuracy(data.train, images, labels)
        if inception is not None and ("fid" in metrics or "pr" in metrics):
            on_stage("Inception features")
            net, protocol = inception
            key = {"source": cfg.data.source, "split": split, "resolution": cfg.model.image_size,
                   "channels": cfg.model.channels, "split_seed": cfg.data.split_seed,
                   "test_fraction": cfg.data.test_fraction}
            real, mu_r, cov_r, cached = reference_stats(net, protocol["weights_sha256"], reference, key, batch, 0)
            result["protocol"] = protocol | {"reference_cached": cached}
            fid = fid_and_pr(net, images, real, mu_r, cov_r)
            if "fid" in metrics:
                m["fid"] = {"value": fid["fid"], "n_fake": fid["n_fake"], "n_real": fid["n_real"]}
            if "pr" in metrics:
                m["precision_recall"] = {k: fid[k] for k in ("precision", "recall", "k", "n_fake", "n_real")}
    return json_safe(result)


def json_safe(value):
    """Replace NaN and infinities (not valid JSON) by None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
