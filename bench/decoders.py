"""AF inverse decoders of a trained run, side by side: sequential (token by token, KV cache) vs Jacobi (all tokens
in parallel, iterated to the same exact inverse), at batch 1 and a larger batch; ms per image, Jacobi rounds per
block and the largest difference from the sequential result. Rounds depend on the trained weights, so pass a run.

    python bench/decoders.py --ckpt runs/quickstart-... [--batch 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from common import interleaved, report
from farmer_cli.checkpoint import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, required=True)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tol", type=float, default=1e-5)
    args = ap.parse_args()
    model, cfg, _, _ = load_model(args.ckpt)
    rows = []
    for batch in (1, args.batch):
        y = torch.arange(batch) % cfg.model.num_classes
        tokens = model.sample_tokens(y, cfg.sampling, torch.Generator().manual_seed(0))
        z = model.from_ar_tokens(tokens)
        exact = model.flow.inverse(z)
        parallel, rounds = model.flow.jacobi_inverse(z, tol=args.tol)
        t = interleaved({"sequential": lambda: model.flow.inverse(z),
                         "jacobi": lambda: model.flow.jacobi_inverse(z, tol=args.tol)}, args.repeats)
        rows.append({"batch": batch, "tokens": z.shape[1], "blocks": len(rounds),
                     "sequential_ms_per_image": 1e3 * t["sequential"] / batch,
                     "jacobi_ms_per_image": 1e3 * t["jacobi"] / batch, "jacobi_speedup": t["sequential"] / t["jacobi"],
                     "jacobi_rounds_per_block": sum(rounds) / len(rounds),
                     "max_abs_diff": (parallel - exact).abs().max().item()})
        print(rows[-1], flush=True)
    report("decoders", rows, {"ckpt": str(args.ckpt), "tol": args.tol, "repeats": args.repeats})


if __name__ == "__main__":
    main()
