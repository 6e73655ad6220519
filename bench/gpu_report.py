"""Report of a GPU training run for the smoke scripts: median images/s after warm-up, FLOP utilisation against the
GPU's dense bf16 peak counted two ways (MFU: the model's forward + backward FLOPs; hardware FLOPs: also the
forward passes activation checkpointing recomputes), and the measured peak memory against the dry-run's
prediction.

    python bench/gpu_report.py PLAN_JSON RUN_DIR/metrics.jsonl
PLAN_JSON: the output of ``farmer train ... --dry-run --gpus 1 --json`` for the same settings.
"""

from __future__ import annotations

import json
import statistics
import sys

import torch

from farmer_cli.memory_plan import gpu_tflops


def main() -> None:
    plan = json.load(open(sys.argv[1]))
    records = [json.loads(line) for line in open(sys.argv[2])]
    warm = max(r["step"] for r in records) // 4  # the first quarter includes cuDNN/allocator warm-up
    ips = statistics.median(r["images_per_s"] for r in records if r["step"] > warm)
    peak = max(r.get("gpu_peak_gib", 0.0) for r in records)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak_flops = gpu_tflops(name) * 1e12
    mfu = ips * plan["model_flops_per_image"] / peak_flops
    hfu = ips * plan["train_flops_per_image"] / peak_flops
    predicted = plan["predicted_peak_bytes"] / 2**30
    print(f"GPU: {name}")
    print(f"training: {ips:.1f} img/s (median of the logged steps after step {warm}) of the dense bf16 peak "
          f"({gpu_tflops(name):.0f} TFLOP/s): MFU {100 * mfu:.1f}% (model FLOPs, "
          f"{plan['model_flops_per_image'] / 1e12:.2f} TFLOP/image); with recomputation {100 * hfu:.1f}% "
          f"({plan['train_flops_per_image'] / 1e12:.2f} TFLOP/image)")
    print(f"peak GPU memory (torch.cuda.max_memory_allocated): {peak:.2f} GiB; dry-run prediction at micro-batch "
          f"{plan['micro_batch']}: {predicted:.2f} GiB (measured/predicted {peak / predicted:.2f})")


if __name__ == "__main__":
    main()
