"""Owning a run directory: one writer at a time, no silent overwrite, no silent change of settings on resume.

* :func:`claim` makes sure ``--out`` can be written before any work starts, refuses to start a new run over an
  existing one unless asked to ``overwrite`` (then the old run's files are removed first, so nothing of it is
  picked up later), and takes the directory's lock.
* :class:`RunLock` is an exclusive ``flock`` on ``<run>/.lock``: a second process training or distilling into the
  same directory is refused with the holder's pid. The kernel releases the lock when its process ends, however it
  ends, so a lock is never stale.
* :func:`resume_conflicts` lists the settings a resumed run may not change.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

from .checkpoint import (CONFIG_FILE, DISTILL_METRICS_FILE, DISTILL_STATE_FILE, HISTORY_DIR, METRICS_FILE,
                         MODEL_FILE, SAMPLES_DIR, STUDENT_FILE, TRAIN_STATE_FILE, CheckpointError)
from .config import Config

RUN_FILES = (CONFIG_FILE, MODEL_FILE, TRAIN_STATE_FILE, METRICS_FILE, STUDENT_FILE, DISTILL_STATE_FILE,
             DISTILL_METRICS_FILE)
LOCK_FILE = ".lock"

# What a resumed run may change: how it reports and loads, not what it trains.
RESUMABLE = {"data.num_workers", "train.log_every", "train.ckpt_every", "train.eval_batches",
             "train.mixed_precision", "train.keep_checkpoints", "train.sample_every"}


class RunLock:
    """Exclusive lock on a run directory for this process's lifetime (or until :meth:`release`)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # not POSIX: no locking
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise CheckpointError(f"{self.path.parent} is in use by another farmer process (pid {holder}); wait for "
                                  "it to finish, stop it, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


def ensure_writable(run_dir: Path) -> None:
    """Create ``run_dir`` (and parents) and check it can be written; CheckpointError naming the path otherwise."""
    for parent in [run_dir, *run_dir.parents]:
        if parent.exists() and not parent.is_dir():
            raise CheckpointError(f"{run_dir}: {parent} is a file, not a directory; choose another --out")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CheckpointError(f"{run_dir}: cannot create the run directory ({err.strerror})") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise CheckpointError(f"{run_dir}: not writable; fix its permissions or choose another --out")


def holds_run(run_dir: Path) -> bool:
    return run_dir.is_dir() and any((run_dir / name).exists() for name in RUN_FILES)


def claim(run_dir: Path, *, resume: bool, overwrite: bool = False) -> RunLock:
    """Check and lock ``run_dir`` for training (``resume``: an existing run; else a new one, replacing an
    existing run only with ``overwrite``). Call on the main process before any work."""
    if not resume and holds_run(run_dir) and not overwrite:
        raise CheckpointError(f"{run_dir} already holds a run: continue it with --resume, replace it with "
                              "--overwrite, or choose another --out")
    ensure_writable(run_dir)
    lock = RunLock(run_dir).acquire()
    if not resume and overwrite:
        for name in RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)
        for stale in run_dir.glob("eval-*.json"):
            stale.unlink()
        for folder in (HISTORY_DIR, SAMPLES_DIR):
            shutil.rmtree(run_dir / folder, ignore_errors=True)
    return lock


def resume_conflicts(stored: Config, requested: Config) -> list[str]:
    """``section.key: stored -> requested`` for every setting a resumed run would change but may not."""
    conflicts = []
    for section in ("model", "data", "train"):
        old, new = dataclasses.asdict(getattr(stored, section)), dataclasses.asdict(getattr(requested, section))
        conflicts += [f"{section}.{k}: {old[k]!r} -> {new[k]!r}" for k in old
                      if old[k] != new[k] and f"{section}.{k}" not in RESUMABLE]
    return conflicts


def claim_on_main(accelerator, run_dir: Path | None, *, resume: bool, overwrite: bool = False
                  ) -> tuple[Path, RunLock | None]:
    """:func:`claim` on the main process; its outcome (the path, or the error) is shared with every rank so all
    stop together. Keep the returned lock referenced for as long as the run directory is being written."""
    lock, outcome = None, ("", "")
    if accelerator.is_main_process:
        try:
            lock = claim(run_dir, resume=resume, overwrite=overwrite)
            outcome = (str(run_dir), "")
        except CheckpointError as err:
            outcome = ("", str(err))
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        outcome = broadcast_object_list([outcome])[0]
    if outcome[1]:
        raise CheckpointError(outcome[1])
    return Path(outcome[0]), lock
