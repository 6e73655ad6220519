"""Profile one training step and one sampling call of the quickstart model (torch.profiler), print the top
operators, and time the fixes side by side (medians of interleaved repeats):

  * attention backend under bf16 autocast on CPU: plain matmul-softmax ("math") vs the fused flash kernel, whose
    CPU backward was the top hot spot (farmer now picks "math" there: farmer_cli/device.py attention_backend)
  * fused AdamW (one kernel over all parameters) vs the per-parameter loop
  * KV-cached vs uncached sampling is in bench/sampling.py

    python bench/profile_hotspots.py [--rows 12]
"""

from __future__ import annotations

import argparse

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from common import interleaved, report
from farmer_cli.config.files import load_preset
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

    def train_step(opt, backend=SDPBackend.MATH):
        def step():
            with sdpa_kernel(backend), torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(u, y, noise="gaussian", sigma=0.05)["bpd"].mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    def sample():
        model.eval()
        model.sample(y[:16], cfg.sampling, torch.Generator().manual_seed(0))
        model.train()

    for name, fn in (("training step, flash attention (bf16 autocast, batch 64)",
                      train_step(optimisers["fused"], SDPBackend.FLASH_ATTENTION)),
                     ("training step, math attention (bf16 autocast, batch 64)", train_step(optimisers["fused"])),
                     ("sampling call (16 images, guided)", sample)):
        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        print(f"\n== {name}: top operators by self CPU time ==")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    t = interleaved({"flash": train_step(optimisers["fused"], SDPBackend.FLASH_ATTENTION),
                     "math": train_step(optimisers["fused"]), "loop": train_step(optimisers["foreach_off"])},
                    args.repeats)
    report("profile", [
        {"change": "attention: math vs flash kernel (bf16, CPU)", "before_s": t["flash"], "after_s": t["math"],
         "speedup": t["flash"] / t["math"]},
        {"change": "AdamW fused vs per-parameter loop", "before_s": t["loop"], "after_s": t["math"],
         "speedup": t["loop"] / t["math"]},
    ])


if __name__ == "__main__":
    main()
