"""Training throughput: images/s, tokens/s and peak memory of one forward+backward+AdamW step (as `farmer train`
runs it: fused AdamW, the attention backend farmer picks), across presets,
float32 vs bfloat16 autocast and batch sizes; and how step time grows with sequence length (patch size at a fixed
resolution) and with depth. All numbers in one run are medians of interleaved repeats, so ratios are fair.

    python bench/train_throughput.py [--repeats 5] [--quick]
    python bench/train_throughput.py --imagenet          # the imagenet256 presets at reduced depth (GPU)
"""

from __future__ import annotations

import argparse
import resource

import torch

from common import interleaved, report
from farmer_cli.config.files import apply_overrides, load_preset
from farmer_cli.model import Farmer
from farmer_cli.device import attention_backend

MID = ["model.af_blocks=8", "model.af_layers=2", "model.af_width=512", "model.af_heads=8",
       "model.ar_layers=8", "model.ar_width=512", "model.ar_heads=8"]


def step_fn(cfg, batch: int, bf16: bool, device: str):
    torch.manual_seed(0)
    model = Farmer(cfg.model).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    m = cfg.model
    u = torch.randint(0, 256, (batch, m.channels, m.image_size, m.image_size), dtype=torch.uint8, device=device)
    y = torch.randint(0, m.num_classes, (batch,), device=device)

    precision = "bf16" if bf16 else "no"

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16), attention_backend(device, precision):
            loss = model(u, y, noise="gaussian", sigma=0.05)["bpd"].mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    return step, sum(p.numel() for p in model.parameters())


def peak_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS so far (never falls)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="fewer configurations")
    ap.add_argument("--imagenet", action="store_true", help="imagenet256 presets at reduced depth")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    if args.imagenet:
        cases = [(f"{p} (4 AF blocks, 4 AR layers)", p, ["model.af_blocks=4", "model.ar_layers=4"], b)
                 for p in ("imagenet256-patch16", "imagenet256-patch8") for b in (8, 32)]
    else:
        cases = [("tiny", "tiny", [], 64), ("quickstart", "quickstart", [], 32), ("quickstart", "quickstart", [], 64),
                 ("mid (8x2x512 AF, 8x512 AR)", "quickstart", MID, 16)]
        if not args.quick:
            cases += [(f"quickstart, patch {p}", "quickstart",  # keep the quickstart's 10/16 informative share
                       [f"model.patch_size={p}", f"model.informative_dims={round(0.625 * p * p)}"], 64) for p in (2, 7)]
            cases += [(f"quickstart, {b} AF blocks", "quickstart", [f"model.af_blocks={b}"], 64) for b in (2, 8)]
    for label, preset, overrides, batch in cases:
        cfg = apply_overrides(load_preset(preset), overrides)
        fns = {}
        for bf16 in (False, True):
            fns["bf16" if bf16 else "fp32"], n_params = step_fn(cfg, batch, bf16, device)
        t = interleaved(fns, args.repeats)
        tokens = cfg.model.tokens + cfg.model.ar_tokens + cfg.model.cond_repeat
        rows.append({"model": label, "params_M": round(n_params / 1e6, 2), "N_tokens": cfg.model.tokens,
                     "batch": batch, "fp32_step_s": t["fp32"], "bf16_step_s": t["bf16"],
                     "img_per_s_fp32": batch / t["fp32"], "img_per_s_bf16": batch / t["bf16"],
                     "tok_per_s_bf16": batch * tokens / t["bf16"], "bf16_speedup": t["fp32"] / t["bf16"],
                     "peak_mem_so_far_MB": round(peak_mb(device))})
    report("train_throughput_imagenet" if args.imagenet else "train_throughput", rows,
           {"device": device, "repeats": args.repeats, "note": "medians of interleaved fp32/bf16 repeats"})


if __name__ == "__main__":
    main()
