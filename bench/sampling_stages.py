"""Where sampling's time and memory go, stage by stage, at batch 1 and a large batch (default 64): informative AR
(token by token, KV cache), the redundant step (guided resampling from the shared mixture), the AF inverse
(sequential / Jacobi / one-step student), denoising, and the whole sample; guided (resampling CFG, w = 4).

Models: the quickstart, a mid-size model, and imagenet256-patch8 at its real widths, token counts, mixture sizes
and channel split with the depth cut (AF 2 blocks x 1 layer, AR 1 layer). Weights are random with the AF's output
projections perturbed (std 0.02), except the quickstart's with ``--quickstart-run RUN`` (a trained run). Jacobi's
rounds depend on the trained weights, so its row is measured only on a trained run; the other stages' cost does
not depend on the weights. The student is an undistilled copy (its cost is that of a distilled one).

ms per image: median of interleaved repeats. Peak memory: the rise of this process's peak RSS during the stage
(Linux: the peak is reset through /proc/self/clear_refs and glibc's free memory trimmed before each stage); on a
GPU, torch.cuda.max_memory_allocated during the stage.

    python bench/sampling_stages.py [--batch 64] [--repeats 3] [--quickstart-run RUN] [--large-batches patch8-cut=8]
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time
from pathlib import Path

import torch

from common import report
from farmer_cli.config.schema import SamplingConfig
from farmer_cli.checkpoint import load_model
from farmer_cli.config.files import apply_overrides, load_preset
from farmer_cli.device import autocast, resolve_precision
from farmer_cli.sample.generate import plan_denoise
from farmer_cli.model import Farmer
from farmer_cli.model.distill import make_student
from farmer_cli.model.guidance import draw
from farmer_cli.model.randomness import ImageStreams

MODELS = {
    "quickstart": ("quickstart", []),
    "mid": ("quickstart", ["model.af_blocks=8", "model.af_layers=2", "model.af_width=256", "model.ar_layers=6",
                           "model.ar_width=256"]),
    "patch8-cut": ("imagenet256-patch8", ["model.af_blocks=2", "model.af_layers=1", "model.ar_layers=1"]),
}


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def measured(fn, device: torch.device) -> tuple[float, int]:
    """(seconds, peak bytes above the memory in use before) of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = _rss_bytes("VmRSS")
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _rss_bytes("VmHWM")
    return seconds, max(0, peak - before)


def stages(model: Farmer, student, batch: int, s: SamplingConfig, trained: bool) -> dict:
    """Inputs made once (from a real sampling pass) and each stage as a callable."""
    device = model.device
    y = torch.arange(batch, device=device) % model.cfg.num_classes
    streams = lambda: ImageStreams.for_images(0, range(batch), device)  # noqa: E731
    info = model.sample_informative(y, s, streams())
    z = model.from_ar_tokens(torch.cat([info.tokens, draw(info.redundant, info.redundant_null, model.prior.N,
                                                          s.redundant_pool or 2 * model.prior.N, s, streams())], -1))
    x = model.from_tokens(model.flow.inverse(z))
    pool = s.redundant_pool or 2 * model.prior.N
    denoise = plan_denoise(model, batch)
    jacobi = SamplingConfig(**{**s.__dict__, "decoder": "jacobi"})
    fns = {
        "informative AR": lambda: model.sample_informative(y, s, streams()),
        "redundant step": lambda: draw(info.redundant, info.redundant_null, model.prior.N, pool, s, streams()),
        "AF inverse sequential": lambda: model.flow.inverse(z),
        "AF inverse jacobi": lambda: model.flow.jacobi_inverse(z, None, jacobi.jacobi_tol, jacobi.jacobi_max_iter),
        "AF inverse student": lambda: student.one_pass_inverse(z),
        "denoise": lambda: model.denoise(x, y, 0.05, *denoise),
        "whole sample (sequential)": lambda: model.sample(y, s, streams(), denoise_batch=denoise[0],
                                                           denoise_checkpoint=denoise[1]),
    }
    if not trained:
        del fns["AF inverse jacobi"]
    return fns


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--small-batch", type=int, default=1, help="the latency-bound batch (0: skip it)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default="auto", help="auto (bf16 on a CUDA GPU, as farmer sample) | fp32 | bf16")
    ap.add_argument("--quickstart-run", type=Path, help="a trained quickstart run (for the Jacobi row)")
    ap.add_argument("--large-batches", default="", help="per-model large batch, e.g. patch8-cut=8")
    args = ap.parse_args()
    device = torch.device(args.device)
    precision = resolve_precision(args.precision, device.type, training=False)[0]
    rows = []
    for name in args.models.split(","):
        preset, overrides = MODELS[name]
        trained = name == "quickstart" and args.quickstart_run is not None
        if trained:
            model, cfg, _, _ = load_model(args.quickstart_run, device)
        else:
            cfg = apply_overrides(load_preset(preset), overrides)
            torch.manual_seed(0)
            model = Farmer(cfg.model, trained_noise_sigma=0.05).to(device).eval()
            for block in model.flow.blocks:
                torch.nn.init.normal_(block.out_proj.weight, std=0.02)
        student = make_student(model.flow).eval().requires_grad_(False)
        s = SamplingConfig(**{**cfg.sampling.__dict__, "cfg": 4.0})
        large = dict(item.split("=") for item in args.large_batches.split(",") if item).get(name, args.batch)
        for batch in [b for b in (args.small_batch, int(large)) if b]:
            fns = stages(model, student, batch, s, trained)
            times: dict[str, list[float]] = {k: [] for k in fns}
            peaks: dict[str, int] = {k: 0 for k in fns}
            for _ in range(args.repeats):
                for stage, fn in fns.items():
                    with autocast(device, precision):
                        seconds, peak = measured(fn, device)
                    times[stage].append(seconds)
                    peaks[stage] = max(peaks[stage], peak)
            sequential = statistics.median(times["AF inverse sequential"])
            for stage in fns:
                t = statistics.median(times[stage])
                rows.append({"model": name + (" (trained)" if trained else ""), "batch": batch, "stage": stage, "ms_per_image": 1e3 * t / batch,
                             "peak_MiB": peaks[stage] / 2**20,
                             "x_vs_sequential": sequential / t if stage.startswith("AF inverse") else ""})
                print(rows[-1], flush=True)
    report("sampling_stages", rows, {"repeats": args.repeats, "device": str(device), "precision": precision, "cfg": 4.0,
                                     "note": "medians of interleaved repeats; random weights"})


if __name__ == "__main__":
    main()
