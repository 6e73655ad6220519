"""Training a Farmer model: the step function and run bookkeeping on the shared :class:`~farmer_cli.train.engine.Loop`.

* Loss: mean bits/dim of the exact NLL (arXiv v2 Eq. 14) with Gaussian dequantisation noise whose sigma follows a
  cosine from ``noise_start`` to ``noise_end`` (arXiv v2 §3.2; or uniform noise), label dropout to the null class for
  classifier-free guidance.
* AdamW (betas 0.9/0.95, weight decay 0.03 on matrices only; arXiv v2 §4.1), warm-up + cosine, gradient clipping,
  EMA of the weights (decay = min(ema_decay, (1+t)/(10+t))). ``model.safetensors`` holds the EMA weights.
* Deterministic given the seed: batch order from a per-epoch seeded permutation and per-step noise seeds, so
  N steps + resume + N steps equal 2N steps in one go.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from farmer_cli.checkpoint import (CONFIG_FILE, METRICS_FILE, MODEL_FILE, SAMPLES_DIR, TRAIN_STATE_FILE, label_map_digest,
                                   model_digest, save_config, save_weights)
from farmer_cli.config.schema import Config
from farmer_cli.data.batching import make_loader
from farmer_cli.data.dataset import DataBundle
from farmer_cli.train.distributed import EMA, ModuleState, expose_methods
from farmer_cli.train.engine import Loop, LoopEvent, RunFiles, Schedule, StepOutput, adamw
from farmer_cli.model import Farmer
from farmer_cli.rundir import settings_digest
from farmer_cli.device import attention_backend
from farmer_cli.eval.bits import bits_per_dim

BPD_EVAL_SEED = 1234  # the noise seed of the bits/dim printed at the start and end of training


def noise_sigma(step: int, total: int, start: float, end: float) -> float:
    """Cosine decay of the dequantisation sigma from ``start`` to ``end`` over ``total`` steps (arXiv v2 §3.2)."""
    t = min(1.0, step / max(1, total))
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * t))


def total_steps(cfg: Config, train_images: int, processes: int) -> int:
    """The schedule's length: ``train.steps``, or ``train.epochs`` epochs of global batches when epochs > 0."""
    tc = cfg.train
    if tc.epochs <= 0:
        return tc.steps
    return tc.epochs * max(1, train_images // tc.global_batch(processes))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices only (not biases, norms, embeddings or position tables)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        is_matrix = p.ndim >= 2 and not name.endswith(("pos", "class_emb.weight"))
        (decay if is_matrix else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    bpd_before: float
    bpd_after: float
    seconds: float
    skipped: int
    model: torch.nn.Module  # this process's trained (unwrapped, possibly sharded) model; EMA weights in the checkpoint


@torch.no_grad()
def save_sample_grid(model: Farmer, cfg: Config, path: Path, write: bool = True, per_class: int = 4,
                     classes: int = 8) -> None:
    """Samples of the first ``classes`` classes, one row each, with a fixed seed (so grids from different steps
    show the same draws) and the run's sampling settings, to ``path`` (where ``write``)."""
    from farmer_cli.viz import grid, save_png

    was_training = model.training
    model.eval()
    y = torch.arange(min(classes, cfg.model.num_classes), device=next(model.parameters()).device)
    images = model.sample(y.repeat_interleave(per_class), cfg.sampling, torch.Generator(model.device).manual_seed(0))
    model.train(was_training)
    if write:
        save_png(grid(images, per_class, scale=max(1, 64 // cfg.model.image_size)), path)


def test_bpd(model, cfg: Config, data: DataBundle) -> float:
    """Class-conditional test bits/dim on the first ``eval_batches`` batches (fixed noise seed)."""
    tc = cfg.train
    return bits_per_dim(model, data.test, True, 1, tc.batch_size, tc.batch_size * tc.eval_batches, BPD_EVAL_SEED)["mean"]


def train(cfg: Config, data: DataBundle, run_dir: Path, accelerator, resume: bool = False, stop_after: int = 0,
          on_event: Callable[[LoopEvent], None] | None = None) -> TrainResult:
    """Train (or resume) a Farmer model on ``data`` into ``run_dir``; returns a summary.

    ``stop_after`` > 0 ends this invocation after that many steps (checkpoint saved; the schedules still span the
    full run), for time-limited jobs. Raises ``Stopped`` (:mod:`farmer_cli.train.stop_signals`) after saving when a stop signal arrives and
    ``TrainingDiverged`` (:mod:`farmer_cli.train.divergence`) on a non-finite loss."""
    tc, device, main = cfg.train, accelerator.device, accelerator.is_main_process
    total = total_steps(cfg, len(data.train), accelerator.num_processes)
    layout = data.layout  # in config.json: a resume checks it finds the same data (commands/train.py)
    global_batch = tc.global_batch(accelerator.num_processes)
    torch.manual_seed(tc.seed)
    model = Farmer(cfg.model)
    if tc.compile:  # in place: parameter names (and so checkpoints) stay those of the plain model
        model.flow.compile()
        model.prior.compile()
    opt = adamw(param_groups(model, tc.weight_decay), tc.lr, (tc.beta1, tc.beta2))
    model, opt = accelerator.prepare(model, opt)  # DDP, or sharded by Accelerate's FSDP plugin
    raw = accelerator.unwrap_model(model)
    expose_methods(raw, "nll_continuous", "sample")  # evaluation and sample grids on a sharded model
    ema = EMA(raw)

    def on_save(step: int, states: dict) -> None:
        save_weights(run_dir / MODEL_FILE, states["ema"], step, {"settings": settings_digest(cfg),
                                                                  "model": model_digest(cfg),
                                                                  "classes": label_map_digest(data.class_names)})
        save_config(run_dir, cfg, data.class_names, {"step": step, "global_batch": global_batch, "data": layout})

    def after_step(step: int) -> None:
        ema.update(step, tc.ema_decay)
        if tc.sample_every and (step + 1) % tc.sample_every == 0:
            with ema.applied() as averaged:  # every rank samples (a sharded model needs all); the main one saves
                save_sample_grid(averaged, cfg, run_dir / SAMPLES_DIR / f"step-{step + 1:08d}.png", main)

    schedule = Schedule(total, tc.warmup_steps, tc.min_lr / tc.lr, tc.grad_clip, tc.seed, tc.log_every, tc.ckpt_every,
                        tc.grad_accum_steps)
    files = RunFiles(run_dir, TRAIN_STATE_FILE, METRICS_FILE, (MODEL_FILE, CONFIG_FILE), keep=tc.keep_checkpoints,
                     identity=settings_digest(cfg))
    loop = Loop(accelerator, model, opt, optimized=raw, state={"ema": ema, "model": ModuleState(raw)},
                schedule=schedule, files=files, on_save=on_save, after_step=after_step, on_event=on_event)
    start = loop.resume() if resume else 0
    if accelerator.log_with:  # --report-to: trackers write under the run directory
        accelerator.project_configuration.logging_dir = str(run_dir)
        flat = {f"{section}.{k}": v for section, values in cfg.to_dict().items() if isinstance(values, dict)
                for k, v in values.items()}
        accelerator.init_trackers("tensorboard", config=flat)
    if main and not resume:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(run_dir, cfg, data.class_names, {"step": 0, "global_batch": global_batch, "data": layout})
    bpd_before = test_bpd(raw, cfg, data) if not resume else math.nan  # every rank: sharded models need all
    loader = make_loader(data.train, tc.batch_size, accelerator.num_processes, accelerator.process_index,
                         tc.seed, start * tc.grad_accum_steps, cfg.data.num_workers, pin_memory=device.type == "cuda")
    batches, skipped, null = iter(loader), 0, cfg.model.num_classes

    def step_fn(batch, step: int) -> StepOutput:
        nonlocal skipped
        u, y, bad = batch
        skipped += bad
        u, y = u.to(device, non_blocking=True), y.to(device, non_blocking=True)
        drop = torch.rand(y.shape, device=device) < tc.label_dropout
        y = torch.where(drop, torch.full_like(y, null), y)
        sigma = noise_sigma(step, total, tc.noise_start, tc.noise_end)
        with accelerator.autocast(), attention_backend(device, accelerator.mixed_precision):
            out = model(u, y, noise=tc.noise, sigma=sigma)
        terms = {k: out[k] for k in ("bpd", "log_p_info", "log_p_red", "logdet")}
        if tc.noise == "gaussian":  # uniform noise has no sigma
            terms["sigma"] = sigma
        return StepOutput(out["bpd"].mean(), terms, u.shape[0])

    t0 = time.time()
    end = min(total, start + stop_after) if stop_after > 0 else total
    loop.run(step_fn, batches, end)
    with ema.applied() as averaged:
        bpd_after = test_bpd(averaged, cfg, data)
    for tracker in accelerator.trackers:  # not end_training(): that also ends the process group
        tracker.finish()
    return TrainResult(run_dir, end, bpd_before, bpd_after, time.time() - t0, skipped, raw)
