"""Sample class-conditional images: AR prior token by token (KV cache), then the AF inverse.

Guidance: --cfg W > 0 uses resampling-based CFG (Algorithm 1 of the paper; every knob under
--set sampling.*) or, with --guidance simple, JetFormer-style guidance. Unguided sampling uses the decoupled
GMM knobs: --temperature T (mixture logits / T) and --var-scale S (component variance x S); the supplement's
unguided setting is --preset-sampling unguided (S=0.9, T=1.3).

Examples:
  farmer sample --class 3 --n 16
  farmer sample --class 0 --class 7 --n 8 --cfg 3 --out sevens.png --out-dir samples/
  farmer sample --class random --n 4 --preset-sampling unguided
  farmer sample --class "golden retriever" --n 64 --cfg 2 --decoder student
  accelerate launch --num_processes 8 -m farmer_cli sample --class 207 --n 1000 --cfg 4.0 --out-dir class207/

Image i of a call draws its random numbers from its own stream seeded by (seed, i), and micro-batch c (images
c*B .. c*B+B-1) runs on process c mod N: the same --seed and --batch-size give the same files on any number of
processes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

from farmer_cli.config.schema import Decoder, DecodeSteps, Guidance, Precision
from farmer_cli.commands import (CKPT_HELP, CLASS_HELP, SEEDED_DEVICE_HELP, Option, check_output_dir,
                                 check_output_image, check_seed, default_output, exit_with, refuse_outputs_in_data, refuse_unread,
                                 refuse_unused, resolve_class, set_keys, command, warn_untrained_null_class)

NAME = "sample"
MAX_IMAGES = 10_000  # per call: every image is kept in memory for the grid


@command
def run(
    ckpt: Optional[Path] = Option(None, "--ckpt", help=CKPT_HELP),
    classes: List[str] = Option([], "--class", "-c", help=CLASS_HELP + " Repeat for several (a class given twice "
                                "gets two rows); 'random' for a random class. Default: every class (at most 10; else 8 random)."),
    n: int = Option(8, "--n", help="Samples per class (one grid row per class); at most 10,000 images per call."),
    cfg_weight: Optional[float] = Option(None, "--cfg", help="Guidance weight w (0 = unguided). Default: the preset's."),
    temperature: Optional[float] = Option(None, "--temperature", "-t", help="Unguided mixture temperature T: "
                                          "logits / T (T > 1 flattens the mixture weights)."),
    var_scale: Optional[float] = Option(None, "--var-scale", "-s", help="Unguided variance scale S: every component "
                                        "variance x S."),
    candidates: Optional[int] = Option(None, "--candidates", "-m", help="Resampling CFG: candidates drawn from each "
                                       "of the conditional and unconditional mixtures per token (s_c = s_u)."),
    guidance: Optional[Guidance] = Option(None, "--guidance", help="resample (Algorithm 1) | simple (JetFormer-style)."),
    preset_sampling: Optional[str] = Option(None, "--preset-sampling", help="Named sampling settings: unguided "
                                            "(supplement: cfg 0, S=0.9, T=1.3) or neutral (cfg 0, S=1, T=1)."),
    seed: int = Option(0, "--seed", help="Random seed. Image i draws from its own stream seeded by (seed, i): "
                       "the same seed and --batch-size give byte-identical images on 1 or N processes."),
    batch_size: int = Option(64, "--batch-size", "-b", help="Images sampled at once (micro-batch): memory depends "
                             "on it, not on --n."),
    out: Optional[Path] = Option(None, "--out", "-o", help="Grid PNG: one row per class (with --n above 16, a "
                                 "block of rows of 16 per class). Default: samples.png, or samples-2.png ... where "
                                 "that exists."),
    out_dir: Optional[Path] = Option(None, "--out-dir", help="Also write every image as <class>-<name>_<index>.png here."),
    scale: int = Option(0, "--scale", help="Enlarge grid cells this many times (0: auto, to at least 64 px)."),
    decoder: Optional[Decoder] = Option(None, "--decoder", help="AF inverse: sequential (token by token, KV cache), "
                                    "jacobi (all tokens in parallel, iterated to the same exact inverse; "
                                    "--set sampling.jacobi_tol / jacobi_max_iter) or student (the one-step student of farmer distill). Default: the "
                                    "checkpoint's sampling.decoder (sequential)."),
    decode_steps: Optional[DecodeSteps] = Option(None, "--decode-steps", help="How the token-by-token decoding "
                                                 "steps run: auto (CUDA graphs on a GPU, eager elsewhere), eager, "
                                                 "compile (torch.compile: ~10-30 s to compile, pays off for many "
                                                 "batches on a CPU) or cuda-graphs. Default: the checkpoint's "
                                                 "sampling.decode_steps (auto). Same images in every mode up to "
                                                 "float rounding."),
    device: str = Option("auto", "--device", help=SEEDED_DEVICE_HELP + " Under accelerate launch each process uses its "
                         "own device."),
    precision: Precision = Option("auto", "--precision", help="auto (bf16 on a CUDA GPU that supports it, else "
                                  "fp32), fp32, bf16 or fp16 (a GPU's; bf16 on a CPU): the transformers' matmuls "
                                  "under autocast; mixture densities, log-dets and the flow's affine updates stay "
                                  "float32. The same words as train --mixed-precision."),
    denoise_batch: int = Option(0, "--denoise-batch", help="Images per denoising backward pass, with activation "
                                "checkpointing; 0: automatic (the whole batch at once when its activations fit a "
                                "quarter of the GPU's memory or 2 GiB on a CPU, else checkpointed passes of as many "
                                "as fit)."),
    overrides: List[str] = Option([], "--set", help="Override sampling settings, e.g. --set sampling.t_resample=2."),
) -> None:
    import torch

    from farmer_cli.checkpoint import load_model, load_student
    from farmer_cli.sample.generate import generate_chunks, my_chunks
    from farmer_cli.device import resolve_precision
    from farmer_cli.model.steps import resolve_mode
    from farmer_cli.device import choose_device, processes_ended, process_state
    from farmer_cli.rundir import find_checkpoint
    from farmer_cli.viz import class_blocks, grid, save_png
    from farmer_cli.commands.ui import console, escape, progress

    if n < 1:
        exit_with("--n must be at least 1")
    check_seed(seed)
    if batch_size < 1 or denoise_batch < 0:
        exit_with("--batch-size must be at least 1 and --denoise-batch at least 0 (0: automatic)")
    _check_image_count(n, max(1, len(classes)))  # again below with the model's classes when --class is not given
    if not 0 <= scale <= 64:
        exit_with("--scale must be between 0 (auto) and 64")
    out = default_output(out, "samples.png")
    check_output_image(out)
    if out_dir is not None:
        check_output_dir(out_dir)
        _check_apart(out, out_dir, [])
    state = process_state()
    world, rank, main = state.num_processes, state.process_index, state.is_main_process
    if world > 1 and out_dir is None:
        exit_with(f"{world} processes write their images to files: pass --out-dir DIR (the grid is built from it)")
    device = choose_device(device, state)
    with processes_ended():
        run_dir = find_checkpoint(ckpt)
        model, cfg, class_names, step = load_model(run_dir, device)
        refuse_outputs_in_data(cfg.data, [("--out", out), ("--out-dir", out_dir)])
        s = sampling_config(cfg, preset_sampling, {
            "sampling.cfg": ("--cfg", cfg_weight), "sampling.temperature": ("--temperature", temperature),
            "sampling.var_scale": ("--var-scale", var_scale), "sampling.guidance": ("--guidance", guidance),
            "sampling.cond_candidates": ("--candidates", candidates),
            "sampling.uncond_candidates": ("--candidates", candidates), "sampling.decoder": ("--decoder", decoder),
            "sampling.decode_steps": ("--decode-steps", decode_steps)}, overrides)
        refuse_unread(s.unread(), [(name, key) for name, key, value in (
            ("--temperature", "temperature", temperature), ("--var-scale", "var_scale", var_scale),
            ("--candidates", "cond_candidates", candidates), ("--guidance", "guidance", guidance)) if value is not None]
            + set_keys(overrides, "sampling") + _preset_keys(preset_sampling))
        refuse_unused([("--denoise-batch", denoise_batch or None)] * (model.denoise_sigma(s) == 0), "",
                      "no denoising step runs: sampling.denoise is off, or the model trained without noise")
        try:
            steps = resolve_mode(s.decode_steps, device)
        except ValueError as e:
            exit_with(f"--decode-steps: {e} (auto, eager and compile run anywhere)")
        if s.cfg > 0 and main:
            warn_untrained_null_class(cfg, run_dir, f"guidance (cfg {s.cfg})")
        student_flow = load_student(run_dir, model) if s.decoder == "student" else None
        labels = _labels(classes, model.cfg.num_classes, class_names, seed)
        _check_image_count(n, len(labels))
        scale = scale or max(1, 64 // cfg.model.image_size)  # auto: cells of at least 64 px
        _check_grid(n, len(labels), cfg.model.image_size, scale)
        y_all = torch.tensor(labels).repeat_interleave(n)
        precision, warning = resolve_precision(precision, device.type, training=False)
        if warning and main:
            console.print(f"[yellow]{escape(warning)}[/]")
        steps_per_chunk = model.prior.N + (0 if student_flow is not None else cfg.model.af_blocks)
        images, stats = [], {}
        names = _png_names(y_all.tolist(), n, class_names)
        if out_dir is not None:
            _check_apart(out, out_dir, names)
            state.wait_for_everyone()  # every process has checked before any writes
        t0 = time.time()
        advance = lambda _: bar.advance(task)  # noqa: E731  (bar and task exist before the first image)
        chunks = generate_chunks(model, y_all, s, seed, batch_size, student=student_flow, rank=rank, world=world,
                                 precision=precision, denoise_batch=denoise_batch, stats=stats, on_token=advance,
                                 on_block=advance)  # checks memory now, before the progress bar
        with progress(disable=not main) as bar:
            task = bar.add_task("sample", total=len(my_chunks(len(y_all), batch_size, rank, world)) * steps_per_chunk)
            written, first = 0, ""
            try:
                for chunk, chunk_images in chunks:
                    if out_dir is not None:
                        _write_pngs(out_dir, chunk, chunk_images, names)
                        written, first = written + len(chunk), first or names[chunk[0]]
                    if world == 1:
                        images.append(chunk_images)
            except KeyboardInterrupt:  # finished images are kept, and said to be there
                if written:
                    console.print(f"[yellow]kept the {written} of {len(names)} images already written to "
                                  f"{escape(str(out_dir))}/ ({escape(first)} ...); sampling again into it needs "
                                  "them removed first, or another --out-dir[/]", highlight=False)
                raise
        state.wait_for_everyone()
        seconds = time.time() - t0
        if not main:
            return
        images = torch.cat(images) if world == 1 else _read_pngs(out_dir, names)
        save_png(grid(*class_blocks(images, n), scale=scale), out)
        how = (f"cfg {s.cfg} ({s.guidance}{_effective_sample_sizes(stats, s, model.prior.N)})" if s.cfg > 0
               else f"unguided (T={s.temperature}, S={s.var_scale})")
        sigma = model.denoise_sigma(s)
        how += f", denoised (sigma {sigma:g})" if sigma > 0 else ""
        shown = ", ".join(f"{k} ({class_names[k]})" if k < len(class_names) and class_names[k] != str(k) else str(k)
                          for k in labels[:4]) + (", ..." if len(labels) > 4 else "")
        console.print(f"{len(images)} samples of {len(labels)} class(es), {escape(shown)}, from step {step} of "
                      f"{escape(str(run_dir))}, "
                      f"{how}, {_decoder_text(student_flow, s, stats)} decoder ({steps} steps), {precision} on "
                      f"{device}"
                      f"{f' x {world} processes' if world > 1 else ''}: {seconds:.1f} s "
                      f"({len(images) / seconds:.1f} img/s) -> [bold]{escape(str(out))}[/]"
                      + (f" and {escape(str(out_dir))}/" if out_dir else ""))


def sampling_config(cfg, preset_sampling, options: dict, overrides):
    """The checkpoint's sampling settings with a named preset, then the options (``{"sampling.cfg": ("--cfg",
    2.0)}``), then --set applied (each through the config gate)."""
    from farmer_cli.config.files import apply_options, apply_sampling_preset

    if preset_sampling is not None:
        apply_sampling_preset(cfg, preset_sampling)
    apply_options(cfg, options, overrides, allowed=("sampling",))
    return cfg.sampling


def _preset_keys(name: str | None) -> list[tuple[str, str]]:
    """(``--preset-sampling NAME (sampling.KEY)``, KEY) for each setting of a named sampling preset."""
    from farmer_cli.config.files import sampling_preset

    keys = sampling_preset(name)["sampling"] if name is not None else {}
    return [(f"--preset-sampling {name} (sampling.{key})", key) for key in keys]


def _labels(classes: list[str], num_classes: int, class_names: list[str], seed: int) -> list[int]:
    """The classes asked for (names, indices or 'random'; a class named "random" is that class), or every class
    (at most 10; else 8 random ones). Random picks use a CPU generator, so every process of a launch picks the
    same."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    if not classes:
        return list(range(num_classes)) if num_classes <= 10 else torch.randperm(num_classes, generator=gen)[:8].tolist()
    return [int(torch.randint(num_classes, (1,), generator=gen)) if c == "random" and c not in class_names
            else resolve_class(c, class_names, num_classes) for c in classes]


def _png_names(labels, n: int, class_names: list[str]) -> list[str]:
    """The file of every image of the call (global index, class-major, n per row): <class>-<name>_<index within
    its class>.png, counting on across rows of the same class (a class given twice writes _0000.. then _000n..),
    so no two images share a name."""
    names, rows_seen = [], {}
    for row in range(0, len(labels), n):
        label = int(labels[row])
        earlier = rows_seen.get(label, 0)  # rows of this class before this one
        rows_seen[label] = earlier + 1
        names += [f"{_safe(class_names, label)}_{earlier * n + i:04d}.png" for i in range(min(n, len(labels) - row))]
    return names


def _check_image_count(n: int, classes: int) -> None:
    """At most :data:`MAX_IMAGES` images per call (``--n`` per class)."""
    if n * classes > MAX_IMAGES:
        exit_with(f"--n {n} x {classes} class(es) is more than {MAX_IMAGES:,} images in one call; sample in several "
                  "calls (different --seed), or use farmer evaluate for large sample sets")


def _check_grid(n: int, classes: int, size: int, scale: int) -> None:
    """The grid at most as large as PIL opens (twice ``Image.MAX_IMAGE_PIXELS``; farmer's image readers refuse larger
    ones too): checked before sampling, not found out when the grid is built."""
    from PIL import Image

    from farmer_cli.viz import class_grid_pixels

    pixels, limit = class_grid_pixels(classes, n, size, scale), 2 * Image.MAX_IMAGE_PIXELS
    if pixels > limit:
        exit_with(f"--n {n} x {classes} class(es) of {size}px at --scale {scale} make a grid of {pixels / 1e6:,.0f} "
                  f"megapixels, more than an image viewer or PIL opens ({limit / 1e6:.0f}); lower --n or --scale, "
                  "or sample in several calls")


def _check_apart(out: Path, out_dir: Path, names: list[str]) -> None:
    """Before any sampling: the grid (--out) is neither --out-dir itself, nor a folder above it, nor one of the
    image files written there (``names``), and none of those is a directory: nothing written overwrites another."""
    grid, folder = out.resolve(), out_dir.resolve()
    if grid == folder or grid in folder.parents:
        exit_with(f"--out {out} and --out-dir {out_dir}: the grid file would be the images' folder (or a folder "
                  f"above it); give the grid another name, e.g. {out_dir / 'grid.png'}")
    if grid.parent == folder and grid.name in set(names):
        exit_with(f"--out {out} is also the name of an image written to --out-dir {out_dir} (one per sample, "
                  f"<class>-<name>_<index>.png): one would overwrite the other; name the grid otherwise, e.g. "
                  f"{out_dir / 'grid.png'}")
    taken = next((name for name in names if (folder / name).is_dir()), None)
    if taken is not None:
        exit_with(f"--out-dir {out_dir}: {taken} there is a directory, so the image of that name cannot be written; "
                  "move it or choose another --out-dir")
    earlier = [name for name in names if (folder / name).exists() or (folder / name).is_symlink()]
    if earlier:
        exit_with(f"--out-dir {out_dir} already holds {len(earlier)} of the {len(names)} images this call would "
                  f"write (e.g. {earlier[0]}, from an earlier call): some would be replaced and others left stale; "
                  "choose a new --out-dir or empty this one")


def _write_pngs(out_dir: Path, chunk: range, images, names: list[str]) -> None:
    from PIL import Image

    from farmer_cli.viz import save_png

    for i, img in zip(chunk, images):
        save_png(Image.fromarray(img.permute(1, 2, 0).squeeze(-1).numpy()), out_dir / names[i])


def _read_pngs(out_dir: Path, names: list[str]):
    """Every image of this call back from ``out_dir`` (written by all processes), in index order: (N, C, H, W)."""
    import numpy as np
    import torch
    from PIL import Image

    arrays = [np.asarray(Image.open(out_dir / name)) for name in names]
    images = torch.from_numpy(np.stack(arrays))
    return images[:, None] if images.ndim == 3 else images.permute(0, 3, 1, 2)


def _safe(class_names: list[str], label: int) -> str:
    name = class_names[label] if label < len(class_names) else str(label)
    return f"{label}-" + "".join(ch if ch.isalnum() else "_" for ch in name)[:40]


def _effective_sample_sizes(stats: dict, s, tokens: int) -> str:
    """Resampling guidance's effective sample sizes, (sum w)² / sum w², averaged over tokens and images: of the
    s_c + s_u candidates per informative token, and of the redundant step's pool, with how many of its ``tokens``
    draws (with replacement) would repeat from that many equally likely candidates."""
    import torch

    parts = []
    if stats.get("ess_informative"):
        ess = float(torch.cat(stats["ess_informative"]).mean())
        parts.append(f"effective sample size {ess:.1f} of {s.cond_candidates + s.uncond_candidates} per token")
    if stats.get("ess_redundant"):
        ess = float(torch.cat(stats["ess_redundant"]).mean())
        repeats = tokens - ess * (1 - (1 - 1 / ess) ** tokens)
        parts.append(f"{ess:.0f} of {2 * (s.redundant_pool or 2 * tokens)} in the redundant pool, ~{repeats:.0f} of "
                     f"its {tokens} draws are repeats")
    return "".join(f"; {part}" for part in parts)


def _decoder_text(student_flow, s, stats: dict) -> str:
    if student_flow is not None:
        done, total = student_flow.distilled
        if total is not None and done < total:
            return f"student (unfinished: distilled {done} of {total} steps; farmer distill --resume continues it)"
        return f"student ({done} distillation steps)"
    if s.decoder == "jacobi":
        rounds = [r for batch in stats.get("jacobi_rounds", []) for r in batch]
        return f"jacobi ({sum(rounds) / max(1, len(rounds)):.1f} rounds per block on average, at most {max(rounds)})"
    return "sequential"
