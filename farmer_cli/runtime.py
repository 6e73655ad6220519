"""Run-time plumbing: Accelerator and precision, run directories, checkpoint discovery, progress bars."""

from __future__ import annotations

import os
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, soft_wrap=True)  # progress, notes, warnings and errors
stdout = Console()  # results (tables) so they can be piped
if not stdout.is_terminal:  # piped or captured: do not squeeze tables into 80 columns
    stdout = Console(width=160)

RUNS_DIR = Path("runs")


def resolve_precision(requested: str, cuda: bool) -> tuple[str, str | None]:
    """Map ``auto|no|bf16|fp16`` to what this machine should run; returns (precision, warning or None).

    fp16 on a CPU is pathological (one 2048² matmul takes about a minute), so it becomes bf16 with a warning.
    ``auto`` picks bf16 on GPUs that support it (else fp16) and on CPUs with AVX512-BF16/AMX (else fp32)."""
    import torch

    if requested not in ("auto", "no", "bf16", "fp16"):
        raise ValueError(f"mixed precision must be auto, no, bf16 or fp16, not '{requested}'")
    if cuda:
        if requested == "auto":
            return ("bf16" if torch.cuda.is_bf16_supported() else "fp16"), None
        return requested, None
    fast_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    if requested == "auto":
        return ("bf16" if fast_bf16 else "no"), None
    if requested == "fp16":
        return "bf16", "fp16 on a CPU is extremely slow; using bf16 instead (pass --mixed-precision no for fp32)"
    return requested, None


def make_accelerator(precision: str, cpu: bool = False):
    """An Accelerator for this process with the resolved precision; prints a warning if one was needed."""
    import torch
    from accelerate import Accelerator

    cuda = torch.cuda.is_available() and not cpu
    resolved, warning = resolve_precision(precision, cuda)
    acc = Accelerator(mixed_precision=resolved, cpu=cpu or not cuda)
    if warning and acc.is_main_process:
        console.print(f"[yellow]warning:[/] {warning}")
    return acc


def attention_backend(device, precision: str):
    """Context for forward passes: on a CPU under bf16 autocast, the plain matmul-softmax attention ("math"
    backend) trains the quickstart 1.47x faster than the fused flash kernel, whose CPU backward dominated the
    profile (bench/profile_hotspots.py); elsewhere PyTorch's default choice."""
    import contextlib

    import torch

    if torch.device(device).type == "cpu" and precision == "bf16":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


def new_run_dir(preset: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return RUNS_DIR / f"{preset or 'run'}-{stamp}"


def find_checkpoint(ckpt: Path | None, what: str = "model.safetensors") -> Path:
    """``--ckpt DIR`` or, without it, the newest run under ./runs/ holding ``what`` (says which it took)."""
    from .checkpoint import CheckpointError

    if ckpt is not None:
        if not ckpt.is_dir():
            raise CheckpointError(f"{ckpt}: no such checkpoint directory")
        return ckpt
    candidates = sorted((p for p in RUNS_DIR.glob("*/") if (p / what).exists()), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise CheckpointError("no checkpoint given and none found under ./runs/: train one with `farmer train` "
                              "or pass --ckpt DIR")
    console.print(f"using the newest checkpoint: [bold]{candidates[-1]}[/]")
    return candidates[-1]


def progress(disable: bool = False, **fields: str) -> Progress:
    """A rich progress bar: description, bar, n/total, extra ``{task.fields[...]}`` columns, elapsed and ETA."""
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
    columns += [TextColumn(f"{label} {{task.fields[{key}]}}") for key, label in fields.items()]
    columns += [TimeElapsedColumn(), TimeRemainingColumn()]
    return Progress(*columns, console=console, disable=disable or os.environ.get("FARMER_NO_PROGRESS") == "1")
