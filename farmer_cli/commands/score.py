"""Exact negative log-likelihood of images, in bits per dimension (8-bit scale).

Each image is converted and resized to the model's resolution, then scored K times with uniform dequantisation
noise (bits/dim = (-log p(x) + D ln 128) / (D ln 2), a bound on the discrete likelihood) and averaged. With
--class the class-conditional likelihood, otherwise the unconditional (null-class) one.

Examples:
  farmer score digit.png
  farmer score ./images --class 3 --samples 8 --json
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from . import CKPT_HELP, CLASS_HELP, DEVICE_HELP, Option, exit_with, resolve_class, user_errors

NAME = "score"


def run(
    images: List[Path] = typer.Argument(..., help="Image files or directories (every image inside is scored)."),
    ckpt: Optional[Path] = Option(None, "--ckpt", help=CKPT_HELP),
    class_: Optional[str] = Option(None, "--class", "-c", help="Class-conditional likelihood of this class. "
                                   + CLASS_HELP + " Default: unconditional (the null class)."),
    samples: int = Option(4, "--samples", "-k", help="Dequantisation draws averaged per image."),
    batch_size: int = Option(64, "--batch-size", "-b", help="Images per forward pass."),
    as_json: bool = Option(False, "--json", help="Print one JSON object per image instead of a table."),
    device: str = Option("auto", "--device", help=DEVICE_HELP),
) -> None:
    with user_errors():
        _score(images, ckpt, class_, samples, batch_size, as_json, device)


def collect_images(paths: list[Path]) -> list[Path]:
    from ..data import IMAGE_SUFFIXES

    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                exit_with(f"{p}: directory holds no image files")
            files += found
        elif not p.exists():
            exit_with(f"{p}: no such file or directory")
        else:
            files.append(p)
    return files


def _score(images, ckpt, class_, samples, batch_size, as_json, device):
    import torch

    from ..checkpoint import load_model
    from ..data import load_image
    from ..runtime import find_checkpoint, resolve_device
    from ..scoring import score_batch
    from .ui import console, escape, figure, progress, stdout

    if samples < 1 or batch_size < 1:
        exit_with("--samples and --batch-size must be at least 1")
    if samples > 1024:
        exit_with("--samples must be at most 1024 (each draw scores the whole batch again)")
    files = collect_images(images)
    model, cfg, class_names, _ = load_model(find_checkpoint(ckpt), resolve_device(device))
    mc = cfg.model
    label = None if class_ is None else resolve_class(class_, class_names, mc.num_classes)
    loaded = [load_image(f, mc.channels, mc.image_size) for f in files]  # fails early, naming the bad file
    rows = []
    gen = torch.Generator().manual_seed(0)
    with progress(disable=len(files) < 2 * batch_size) as bar:
        task = bar.add_task("score", total=len(files))
        for start in range(0, len(files), batch_size):
            u = torch.stack([t for t, _ in loaded[start : start + batch_size]])
            y = None if label is None else torch.full((u.shape[0],), label)
            nll, bpd = score_batch(model, u, y, samples, gen)
            for i, f in enumerate(files[start : start + batch_size]):
                width, height = loaded[start + i][1]
                rows.append({"file": str(f), "size": f"{width}x{height}", "bits_per_dim": _rounded(bpd[i], 4),
                             "nll_nats": _rounded(nll[i], 2), "class": class_ if class_ is not None else None,
                             "samples": samples})
            bar.advance(task, u.shape[0])
    undefined = sum(r["bits_per_dim"] is None for r in rows)
    if undefined:
        console.print(f"[yellow]warning:[/] the likelihood of {undefined} image(s) is not a finite number (reported "
                      "as null / n/a): the checkpoint's weights may be damaged")
    if as_json:
        for r in rows:
            print(json.dumps(r))
        return
    from rich.table import Table

    cond = f"class {escape(class_)}" if class_ is not None else "unconditional"
    table = Table(title=f"{cond} likelihood at {mc.image_size}x{mc.image_size}x{mc.channels}, mean of {samples} "
                  "dequantisation draws (--samples)")
    for col in ("file", "size", "bits/dim", "NLL (nats)"):
        table.add_column(col, justify="left" if col == "file" else "right")
    for r in rows:
        table.add_row(escape(r["file"]), r["size"], figure(r["bits_per_dim"], ".3f"), figure(r["nll_nats"], ".1f"))
    stdout.print(table)


def _rounded(value, digits: int):
    """A figure for JSON: rounded, or None where it is not finite (NaN is not valid JSON)."""
    import math

    value = float(value)
    return round(value, digits) if math.isfinite(value) else None

