"""Distilling the AF inverse into a one-step student (arXiv v2 §3.5, Algorithm 2; loss in
farmer_cli/model/distill.py): a step function on the shared :class:`~farmer_cli.train.engine.Loop`.

The teacher (the checkpoint's EMA AF) is frozen; only the student trains, with AdamW, warm-up + cosine, gradient
clipping, the same deterministic batch order as training, and ``student.safetensors`` + ``distill_state.pt``
checkpoints so ``--resume`` continues the same run.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from farmer_cli.checkpoint import DISTILL_METRICS_FILE, DISTILL_STATE_FILE, MODEL_FILE, STUDENT_FILE, save_weights, weights_fingerprint
from farmer_cli.config.schema import Config
from farmer_cli.data.batching import iterate_batches, make_loader
from farmer_cli.data.dataset import DataBundle
from farmer_cli.data.sources import DataError
from farmer_cli.train.distributed import ModuleState
from farmer_cli.train.engine import Loop, LoopEvent, RunFiles, Schedule, StepOutput, adamw
from farmer_cli.model import Farmer, dequantize
from farmer_cli.model.distill import OnePassInverse, distill_loss, make_student
from farmer_cli.device import attention_backend

STUDENT_LR_FLOOR = 0.01  # the student's cosine schedule ends at 1% of its peak learning rate


def error_images(data: DataBundle, batch: int) -> tuple[torch.Tensor, str]:
    """The images :func:`student_error` measures on: up to ``batch`` readable test images, or training images
    where the data set holds no (readable) test image (a one-image data set has no test split); and which."""
    for dataset, kind in ((data.test, "held-out"), (data.train, "training")):
        for u, _ in iterate_batches(dataset, batch, batch):
            return u, kind
    raise DataError(f"data source {data.train.source.name}: no readable image to measure the student on")


@torch.no_grad()
def student_error(model: Farmer, student, u: torch.Tensor, device: torch.device, seed: int = 0) -> float:
    """Mean squared error between the student's one-pass inverse and the true inverse on the latents of images
    ``u`` (uint8 (B, C, S, S), from :func:`error_images`): the teacher's encodings, so the true inverse is the image
    itself."""
    x = dequantize(u, "uniform", generator=torch.Generator().manual_seed(seed)).to(device)
    tokens = model.to_tokens(x)
    z, _ = model.flow(tokens)
    return ((student.one_pass_inverse(z) - tokens) ** 2).mean().item()


@dataclass
class DistillResult:
    steps: int
    first_loss: float  # of this invocation
    last_loss: float
    error_before: float  # student_error before and after
    error_after: float
    seconds: float
    student: torch.nn.Module  # this process's student AF
    error_images: str = "held-out"  # what student_error measured on: held-out (test) or training images


def distill(model: Farmer, cfg: Config, data: DataBundle, run_dir: Path, accelerator, resume: bool = False,
            on_event: Callable[[LoopEvent], None] | None = None) -> DistillResult:
    """Train (or resume) the student of ``model``'s AF into ``run_dir``.

    The teacher is ``model.flow``: it is moved to ``accelerator.device`` (with the DCT basis, which ``to_tokens``
    needs there) and frozen (eval mode, no gradients), in place; the AR prior stays where the caller put it, so a
    large prior never takes GPU memory during distillation."""
    dc, device = cfg.distill, accelerator.device
    teacher = model.flow.to(device).eval().requires_grad_(False)
    if model.basis is not None:  # to_tokens runs on the device too; the AR prior and heads stay where they are
        model.basis = model.basis.to(device)
    raw = make_student(teacher)
    opt = adamw(raw.parameters(), dc.lr, (cfg.train.beta1, cfg.train.beta2))
    student, opt = accelerator.prepare(OnePassInverse(raw), opt)  # forward = the one-pass inverse, as DDP needs
    teacher_id = {"teacher": weights_fingerprint(run_dir / MODEL_FILE), "distill": json.dumps(asdict(dc))}
    tc = cfg.train
    schedule = Schedule(dc.steps, dc.warmup_steps, STUDENT_LR_FLOOR, tc.grad_clip, tc.seed, tc.log_every, tc.ckpt_every)
    files = RunFiles(run_dir, DISTILL_STATE_FILE, DISTILL_METRICS_FILE, (STUDENT_FILE,), "distill-step",
                     tc.keep_checkpoints, identity=json.dumps(teacher_id, sort_keys=True))
    loop = Loop(accelerator, student, opt, optimized=raw, state={"student": ModuleState(raw)}, schedule=schedule,
                files=files, on_event=on_event,
                on_save=lambda step, states: save_weights(run_dir / STUDENT_FILE, states["student"], step, teacher_id))
    start = loop.resume() if resume and (run_dir / DISTILL_STATE_FILE).exists() else 0
    measured_on, measured_kind = error_images(data, dc.batch_size)  # read once, measured before and after
    error_before = student_error(model, raw, measured_on, device)  # every rank: a sharded student needs all
    loader = make_loader(data.train, dc.batch_size, accelerator.num_processes, accelerator.process_index,
                         cfg.train.seed + 1, start, cfg.data.num_workers, pin_memory=device.type == "cuda")
    seen: dict[str, torch.Tensor] = {}  # this invocation's first and last loss, read back once at the end

    def step_fn(batch, step: int) -> StepOutput:
        u = batch[0]
        x = model.to_tokens(dequantize(u.to(device, non_blocking=True), "uniform"))
        with accelerator.autocast(), attention_backend(device, accelerator.mixed_precision):
            loss, per_block = distill_loss(teacher, student, x, dc.latent_noise_max)
        seen.setdefault("first", loss.detach())
        seen["last"] = loss.detach()
        return StepOutput(loss, {"loss": loss, "per_block": per_block}, u.shape[0])

    t0 = time.time()
    loop.run(step_fn, iter(loader), dc.steps)
    error_after = student_error(model, raw.eval(), measured_on, device)
    first, last = (float(seen[k]) if seen else math.nan for k in ("first", "last"))
    return DistillResult(dc.steps, first, last, error_before, error_after, time.time() - t0, raw,
                         measured_kind)
