"""Run directories: where a run goes, how it is found, who may write it, what it keeps.

One writer at a time, no silent overwrite, no silent change of settings on resume:

* :func:`claim` makes sure ``--out`` can be written before any work starts, refuses to start a new run over an
  existing one unless asked to ``overwrite`` (then the old run's files are removed first, so nothing of it is
  picked up later), and takes the directory's lock. A run is recognised by farmer's own ``config.json`` (its
  ``format_version`` and ``config`` keys); a directory holding files with farmer's names that are not a run's is
  refused, never written over, and ``overwrite`` deletes only what farmer names (:func:`farmer_files`).
* :class:`RunLock` is an exclusive ``flock`` on ``<run>/.lock``, opened without following a symbolic link and
  written only when it is farmer's own file: a second process training or distilling into the same directory is
  refused with the holder's pid. The kernel releases the lock when its process ends, however it ends, so a lock
  is never stale.
* :func:`resume_conflicts` lists the settings a resumed run may not change.
* :func:`new_run_dir` names a new run (``runs/<preset>-<timestamp>``), :func:`find_checkpoint` finds one,
  :func:`snapshot` / :func:`history` keep step checkpoints under ``checkpoints/``, :func:`free_result_path` names
  an evaluation's ``eval-<step>.json`` without overwriting an earlier one.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import stat
import time
from pathlib import Path

from farmer_cli.checkpoint import CONFIG_FILE, DISTILL_METRICS_FILE, DISTILL_STATE_FILE, LOCK_FILE, METRICS_FILE, MODEL_FILE, SAMPLES_DIR, STUDENT_FILE, TRAIN_STATE_FILE, CheckpointError, regular_file
from farmer_cli.config.schema import Config
from farmer_cli.storage import TEMPORARY_MARK, free_name, parse_json

log = logging.getLogger("farmer")

RUN_FILES = (CONFIG_FILE, MODEL_FILE, TRAIN_STATE_FILE, METRICS_FILE, STUDENT_FILE, DISTILL_STATE_FILE,
             DISTILL_METRICS_FILE)
TRACKER_DIR = "tensorboard"  # --report-to tensorboard: the run's event files
TRACKER_NAMES = re.compile(r"events\.out\.tfevents\.")  # TensorBoard's event file names
HISTORY_DIR = "checkpoints"  # checkpoints/<prefix>-<step>/: the kept step checkpoints (:func:`snapshot`)

# What a resumed run may change: how it reports and loads, not what it trains.
RESUMABLE = {"data.num_workers", "train.log_every", "train.ckpt_every", "train.eval_batches",
             "train.mixed_precision", "train.keep_checkpoints", "train.sample_every"}


LOCK_TEXT = re.compile(r"farmer pid \d+")  # what farmer writes into its lock file
OLD_LOCK_TEXT = re.compile(r"\d+")  # earlier releases wrote the pid alone (recognised only inside a run)


class RunLock:
    """Exclusive lock on a run directory for this process's lifetime (or until :meth:`release`).

    A new lock file is created (``O_EXCL``) and holds ``farmer pid N``. An existing one is locked and written only
    when it is farmer's: a regular file of one name (not a hard link to anyone's file), empty or holding what
    farmer writes there; anything else is refused, never truncated."""

    def __init__(self, run_dir: Path, option: str = "--out") -> None:
        self.path, self.option = run_dir / LOCK_FILE, option
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # not POSIX: no locking
            return self
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK
        try:  # never through a link (its target may be anyone's file); never a directory, FIFO or device
            try:
                fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                fd = os.open(self.path, flags)
                self._check_farmers(fd)
        except OSError as err:
            raise CheckpointError(f"{self.path}: cannot be used as the run's lock file ({err.strerror}; a symbolic "
                                  "link or a directory?): remove it and start again") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = re.sub(r"\D", "", os.read(fd, 32).decode(errors="replace")) or "unknown"
            os.close(fd)
            raise CheckpointError(f"{self.path.parent} is in use by another farmer process (pid {holder}); wait for "
                                  "it to finish, or stop it") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"farmer pid {os.getpid()}".encode())
        self.fd = fd
        return self

    def _check_farmers(self, fd: int) -> None:
        """CheckpointError (closing ``fd``) unless the existing lock file is one farmer may lock and rewrite."""
        info = os.fstat(fd)
        text = os.read(fd, 64).decode(errors="replace").strip() if stat.S_ISREG(info.st_mode) else ""
        os.lseek(fd, 0, os.SEEK_SET)
        why = ("not a regular file" if not stat.S_ISREG(info.st_mode) else
               f"a hard link ({info.st_nlink} names for one file, so writing it would write another file)"
               if info.st_nlink != 1 else
               "a file farmer did not write (its lock file holds 'farmer pid N')"
               if text and not (LOCK_TEXT.fullmatch(text) or (OLD_LOCK_TEXT.fullmatch(text) and is_run(self.path.parent)))
               else "")
        if why:
            os.close(fd)
            raise CheckpointError(f"{self.path}: {why}, so not the run's lock file; farmer will not write it: remove "
                                  f"it, or {elsewhere(self.option)}")

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


def elsewhere(option: str) -> str:
    """The hint for a run folder farmer cannot use: another train ``--out``, or a copy of the run that distill's
    ``--ckpt`` names (distillation writes into the run it distils)."""
    return "choose another --out" if option == "--out" else f"copy the run elsewhere and give the copy to {option}"


def ensure_writable(run_dir: Path, option: str = "--out") -> None:
    """Create ``run_dir`` (and parents) and check it can be written; CheckpointError naming the path otherwise."""
    for parent in [run_dir, *run_dir.parents]:
        if parent.exists() and not parent.is_dir():
            raise CheckpointError(f"{run_dir}: {parent} is a file, not a directory; {elsewhere(option)}")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CheckpointError(f"{run_dir}: cannot create the run directory ({err.strerror})") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise CheckpointError(f"{run_dir}: not writable; fix its permissions or {elsewhere(option)}")


FARMER_NAMES = re.compile(r"eval-\d+(-\d+)?\.json")  # evaluate's results beside RUN_FILES
PARTIAL_MARK = ".farmer-partial"  # in checkpoints/<prefix>-<step>.partial/ while farmer copies a step into it
HISTORY_NAMES = re.compile(r"(step|distill-step)-\d{8}(\.partial)?")  # checkpoints/<prefix>-<step>/
SAMPLE_NAMES = re.compile(r"step-\d{8}\.png")  # samples/step-<step>.png


def is_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a farmer run: a ``config.json`` that farmer wrote (a JSON object with its
    ``format_version`` and ``config`` keys)."""
    if not regular_file(run_dir / CONFIG_FILE):
        return False
    try:
        payload = parse_json((run_dir / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(payload, dict) and "format_version" in payload and isinstance(payload.get("config"), dict)


def holds_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds anything under a name farmer writes: a run file, a step checkpoint or a sample grid
    (a run, or files farmer must not write over)."""
    return run_dir.is_dir() and bool(farmer_files(run_dir))


def managed_folder(path: Path) -> Path | None:
    """The run folder (``checkpoints/``, ``samples/``, ``tensorboard/`` of a farmer run) that ``path`` is or lies
    in, links resolved; None elsewhere. Farmer writes, prunes and deletes there, so nothing of a user's belongs."""
    place = Path(path).resolve()
    return next((p for p in (place, *place.parents)
                 if p.name in (HISTORY_DIR, SAMPLES_DIR, TRACKER_DIR) and is_run(p.parent)), None)


def check_own_paths(run_dir: Path, option: str = "--out") -> None:
    """Where farmer writes, prunes and deletes must be the run's own: the run files (``config.json``,
    ``metrics.jsonl``, ...) regular files and ``checkpoints/``, ``samples/`` and ``tensorboard/`` folders, none a
    symbolic link (a link whose target does not exist yet included), so nothing outside the run is ever written or
    deleted. The run is not the file system's root, the home folder, or a folder inside another run's
    ``checkpoints/``, ``samples/`` or ``tensorboard/``. ``option`` names the run in hints: train's ``--out``, or
    distill's ``--ckpt`` (it writes the student into the run it distils)."""
    place = run_dir.resolve()
    if place == Path(place.anchor) or place == Path.home().resolve():
        raise CheckpointError(f"{run_dir} is {'the root folder' if place == Path(place.anchor) else 'your home folder'}"
                              f": a run writes its files and folders there; {elsewhere(option)}, a folder of its own")
    managed = managed_folder(run_dir)
    if managed is not None:
        how = ("choose another --out (copy a step checkpoint out first to continue from it)" if option == "--out"
               else f"give {option} {managed.parent} (its latest weights), or copy the step checkpoint out of the "
                    "run first and give that copy")
        raise CheckpointError(f"{run_dir} is in {managed}, a folder of the run in {managed.parent} where farmer "
                              f"writes, prunes and deletes: {how}")
    for name, kind in [(folder, "folder") for folder in (HISTORY_DIR, SAMPLES_DIR, TRACKER_DIR)] + \
                      [(file, "file") for file in RUN_FILES]:
        path = run_dir / name
        wrong_kind = path.exists() and not (path.is_dir() if kind == "folder" else path.is_file())
        if path.is_symlink() or wrong_kind:
            what = f"a symbolic link to {os.readlink(path)}" if path.is_symlink() else f"not a {kind}"
            does = f"writes and deletes its {name} there" if kind == "folder" else "writes it"
            raise CheckpointError(f"{path} is {what}: farmer {does}, so it must be a {kind} inside the run; remove "
                                  "it (or move it into the run) and start again")


def never_saved(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run stopped before its first checkpoint (killed while loading data or measuring
    the first test bits/dim): farmer's ``config.json`` but no weights, training state or step checkpoint. Nothing
    trained is lost by starting it again."""
    saved = any((run_dir / name).exists() for name in (MODEL_FILE, TRAIN_STATE_FILE)) or history(run_dir, "step")
    return is_run(run_dir) and not saved


def farmer_files(run_dir: Path) -> list[Path]:
    """What ``overwrite`` deletes in a run: the run files, the ``eval-<step>.json`` results evaluate wrote (a user's
    file of that name is kept: :func:`written_by_farmer`), the step checkpoints
    ``checkpoints/step-<8 digits>/``, ``samples/step-<8 digits>.png`` grids and a run's TensorBoard event files
    (``tensorboard/**/events.out.tfevents.*``); nothing else, whatever it is called."""
    found = [run_dir / name for name in RUN_FILES if (run_dir / name).exists() or (run_dir / name).is_symlink()]
    tracker = run_dir / TRACKER_DIR
    if is_run(run_dir) and tracker.is_dir() and not tracker.is_symlink():  # a new run's events must not mix in
        found += [Path(here, name) for here, _, files in os.walk(tracker) for name in files  # links not entered
                  if TRACKER_NAMES.match(name) and not Path(here, name).is_symlink()]
    found += [p for p in run_dir.glob("eval-*.json") if FARMER_NAMES.fullmatch(p.name) and written_by_farmer(p)]
    for folder, names in ((HISTORY_DIR, HISTORY_NAMES), (SAMPLES_DIR, SAMPLE_NAMES)):
        if (run_dir / folder).is_dir() and not (run_dir / folder).is_symlink():  # never look through a link
            found += [p for p in (run_dir / folder).iterdir() if names.fullmatch(p.name)]
    return found


def claim(run_dir: Path, *, resume: bool, overwrite: bool = False, option: str = "--out") -> RunLock:
    """Check and lock ``run_dir`` for training (``resume``: an existing run; else a new one, replacing an
    existing run only with ``overwrite``; ``option`` names it in hints). Call on the main process before any work."""
    check_own_paths(run_dir, option)
    if not resume and holds_run(run_dir):
        if not is_run(run_dir):
            names = ", ".join(sorted(str(p.relative_to(run_dir)) for p in farmer_files(run_dir))[:4])
            raise CheckpointError(f"{run_dir} holds files that are not a farmer run's ({names}); farmer will not "
                                  "write over them: choose another --out")
        if never_saved(run_dir):
            log.info("%s: the run there stopped before its first checkpoint; starting it again", run_dir)
            overwrite = True
        if not overwrite:
            raise CheckpointError(f"{run_dir} already holds a run: continue it with --resume, replace it with "
                                  "--overwrite, or choose another --out")
    if not resume and run_dir.is_dir() and not holds_run(run_dir):
        others = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_FILE)
        if others:  # a user's folder (of images, of other runs): a run's files would be mixed into it
            raise CheckpointError(f"{run_dir} holds other files ({', '.join(others[:3])}"
                                  f"{', ...' if len(others) > 3 else ''}) and no farmer run; a run starts in a new or "
                                  "empty folder: choose another --out")
    ensure_writable(run_dir, option)
    lock = RunLock(run_dir, option).acquire()
    remove_stale_writes(run_dir)
    if not resume and overwrite:
        for path in farmer_files(run_dir):
            remove(path)
        tracker = run_dir / TRACKER_DIR
        emptied = [Path(here) for here, _, _ in os.walk(tracker, topdown=False)] if not tracker.is_symlink() else []
        for folder in [*emptied, run_dir / SAMPLES_DIR, run_dir / HISTORY_DIR]:  # gone if it held only farmer's files
            try:
                folder.rmdir()
            except OSError:
                pass
    return lock


def written_by_farmer(path: Path) -> bool:
    """Whether the regular file ``path``, under one of farmer's run-file names, holds what farmer writes under that
    name, judged by its first bytes: ``config.json`` with farmer's keys (:func:`is_run`), a safetensors file whose
    header records farmer's ``format_version``, a zip archive (``torch.save``) for a training state, JSON lines (or
    nothing yet) for metrics, an evaluation result (``eval-<step>.json``: its checkpoint, step and metrics). A user's file under farmer's name (notes saved as ``checkpoints/step-N/config.json``)
    is neither deleted nor written over."""
    import json
    import zipfile

    try:
        if path.name == CONFIG_FILE:
            return is_run(path.parent)
        if path.suffix == ".pt":
            return zipfile.is_zipfile(path)
        if FARMER_NAMES.fullmatch(path.name):
            result = json.loads(path.read_bytes()) if path.stat().st_size <= 16 << 20 else None
            return isinstance(result, dict) and {"checkpoint", "step", "metrics"} <= set(result)
        with open(path, "rb") as f:
            if path.suffix == ".safetensors":
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size)) if 2 <= size <= 64 << 20 else None
                return isinstance(header, dict) and "format_version" in (header.get("__metadata__") or {})
            first = f.readline(1 << 20).strip()
            return not first or isinstance(json.loads(first), dict)
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        return False


def remove(path: Path, checked: bool = True) -> None:
    """Delete what is at ``path`` under one of farmer's names: a folder (a step checkpoint) by its run files that
    farmer wrote (:func:`written_by_farmer`; all of them in a ``.partial`` folder, ``checked`` False, whose copies
    a killed writer may have cut short), then itself when nothing else is left in it (a file of the user's keeps
    it, with a warning); a symbolic link itself, never what it points to; nothing if there is nothing."""
    if not path.is_dir() or path.is_symlink():
        path.unlink(missing_ok=True)
        return
    removed = [path / name for name in RUN_FILES if (path / name).is_symlink()
               or (path / name).is_file() and (not checked or written_by_farmer(path / name))]
    removed += [path / PARTIAL_MARK] * (not checked and (path / PARTIAL_MARK).is_file())
    for file in removed:
        file.unlink()
    try:
        path.rmdir()
    except OSError:
        if removed:
            others = ", ".join(sorted(p.name for p in path.iterdir())[:3])
            log.warning("%s: farmer's files removed; the folder is kept because it holds others (%s)", path, others)


def remove_stale_writes(run_dir: Path) -> None:
    """Delete what a writer killed mid-write (``kill -9``, a node lost) left of the run's files: the temporary
    ``.<run file>.farmer-<random>.tmp`` files of :func:`farmer_cli.storage.atomic_write` and the
    ``checkpoints/*.partial`` folders that :func:`snapshot` marked as its own (:data:`PARTIAL_MARK`); a user's file
    or folder under a similar name is left. Only the lock holder writes these names, so call holding the lock."""
    temporaries = re.compile("|".join(rf"\.{re.escape(name)}\.{TEMPORARY_MARK}\w+\.tmp" for name in RUN_FILES))
    for path in run_dir.iterdir():
        if temporaries.fullmatch(path.name) and path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
    for partial in (run_dir / HISTORY_DIR).glob("*.partial"):
        if HISTORY_NAMES.fullmatch(partial.name) and (partial / PARTIAL_MARK).is_file():
            remove(partial, checked=False)


DISTILL_FILES = (STUDENT_FILE, DISTILL_STATE_FILE, DISTILL_METRICS_FILE)


def holds_distillation(run_dir: Path) -> bool:
    return any((run_dir / name).exists() for name in DISTILL_FILES)


def remove_distillation(run_dir: Path) -> None:
    """Delete a run's student, its distillation state and metrics and its ``checkpoints/distill-step-*``
    (``farmer distill --overwrite``; call holding the run's lock)."""
    for name in DISTILL_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for old in (run_dir / HISTORY_DIR).glob("distill-step-*"):
        if HISTORY_NAMES.fullmatch(old.name):
            remove(old)


def settings_digest(cfg: Config) -> str:
    """SHA-256 of the settings a resumed run may not change (model, data and train, less :data:`RESUMABLE`), kept
    in the weights' metadata at every checkpoint: a config.json edited by hand since then no longer matches."""
    import hashlib
    import json

    fixed = {f"{section}.{k}": v for section in ("model", "data", "train")
             for k, v in dataclasses.asdict(getattr(cfg, section)).items() if f"{section}.{k}" not in RESUMABLE}
    return hashlib.sha256(json.dumps(fixed, sort_keys=True, default=str).encode()).hexdigest()


def resume_conflicts(stored: Config, requested: Config) -> list[str]:
    """``section.key: stored -> requested`` for every setting a resumed run would change but may not."""
    conflicts = []
    for section in ("model", "data", "train"):
        old, new = dataclasses.asdict(getattr(stored, section)), dataclasses.asdict(getattr(requested, section))
        conflicts += [f"{section}.{k}: {old[k]!r} -> {new[k]!r}" for k in old
                      if old[k] != new[k] and f"{section}.{k}" not in RESUMABLE]
    return conflicts


def claim_on_main(accelerator, run_dir: Path | None, *, resume: bool, overwrite: bool = False, option: str = "--out"
                  ) -> tuple[Path, RunLock | None]:
    """:func:`claim` on the main process; its outcome (the path, or the error) is shared with every rank so all
    stop together. Keep the returned lock referenced for as long as the run directory is being written."""
    lock, outcome = None, ("", "")
    if accelerator.is_main_process:
        try:
            lock = claim(run_dir, resume=resume, overwrite=overwrite, option=option)
            outcome = (str(run_dir), "")
        except CheckpointError as err:
            outcome = ("", str(err))
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        outcome = broadcast_object_list([outcome])[0]
    if outcome[1]:
        raise CheckpointError(outcome[1])
    return Path(outcome[0]), lock


RUNS_DIR = Path("runs")  # where runs go without --out, and where --ckpt is looked for without one


def new_run_dir(preset: str) -> Path:
    """``runs/<preset>-<timestamp>``, with a numeric suffix where that name is already taken (two runs started in
    the same second never share a directory). The name is created here, so a concurrent caller gets another."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = f"{preset or 'run'}-{stamp}"
    RUNS_DIR.mkdir(parents=True, exist_ok=True)
    for k in range(1000):
        candidate = RUNS_DIR / (base if k == 0 else f"{base}-{k}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"could not find a free run name under {RUNS_DIR}/ for {base}")


def find_checkpoint(ckpt: Path | None, what: str | None = None, option: str = "--ckpt") -> Path:
    """``--ckpt DIR`` or, without it, the run under ./runs/ whose ``what`` (default: the model weights) was written
    last (not the folder changed last: an evaluation's result does not make a run newer); logs which it took."""
    what = what or MODEL_FILE
    if ckpt is not None:
        if not ckpt.is_dir():
            raise CheckpointError(f"{ckpt}: no such checkpoint directory")
        return ckpt
    candidates = sorted((p for p in RUNS_DIR.glob("*/") if (p / what).is_file()),
                        key=lambda p: (p / what).stat().st_mtime)
    if not candidates:
        raise CheckpointError(f"no checkpoint given and none found under ./runs/: train one with `farmer train` "
                              f"or pass {option} DIR")
    log.info("using the newest checkpoint: %s", candidates[-1])
    return candidates[-1]


def snapshot(run_dir: Path, names: tuple[str, ...], step: int, prefix: str, keep: int) -> None:
    """Keep copies of ``names`` (already written) of step ``step`` in ``checkpoints/<prefix>-<step>/``, and delete all
    but the ``keep`` newest such directories. Copies, not hard links: damage to the live file (an edit in place, a
    bad block) must not reach its backup; each kept step costs the disk of one checkpoint."""
    target = run_dir / HISTORY_DIR / f"{prefix}-{step:08d}"
    partial = target.with_name(target.name + ".partial")
    if partial.is_symlink() or (partial / PARTIAL_MARK).is_file():  # a link (removed itself), an earlier copy cut short
        remove(partial, checked=False)
    try:
        partial.mkdir(parents=True)
    except FileExistsError:  # a folder of the user's under farmer's temporary name
        log.warning("%s is not a folder farmer made: no step checkpoint of step %d is kept", partial, step)
        return
    (partial / PARTIAL_MARK).write_text(f"farmer pid {os.getpid()}")
    for name in names:
        if (run_dir / name).exists():
            shutil.copy2(run_dir / name, partial / name)
    remove(target)  # an older checkpoint of this step, or something else under farmer's name
    if target.exists():  # a folder of the user's files under this step's name: this step keeps no copy
        log.warning("%s holds files that are not farmer's: no step checkpoint is kept there", target)
        remove(partial, checked=False)
        return
    (partial / PARTIAL_MARK).unlink()
    partial.rename(target)  # a directory without ".partial" is complete
    for old in history(run_dir, prefix)[keep:]:
        remove(old)


def history(run_dir: Path, prefix: str) -> list[Path]:
    """Complete step checkpoints ``checkpoints/<prefix>-<step>/`` (holding farmer's files), newest first."""
    name = re.compile(rf"{re.escape(prefix)}-\d{{8}}")  # as :func:`snapshot` names them
    found = (run_dir / HISTORY_DIR).glob(f"{prefix}-*")
    return sorted((p for p in found if name.fullmatch(p.name) and p.is_dir() and not p.is_symlink()
                   and any((p / file).is_file() for file in RUN_FILES)), reverse=True)


def free_result_path(run_dir: Path, stem: str) -> Path:
    """``<stem>.json``, or ``<stem>-2.json``, ``-3`` ... where it exists: an earlier evaluation is never overwritten."""
    return free_name(run_dir / f"{stem}.json")
