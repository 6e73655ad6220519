"""Sample class-conditional images: AR prior token by token (KV cache), then the AF inverse.

Guidance: --cfg W > 0 uses resampling-based CFG (Algorithm 1 of the paper; every knob under
--set sampling.*) or, with --guidance simple, JetFormer-style guidance. Unguided sampling uses the decoupled
GMM knobs: --temperature T (mixture logits / T) and --var-scale S (component variance x S); the supplement's
unguided setting is --preset-sampling unguided (S=0.9, T=1.3).

Examples:
  farmer sample --class 3 --n 16
  farmer sample --class 0 --class 7 --n 8 --cfg 3 --out sevens.png --out-dir samples/
  farmer sample --class random --n 4 --preset-sampling unguided
  farmer sample --class "golden retriever" --n 64 --cfg 2 --student
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

from . import (CKPT_HELP, CLASS_HELP, DEVICE_HELP, Option, check_output_dir, check_output_image, exit_with, resolve_class,
               user_errors)

NAME = "sample"
MAX_IMAGES = 10_000  # per call: every image is kept in memory for the grid


def run(
    ckpt: Optional[Path] = Option(None, "--ckpt", help=CKPT_HELP),
    classes: List[str] = Option([], "--class", "-c", help=CLASS_HELP + " Repeat for several; 'random' for a random "
                                "class. Default: every class (at most 10; else 8 random)."),
    n: int = Option(8, "--n", help="Samples per class (one grid row per class); at most 10,000 images per call."),
    cfg_weight: Optional[float] = Option(None, "--cfg", help="Guidance weight w (0 = unguided). Default: the preset's."),
    temperature: Optional[float] = Option(None, "--temperature", "-t", help="Unguided mixture temperature T: "
                                          "logits / T (T > 1 flattens the mixture weights)."),
    var_scale: Optional[float] = Option(None, "--var-scale", "-s", help="Unguided variance scale S: every component "
                                        "variance x S."),
    candidates: Optional[int] = Option(None, "--candidates", "-m", help="Resampling CFG: candidates drawn from each "
                                       "of the conditional and unconditional mixtures per token (s_c = s_u)."),
    guidance: Optional[str] = Option(None, "--guidance", help="resample (Algorithm 1) | simple (JetFormer-style)."),
    preset_sampling: Optional[str] = Option(None, "--preset-sampling", help="Named sampling settings: unguided "
                                            "(supplement: cfg 0, S=0.9, T=1.3) or neutral (cfg 0, S=1, T=1)."),
    seed: int = Option(0, "--seed", help="Random seed; the same seed gives the same images on CPU."),
    batch_size: int = Option(64, "--batch-size", "-b", help="Images decoded at once."),
    out: Path = Option(Path("samples.png"), "--out", "-o", help="Grid PNG (rows = classes)."),
    out_dir: Optional[Path] = Option(None, "--out-dir", help="Also write every image as <class>-<name>_<index>.png here."),
    scale: int = Option(0, "--scale", help="Enlarge grid cells this many times (0: auto, to at least 64 px)."),
    student: bool = Option(False, "--student", help="Decode with the distilled one-step student (run farmer distill "
                           "first); the same as --decoder student."),
    decoder: Optional[str] = Option(None, "--decoder", help="AF inverse: sequential (token by token, KV cache), "
                                    "jacobi (all tokens in parallel, iterated to the same exact inverse; "
                                    "--set sampling.jacobi_tol / jacobi_max_iter) or student. Default: the "
                                    "checkpoint's sampling.decoder (sequential)."),
    device: str = Option("auto", "--device", help=DEVICE_HELP),
    overrides: List[str] = Option([], "--set", help="Override sampling settings, e.g. --set sampling.t_resample=2."),
) -> None:
    with user_errors():
        _sample(ckpt, classes, n, cfg_weight, temperature, var_scale, candidates, guidance, preset_sampling, seed,
                batch_size, out, out_dir, scale, student or decoder == "student", overrides, device,
                None if decoder == "student" else decoder)


def sampling_config(cfg, cfg_weight, temperature, var_scale, candidates, guidance, preset_sampling, overrides):
    """The checkpoint's sampling settings with a named preset, then explicit flags, then --set applied (each
    through the config gate)."""
    from ..config_files import apply_overrides, apply_sampling_preset

    if preset_sampling is not None:
        apply_sampling_preset(cfg, preset_sampling)
    flags = {"cfg": cfg_weight, "temperature": temperature, "var_scale": var_scale, "guidance": guidance,
             "cond_candidates": candidates, "uncond_candidates": candidates}
    apply_overrides(cfg, [f"sampling.{k}={v}" for k, v in flags.items() if v is not None] + list(overrides),
                    allowed=("sampling",))
    return cfg.sampling


def _sample(ckpt, classes, n, cfg_weight, temperature, var_scale, candidates, guidance, preset_sampling, seed,
            batch_size, out, out_dir, scale, student, overrides, device, decoder):
    import torch

    from ..checkpoint import load_model, load_student
    from ..runtime import find_checkpoint, resolve_device
    from ..viz import grid, save_png
    from .ui import console, escape, progress

    if decoder not in (None, "sequential", "jacobi"):
        exit_with(f"--decoder must be sequential, jacobi or student, not '{decoder}'")
    if n < 1:
        exit_with("--n must be at least 1")
    if batch_size < 1:
        exit_with("--batch-size must be at least 1")
    if n * max(1, len(classes)) > MAX_IMAGES:
        exit_with(f"--n {n} x {max(1, len(classes))} class(es) is more than {MAX_IMAGES:,} images in one call; "
                  "sample in several calls (different --seed), or use farmer evaluate for large sample sets")
    if not 0 <= scale <= 64:
        exit_with("--scale must be between 0 (auto) and 64")
    check_output_image(out)
    if out_dir is not None:
        check_output_dir(out_dir)
    device = resolve_device(device)
    run_dir = find_checkpoint(ckpt)
    model, cfg, class_names, step = load_model(run_dir, device)
    s = sampling_config(cfg, cfg_weight, temperature, var_scale, candidates, guidance, preset_sampling,
                        overrides + ([f"sampling.decoder={decoder}"] if decoder else []))
    student_flow = load_student(run_dir, model) if student else None
    gen = torch.Generator(device).manual_seed(seed)
    sigma = model.denoise_sigma(s)
    K = cfg.model.num_classes
    if not classes:
        labels = list(range(K)) if K <= 10 else torch.randperm(K, generator=gen, device=device)[:8].tolist()
    else:
        labels = [int(torch.randint(K, (1,), generator=gen, device=device)) if c == "random" else resolve_class(c, class_names, K)
                  for c in classes]
    y_all = torch.tensor(labels).repeat_interleave(n)
    N, blocks = model.prior.N, cfg.model.af_blocks
    chunks = list(y_all.split(batch_size))
    per_chunk = N + (0 if student_flow is not None else blocks)
    images, stats = [], {}
    t0 = time.time()
    with progress() as bar:
        task = bar.add_task("sample", total=len(chunks) * per_chunk)
        for y in chunks:
            images.append(model.sample(y, s, gen, student=student_flow, on_token=lambda i: bar.advance(task),
                                       on_block=lambda t: bar.advance(task), stats=stats).cpu())
    images = torch.cat(images)
    seconds = time.time() - t0
    size = cfg.model.image_size
    picture = grid(images, n, scale=scale or max(1, 64 // size))
    save_png(picture, out)
    if out_dir is not None:
        from PIL import Image

        out_dir.mkdir(parents=True, exist_ok=True)
        for i, (img, label) in enumerate(zip(images, y_all.tolist())):
            arr = img.permute(1, 2, 0).squeeze(-1).numpy()
            Image.fromarray(arr).save(out_dir / f"{_safe(class_names, label)}_{i % n:04d}.png")
    how = f"cfg {s.cfg} ({s.guidance})" if s.cfg > 0 else f"unguided (T={s.temperature}, S={s.var_scale})"
    how += f", denoised (sigma {sigma:g})" if sigma > 0 else ""
    console.print(f"{len(images)} samples of {len(labels)} class(es) from step {step} of {escape(str(run_dir))}, {how}, "
                  f"{_decoder_text(student_flow, s, stats)} decoder: {seconds:.1f} s "
                  f"({len(images) / seconds:.1f} img/s) -> [bold]{escape(str(out))}[/]"
                  + (f" and {escape(str(out_dir))}/" if out_dir else ""))


def _safe(class_names: list[str], label: int) -> str:
    name = class_names[label] if label < len(class_names) else str(label)
    return f"{label}-" + "".join(ch if ch.isalnum() else "_" for ch in name)[:40]


def _decoder_text(student_flow, s, stats: dict) -> str:
    if student_flow is not None:
        return "student"
    if s.decoder == "jacobi":
        rounds = [r for batch in stats.get("jacobi_rounds", []) for r in batch]
        return f"jacobi ({sum(rounds) / max(1, len(rounds)):.1f} rounds per block on average, at most {max(rounds)})"
    return "sequential"
