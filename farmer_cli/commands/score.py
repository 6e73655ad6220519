"""Exact negative log-likelihood of images, in bits per dimension (8-bit scale).

Each image is converted and resized to the model's resolution, then scored K times with uniform dequantisation
noise (bits/dim = (-log p(x) + D ln 128) / (D ln 2), a bound on the discrete likelihood) and averaged. With
--class the class-conditional likelihood, otherwise the unconditional (null-class) one. Beside it: the bytes a
lossless coder driven by the model would need (bits/dim x D / 8) against the PNG of the same pixels.
--heatmap shows where the bits go, patch by patch.

Examples:
  farmer score digit.png
  farmer score digit.png --heatmap bits.png
  farmer score ./images --class 3 --samples 8 --json
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from farmer_cli.commands import (CKPT_HELP, CLASS_HELP, DEVICE_HELP, Option, check_draws, check_output_image, exit_with,
                                 refuse_outputs_in_data, resolve_class, command, warn_untrained_null_class)

NAME = "score"


@command
def run(
    images: List[Path] = typer.Argument(..., help="Image files or directories (every image inside is scored)."),
    ckpt: Optional[Path] = Option(None, "--ckpt", help=CKPT_HELP),
    class_: Optional[str] = Option(None, "--class", "-c", help="Class-conditional likelihood of this class. "
                                   + CLASS_HELP + " Default: unconditional (the null class)."),
    samples: int = Option(4, "--samples", "-k", help="Dequantisation draws averaged per image."),
    batch_size: int = Option(64, "--batch-size", "-b", help="Images per forward pass."),
    as_json: bool = Option(False, "--json", help="Print one JSON object per image instead of a table."),
    device: str = Option("auto", "--device", help=DEVICE_HELP),
    heatmap: Optional[Path] = Option(None, "--heatmap", help="Also write where the bits go: the image beside its "
                                     "bits/dim per patch (the exact NLL split over patches: each AF block's log-det, "
                                     "the informative term, the share of the redundant term). With several images: "
                                     "<name>_<image>.png beside it. --json then includes the per-patch bits."),
) -> None:
    import math

    import torch

    from farmer_cli.checkpoint import load_model
    from farmer_cli.data.images import image_files, load_image
    from farmer_cli.device import choose_device
    from farmer_cli.rundir import find_checkpoint
    from farmer_cli.eval.bits import model_bytes, patch_bits, png_bytes, score_batch
    from farmer_cli.viz import bits_figure, save_png
    from farmer_cli.commands.ui import console, escape, figure, progress, stdout

    if batch_size < 1:
        exit_with("--batch-size must be at least 1")
    check_draws("--samples", samples)
    files = image_files(images)
    if heatmap is not None:
        check_output_image(heatmap, "--heatmap", images)
    run_dir = find_checkpoint(ckpt)
    model, cfg, class_names, _ = load_model(run_dir, choose_device(device))
    refuse_outputs_in_data(cfg.data, [("--heatmap", heatmap)])
    mc = cfg.model
    label = None if class_ is None else resolve_class(class_, class_names, mc.num_classes)
    if label is None:
        warn_untrained_null_class(cfg, run_dir, "the unconditional likelihood (no --class)")
    class_name = None if label is None else class_names[label] if label < len(class_names) else str(label)
    if label is not None:  # reported as the class it resolved to: "1" may name the folder "02"
        class_ = str(label) if class_name == str(label) else f"{label} ({class_name})"
    loaded = [load_image(f, mc.channels, mc.image_size) for f in files]  # fails early, naming the bad file
    heat_paths = _heatmap_paths(files, heatmap) if heatmap is not None else []
    earlier = [p for p in heat_paths if len(heat_paths) > 1 and (p.exists() or p.is_symlink())]
    if earlier:  # names derived from --heatmap: an earlier call's maps would be partly replaced, partly left
        exit_with(f"--heatmap {heatmap}: {len(earlier)} of the {len(heat_paths)} maps this call would write exist "
                  f"already (e.g. {earlier[0]}, from an earlier call); choose another --heatmap name or folder")
    rows = []
    gen = torch.Generator().manual_seed(0)
    with progress(disable=len(files) < 2 * batch_size) as bar:
        task = bar.add_task("score", total=len(files))
        for start in range(0, len(files), batch_size):
            u = torch.stack([t for t, _ in loaded[start : start + batch_size]])
            y = None if label is None else torch.full((u.shape[0],), label)
            if heatmap is not None:  # one pass gives the map and the total (the sum of the map)
                maps = patch_bits(model, u, y, samples, gen)
                bits = maps.sum(dim=(1, 2)).double()
                nll, bpd = bits * math.log(2.0), bits / mc.dims
            else:
                nll, bpd = score_batch(model, u, y, samples, gen)
            for i, f in enumerate(files[start : start + batch_size]):
                width, height = loaded[start + i][1]
                png = png_bytes(u[i])
                row = {"file": str(f), "size": f"{width}x{height}", "bits_per_dim": _rounded(bpd[i], 4),
                       "nll_nats": _rounded(nll[i], 2), "class": label, "class_name": class_name,
                       "samples": samples, "model_bytes": _rounded(model_bytes(float(bpd[i]), mc.dims), 1),
                       "png_bytes": png, "png_over_model": _rounded(png / model_bytes(float(bpd[i]), mc.dims), 3)}
                if heatmap is not None:
                    row["patch_size"] = mc.patch_size
                    row["patch_bits"] = [[round(float(v), 4) for v in r] for r in maps[i]]
                    out = heat_paths[start + i]
                    title = f"{Path(f).name}: {float(bpd[i]):.3f} bits/dim ({label_text(class_)})"
                    save_png(bits_figure(u[i], maps[i].numpy() / mc.token_dim, title), out)
                    row["heatmap"] = str(out)
                rows.append(row)
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

    table = Table(title=f"{escape(label_text(class_))} likelihood at {mc.image_size}x{mc.image_size}x{mc.channels}, "
                  f"mean of {samples} dequantisation draws (--samples); model bytes = what a lossless coder driven "
                  "by the model needs")
    for col in ("file", "size", "bits/dim", "NLL (nats)", "model bytes", "PNG bytes", "PNG / model"):
        table.add_column(col, justify="left" if col == "file" else "right")
    for r in rows:
        table.add_row(escape(r["file"]), r["size"], figure(r["bits_per_dim"], ".3f"), figure(r["nll_nats"], ".1f"),
                      figure(r["model_bytes"], ".0f"), str(r["png_bytes"]), figure(r["png_over_model"], ".2f"))
    stdout.print(table)
    if heatmap is not None:
        console.print(f"bits maps -> {escape(', '.join(r['heatmap'] for r in rows[:3]))}"
                      + (f" and {len(rows) - 3} more" if len(rows) > 3 else ""))


def label_text(class_) -> str:
    return f"class {class_}" if class_ is not None else "unconditional"


def _rounded(value, digits: int):
    """A figure for JSON: rounded, or None where it is not finite (NaN is not valid JSON)."""
    import math

    value = float(value)
    return round(value, digits) if math.isfinite(value) else None


def _heatmap_paths(files: list, heatmap: Path) -> list[Path]:
    """One heatmap per image, no two the same: ``heatmap`` itself for one image, else ``<heatmap stem>_<image
    stem>.png``, with the image's folders (below the folders all images share) where stems repeat
    (d/a/0.png, d/b/0.png -> heat_a_0.png, heat_b_0.png), and its position where even that repeats (again where
    that makes another image's name: d/a/0.png beside d/a_0_0.png)."""
    import os
    from collections import Counter

    if len(files) == 1:
        return [heatmap]
    paths = [Path(f) for f in files]
    root = Path(os.path.commonpath([str(p.parent.resolve()) for p in paths]))
    stems = [p.stem for p in paths]
    repeated = {s for s, k in Counter(stems).items() if k > 1}
    names = ["_".join(p.resolve().relative_to(root).with_suffix("").parts) if s in repeated else s
             for p, s in zip(paths, stems)]
    clashes, given, used = {n for n, k in Counter(names).items() if k > 1}, set(names), set()
    for i, name in enumerate(names):
        if name in clashes:  # its position, then again, until no other image has or takes the name
            name = f"{name}_{i}"
            while name in given or name in used:
                name = f"{name}_{i}"
        used.add(name)
        names[i] = name
    return [heatmap.with_name(f"{heatmap.stem}_{name}.png") for name in names]
