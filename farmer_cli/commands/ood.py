"""Out-of-distribution detection with exact likelihoods: scores, AUROC, histogram.

Scores every image of --in (in-distribution) and --out (others), and measures how well a score separates them.

Raw likelihood fails at this: models give simpler foreign images *higher* likelihood (trained on Fashion-MNIST,
they prefer MNIST digits). The scores (larger = more out-of-distribution):
  combined    the larger of two-sided z-scores of bits/dim and of complexity against the model's training images
              (default: AUROC >= 0.98 in every case of bench/ood.py, where each single score fails somewhere)
  complexity  bits/dim minus the PNG bits/dim of the same pixels
  bpd         raw bits/dim
  typicality  |bits/dim - mean bits/dim of the model's training images|
  ratio       bits/dim minus bits/dim under --background CKPT (any other farmer run at the same resolution)

Prints per-set summaries and, with both sides, AUROC and the false-positive rate at 95% true positives; writes a
histogram of the two sets' scores (--figure). Likelihoods are unconditional.

Examples:
  farmer ood --in ./test_images --out ./other_images
  farmer ood --in ./a --out ./b --score all --json
  farmer ood --in ./a --out ./b --score ratio --background runs/generic-model
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Optional

from farmer_cli.commands import (CKPT_HELP, DEVICE_HELP, Option, check_data_unchanged, check_draws,
                                 check_output_image, check_recorded_data, default_output, exit_with,
                                 refuse_outputs_in_data, command, warn_untrained_null_class)
from farmer_cli.storage import within

NAME = "ood"
# farmer_cli.eval.ood.SCORES and "all" (spelled out so that --help needs no torch; tests/test_library.py checks them)
ScoreChoice = Literal["combined", "complexity", "bpd", "typicality", "ratio", "all"]


@command
def run(
    inside: Path = Option(..., "--in", help="In-distribution images: a folder (searched recursively) or a file."),
    outside: Optional[Path] = Option(None, "--out", help="Images to tell apart from --in (folder or file)."),
    ckpt: Optional[Path] = Option(None, "--ckpt", help=CKPT_HELP),
    score: ScoreChoice = Option("combined", "--score", help="combined | complexity | bpd | typicality | ratio | all."),
    background: Optional[Path] = Option(None, "--background", help="Background run for the ratio score."),
    figure: Optional[Path] = Option(None, "--figure", help="Histogram of the scores (PNG). Default: ood.png, or "
                                    "ood-2.png ... where that exists."),
    samples: int = Option(1, "--samples", "-k", help="Dequantisation draws averaged per image."),
    batch_size: int = Option(256, "--batch-size", "-b", help="Images per forward pass."),
    limit: int = Option(0, "--limit", help="Score at most this many images per side (0: all)."),
    as_json: bool = Option(False, "--json", help="Print one JSON object: per-image scores and the separation."),
    device: str = Option("auto", "--device", help=DEVICE_HELP),
) -> None:
    import numpy as np
    import torch

    from farmer_cli.eval import ood
    from farmer_cli.checkpoint import load_config, load_model, same_weights
    from farmer_cli.data.dataset import load_data
    from farmer_cli.data.images import image_files, load_image
    from farmer_cli.device import choose_device
    from farmer_cli.rundir import find_checkpoint
    from farmer_cli.viz import histogram_figure, save_png
    from farmer_cli.commands.ui import console, escape, stdout

    names = list(ood.SCORES) if score == "all" else [score]
    if "ratio" in names and background is None:
        if score == "all":
            names.remove("ratio")
        else:
            exit_with("--score ratio needs --background CKPT (a second farmer run at the same resolution)")
    if outside is not None and (within(outside, inside) or within(inside, outside)):
        exit_with(f"--in {inside} and --out {outside} share images (one is, or holds, the other; folders are read "
                  "recursively): there is nothing to tell apart; give separate images")
    if background is not None and "ratio" not in names:
        exit_with(f"--background is used by the ratio score only; add --score ratio (or all), not --score {score}")
    if batch_size < 1 or limit < 0:
        exit_with("--batch-size must be at least 1, --limit at least 0")
    check_draws("--samples", samples)
    figure = default_output(figure, "ood.png")
    check_output_image(figure, "--figure", [p for p in (inside, outside) if p is not None])
    device = choose_device(device)
    run_dir = find_checkpoint(ckpt)
    if background is not None and background.is_dir() and background.resolve() == run_dir.resolve():
        exit_with(f"--background {background} is the --ckpt run itself, so every ratio score would be 0; give a "
                  "second run (a model of generic images at the same resolution)")
    model, cfg, _, _ = load_model(run_dir, device)
    refuse_outputs_in_data(cfg.data, [("--figure", figure)])
    warn_untrained_null_class(cfg, run_dir, "ood's unconditional likelihood")
    mc = cfg.model
    other = None
    if background is not None:  # loaded and checked before any scoring
        other, other_cfg, _, _ = load_model(background, device)
        if (other_cfg.model.image_size, other_cfg.model.channels) != (mc.image_size, mc.channels):
            exit_with(f"--background {background} models {other_cfg.model.image_size}px x "
                      f"{other_cfg.model.channels} channels, not {mc.image_size}px x {mc.channels} like --ckpt")
        if same_weights(model, other):  # a copy of the run, or its newest step checkpoint
            exit_with(f"--background {background} holds the same weights as --ckpt {run_dir}, so every ratio score "
                      "would be 0; give a second run (a model of generic images at the same resolution)")
    train = None
    if {"typicality", "combined"} & set(names):  # statistics of the run's training images, as they were
        check_recorded_data(run_dir, cfg.data)
        bundle = load_data(cfg.data, mc.channels, mc.image_size)
        check_data_unchanged(run_dir, load_config(run_dir)[2].get("data"), bundle,
                             "the typicality statistics would come from other images than the model learned")
        train = bundle.train
    sides = {"in": inside} | ({"out": outside} if outside is not None else {})
    files = {side: image_files([path])[: limit or None] for side, path in sides.items()}
    images = {side: torch.stack([load_image(f, mc.channels, mc.image_size)[0] for f in files[side]]) for side in sides}
    bpd = {s: ood.bits_per_dim_of(model, images[s], batch_size, samples) for s in sides}
    train = ood.training_statistics(model, train) if train is not None else None
    background_bpd = None
    if other is not None:
        background_bpd = {s: ood.bits_per_dim_of(other, images[s], batch_size, samples) for s in sides}
    result = {"scores": {}, "separation": {}, "files": {s: [str(f) for f in files[s]] for s in sides},
              "bpd": {s: bpd[s].round(5).tolist() for s in sides}}
    for name in names:
        values = {s: ood.scores(name, bpd[s], images[s], train, background_bpd and background_bpd[s])
                  for s in sides}
        result["scores"][name] = {s: v.round(5).tolist() for s, v in values.items()}
        if "out" in sides:
            result["separation"][name] = ood.separation(values["in"], values["out"])
    first = names[0]
    save_png(histogram_figure({s: result["scores"][first][s] for s in sides},
                              f"OOD score '{first}' (larger = more out-of-distribution)"), figure)
    undefined = sum(int((~np.isfinite(bpd[s])).sum()) for s in sides)
    if undefined:
        console.print(f"[yellow]warning:[/] the likelihood of {undefined} image(s) is not a finite number (null in "
                      "--json, nan in the table): the checkpoint's weights may be damaged")
    if as_json:
        from farmer_cli.eval.protocol import json_safe

        print(json.dumps(json_safe(result), allow_nan=False))  # NaN and infinities are not JSON: null
        return
    from rich.table import Table

    table = Table(title=f"OOD scores (larger = more out-of-distribution), unconditional, {samples} draw(s)")
    for col in ("score", "--in mean", "--out mean", "AUROC", "FPR at 95% TPR"):
        table.add_column(col, justify="left" if col == "score" else "right")
    for name in names:
        sep = result["separation"].get(name, {})
        mean = {s: f"{sum(v) / len(v):.3f}" for s, v in result["scores"][name].items()}
        table.add_row(name + (" (default)" if name == ood.DEFAULT_SCORE else ""), mean["in"], mean.get("out", "-"),
                      f"{sep['auroc']:.3f}" if sep else "-", f"{sep['fpr_at_95_tpr']:.3f}" if sep else "-")
    stdout.print(table)
    console.print(f"{len(files['in'])} --in and {len(files.get('out', []))} --out images; "
                  f"histogram -> {escape(str(figure))}")

