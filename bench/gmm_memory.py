"""Memory and speed of the mixture log-density at the patch-8 redundant-term sizes (S = 256 points per shared
mixture, K = 200 components, D = 640 channels): forward + backward of

  * broadcast       the former GMM.log_prob, which builds (B, S, K, D) tensors (copied here as the reference);
  * expanded        GMM.log_prob: two (S, D) x (D, K) matmuls, the quadratic accumulated in float64;
  * expanded-fp32   the same expansion in float32, the variant GMM.log_prob does not use: cheaper, but its terms
                    cancel (see the error columns).

Each variant runs in a fresh process; peak memory is how far the first forward + backward raises the process's
peak RSS above its RSS with the inputs built (CPU, Linux: the peak is reset through /proc/self/clear_refs) or
torch.cuda.max_memory_allocated above the memory allocated (GPU). Errors are against the broadcast form in float64, with
means ~ N(0, 1), stds ~ U[1e-3, 2] and points drawn from the mixture.

    python bench/gmm_memory.py [--batch 8] [--repeats 3] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from common import median_time, report
from farmer_cli.model import GMM

S, K, D = 256, 200, 640
MIN_STD = 1e-3


def broadcast_log_prob(g: GMM, z: torch.Tensor) -> torch.Tensor:
    """The former GMM.log_prob: z (..., S, D) -> (..., S) in z's dtype, through (..., S, K, D) tensors."""
    z = z[..., :, None, :]
    means, stds = g.means[..., None, :, :], g.stds[..., None, :, :]
    comp = -0.5 * (((z - means) / stds) ** 2 + math.log(2 * math.pi)) - torch.log(stds)
    return torch.logsumexp(F.log_softmax(g.logits, dim=-1)[..., None, :] + comp.sum(-1), dim=-1)


def expanded_fp32_log_prob(g: GMM, z: torch.Tensor) -> torch.Tensor:
    """GMM.log_prob's expansion with the quadratic in float32 instead of float64."""
    prec = g.stds.pow(-2)
    quad = (z * z) @ prec.mT - 2 * z @ (g.means * prec).mT + (g.means**2 * prec).sum(-1)[..., None, :]
    log_norm = -0.5 * z.shape[-1] * math.log(2 * math.pi) - torch.log(g.stds).sum(-1)
    return torch.logsumexp((F.log_softmax(g.logits, dim=-1) + log_norm)[..., None, :] - 0.5 * quad, dim=-1)


VARIANTS = {"broadcast": broadcast_log_prob, "expanded": GMM.log_prob, "expanded-fp32": expanded_fp32_log_prob}


def inputs(batch: int, device: torch.device) -> tuple[GMM, torch.Tensor]:
    """B shared mixtures (B, K, D) and S points per mixture (B, S, D) drawn from them."""
    gen = torch.Generator().manual_seed(0)
    g = GMM(torch.randn(batch, K, generator=gen), torch.randn(batch, K, D, generator=gen),
            MIN_STD + (2 - MIN_STD) * torch.rand(batch, K, D, generator=gen))
    z = g.sample(S, gen)
    return GMM(g.logits.to(device), g.means.to(device), g.stds.to(device)), z.to(device)


def peak_rss_bytes() -> int:
    """The process's peak resident set size (VmHWM)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024


def reset_peak_rss() -> int:
    """Set the peak RSS to the current RSS (Linux >= 4.0) and return it."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return peak_rss_bytes()


def child(variant: str, batch: int, repeats: int, device: torch.device, out: Path) -> None:
    """Time forward + backward of one variant and measure its peak memory; save its log-densities to ``out``."""
    g, z = inputs(batch, device)
    leaves = [g.logits, g.means, g.stds, z]
    for t in leaves:
        t.requires_grad_(True)
    fn = VARIANTS[variant]
    cuda = device.type == "cuda"

    def step() -> None:
        for t in leaves:
            t.grad = None
        fn(g, z).sum().backward()
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = reset_peak_rss()
    step()
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()
    seconds = median_time(step, repeats=repeats, warmup=0)
    with torch.no_grad():
        torch.save(fn(g, z).cpu(), out)
    print(json.dumps({"seconds": seconds, "peak_mb": (peak - base) / 1e6}))


def float64_truth(batch: int) -> torch.Tensor:
    """The broadcast form in float64, one mixture at a time: (B, S)."""
    g, z = inputs(batch, torch.device("cpu"))
    with torch.no_grad():
        return torch.cat([broadcast_log_prob(GMM(g.logits[i:i + 1].double(), g.means[i:i + 1].double(),
                                                 g.stds[i:i + 1].double()), z[i:i + 1].double())
                          for i in range(batch)])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu or cuda")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if args.child:
        child(args.child, args.batch, args.repeats, device, args.out)
        return

    truth = float64_truth(args.batch)
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in VARIANTS:
            out = Path(tmp) / f"{variant}.pt"
            proc = subprocess.run([sys.executable, __file__, "--child", variant, "--batch", str(args.batch),
                                   "--repeats", str(args.repeats), "--device", str(device), "--out", str(out)],
                                  capture_output=True, text=True, check=True)
            results[variant] = json.loads(proc.stdout.splitlines()[-1])
            err = (torch.load(out).double() - truth).abs()
            rows.append({"variant": variant, "fwd+bwd ms": 1e3 * results[variant]["seconds"],
                         "peak MB": results[variant]["peak_mb"], "max abs err (nats)": err.max().item(),
                         "max rel err": (err / truth.abs()).max().item()})
    print(f"B={args.batch}, S={S}, K={K}, D={D}, device {device}; one (B, S, K, D) float32 tensor is "
          f"{args.batch * S * K * D * 4 / 1e6:.0f} MB")
    report("gmm_memory", rows, {"batch": args.batch, "device": str(device)})
    old, new = results["broadcast"], results["expanded"]
    print(f"expanded vs broadcast: {old['seconds'] / new['seconds']:.1f}x faster, "
          f"{old['peak_mb'] / new['peak_mb']:.0f}x less peak memory")


if __name__ == "__main__":
    main()
