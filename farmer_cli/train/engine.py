"""The one optimisation loop behind ``farmer train`` and ``farmer distill``.

:class:`Loop` owns what every run of either needs: AdamW with linear warm-up then cosine decay, resuming from the
training state, per-step seeding (so N steps + resume + N steps equal 2N in one go), gradient clipping, divergence
detection naming the step and the term (watched on the device, read at logging and checkpoint steps, so other
steps make no host sync), ``metrics.jsonl``-style records, checkpoint cadence, and saving on a stop
signal (SIGINT, SIGTERM, SIGUSR1) at the end of the current step. Training and distillation differ only in the
*step function* they pass to :meth:`Loop.run` and in what they save beside the training state.

Progress is reported through a callback receiving :class:`LoopEvent` s; this module imports no UI.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from farmer_cli.checkpoint import CheckpointError, load_training_state, save_training_state
from farmer_cli.rundir import history, snapshot
from farmer_cli.train.distributed import as_float, full_tensor, gather_optimizer, load_optimizer, no_grad_sync
from farmer_cli.train.divergence import FiniteWatch
from farmer_cli.train.stop_signals import StopFlag, Stopped

log = logging.getLogger("farmer")

STOP_VOTE_EVERY = 10  # steps between the ranks' stop votes in a multi-process run


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from 1 to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    done = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * done))


@dataclass
class StepOutput:
    """What a step function returns: the scalar loss to minimise and named terms for the log (tensors are
    averaged when logged; floats and lists pass through). Tensor terms are checked when the loss is not finite."""

    loss: torch.Tensor
    terms: dict[str, Any] = field(default_factory=dict)
    images: int = 0  # images in this process's batch (for images/s)


@dataclass
class LoopEvent:
    """``kind``: "start" before the first step of this invocation; "step" after every step; "log" every
    ``log_every`` steps with ``record``; "checkpoint" after a save; "stop" when a stop signal was honoured."""

    kind: str
    step: int
    total: int
    record: dict[str, Any] | None = None


@dataclass(frozen=True)
class Schedule:
    """How a loop steps: ``total`` optimiser steps, learning rate warmed up over ``warmup`` then cosine down to
    ``min_lr_ratio`` of its peak (:func:`lr_factor`), gradient-norm clipping, ``accum`` micro-batches per step,
    the seed of each step's randomness, and how often it logs and checkpoints."""

    total: int
    warmup: int
    min_lr_ratio: float
    grad_clip: float
    seed: int
    log_every: int
    ckpt_every: int
    accum: int = 1


@dataclass(frozen=True)
class RunFiles:
    """What a loop writes in ``run_dir``: its training state (``state_file``) and metrics (``metrics_file``), and the
    step checkpoints ``checkpoints/<history_prefix>-<step>/`` (the state file and ``kept_files``), ``keep`` deep."""

    run_dir: Path
    state_file: str
    metrics_file: str
    kept_files: tuple[str, ...] = ()
    history_prefix: str = "step"
    keep: int = 3
    identity: str = ""  # what the run may not change (a digest of its settings), saved in the state and checked on
    # resume: the state (or step checkpoint) of another run is refused


class Loop:
    """One optimisation loop over the trainable module ``model`` (already through ``accelerator.prepare``), stepped
    as ``schedule`` says and saved as ``files`` say.

    ``state`` names what is saved in and restored from the training state file besides the optimiser (objects with
    ``gather()`` and ``load(state)``, e.g. ``{"ema": EMA(raw), "model": ModuleState(raw)}``, loaded in that order);
    ``optimized`` is the unwrapped module whose parameters the optimiser holds. Saving and loading are collective
    and safe for sharded (FSDP) models (see farmer_cli/train/distributed.py). ``on_save(step, states)`` writes what else the run
    keeps (weights, config) from the gathered states, which are then kept as a step checkpoint with the state file;
    ``after_step(step)`` runs after each optimiser step (EMA). Each step accumulates gradients over
    ``schedule.accum`` micro-batches (the step function is called that many times), so the global batch is
    micro-batch x accum x processes."""

    def __init__(self, accelerator, model: torch.nn.Module, optimizer, *, optimized: torch.nn.Module,
                 state: dict[str, Any], schedule: Schedule, files: RunFiles,
                 on_save: Callable[[int, dict[str, Any]], None] = lambda step, states: None,
                 after_step: Callable[[int], None] = lambda step: None,
                 on_event: Callable[[LoopEvent], None] | None = None) -> None:
        self.acc, self.model, self.optimizer = accelerator, model, optimizer
        inner = getattr(optimizer, "optimizer", optimizer)  # the torch optimizer inside Accelerate's wrapper
        s = schedule
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(inner, lambda k: lr_factor(k, s.warmup, s.total,
                                                                                      s.min_lr_ratio))
        self.run_dir, self.state_file, self.state, self.optimized = files.run_dir, files.state_file, state, optimized
        self.inner_optimizer = inner
        self.total, self.grad_clip, self.seed, self.accum = s.total, s.grad_clip, s.seed, s.accum
        self.log_every, self.ckpt_every = s.log_every, s.ckpt_every
        self.metrics_path = files.run_dir / files.metrics_file
        self.keep, self.kept_files, self.history_prefix = files.keep, (files.state_file, *files.kept_files), \
            files.history_prefix
        self.identity = files.identity
        self.on_save, self.after_step = on_save, after_step
        self.on_event = on_event or (lambda event: None)
        self.step = 0
        self.watch = FiniteWatch(accelerator.device)

    # ----- state -----
    def resume(self) -> int:
        """Load the training state (safely: tensors and plain values only) and return its step. Where the run's
        state file is unreadable, the newest readable step checkpoint is used instead."""
        state = self._read_state() if self.acc.is_main_process else {}
        step = torch.tensor([int(state.get("step", 0))], device=self.acc.device)
        for name, part in self.state.items():
            part.load(state.get(name, {}))
        load_optimizer(self.optimized, self.inner_optimizer, state.get("optimizer", {}))
        if self.acc.num_processes > 1:  # the scheduler and step from the main process's file
            from accelerate.utils import broadcast, broadcast_object_list

            step = broadcast(step)
            state["scheduler"] = broadcast_object_list([state.get("scheduler")])[0]
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(step.item())
        return self.step

    def _read_state(self) -> dict[str, Any]:
        """The main process reads the state file (memory-mapped), or the newest readable step checkpoint."""
        names = list(self.state)
        try:
            return load_training_state(self.run_dir, self.state_file, names, self.identity, self.total)
        except CheckpointError as err:
            for older in history(self.run_dir, self.history_prefix):
                try:
                    state = load_training_state(older, self.state_file, names, self.identity, self.total)
                except CheckpointError:
                    continue
                log.warning("%s; resuming from the step checkpoint %s instead", err, older)
                return state
            raise

    def save(self, step: int) -> None:
        """Every rank takes part in gathering the state (sharded models send their shards); the main process writes
        the training state, then ``on_save``. Weights that went non-finite are never saved."""
        self.watch.check()
        self.acc.wait_for_everyone()
        states = {name: part.gather() for name, part in self.state.items()}
        optimizer = gather_optimizer(self.optimized, self.inner_optimizer)
        if self.acc.is_main_process:
            payload = {**states, "optimizer": optimizer, "scheduler": self.scheduler.state_dict(), "step": step,
                       "identity": self.identity}
            save_training_state(self.run_dir, self.state_file, payload)
            self.on_save(step, states)
            snapshot(self.run_dir, self.kept_files, step, self.history_prefix, self.keep)
        self.acc.wait_for_everyone()
        self.on_event(LoopEvent("checkpoint", step, self.total))

    # ----- metrics -----
    def _open_metrics(self, start: int):
        """Append to the metrics file after dropping records past ``start`` (left by a run that stopped between
        checkpoints), so no step is ever recorded twice."""
        if not self.acc.is_main_process:
            return None
        if self.metrics_path.exists():
            kept = []
            for line in self.metrics_path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= start:
                        kept.append(line)
                except (json.JSONDecodeError, AttributeError):
                    continue  # a line cut by a crash
            from farmer_cli.storage import atomic_write

            atomic_write(self.metrics_path, lambda tmp: Path(tmp).write_text("".join(k + "\n" for k in kept)))
        return self.metrics_path.open("a")

    # ----- the loop -----
    def _record(self, step: int, outs: list[StepOutput], grad_norm: torch.Tensor,
                images_per_s: float) -> dict[str, Any]:
        """Tensor terms are averaged over the step's micro-batches (lists of tensors element by element); other
        terms come from the last one. (A logging step: reading the values back is where the host waits.)"""
        record: dict[str, Any] = {"step": step, "lr": self.scheduler.get_last_lr()[0],
                                  "grad_norm": as_float(grad_norm), "images_per_s": images_per_s}
        if self.acc.device.type == "cuda":
            record["gpu_peak_gib"] = torch.cuda.max_memory_allocated(self.acc.device) / 2**30
        for key, value in outs[-1].terms.items():
            if isinstance(value, torch.Tensor):
                value = torch.stack([o.terms[key].detach().float().mean() for o in outs]).mean().item()
            elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
                value = torch.stack([torch.stack(o.terms[key]).detach().float() for o in outs]).mean(0).tolist()
            record[key] = value
        return record

    def _accumulate(self, step_fn: Callable[[Any, int], StepOutput], batches: Iterator, step: int
                    ) -> list[StepOutput]:
        """Forward and backward ``accum`` micro-batches for optimiser step ``step``: each micro-batch has its own
        seed, its loss is divided by ``accum``, and gradients are synchronised across processes on the last only."""
        acc, world, rank = self.acc, self.acc.num_processes, self.acc.process_index
        outs = []
        for i in range(self.accum):
            micro = step * self.accum + i
            torch.manual_seed(self.seed * 1_000_003 + micro * world + rank)
            out = step_fn(next(batches), step)
            self.watch.observe(step, {"loss": out.loss} | {k: v for k, v in out.terms.items()
                                                           if isinstance(v, torch.Tensor)})
            last = i == self.accum - 1
            with contextlib.nullcontext() if last else no_grad_sync(acc, self.model):
                acc.backward(out.loss / self.accum)
            outs.append(out)
        return outs

    def run(self, step_fn: Callable[[Any, int], StepOutput], batches: Iterator, end: int) -> int:
        """Run steps ``self.step`` .. ``end`` - 1; returns the last completed step (== ``end``).

        A stop signal ends the current step, saves, and raises :class:`Stopped`; a non-finite loss or gradient
        raises :class:`TrainingDiverged` without saving over the last checkpoint."""
        acc, world = self.acc, self.acc.num_processes
        metrics = self._open_metrics(self.step)
        seen, last_log = 0, time.time()
        self.on_event(LoopEvent("start", self.step, self.total))
        try:
            with StopFlag() as stop:
                for step in range(self.step, end):
                    self.model.train()
                    outs = self._accumulate(step_fn, batches, step)
                    grad_norm = acc.clip_grad_norm_(self.model.parameters(), self.grad_clip)
                    self.watch.observe(step, {"grad_norm": full_tensor(grad_norm)})
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.after_step(step)
                    self.step = done = step + 1
                    seen += sum(o.images for o in outs) * world
                    if done % self.log_every == 0 or done == end:
                        self.watch.check()
                        now = time.time()
                        record = self._record(done, outs, grad_norm, seen / max(1e-9, now - last_log))
                        seen, last_log = 0, now
                        if metrics is not None:
                            metrics.write(json.dumps(record) + "\n")
                            metrics.flush()
                        acc.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=done)
                        self.on_event(LoopEvent("log", done, self.total, record))
                    self.on_event(LoopEvent("step", done, self.total))
                    if self._stop_requested(stop, done):
                        self.save(done)
                        self.on_event(LoopEvent("stop", done, self.total))
                        raise Stopped(done, stop.signame or "another process")
                    if done % self.ckpt_every == 0 or done == end:
                        self.save(done)
        finally:  # a second Ctrl-C interrupts at once: the last checkpoint on disk stays as it was
            if metrics is not None:
                metrics.close()
        return self.step

    def _stop_requested(self, stop: StopFlag, done: int) -> bool:
        """True on every rank when any rank received a stop signal (so all save the same step). With several
        processes the ranks vote every :data:`STOP_VOTE_EVERY` steps (a collective and a host sync each time), so
        a stop comes at most that many steps late."""
        flag = stop.signame is not None
        if self.acc.num_processes == 1:
            return flag
        if done % STOP_VOTE_EVERY:
            return False
        votes = torch.tensor([1.0 if flag else 0.0], device=self.acc.device)
        return bool(self.acc.reduce(votes, reduction="sum").item() > 0)


def adamw(param_groups, lr: float, betas: tuple[float, float], weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW with the fused (single-kernel) update."""
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, weight_decay=weight_decay, fused=True)
