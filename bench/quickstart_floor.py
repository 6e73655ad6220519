"""How fast can the quickstart train on this CPU? The matrix-multiply floor of its 2,000 steps, against the step.

One quickstart training step (batch 64, float32 as `auto` precision picks on a CPU without bf16 instructions) is run
under a dispatch mode that records every matrix multiply (``mm``, ``addmm``, ``bmm``: shapes, strides, FLOPs). Then,
as medians of interleaved repeats:

  * the whole step (forward, backward, AdamW);
  * the recorded multiplies alone, replayed on tensors of the same shapes and strides: the step's time if
    everything else (attention, GELU, layer norms, the mixtures, AdamW) cost nothing (attention's fused kernel is
    not a recorded multiply, so its FLOPs, about 7% of the step's at 57 positions, are not counted either);
  * one large square multiply (1024 x 1024 x 1024): about the best this CPU's float32 GEMM does.

It prints the step's FLOPs and each time scaled to the quickstart's 2,000 steps, next to README's 8-minute target.
For the AVX2-only laptop class, rehearse on any x86 machine:

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python bench/quickstart_floor.py
"""

from __future__ import annotations

import argparse

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from common import interleaved, report
from farmer_cli.config.files import load_preset
from farmer_cli.device import attention_backend
from farmer_cli.model import Farmer

GEMMS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}
TARGET_S = 8 * 60


class GemmRecorder(TorchDispatchMode):
    """Records (op, [(shape, stride) of each tensor argument], FLOPs) for every matrix multiply dispatched."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in GEMMS:
            tensors = [(tuple(a.shape), a.stride()) for a in args if isinstance(a, torch.Tensor)]
            a, b = args[-2], args[-1]  # (..., m, k) @ (..., k, n)
            flops = 2 * a.shape[-2] * a.shape[-1] * b.shape[-1] * (a.shape[0] if a.dim() == 3 else 1)
            self.calls.append((func, tensors, flops))
        return func(*args, **(kwargs or {}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    cfg = load_preset("quickstart")
    torch.manual_seed(0)
    model = Farmer(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    m = cfg.model
    u = torch.randint(0, 256, (args.batch, m.channels, m.image_size, m.image_size), dtype=torch.uint8)
    y = torch.randint(0, m.num_classes, (args.batch,))

    def step():
        with attention_backend("cpu", "no"):
            loss = model(u, y, noise="gaussian", sigma=cfg.train.noise_end)["bpd"].mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    recorder = GemmRecorder()
    with recorder:
        step()
    replay = [(func, [_random_strided(s, st) for s, st in tensors]) for func, tensors, _ in recorder.calls]

    def gemms_only():
        for func, tensors in replay:
            func(*tensors)

    square = torch.randn(1024, 1024), torch.randn(1024, 1024)
    t = interleaved({"step": step, "gemms": gemms_only, "square": lambda: torch.mm(*square)}, args.repeats)
    flops = sum(f for *_, f in recorder.calls)
    square_rate = 2 * 1024**3 / t["square"]
    steps = cfg.train.steps
    rows = [
        {"what": "whole step (forward, backward, AdamW)", "per_step_ms": 1e3 * t["step"],
         "GFLOP_per_s": flops / t["step"] / 1e9, "train_2000_steps_s": steps * t["step"]},
        {"what": "its matrix multiplies alone", "per_step_ms": 1e3 * t["gemms"],
         "GFLOP_per_s": flops / t["gemms"] / 1e9, "train_2000_steps_s": steps * t["gemms"]},
        {"what": "its FLOPs at a 1024^3 multiply's rate", "per_step_ms": 1e3 * flops / square_rate,
         "GFLOP_per_s": square_rate / 1e9, "train_2000_steps_s": steps * flops / square_rate},
    ]
    print(f"quickstart step, batch {args.batch}, float32: {len(recorder.calls)} matrix multiplies, "
          f"{flops / 1e9:.1f} GFLOP; CPU capability {torch.backends.cpu.get_cpu_capability()}")
    report("quickstart_floor", rows, {"gflop_per_step": flops / 1e9, "target_s": TARGET_S,
                                      "cpu_capability": torch.backends.cpu.get_cpu_capability()})
    print(f"README's target for the whole `farmer train`: {TARGET_S} s")


def _random_strided(shape, stride) -> torch.Tensor:
    """A random tensor of exactly this shape and stride (transposed and broadcast layouts included)."""
    size = 1 + sum((n - 1) * st for n, st in zip(shape, stride))
    return torch.randn(size).as_strided(shape, stride)


if __name__ == "__main__":
    main()
