"""The mission's sampling command, `farmer sample --class 207 --n 64 --cfg 4.0`, at the full size of
imagenet256-patch8 (1.98B parameters, random weights) on one GPU: every decoder in a fresh (cold) process.

Each row runs ``generation.generate_chunks`` (what `farmer sample` runs after loading its checkpoint) for 64 images
of class 207 at cfg 4.0 in bf16, once cold (graph captures, allocator warm-up and all) and once warm, then times
the stages warm: the informative AR tokens, the AF inverse, denoising. Also per row: ms per AR token and per AF
step, aten operators per step (each launches about one kernel when run eagerly; a CUDA-graph step is one replay),
host syncs inside the decoding loops (torch.cuda.set_sync_debug_mode), peak GPU memory. Random weights: the AF
output projections get std 0.02 so the flow is not the identity. How many Jacobi rounds a block needs depends on
trained weights (7.8-8.5 of 49 on the trained quickstart model; random weights here take hundreds), so the Jacobi
row runs ``--jacobi-rounds`` rounds per block (not the exact inverse) and reports ms per round and the break-even:
the rounds per block at which Jacobi would match the sequential row's AF time.

    python bench/gpu_sample.py                      # one GPU, under 10 minutes: table + one JSON line
    python bench/gpu_sample.py --rows sequential,student --n 16
    python bench/gpu_sample.py --device cpu --n 2 --set model.af_blocks=2 --set model.af_layers=1 \\
        --set model.ar_layers=1 --rows sequential-eager,sequential-compile,jacobi,student   # CPU rehearsal

Targets (issue 21): the exact inverse (sequential or Jacobi) <= 14 s and the student <= 4 s for the 64 images, cold.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from dataclasses import replace

import torch

ROWS = {  # row -> (decoder, decode steps)
    "sequential": ("sequential", "auto"),
    "sequential-eager": ("sequential", "eager"),
    "sequential-compile": ("sequential", "compile"),
    "jacobi": ("jacobi", "auto"),
    "student": ("student", "auto"),
}
TARGET_S = {"sequential": 14.0, "jacobi": 14.0, "student": 4.0}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device):
    _sync(device)
    t = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t


def ops_per_step(model, s, device) -> dict:
    """aten operators one eager AF step and one eager AR token dispatch (at batch 2: the count does not depend on
    it)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from farmer_cli.model.steps import StepRunner

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    block, prior, runner = model.flow.blocks[0], model.prior, StepRunner()
    N, B = model.cfg.tokens, 2
    z = torch.randn(B, N, model.cfg.token_dim, device=device)
    classes = torch.zeros(B, dtype=torch.long, device=device) if block.class_emb is not None else None
    x, offsets = z.clone(), block._offsets(0, N, classes).expand(B, -1, -1).contiguous()
    cache = block.stack.new_cache(B, N, device)
    runner.attend(cache, 1)
    with Count():
        block.decode_step(x, z, offsets, cache)
    af, Count.n = Count.n, 0
    labels = torch.zeros(2 * B if s.cfg > 0 else B, dtype=torch.long, device=device)
    z_info = torch.zeros(labels.shape[0], prior.N, prior.d_I, device=device)
    cache = prior.stack.new_cache(labels.shape[0], prior.M + prior.N, device)
    runner.attend(cache, prior.M)
    prior.prefill(labels, cache)
    runner.attend(cache, prior.M + 1)
    with Count():
        prior.token_step(z_info, cache)
    return {"aten_ops_per_af_step": af, "aten_ops_per_ar_token": Count.n}


def child(args) -> dict:
    """One row in this (fresh) process."""
    from farmer_cli.config.files import apply_overrides, load_preset
    from farmer_cli.device import autocast
    from farmer_cli.sample.generate import generate_chunks, plan_denoise
    from farmer_cli.model import Farmer
    from farmer_cli.model.distill import make_student
    from farmer_cli.model.randomness import ImageStreams

    decoder, steps = ROWS[args.child]
    device = torch.device(args.device)
    cfg = apply_overrides(load_preset(args.preset), list(args.set))
    s = replace(cfg.sampling, cfg=args.cfg, decoder="jacobi" if decoder == "jacobi" else "sequential",
                decode_steps=steps, jacobi_max_iter=args.jacobi_rounds, jacobi_tol=0.0)
    torch.manual_seed(0)
    t = time.perf_counter()
    with torch.device(device):
        model = Farmer(cfg.model, trained_noise_sigma=cfg.train.final_noise_sigma()).eval()
        for block in model.flow.blocks:
            torch.nn.init.normal_(block.out_proj.weight, std=0.02)
        student = make_student(model.flow).eval() if decoder == "student" else None
    build = time.perf_counter() - t
    precision = "bf16" if device.type == "cuda" else "fp32"
    labels = torch.full((args.n,), 207 % cfg.model.num_classes)
    stats: dict = {}

    def whole():
        return list(generate_chunks(model, labels, s, 0, args.n, student=student, precision=precision, stats=stats))

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _, cold = _timed(whole, device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    _, warm = _timed(whole, device)
    # stages, warm, as generate_chunks runs them
    y = labels.to(device)
    from farmer_cli.model.steps import StepRunner

    with autocast(device, precision):
        runner = StepRunner(steps, device)
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rng = ImageStreams.for_images(0, range(args.n), device)
            info, ar_s = _timed(lambda: model.sample_informative(y, s, rng, runner=runner), device)
            tokens = model.sample_tokens(y, s, ImageStreams.for_images(0, range(args.n), device), runner=runner)
            x, af_s = _timed(lambda: model.decode(tokens, y, student=student, s=s, stats=stats, runner=runner),
                             device)
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
        syncs = sum("synchroniz" in str(w.message) for w in caught)
        denoise = plan_denoise(model, args.n)
        _, denoise_s = _timed(lambda: model.denoise(x, y, model.denoise_sigma(s), *denoise), device)
    N, blocks = model.cfg.tokens, model.cfg.af_blocks
    rounds = [r for call in stats.get("jacobi_rounds", []) for r in call]
    row = {"row": args.child, "decoder": decoder, "af_blocks": blocks, "af_tokens": N,
           "steps": StepRunner(steps, device).mode, "images": args.n,
           "cold_s": cold, "warm_s": warm, "build_s": build, "peak_GiB": peak,
           "ar_ms_per_token": 1e3 * ar_s / model.prior.N, "af_s": af_s,
           "af_ms_per_step": 1e3 * af_s / (blocks * (N - 1)) if decoder == "sequential" else None,
           "jacobi_rounds_per_block": sum(rounds) / len(rounds) if rounds else None,
           "jacobi_ms_per_round": 1e3 * af_s / (blocks * args.jacobi_rounds) if decoder == "jacobi" else None,
           "denoise_s": denoise_s, "denoise_images_per_pass": denoise[0], "denoise_checkpointed": denoise[1],
           "host_syncs_in_decoding": syncs if device.type == "cuda" else None,
           "target_s": TARGET_S.get(decoder), **ops_per_step(model, s, device)}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="imagenet256-patch8")
    ap.add_argument("--set", action="append", default=[], help="config override (e.g. a depth cut for a rehearsal)")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rows", default="sequential,jacobi,student", help=f"comma-separated, of {', '.join(ROWS)}")
    ap.add_argument("--jacobi-rounds", type=int, default=16, help="Jacobi rounds per block (timed, not exact)")
    ap.add_argument("--child", choices=list(ROWS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("ROW " + json.dumps(child(args)), flush=True)
        return
    from common import machine

    rows = []
    for name in args.rows.split(","):
        cmd = [sys.executable, __file__, "--child", name, "--preset", args.preset, "--n", str(args.n), "--cfg",
               str(args.cfg), "--device", args.device, "--jacobi-rounds", str(args.jacobi_rounds)]
        cmd += [f"--set={o}" for o in args.set]
        done = subprocess.run(cmd, capture_output=True, text=True)
        found = [line[4:] for line in done.stdout.splitlines() if line.startswith("ROW ")]
        if done.returncode or not found:
            print(f"{name}: failed (exit {done.returncode})\n{done.stderr[-3000:]}", flush=True)
            continue
        rows.append(json.loads(found[0]))
        r = rows[-1]
        print(f"{name:<19} cold {r['cold_s']:7.1f} s  warm {r['warm_s']:7.1f} s  "
              f"AR {r['ar_ms_per_token']:6.2f} ms/token"
              f"  AF {r['af_s']:6.2f} s" + (f" ({r['af_ms_per_step']:.3f} ms/step)" if r["af_ms_per_step"] else "")
              + (f" ({r['jacobi_ms_per_round']:.1f} ms/round)" if r["jacobi_ms_per_round"] else "")
              + f"  denoise {r['denoise_s']:5.2f} s ({r['denoise_images_per_pass']}/pass"
              f"{', ckpt' if r['denoise_checkpointed'] else ''})  peak {r['peak_GiB']:.2f} GiB"
              f"  ops/step AF {r['aten_ops_per_af_step']} AR {r['aten_ops_per_ar_token']}"
              f"  syncs {r['host_syncs_in_decoding']}  target {r['target_s'] or '-'} s", flush=True)
    by = {r["row"]: r for r in rows}
    if "sequential" in by and "jacobi" in by:
        seq = by["sequential"]["af_s"] / by["jacobi"]["jacobi_ms_per_round"] * 1e3 / by["jacobi"]["af_blocks"]
        print(f"Jacobi matches the sequential AF inverse at {seq:.1f} rounds per block "
              f"(of {by['jacobi']['af_tokens'] - 1} sequential steps); fewer rounds and it is faster")
    print(json.dumps({"bench": "gpu_sample", "machine": machine(), "preset": args.preset, "overrides": args.set,
                      "rows": rows}))


if __name__ == "__main__":
    main()
