"""Profile one training step and one sampling call of the quickstart model (torch.profiler), print the top
operators, and time the fixes side by side (medians of interleaved repeats):

  * fused AdamW (one kernel over all parameters) vs the per-parameter loop the optimiser uses by default on CPU
  * KV-cached vs uncached sampling (see bench/sampling.py for the full table)

    python bench/profile.py [--rows 12]
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from common import interleaved, report
from farmer_cli.config import load_preset
from farmer_cli.model import Farmer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    cfg = load_preset("quickstart")
    torch.manual_seed(0)
    model = Farmer(cfg.model)
    u = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8)
    y = torch.randint(0, 10, (64,))
    optimisers = {"fused": torch.optim.AdamW(model.parameters(), 1e-4, fused=True),
                  "foreach_off": torch.optim.AdamW(model.parameters(), 1e-4, foreach=False)}

    def train_step(opt):
        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(u, y, noise="gaussian", sigma=0.05)["bpd"].mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    def sample():
        model.eval()
        model.sample(y[:16], cfg.sampling, torch.Generator().manual_seed(0))
        model.train()

    for name, fn in (("training step (bf16 autocast, batch 64, fused AdamW)", train_step(optimisers["fused"])),
                     ("sampling call (16 images, guided)", sample)):
        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        print(f"\n== {name}: top operators by self CPU time ==")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    t = interleaved({k: train_step(o) for k, o in optimisers.items()}, args.repeats)
    report("profile", [{"change": "AdamW fused=True vs per-parameter loop", "before_s": t["foreach_off"],
                        "after_s": t["fused"], "speedup": t["foreach_off"] / t["fused"]}])


if __name__ == "__main__":
    main()
