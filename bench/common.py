"""Shared helpers for the benchmarks: side-by-side timing with medians, tables, JSON output."""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch


def machine() -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, {gpu}, torch {torch.__version__}"


def median_time(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of fn() over ``repeats`` runs after ``warmup`` runs (seconds)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def interleaved(fns: dict, repeats: int = 5) -> dict[str, float]:
    """Median times of several functions measured in alternation (so drifts in machine load hit all alike)."""
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in samples.items()}


def report(name: str, rows: list[dict], extra: dict | None = None) -> None:
    """Print rows as an aligned table and write bench/<name>.json."""
    cols = list(rows[0])
    widths = [max(len(c), *(len(_fmt(r[c])) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(_fmt(r[c]).ljust(w) for c, w in zip(cols, widths)))
    out = Path(__file__).with_name(f"{name}.json")
    out.write_text(json.dumps({"machine": machine(), "rows": rows, **(extra or {})}, indent=2))
    print(f"machine: {machine()}\nwritten: {out}")


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
