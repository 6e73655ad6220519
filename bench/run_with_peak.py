"""Run one farmer command in this process, then print its wall time and peak GPU memory
(torch.cuda.max_memory_allocated): for the GPU smoke scripts, where ``/usr/bin/time`` sees only host memory.

    python bench/run_with_peak.py sample --ckpt RUN --class 207 --n 64 --cfg 4.0
"""

from __future__ import annotations

import sys
import time

import torch

from farmer_cli.app import main


def run() -> int:
    command = " ".join(sys.argv[1:2])
    sys.argv = ["farmer", *sys.argv[1:]]
    start = time.perf_counter()
    try:
        main()
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    print(f"farmer {command}: wall {time.perf_counter() - start:.1f} s, peak GPU memory {peak:.2f} GiB, exit {code}",
          flush=True)
    return code


if __name__ == "__main__":
    sys.exit(run())
