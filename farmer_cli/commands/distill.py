"""Distil the autoregressive flow's slow sequential inverse into a one-step student (Algorithm 2).

The student (a copy of the AF with bidirectional attention) learns to invert every AF block in one parallel
pass; `farmer sample --student` then replaces the token-by-token inverse with it. The AR prior is untouched.
Writes student.safetensors into the checkpoint directory.

Examples:
  farmer distill
  farmer distill --ckpt runs/quickstart-20260101-120000 --steps 2000
  farmer distill --resume
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from . import CKPT_HELP, SET_HELP, Option, exit_with, user_errors

NAME = "distill"


def run(
    ckpt: Optional[Path] = Option(None, "--ckpt", help=CKPT_HELP),
    data: Optional[str] = Option(None, "--data", "-d", help="Data source (default: the checkpoint's)."),
    steps: Optional[int] = Option(None, "--steps", help="Distillation steps (default: the preset's distill.steps)."),
    batch_size: Optional[int] = Option(None, "--batch-size", "-b", help="Batch size per process."),
    lr: Optional[float] = Option(None, "--lr", help="Peak learning rate of the student."),
    mixed_precision: Optional[str] = Option(None, "--mixed-precision", help="auto | no | bf16 | fp16."),
    resume: bool = Option(False, "--resume", help="Continue an interrupted distillation of this checkpoint."),
    overrides: List[str] = Option([], "--set", help=SET_HELP),
) -> None:
    with user_errors():
        _distill(ckpt, data, steps, batch_size, lr, mixed_precision, resume, overrides)


def _distill(ckpt, data, steps, batch_size, lr, mixed_precision, resume, overrides):
    from ..checkpoint import load_model
    from ..config import apply_overrides
    from ..data import load_data
    from ..distilling import distill
    from ..runtime import console, find_checkpoint, make_accelerator
    from ..training import TrainingDiverged

    run_dir = find_checkpoint(ckpt)
    model, cfg, _, step = load_model(run_dir)
    cli = {"data.source": data, "distill.steps": steps, "distill.batch_size": batch_size, "distill.lr": lr,
           "train.mixed_precision": mixed_precision}
    apply_overrides(cfg, [f"{k}={v}" for k, v in cli.items() if v is not None] + list(overrides))
    if cfg.distill.steps < 1 or cfg.distill.batch_size < 1:
        exit_with("--steps and --batch-size must be at least 1")
    bundle = load_data(cfg.data, cfg.model.channels, cfg.model.image_size)
    acc = make_accelerator(cfg.train.mixed_precision)
    if acc.is_main_process:
        console.print(f"distilling the AF of {run_dir} (step {step}) for {cfg.distill.steps} steps")
    try:
        result = distill(model, cfg, bundle, run_dir, acc, resume=resume)
    except TrainingDiverged as err:
        console.print(f"[red]error:[/] {err}")
        raise SystemExit(1) from None
    if acc.is_main_process:
        console.print(f"done in {result['seconds'] / 60:.1f} min: loss {result['first_loss']:.4f} -> "
                      f"{result['last_loss']:.4f}; student in [bold]{run_dir}/student.safetensors[/]")
        console.print(f"next: farmer sample --ckpt {run_dir} --student --class 3 --n 16")
