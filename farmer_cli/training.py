"""The training loop shared by ``farmer train`` (and reused by ``farmer distill`` for its schedule/batches).

* AdamW (betas 0.9/0.95, weight decay 0.03 on matrices only), linear warm-up then cosine decay to ``min_lr``.
* Loss: mean bits/dim of the exact NLL (NOTES Eq. 14) with Gaussian dequantisation noise whose sigma follows a
  cosine from ``noise_start`` to ``noise_end`` (or uniform noise), label dropout to the null class for CFG.
* Gradient clipping, EMA of the weights (with the usual warm-up: decay = min(ema_decay, (1+t)/(10+t))).
* Deterministic given the seed: batch order comes from a per-epoch seeded permutation and each step re-seeds
  the noise RNG from (seed, step, rank), so N steps + resume + N steps equal 2N steps in one go.
* A non-finite loss or gradient stops the run with :class:`TrainingDiverged` naming the step and the term; the
  last good checkpoint on disk is left alone.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .checkpoint import (MODEL_FILE, load_training_state, save_config, save_training_state, save_weights)
from .config import Config
from .data import DataBundle, ImageDataset, collate
from .runtime import attention_backend, console, progress
from .scoring import score_batch


class TrainingDiverged(RuntimeError):
    pass


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from 1 to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress_ = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress_))


def noise_sigma(step: int, total: int, start: float, end: float) -> float:
    """Cosine decay of the dequantisation sigma from ``start`` to ``end`` over ``total`` steps (NOTES §1.1)."""
    t = min(1.0, step / max(1, total))
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * t))


def batch_indices(n: int, batch: int, world: int, rank: int, seed: int, start_step: int) -> Iterator[list[int]]:
    """Index lists for this process from global step ``start_step`` on, forever.

    Epoch e shuffles with seed (seed, e); a global batch is ``batch x world`` examples, rank r takes slice r."""
    global_batch = batch * world
    per_epoch = max(1, n // global_batch)
    step = start_step
    while True:
        epoch, offset = divmod(step, per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
        if n < global_batch:  # tiny data sets: repeat the permutation to fill one batch
            perm = (perm * (global_batch // n + 1))[:global_batch]
        for b in range(offset, per_epoch):
            chunk = perm[b * global_batch : (b + 1) * global_batch]
            yield chunk[rank * batch : (rank + 1) * batch]
            step += 1


def make_loader(dataset: ImageDataset, batch: int, world: int, rank: int, seed: int, start_step: int, workers: int):
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batch_indices(len(dataset), batch, world, rank, seed, start_step),
        collate_fn=collate, num_workers=workers, persistent_workers=workers > 0,
    )


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices only (not biases, norms, embeddings or position tables)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        is_matrix = p.ndim >= 2 and not name.endswith(("pos", "class_emb.weight"))
        (decay if is_matrix else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, step: int, decay: float) -> None:
    d = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach().to(e.dtype), 1 - d)


@torch.no_grad()
def evaluate_bpd(model, dataset: ImageDataset, batch: int, batches: int, device, seed: int = 1234) -> float:
    """Mean class-conditional test bits/dim (uniform dequantisation) over the first ``batches`` batches of the
    test split, with a fixed noise seed so numbers are comparable across runs and checkpoints."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=False, collate_fn=collate)
    for i, (u, y, _) in enumerate(loader):
        if i >= batches:
            break
        total += score_batch(model, u, y, 1, gen)[1].sum().item()
        count += u.shape[0]
    return total / max(1, count)


def check_finite(step: int, out: dict[str, torch.Tensor], loss: torch.Tensor) -> None:
    if torch.isfinite(loss):
        return
    bad = [k for k in ("logdet", "log_p_info", "log_p_red") if not torch.isfinite(out[k]).all()]
    raise TrainingDiverged(
        f"step {step}: the loss became non-finite ({', '.join(bad) or 'bits/dim'} blew up). The last good checkpoint "
        "is kept. Try a lower --lr, a smaller model.af_max_log_scale, or --mixed-precision no."
    )


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    bpd_before: float
    bpd_after: float
    seconds: float
    skipped: int
    model: torch.nn.Module  # this process's trained (unwrapped) model; the EMA weights are in the checkpoint


def train(cfg: Config, data: DataBundle, run_dir: Path, accelerator, resume: bool = False,
          quiet: bool = False, stop_after: int = 0) -> TrainResult:
    """Train (or resume) a Farmer model on ``data`` into ``run_dir``; returns a summary.

    ``stop_after`` > 0 ends this invocation after that many steps (checkpoint saved; the schedules still span the
    full run), for time-limited jobs: N + resume + N steps give the same weights as 2N in one go."""
    from .model import Farmer

    tc, device = cfg.train, accelerator.device
    main = accelerator.is_main_process
    total = tc.steps if tc.epochs <= 0 else tc.epochs * max(1, len(data.train) // (tc.batch_size * accelerator.num_processes))
    torch.manual_seed(tc.seed)
    model = Farmer(cfg.model)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr, betas=(tc.beta1, tc.beta2), fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, tc.warmup_steps, total, tc.min_lr / tc.lr))
    start = 0
    if resume:
        state = load_training_state(run_dir)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start = state["step"]
        if main:
            console.print(f"resuming {run_dir} at step {start} of {total}")
    model, opt = accelerator.prepare(model, opt)
    ema.to(device)
    raw = accelerator.unwrap_model(model)

    def checkpoint(step: int) -> None:
        accelerator.wait_for_everyone()
        if main:
            save_training_state(run_dir, {"model": raw.state_dict(), "ema": ema.state_dict(),
                                          "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step})
            save_weights(run_dir / MODEL_FILE, ema.state_dict(), step)
            save_config(run_dir, cfg, data.class_names, {"step": step})

    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(run_dir, cfg, data.class_names, {"step": start})
    bpd_before = evaluate_bpd(raw, data.test, tc.batch_size, tc.eval_batches, device) if main and not resume else float("nan")
    if main and not resume:
        console.print(f"test bits/dim before training: [bold]{bpd_before:.3f}[/] ({len(data.test)} test images)")
    loader = make_loader(data.train, tc.batch_size, accelerator.num_processes, accelerator.process_index,
                         tc.seed, start, cfg.data.num_workers)
    metrics = (run_dir / "metrics.jsonl").open("a") if main else None
    skipped, t0, seen, last_log = 0, time.time(), 0, time.time()
    null = cfg.model.num_classes
    completed = start
    batches = iter(loader)
    bar = progress(disable=quiet or not main, bpd="bits/dim", ips="img/s")
    try:
        with bar:
            task = bar.add_task("train", total=total, completed=start, bpd="-", ips="-")
            end = min(total, start + stop_after) if stop_after > 0 else total
            for step in range(start, end):
                u, y, bad = next(batches)
                skipped += bad
                torch.manual_seed(tc.seed * 1_000_003 + step * accelerator.num_processes + accelerator.process_index)
                u, y = u.to(device), y.to(device)
                drop = torch.rand(y.shape, device=device) < tc.label_dropout
                y = torch.where(drop, torch.full_like(y, null), y)
                model.train()
                sigma = noise_sigma(step, total, tc.noise_start, tc.noise_end)
                with accelerator.autocast(), attention_backend(device, accelerator.mixed_precision):
                    out = model(u, y, noise=tc.noise, sigma=sigma)
                loss = out["bpd"].mean()
                check_finite(step, out, loss)
                accelerator.backward(loss)
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), tc.grad_clip)
                if not torch.isfinite(torch.as_tensor(grad_norm)):
                    raise TrainingDiverged(f"step {step}: non-finite gradient norm; the last good checkpoint is kept")
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                ema_update(ema, raw, step, tc.ema_decay)
                completed = step + 1
                seen += u.shape[0] * accelerator.num_processes
                done = step + 1
                if main and (done % tc.log_every == 0 or done == end):
                    now = time.time()
                    ips = seen / max(1e-9, now - last_log)
                    seen, last_log = 0, now
                    record = {"step": done, "bpd": loss.item(), "lr": sched.get_last_lr()[0],
                              "sigma": sigma, "grad_norm": float(grad_norm), "images_per_s": ips,
                              **{k: out[k].mean().item() for k in ("log_p_info", "log_p_red", "logdet")}}
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                    bar.update(task, bpd=f"{loss.item():.3f}", ips=f"{ips:.0f}")
                bar.update(task, completed=done)
                if done % tc.ckpt_every == 0 and done != end:
                    checkpoint(done)
    except KeyboardInterrupt:
        if main:
            console.print(f"[yellow]interrupted after step {completed}: saving a checkpoint; resume with --resume[/]")
        checkpoint(completed)
        raise
    finally:
        if metrics:
            metrics.close()
    checkpoint(end)
    seconds = time.time() - t0
    bpd_after = evaluate_bpd(ema, data.test, tc.batch_size, tc.eval_batches, device) if main else float("nan")
    if skipped and main:
        console.print(f"[yellow]skipped {skipped} unreadable images in total[/]")
    return TrainResult(run_dir, end, bpd_before, bpd_after, seconds, skipped, raw)
