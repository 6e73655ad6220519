"""Show what the informative and redundant latent channels hold, as a figure and a table.

--mode interpolate (supplement Fig. 8): encode IMAGE, take the latent after each chosen AF block, mix it with
Gaussian noise, z' = sqrt(1-a²)·z + a·eps at each level a, on the redundant channels only (partial) or on all
channels (full), and decode with the inverse of the blocks up to that one. Rows: block depth; columns: level;
partial and full side by side. Also prints the mean squared pixel error of each reconstruction.

--mode variance (arXiv v2 Fig. 7): sample the informative tokens of a class, then the redundant channels from the
shared mixture with every component variance multiplied by each factor (rows), and decode.

Examples:
  farmer inspect-channels
  farmer inspect-channels digit.png --blocks 1,4 --levels 0,0.5,1 --out inspect.png
  farmer inspect-channels --mode variance --class 7 --out variance.png
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import typer

InverseDecoder = Literal["sequential", "student"]  # the inverses that decode part of the flow (upto a block)

from farmer_cli.commands import (CKPT_HELP, CLASS_HELP, SEEDED_DEVICE_HELP, Option, check_data_unchanged,
                                 check_output_image, check_recorded_data, check_seed, command, default_output, exit_with,
                                 refuse_outputs_in_data, refuse_unused, resolve_class)
from farmer_cli.config.schema import MAX_SAMPLING_SCALE

NAME = "inspect-channels"
DEFAULT_FACTORS = "0,0.2,0.4,0.8,1.0,1.2,1.5,2.0,4.0"
DEFAULT_LEVELS = "0,0.25,0.5,0.75,1.0"


@command
def run(
    image: Optional[Path] = typer.Argument(None, help="Image to encode (interpolate mode). Default: the first test "
                                           "image of the checkpoint's data set."),
    ckpt: Optional[Path] = Option(None, "--ckpt", help=CKPT_HELP),
    mode: Literal["interpolate", "variance"] = Option("interpolate", "--mode", help="interpolate (noise on redundant vs all channels per AF block) "
                       "or variance (redundant-mixture variance sweep)."),
    blocks: Optional[str] = Option(None, "--blocks", help="Interpolate mode: AF blocks (1-based), e.g. 1,4,8, or "
                                   "'all' (the default)."),
    levels: Optional[str] = Option(None, "--levels", help=f"Interpolate mode: noise levels a in [0, 1] (default "
                                   f"{DEFAULT_LEVELS})."),
    factors: Optional[str] = Option(None, "--factors", help=f"Variance mode: variance factors (default "
                                    f"{DEFAULT_FACTORS})."),
    class_: Optional[str] = Option(None, "--class", "-c", help="Variance mode: the class. " + CLASS_HELP + " Default: "
                                   "the first class."),
    columns: Optional[int] = Option(None, "--n", help="Variance mode: samples per row (default 6)."),
    seed: int = Option(0, "--seed", help="Seed of the noise / samples."),
    decoder: InverseDecoder = Option("sequential", "--decoder", help="AF inverse: sequential (the exact inverse, "
                                     "KV cache) or student (the one-step student of farmer distill)."),
    out: Optional[Path] = Option(None, "--out", "-o", help="Figure PNG (default: inspect.png, or "
                                 "inspect-variance.png in variance mode)."),
    device: str = Option("auto", "--device", help=SEEDED_DEVICE_HELP),
) -> None:
    student = decoder == "student"
    import torch

    from farmer_cli.checkpoint import load_config, load_model, load_student
    from farmer_cli.data.dataset import load_data
    from farmer_cli.data.images import load_image
    from farmer_cli.sample.channels import noise_interpolation, variance_sweep
    from farmer_cli.device import choose_device
    from farmer_cli.rundir import find_checkpoint
    from farmer_cli.viz import grid, labelled_figure, save_png
    from farmer_cli.commands.ui import console, escape, stdout

    only = {"interpolate": {"IMAGE": image, "--blocks": blocks, "--levels": levels},
            "variance": {"--factors": factors, "--class": class_, "--n": columns}}
    other = "variance" if mode == "interpolate" else "interpolate"
    refuse_unused(only[other].items(), f"in --mode {mode}", f"for --mode {other}")
    blocks, levels, factors = blocks or "all", levels or DEFAULT_LEVELS, factors or DEFAULT_FACTORS
    columns = 6 if columns is None else columns
    out = default_output(out, "inspect.png" if mode == "interpolate" else "inspect-variance.png")
    check_output_image(out, inputs=[image] if image is not None else [])
    check_seed(seed)
    if not 1 <= columns <= 64:
        exit_with("--n must be between 1 and 64")
    run_dir = find_checkpoint(ckpt)
    model, cfg, class_names, _ = load_model(run_dir, choose_device(device))
    refuse_outputs_in_data(cfg.data, [("--out", out)])
    mc = cfg.model
    if mc.d_redundant == 0:
        exit_with("this model has no redundant channels (model.channel_split = false): nothing to inspect")
    student_flow = load_student(run_dir, model) if student else None
    size = mc.image_size
    scale = max(1, 64 // size)
    cell = (size * scale, size * scale)
    if mode == "interpolate":
        chosen = parse_blocks(blocks, mc.af_blocks)
        lv = _floats(levels, "levels")
        if any(not 0.0 <= a <= 1.0 for a in lv):
            exit_with(f"--levels {levels}: every level must be within [0, 1]")
        if image is not None:
            (u, _), source = load_image(image, mc.channels, size), str(image)
        else:
            from farmer_cli.data.batching import first_readable

            check_recorded_data(run_dir, cfg.data)
            bundle = load_data(cfg.data, mc.channels, size)
            check_data_unchanged(run_dir, load_config(run_dir)[2].get("data"), bundle,
                                 "its first test image may be one it trained on", "or give an IMAGE")
            u, split = first_readable(bundle.test), "test"
            if u is None:  # a one-image data set has no test split
                u, split = first_readable(bundle.train), "training"
            source = f"first {split} image of {cfg.data.source}"
        res = noise_interpolation(model, u, chosen, lv, seed, student_flow)
        L = len(lv)
        spacer = torch.full((len(chosen), 1, *res.partial.shape[2:]), 255, dtype=torch.uint8)
        cells = torch.cat([res.partial, spacer, res.full], dim=1).flatten(0, 1)
        panel = grid(cells, 2 * L + 1, scale=scale)
        cols = [f"a={a:g}" for a in lv]
        figure = labelled_figure(panel, f"noise interpolation of {source}: partial (redundant channels only) | "
                                 "full (all channels)", [f"block {b}" for b in chosen], cols + [""] + cols, cell)
        save_png(figure, out)
        from rich.table import Table

        table = Table(title="mean squared pixel error vs the input (pixels in [0,1]): partial / full")
        table.add_column("AF block")
        for a in lv:
            table.add_column(f"a={a:g}", justify="right")
        for i, b in enumerate(chosen):
            table.add_row(str(b), *[f"{res.mse_partial[i, j]:.4f}/{res.mse_full[i, j]:.4f}" for j in range(L)])
        stdout.print(table)
    else:
        fs = _floats(factors, "factors")
        if any(not 0 <= f <= MAX_SAMPLING_SCALE for f in fs):
            exit_with(f"--factors must be between 0 and {MAX_SAMPLING_SCALE:g} (variance scales of the redundant "
                      "mixture)")
        label = 0 if class_ is None else resolve_class(class_, class_names, mc.num_classes)
        images = variance_sweep(model, label, fs, columns, cfg.sampling, seed, student_flow).images
        panel = grid(images.flatten(0, 1), columns, scale=scale)
        name = class_names[label] if label < len(class_names) else str(label)
        figure = labelled_figure(panel, f"redundant-mixture variance sweep, class {name}: same informative tokens "
                                 "per column", [f"var x{f:g}" for f in fs], [], cell)
        save_png(figure, out)
    console.print(f"figure -> [bold]{escape(str(out))}[/]")


def _floats(text: str, name: str) -> list[float]:
    import math

    if any(not v.strip() for v in text.split(",")) and text.strip():
        exit_with(f"--{name} {text}: an empty item between commas; give comma-separated numbers, e.g. 0,0.5,1")
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        exit_with(f"--{name} must be comma-separated numbers, got '{text}'")
    if not values:
        exit_with(f"--{name} is empty")
    if not all(math.isfinite(v) for v in values):
        exit_with(f"--{name} must be finite numbers, got '{text}'")
    if len(values) > 32:
        exit_with(f"--{name}: at most 32 values, got {len(values)}")
    if len(set(values)) < len(values):  # a repeated column (or row) would show the same picture again
        exit_with(f"--{name} {text}: a value is named twice; name each once")
    return values


def parse_blocks(text: str, n: int) -> list[int]:
    if text == "all":
        return list(range(1, n + 1))
    try:
        chosen = [int(v) for v in text.split(",")]
    except ValueError:
        exit_with(f"--blocks must be 'all' or comma-separated block numbers, got '{text}'")
    bad = [b for b in chosen if not 1 <= b <= n]
    if bad or not chosen:
        exit_with(f"--blocks {text}: this model has AF blocks 1..{n}")
    if len(set(chosen)) < len(chosen):
        exit_with(f"--blocks {text}: a block is named twice; name each once")
    return chosen

