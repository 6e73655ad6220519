"""The evaluation protocol behind ``farmer evaluate``: bits/dim, classifiers and distributed sample features."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from farmer_cli.config.schema import Config
from farmer_cli.data.batching import iterate_batches
from farmer_cli.data.dataset import DataBundle, ImageDataset
from farmer_cli.eval.fid import fid_metrics
from farmer_cli.eval.inception import inception_features
from farmer_cli.model import Farmer, check_finite, dequantize
from farmer_cli.eval.bits import bits_per_dim

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
        if limit > 0:  # exactly ``limit`` images, not a whole last batch
            if total >= limit:
                break
            u, y = u[: limit - total], y[: limit - total]
        if len(y) == 0:
            continue
        x = dequantize(u, "uniform", generator=gen).to(device)
        pred = check_finite(model.class_log_likelihoods(x, classes), "the class log-likelihoods").argmax(1).cpu()
        correct += (pred == y).sum().item()
        total += len(y)
    return {"accuracy": correct / max(1, total), "n": total, "classes": K, "capped": K < model.cfg.num_classes}


def fit_reference_classifier(train: ImageDataset, limit: int = 5000):
    """A logistic regression fitted on the first ``limit`` real training images' pixels (scikit-learn): the
    reference classifier of sample-acc."""
    from sklearn.linear_model import LogisticRegression

    xs, ys = [], []
    for u, y in iterate_batches(train, 256, limit):
        xs.append(u.flatten(1).float() / 255.0)
        ys.append(y)
    clf = LogisticRegression(max_iter=300, C=0.05)
    clf.fit(torch.cat(xs).numpy(), torch.cat(ys).numpy())
    clf.fitted_on_ = sum(len(y) for y in ys)
    return clf


def classify_pixels(clf, images: torch.Tensor) -> np.ndarray:
    """The reference classifier's predicted class of every uint8 image (B, C, H, W)."""
    return clf.predict(images.flatten(1).float().numpy() / 255.0)


def reference_classifier_accuracy(train: ImageDataset, images: torch.Tensor, labels: torch.Tensor,
                                  limit: int = 5000) -> dict:
    """Share of generated images that a logistic regression fitted on real training pixels reads as the class
    asked for: "would a simple classifier recognise these samples?" (scikit-learn)."""
    clf = fit_reference_classifier(train, limit)
    return sample_accuracy(clf, classify_pixels(clf, images), labels)


def sample_accuracy(clf, predictions: np.ndarray, labels: torch.Tensor) -> dict:
    """The sample-acc figure: the share of predictions (n,) equal to the classes asked for, labels (n,)."""
    return {"accuracy": float((predictions == labels.numpy()).mean()), "n": len(labels), "fitted_on": clf.fitted_on_}


def _gather_to_main(part, rank: int, world: int) -> list | None:
    """Every process's ``part`` as a list on process 0 (None elsewhere); [part] on a single process."""
    if world == 1:
        return [part]
    import torch.distributed as dist

    parts = [None] * world if rank == 0 else None
    dist.gather_object(part, parts, dst=0)
    return parts


def _broadcast_from_main(obj, rank: int, world: int):
    if world == 1:
        return obj
    import torch.distributed as dist

    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sample_features(model: Farmer, cfg: Config, n: int, seed: int, batch: int, *, student=None, net=None,
                    resize: str = "antialias", clf=None, rank: int = 0, world: int = 1,
                    on_samples=lambda k: None) -> dict | None:
    """Generate n class-balanced samples (this process's share of micro-batches, see
    :mod:`farmer_cli.sample.generate`) and keep only what the metrics need: Inception features (``net``) and the
    reference classifier's predictions (``clf``). Images are dropped batch by batch.

    Returns on process 0 {"labels", "features" (n, F) float64 or None, "predictions" (n,) or None}, in global image
    order; None on the other processes. Features are computed per micro-batch, so 1 and N processes give the same
    numbers."""
    from farmer_cli.sample.generate import balanced_labels, generate_chunks

    labels = balanced_labels(n, model.cfg.num_classes)
    part = []
    for chunk, images in generate_chunks(model, labels, cfg.sampling, seed, batch, student=student, rank=rank,
                                         world=world):
        feats = None if net is None else inception_features(net, images, batch, resize=resize).float().numpy()
        pred = None if clf is None else classify_pixels(clf, images)
        part.append((chunk.start, feats, pred))
        on_samples(len(chunk))
    parts = _gather_to_main(part, rank, world)
    if rank != 0:
        return None
    pieces = sorted((piece for p in parts for piece in p), key=lambda piece: piece[0])
    out = {"labels": labels, "features": None, "predictions": None}
    if net is not None:
        out["features"] = torch.from_numpy(np.concatenate([f for _, f, _ in pieces])).double()
    if clf is not None:
        out["predictions"] = np.concatenate([p for _, _, p in pieces])
    return out


def evaluate(model: Farmer, cfg: Config, data: DataBundle, metrics: list[str], *, split: str = "test",
             n_samples: int = 1000, batch: int = 100, bpd_draws: int = 1, limit: int = 0, max_classes: int = 100,
             seed: int = 0, student=None, inception=None, ref_stats: dict | None = None,
             save_ref_stats=None, resize: str = "antialias", rank: int = 0, world: int = 1,
             on_stage=lambda name: None, on_samples=lambda k: None) -> dict | None:
    """The evaluation protocol: every requested metric of ``METRICS`` as one JSON-ready dict (on process 0; None on
    the others).

    ``inception``: (network, protocol dict) from :mod:`farmer_cli.eval.inception`, needed for fid and pr;
    ``ref_stats``: a reference loaded by :func:`farmer_cli.eval.ref_stats.load_ref_stats` (``mu``, ``sigma``, maybe
    ``act``) instead of the ``split`` images; ``save_ref_stats``: a path to write the split's statistics to.
    ``rank`` / ``world``: this process under ``accelerate launch``; samples and their features are shared out
    and gathered on process 0, which alone runs bpd, classify and the reference statistics.
    ``on_stage(name)`` / ``on_samples(k)`` report progress. Non-finite figures become None."""
    reference = data.test if split == "test" else data.train
    main = rank == 0
    result: dict = {"data": cfg.data.split_source(split), "split": split, "seed": seed, "processes": world, "metrics": {}}
    m = result["metrics"]
    want_features = inception is not None and ("fid" in metrics or "pr" in metrics)
    samples = None
    if want_features or "sample-acc" in metrics:
        clf = None
        if "sample-acc" in metrics:
            if main:
                on_stage("fitting the reference classifier")
            clf = _broadcast_from_main(fit_reference_classifier(data.train) if main else None, rank, world)
        if main:
            on_stage("sampling" + (" and Inception features" if want_features else ""))
        samples = sample_features(model, cfg, n_samples, seed, batch, student=student,
                                  net=inception[0] if want_features else None, resize=resize, clf=clf, rank=rank,
                                  world=world, on_samples=on_samples)
        if not main:
            return None
        result["sampling"] = dataclasses.asdict(cfg.sampling) | {
            "student": student is not None, "student_steps": getattr(student, "distilled", None),  # (done, asked)
            "n_samples": n_samples, "denoise_sigma": model.denoise_sigma(cfg.sampling)}
        if clf is not None:
            m["sample_acc"] = sample_accuracy(clf, samples["predictions"], samples["labels"])
    elif not main:
        return None
    if "bpd" in metrics:
        on_stage(f"scoring {split} bits/dim")
        m["bpd_unconditional"] = bits_per_dim(model, reference, False, bpd_draws, batch, limit, seed)
        m["bpd_conditional"] = bits_per_dim(model, reference, True, bpd_draws, batch, limit, seed)
    if "classify" in metrics:
        on_stage("generative classifier")
        m["classify"] = generative_classifier(model, reference, max_classes, batch, limit, seed)
    if want_features:
        result["protocol"], figures = fid_metrics(cfg, metrics, split, reference, samples["features"], batch,
                                                  inception[0], inception[1], ref_stats, save_ref_stats, resize,
                                                  on_stage)
        m.update(figures)
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
