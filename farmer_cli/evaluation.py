"""The computations behind ``farmer evaluate``: test bits/dim, generative-classifier accuracy, generated samples,
their recognisability by a reference classifier, and FID / precision-recall features with cached reference
statistics."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch

from .config import SamplingConfig
from .data import ImageDataset, collate
from .model import Farmer, dequantize
from .scoring import score_batch


def _batches(dataset: ImageDataset, batch: int, limit: int):
    n = len(dataset) if limit <= 0 else min(limit, len(dataset))
    subset = torch.utils.data.Subset(dataset, range(n))
    for u, y, _ in torch.utils.data.DataLoader(subset, batch_size=batch, collate_fn=collate):
        yield u, y


@torch.no_grad()
def bits_per_dim(model: Farmer, dataset: ImageDataset, conditional: bool, draws: int, batch: int, limit: int,
                 seed: int = 0) -> dict:
    """Mean and standard error of test bits/dim over images (each averaged over ``draws`` dequantisations)."""
    gen = torch.Generator().manual_seed(seed)
    values = [score_batch(model, u, y if conditional else None, draws, gen)[1] for u, y in _batches(dataset, batch, limit)]
    v = torch.cat(values).double()
    return {"mean": v.mean().item(), "stderr": (v.std() / math.sqrt(len(v))).item() if len(v) > 1 else float("nan"),
            "n": len(v), "draws": draws}


@torch.no_grad()
def generative_classifier(model: Farmer, dataset: ImageDataset, max_classes: int, batch: int, limit: int,
                          seed: int = 0) -> dict:
    """Accuracy of argmax_y log p(x | y) (Bayes' rule with a uniform class prior) on test images.

    The AF is unconditional (unless model.af_class_conditional), so each image is encoded once and only the AR
    prior runs once per class. With more than ``max_classes`` classes, only images of the first ``max_classes``
    classes are used and the argmax runs over those classes (reported)."""
    K = min(model.cfg.num_classes, max_classes)
    gen = torch.Generator().manual_seed(seed)
    correct = total = 0
    for u, y in _batches(dataset, batch, 0):
        keep = y < K
        u, y = u[keep], y[keep]
        if len(y) == 0:
            continue
        if limit > 0 and total >= limit:
            break
        x = dequantize(u, "uniform", generator=gen)
        B = x.shape[0]
        classes = torch.arange(K).repeat_interleave(B)
        if model.cfg.af_class_conditional:
            log_px = -model.nll_continuous(x.repeat(K, 1, 1, 1), classes)["nll"]
        else:
            tokens, logdet = model.encode(x)
            info, red = model.prior(tokens.repeat(K, 1, 1), classes)
            log_px = info + red + logdet.repeat(K)
        pred = log_px.view(K, B).argmax(0)
        correct += (pred == y).sum().item()
        total += B
    return {"accuracy": correct / max(1, total), "n": total, "classes": K,
            "capped": K < model.cfg.num_classes}


@torch.no_grad()
def generate(model: Farmer, n: int, s: SamplingConfig, seed: int, batch: int, student=None, on_batch=None,
             denoise_sigma: float = 0.0):
    """n class-balanced samples (labels 0,1,...,K-1,0,1,...) -> (uint8 (n, C, H, W), labels (n,))."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % model.cfg.num_classes
    images = []
    for y in labels.split(batch):
        images.append(model.sample(y, s, gen, student=student, denoise_sigma=denoise_sigma))
        if on_batch is not None:
            on_batch(len(y))
    return torch.cat(images), labels


def reference_classifier_accuracy(train: ImageDataset, images: torch.Tensor, labels: torch.Tensor,
                                  limit: int = 5000) -> dict:
    """Share of generated images that a logistic regression fitted on real training pixels reads as the class
    asked for: "would a simple classifier recognise these samples?" (scikit-learn)."""
    from sklearn.linear_model import LogisticRegression

    xs, ys = [], []
    for u, y in _batches(train, 256, limit):
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
    images = torch.cat([u for u, _ in _batches(dataset, batch, limit)])
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
