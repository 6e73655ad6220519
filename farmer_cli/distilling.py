"""The distillation loop behind ``farmer distill`` (Algorithm 2; loss in farmer_cli/model/distill.py).

The teacher (the checkpoint's EMA AF) is frozen; only the student trains, with AdamW, warm-up + cosine, gradient
clipping, the same deterministic batch order as training, and atomic checkpoints (``student.safetensors`` and
``distill_state.pt``) so ``--resume`` continues the same run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .checkpoint import STUDENT_FILE, atomic_write, save_weights
from .config import Config
from .data import DataBundle
from .model import Farmer, dequantize
from .model.distill import distill_loss, make_student
from .runtime import attention_backend, console, progress
from .training import TrainingDiverged, lr_factor, make_loader

DISTILL_STATE = "distill_state.pt"


@torch.no_grad()
def student_error(model: Farmer, student, data: DataBundle, batch: int, seed: int = 0) -> float:
    """Mean squared error between the student's one-pass inverse and the true inverse on held-out latents.

    The latents are the teacher's encodings of test images (so the true inverse is the image itself)."""
    u = torch.stack([data.test[i][0] for i in range(min(batch, len(data.test)))])
    x = dequantize(u, "uniform", generator=torch.Generator().manual_seed(seed)).to(next(model.parameters()).device)
    tokens = model.to_tokens(x)
    z, _ = model.flow(tokens)
    return ((student.one_pass_inverse(z) - tokens) ** 2).mean().item()


def distill(model: Farmer, cfg: Config, data: DataBundle, run_dir: Path, accelerator, resume: bool = False,
            quiet: bool = False) -> dict:
    dc, device, main = cfg.distill, accelerator.device, accelerator.is_main_process
    teacher = model.flow.to(device).eval().requires_grad_(False)
    student = make_student(teacher)
    opt = torch.optim.AdamW(student.parameters(), lr=dc.lr, betas=(cfg.train.beta1, cfg.train.beta2), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, dc.warmup_steps, dc.steps, 0.01))
    start = 0
    state_path = run_dir / DISTILL_STATE
    if resume and state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        student.load_state_dict(state["student"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start = state["step"]
    error_before = student_error(model, student, data, dc.batch_size) if main else float("nan")
    student, opt = accelerator.prepare(student, opt)
    raw = accelerator.unwrap_model(student)

    def checkpoint(step: int) -> None:
        accelerator.wait_for_everyone()
        if main:
            atomic_write(state_path, lambda tmp: torch.save({"student": raw.state_dict(), "optimizer": opt.state_dict(),
                                                        "scheduler": sched.state_dict(), "step": step}, tmp))
            save_weights(run_dir / STUDENT_FILE, raw.state_dict(), step)

    loader = make_loader(data.train, dc.batch_size, accelerator.num_processes, accelerator.process_index,
                         cfg.train.seed + 1, start, 0)
    batches = iter(loader)
    losses, t0 = [], time.time()
    metrics = (run_dir / "distill_metrics.jsonl").open("a") if main else None
    bar = progress(disable=quiet or not main, loss="loss")
    with bar:
        task = bar.add_task("distill", total=dc.steps, completed=start, loss="-")
        for step in range(start, dc.steps):
            u, _, _ = next(batches)
            torch.manual_seed(cfg.train.seed * 1_000_003 + step * accelerator.num_processes + accelerator.process_index)
            x = model.to_tokens(dequantize(u.to(device), "uniform"))
            with accelerator.autocast(), attention_backend(device, accelerator.mixed_precision):
                loss, per_block = distill_loss(teacher, student, x, dc.latent_noise_max)
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"distillation step {step}: non-finite loss; the last good student is kept")
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(student.parameters(), cfg.train.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if main and ((step + 1) % cfg.train.log_every == 0 or step + 1 == dc.steps):
                metrics.write(json.dumps({"step": step + 1, "loss": loss.item(), "per_block": per_block}) + "\n")
                metrics.flush()
                bar.update(task, loss=f"{loss.item():.5f}")
            bar.update(task, completed=step + 1)
            if (step + 1) % cfg.train.ckpt_every == 0:
                checkpoint(step + 1)
    if metrics:
        metrics.close()
    checkpoint(dc.steps)
    error_after = student_error(model, raw.eval(), data, dc.batch_size) if main else float("nan")
    if main and not quiet:
        console.print(f"student inverse error (MSE vs the true inverse, held-out images): "
                      f"{error_before:.2e} -> [bold]{error_after:.2e}[/]")
    return {"steps": dc.steps, "first_loss": losses[0] if losses else float("nan"),
            "last_loss": losses[-1] if losses else float("nan"), "error_before": error_before,
            "error_after": error_after, "seconds": time.time() - t0}
