"""Does ``train.compile`` pay? The quickstart's training step (flow + prior, forward + backward + fused AdamW) with
the flow and prior compiled in place (``nn.Module.compile``, as ``--set train.compile=true`` does) against the
plain model: the compile time (first steps) against the time saved per step, over the quickstart's 2,000 steps.
The noise sigma changes every step (annealing), as in training, so recompilation for it would show here.

    python bench/train_compile.py [--repeats 7] [--bf16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import report
from farmer_cli.config.files import load_preset
from farmer_cli.model import Farmer
from farmer_cli.device import attention_backend


def make_step(compiled: bool, bf16: bool, batch: int = 64):
    cfg = load_preset("quickstart")
    torch.manual_seed(0)
    model = Farmer(cfg.model)
    if compiled:
        model.flow.compile()
        model.prior.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    u, y = torch.randint(0, 256, (batch, 1, 28, 28), dtype=torch.uint8), torch.arange(batch) % 10
    calls = [0]

    def step():
        sigma = 0.1 * 0.99 ** calls[0]
        calls[0] += 1
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), attention_backend("cpu", "bf16" if bf16 else "no"):
            loss = model(u, y, noise="gaussian", sigma=sigma)["bpd"].mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, cfg.train.steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--bf16", action="store_true")
    args = ap.parse_args()
    eager, steps = make_step(False, args.bf16)
    compiled, _ = make_step(True, args.bf16)
    t = time.perf_counter()
    compiled()
    compiled()  # the second step compiles the backward's other shapes, if any
    compile_s = time.perf_counter() - t
    eager()
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(args.repeats):
        for name, fn in (("eager", eager), ("compiled", compiled)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    e, c = statistics.median(times["eager"]), statistics.median(times["compiled"])
    saved = steps * (e - c)
    report("train_compile", [{"precision": "bf16" if args.bf16 else "fp32", "eager_step_ms": 1e3 * e,
                              "compiled_step_ms": 1e3 * c, "speedup": e / c, "compile_s": compile_s,
                              f"saved_over_{steps}_steps_s": saved, "pays": saved > compile_s}],
           {"repeats": args.repeats, "note": "medians of interleaved steps; quickstart, batch 64"})


if __name__ == "__main__":
    main()
