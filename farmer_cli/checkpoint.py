"""Checkpoints: a run directory with ``config.json``, ``model.safetensors`` (EMA weights), ``training_state.pt``
(raw weights, EMA, optimiser, scheduler, step: everything ``--resume`` needs) and, after distillation,
``student.safetensors``.

Every file is written to a temporary name in the same directory and then renamed over the old one
(``os.replace`` is atomic on POSIX), so killing the process at any moment leaves each file either old or new,
never truncated.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import stat
from pathlib import Path
from typing import Any

import torch

from farmer_cli.config.schema import MAX_STEPS, Config, ConfigError
from farmer_cli.storage import atomic_write, parse_json
from farmer_cli.config.files import from_dict

FORMAT_VERSION = 1
CONFIG_FILE, MODEL_FILE, STUDENT_FILE = "config.json", "model.safetensors", "student.safetensors"
TRAIN_STATE_FILE, DISTILL_STATE_FILE = "training_state.pt", "distill_state.pt"
METRICS_FILE, DISTILL_METRICS_FILE = "metrics.jsonl", "distill_metrics.jsonl"
LOCK_FILE = ".lock"  # held by the process training or distilling the run (farmer_cli.rundir.RunLock)
SAMPLES_DIR = "samples"  # train.sample_every > 0: a grid every that many steps, samples/step-<step>.png
STATE_WEIGHTS = {TRAIN_STATE_FILE: MODEL_FILE, DISTILL_STATE_FILE: STUDENT_FILE}  # written together at every save


log = logging.getLogger("farmer")


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or from an incompatible version/config."""


def save_config(run_dir: Path, cfg: Config, class_names: list[str], extra: dict[str, Any] | None = None) -> None:
    payload = {"format_version": FORMAT_VERSION, "config": cfg.to_dict(), "class_names": class_names, **(extra or {})}
    atomic_write(run_dir / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=2)))


def save_weights(path: Path, state: dict[str, torch.Tensor], step: int, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    meta = {"step": str(step), "format_version": str(FORMAT_VERSION), **(metadata or {})}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def weights_fingerprint(path: Path) -> str:
    """A cheap identity of a weights file: its step, size and a hash of its first and last MiB (header and
    tensors). Stored with a distilled student so a student is never used with another teacher."""
    import hashlib

    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as fh:
        digest.update(fh.read(1 << 20))
        fh.seek(max(0, size - (1 << 20)))
        digest.update(fh.read(1 << 20))
    return f"{size}-{digest.hexdigest()[:32]}"


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Whether two models hold the same tensors (names, shapes and values): a copy of a run, wherever it lies."""
    one, two = a.state_dict(), b.state_dict()
    return one.keys() == two.keys() and all(
        one[k].shape == two[k].shape and torch.equal(one[k], two[k].to(one[k].device)) for k in one)


def save_training_state(run_dir: Path, name: str, state: dict[str, Any]) -> None:
    """Tensors and plain values only (state dicts, optimiser state, step), so it loads with ``weights_only``."""
    atomic_write(run_dir / name, lambda tmp: torch.save(state, tmp))


def load_training_state(run_dir: Path, name: str, modules: list[str], identity: str = "",
                        total: int = MAX_STEPS) -> dict[str, Any]:
    """Load ``name`` safely: ``torch.load(weights_only=True)`` unpickles tensors and plain containers only, so a
    crafted file cannot run code. Checks that the state holds ``modules``, the optimiser, scheduler and a step of
    at most ``total``, that it was saved by the run of ``identity`` (a digest of the settings a run may not change;
    a state that records none, from an older farmer, passes) and that it belongs with its weights file."""
    path = run_dir / name
    if not path.exists():
        raise CheckpointError(f"{run_dir}: no {name} to resume from (was the run started with this version?)")
    import zipfile

    try:  # mmap: tensors are paged in as they are copied into the model, not materialised all at once
        if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; say so rather than torch's mmap text
            raise ValueError("an empty file" if path.stat().st_size == 0 else "not a file torch.save wrote (no zip "
                             "archive)")
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: unreadable or unsafe training state ({first[:200]}); it was not loaded") from None
    missing = [k for k in [*modules, "optimizer", "scheduler", "step"] if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a farmer training state (missing {', '.join(missing)})")
    if not isinstance(state["step"], int) or isinstance(state["step"], bool) or not 0 <= state["step"] <= MAX_STEPS:
        raise CheckpointError(f"{path}: not a farmer training state (step {str(state['step'])[:40]!r})")
    fix = _start_over(name)
    if state["step"] > total:
        raise CheckpointError(f"{path}: step {state['step']}, beyond the run's {total} steps: it is not this run's "
                              f"state; {fix}")
    if identity and state.get("identity", identity) != identity:
        other = ("a run with other settings (another seed, data or model) than config.json records"
                 if name == TRAIN_STATE_FILE else "the distillation of other teacher weights or distill settings")
        raise CheckpointError(f"{path}: saved by {other}: it is not this run's state; {fix}")
    weights = run_dir / STATE_WEIGHTS[name] if name in STATE_WEIGHTS else None
    _check_state_shapes(state, modules, path, weights)
    if weights is not None:
        _check_state_matches_weights(state, modules[0], path, weights)
    return state


def _start_over(name: str) -> str:
    """What to do about a training state file ``name`` that is not this run's."""
    return "restore this run's own files, or " + ("start a new run" if name == TRAIN_STATE_FILE else
                                                  "start afresh with farmer distill --overwrite")


def regular_file(path: Path) -> bool:
    """Whether ``path`` (a link followed) is a regular file: reading a FIFO planted under a run file's name would
    wait for a writer forever, and a device or folder is no run file either."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def check_regular(path: Path) -> None:
    """CheckpointError unless ``path`` is a regular file (see :func:`regular_file`); call where it exists."""
    if not regular_file(path):
        raise CheckpointError(f"{path} is not a regular file (a folder, FIFO or device), so not the run's own file; "
                              "restore it (a run keeps copies in checkpoints/step-*/)")


def _check_state_matches_weights(state: dict[str, Any], module: str, path: Path, weights: Path) -> None:
    """A training state and its weights file (``module`` of the state: the EMA, or the student) are written
    together at every save, the state first. At the weights' step the state must hold the weights' tensors (those
    of up to 1M elements are compared: a state of another run, even of the same config, is refused); a later step
    is a save cut short between the two files (resumed, with a warning); an earlier one is not this run's."""
    from safetensors import SafetensorError, safe_open

    if not regular_file(weights):
        return  # no readable weights beside it: loading them reports that
    try:
        with safe_open(str(weights), framework="pt") as fh:
            step = _metadata_step(fh.metadata() or {}, weights)
            if state["step"] == step:
                small = [key for key in fh.keys() if state[module][key].numel() <= 1 << 20]
                differs = next((key for key in small if not torch.equal(fh.get_tensor(key), state[module][key])), None)
    except (SafetensorError, OSError, ValueError):
        return  # no readable weights beside it: loading them reports that
    fix = _start_over(path.name)
    if state["step"] < step:
        raise CheckpointError(f"{path}: step {state['step']}, older than {weights.name} (step {step}), which is "
                              f"saved after it: it is not this run's state; {fix}")
    if state["step"] > step:
        log.warning("%s is at step %d but %s at step %d: the last save was cut short between the two; resuming "
                    "from step %d (%s is written again at the next checkpoint)", path.name, state["step"],
                    weights.name, step, state["step"], weights.name)
    elif differs is not None:
        raise CheckpointError(f"{path}: its {module} weights are not those of {weights.name} at the same step "
                              f"({differs} differs): it is the state of another run; {fix}")


def _check_state_shapes(state: dict[str, Any], modules: list[str], path: Path, weights: Path | None) -> None:
    """The weights (``modules``) and optimiser moments in a training state must have the tensor names and shapes of
    the weights file saved with it (``weights``, itself checked against config.json before a resume): a state
    file of another run or config is refused here, naming both files, instead of failing inside the model."""
    for module in modules:
        part = state[module]
        if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
            raise CheckpointError(f"{path}: not a farmer training state ({module} is not a set of named tensors)")
    moments = state["optimizer"].get("state", {}) if isinstance(state["optimizer"], dict) else None
    if not isinstance(moments, dict) or not all(isinstance(per, dict) for per in moments.values()):
        raise CheckpointError(f"{path}: not a farmer training state (optimizer)")
    expected = _header_shapes(weights) if weights is not None else None
    if expected is None:  # no readable weights file beside it: the model checks the shapes when loading
        return
    found = [(module, {k: tuple(v.shape) for k, v in state[module].items()}) for module in modules]
    found.append(("optimizer", {k: tuple(v.shape) for k, per in moments.items() for v in per.values()
                                if isinstance(k, str) and isinstance(v, torch.Tensor) and v.ndim}))  # moments
    for module, shapes in found:
        extra = set(shapes) - set(expected)  # the optimiser may hold moments of fewer parameters
        wrong = sorted(extra if module == "optimizer" else extra | (set(expected) - set(shapes))) or \
            sorted(k for k in shapes if shapes[k] != expected[k])
        if wrong:
            key = wrong[0]
            raise CheckpointError(f"{path}: its {module} state does not fit {weights.name} beside it ({key}: state "
                                  f"{shapes.get(key, 'absent')}, weights {expected.get(key, 'absent')}); it is "
                                  f"the state of another run or config: {_start_over(path.name)}")


def _header_shapes(path: Path) -> dict[str, tuple[int, ...]] | None:
    """Tensor name -> shape from a safetensors header (nothing is loaded), or None where it cannot be read."""
    from safetensors import SafetensorError, safe_open

    if not regular_file(path):
        return None
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {key: tuple(fh.get_slice(key).get_shape()) for key in fh.keys()}
    except (SafetensorError, OSError, ValueError):
        return None


def check_metrics(run_dir: Path, name: str) -> None:
    """Before a resume: every line of the run's metrics file ``name`` must be a record farmer wrote, a JSON object
    whose ``step`` is a whole number >= 0 (blank lines aside); only an unterminated last line may be something
    else (a record cut short by a crash, which resuming drops). Anything other (an edited file) is refused here,
    naming the line, before any work."""
    path = Path(run_dir) / name
    if path.is_symlink():  # never read (or later appended) through a link: see rundir.check_own_paths
        raise CheckpointError(f"{path} is a symbolic link to {os.readlink(path)}: farmer writes it, so it must be a "
                              "file inside the run; remove it (or move it into the run) and start again")
    if not path.exists():
        return
    fix = "fix or delete that line, then resume again"
    try:
        with open(path, "rb") as f:  # line by line, each bounded: a huge or sparse file is not read whole
            for number, raw in enumerate(iter(lambda: f.readline(MAX_RECORD_BYTES), b""), 1):
                if len(raw) >= MAX_RECORD_BYTES and not raw.endswith(b"\n"):
                    raise CheckpointError(f"{path} line {number}: longer than {MAX_RECORD_BYTES:,} bytes, far more "
                                          f"than a record farmer writes; {fix}")
                why = _record_fault(raw, cut=not raw.endswith((b"\n", b"\r")))
                if why is not None:
                    raise CheckpointError(f"{path} line {number}: {why}; farmer writes one JSON record with a "
                                          f"whole-number \"step\" per line: {fix}")
    except OSError as err:
        raise CheckpointError(f"{path}: unreadable ({err.strerror or err}); fix it or delete it, then resume "
                              "again") from None


MAX_RECORD_BYTES = 1 << 20  # a metrics record is a few hundred bytes


def _record_fault(raw: bytes, cut: bool) -> str | None:
    """What is wrong with one line of a metrics file, or None: blank, or a JSON object with a whole-number step
    >= 0. An unterminated last line (``cut``: a record cut short by a crash, which resuming drops) may be anything."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return None if cut else f"not UTF-8 text (byte {err.start})"
    if not line.strip():
        return None
    try:
        record = parse_json(line)
    except ValueError as err:
        return None if cut else f"not a JSON record ({getattr(err, 'msg', err)})"
    if not isinstance(record, dict):
        return "not a JSON object"
    step = record.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return f"step {json.dumps(step)} is not a whole number >= 0" if "step" in record else "no step"
    return None


MAX_CONFIG_BYTES = 64 << 20  # config.json: settings and up to 65,536 class names


def load_config(run_dir: Path) -> tuple[Config, list[str], dict[str, Any]]:
    """-> (config, class names, the whole JSON payload); CheckpointError for anything malformed."""
    run_dir = Path(run_dir)
    path = run_dir / CONFIG_FILE
    if not path.exists():
        raise CheckpointError(f"{run_dir}: not a farmer checkpoint (no {CONFIG_FILE})")
    check_regular(path)
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{path}: {path.stat().st_size:,} bytes, far more than a config farmer writes (at most "
                              f"{MAX_CONFIG_BYTES:,}, class names included); restore the run's config.json (a copy is "
                              "kept in its checkpoints/step-*/)")
    try:
        payload = parse_json(path.read_text())
    except (OSError, ValueError) as err:  # ValueError: not UTF-8, not JSON, nested too deeply
        raise CheckpointError(f"{path}: unreadable ({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
                              "restore the run's config.json (a copy is kept in its checkpoints/step-*/)") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: not a farmer config (a JSON object was expected)")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {payload.get('format_version')!r}, this farmer reads "
                              f"{FORMAT_VERSION}; retrain or use the farmer version that wrote it")
    raw = payload.get("config")
    if isinstance(raw, dict) and isinstance(raw.get("model"), dict):
        raw["model"].setdefault("gelu", "tanh")  # runs written before model.gelu existed used the tanh GELU
    try:
        cfg = from_dict(raw, origin=str(path))
    except ConfigError as err:
        raise CheckpointError(f"{err}: the file was edited, or written by another farmer version; restore the run's "
                              "config.json (a copy is kept in its checkpoints/step-*/)") from None
    names = payload.get("class_names", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"{path}: class_names must be a list of strings")
    if len(set(names)) != len(names):  # --class NAME must name one class
        twice = next(n for n in names if names.count(n) > 1)
        raise CheckpointError(f"{path}: class_names lists '{twice}' more than once; the file was edited: restore "
                              "one name per class")
    if names and len(names) != cfg.model.num_classes:  # runs written before class_names existed have none
        raise CheckpointError(f"{path}: class_names lists {len(names)} classes but model.num_classes is "
                              f"{cfg.model.num_classes}; the file was edited: restore one name per class")
    return cfg, names, payload


FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")  # safetensors' names


def _check_header(module: torch.nn.Module, path: Path) -> dict[str, str]:
    """Compare the tensor names, shapes and (floating-point) dtypes in a safetensors header with ``module`` (which
    may live on the meta device, so nothing is allocated for a config that does not fit); returns the file's
    metadata."""
    from safetensors import SafetensorError, safe_open

    if not path.exists():
        copies = sorted(path.parent.glob(f"checkpoints/*step-*/{path.name}"))  # the run's step checkpoints
        raise CheckpointError(f"{path}: missing" + (f"; the run keeps copies in its step checkpoints: copy the newest "
                                                    f"back ({copies[-1]}), or give --ckpt {copies[-1].parent}"
                                                    if copies else ""))
    check_regular(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            shapes = {key: tuple(fh.get_slice(key).get_shape()) for key in fh.keys()}
            dtypes = {key: fh.get_slice(key).get_dtype() for key in fh.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable weights ({err}); restore it (a run keeps copies of its last "
                              "checkpoints in checkpoints/step-*/)") from None
    # farmer writes float32 (and reads bf16/fp16 exports); integers would load silently as rounded weights
    cast = sorted(key for key, dtype in dtypes.items() if dtype not in FLOAT_DTYPES)
    if cast:
        raise CheckpointError(f"{path}: {cast[0]} is stored as {dtypes[cast[0]]} ({len(cast)} such tensors), not a "
                              "floating-point type: these are not weights farmer wrote; use the run's own file")
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    wrong = sorted(set(expected) ^ set(shapes)) or [k for k in expected if expected[k] != shapes[k]]
    if wrong:
        key = wrong[0]
        raise CheckpointError(f"{path}: weights do not fit the model in config.json ({key}: file "
                              f"{shapes.get(key, 'absent')}, model {expected.get(key, 'absent')}); checkpoint from "
                              "another version or config")
    return metadata


def load_weights(module: torch.nn.Module, path: Path) -> int:
    """Load a safetensors file into ``module`` strictly (names and shapes checked first); returns its step."""
    from safetensors.torch import load_file

    metadata = _check_header(module, path)
    step = _metadata_step(metadata, path)
    tensors = load_file(str(path))
    broken = next((key for key, t in tensors.items() if not bool(torch.isfinite(t).all())), None)
    if broken is not None:
        raise CheckpointError(f"{path}: {broken} holds NaN or infinite values (weights that diverged or were "
                              "damaged); use an earlier checkpoint (checkpoints/step-*) or train again")
    module.load_state_dict(tensors, strict=True)
    return step


def _metadata_step(metadata: dict[str, str], path: Path) -> int:
    """The training step a weights file records in its metadata (0 where it records none)."""
    text = metadata.get("step", "0")
    if not (text.isascii() and text.isdigit() and len(text) <= 18):
        raise CheckpointError(f"{path}: its metadata step {text[:40]!r} is not a step number (the file was edited "
                              "or not written by farmer); use the run's own file")
    return int(text)


def weights_step(path: Path) -> int:
    """The step a weights file records (its metadata only is read); CheckpointError where it cannot be read."""
    from safetensors import SafetensorError, safe_open

    check_regular(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            return _metadata_step(fh.metadata() or {}, path)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable weights ({err}); restore it") from None


def check_student_file(model, run_dir: Path) -> None:
    """Check ``student.safetensors`` against the AF of ``model`` (the student is a copy of it: the same tensors)
    before a distillation resumes into it; nothing is loaded."""
    _check_header(model.flow, Path(run_dir) / STUDENT_FILE)


def check_model_file(cfg: Config, run_dir: Path) -> dict[str, str]:
    """Check ``model.safetensors`` against ``cfg`` on the meta device: nothing is allocated for a config that does
    not fit its weights (or asks for an absurd size). Returns the file's metadata."""
    from farmer_cli.model import Farmer

    with torch.device("meta"):
        return _check_header(Farmer(cfg.model), run_dir / MODEL_FILE)


def label_map_digest(class_names: list[str]) -> str:
    """What the weights record of the label map they were trained with (class index -> name)."""
    import hashlib

    return hashlib.sha256(json.dumps(class_names).encode()).hexdigest()[:16]


def model_digest(cfg: Config) -> str:
    """What the weights record of the model they are (``model.*`` and the final training noise, which sets the
    denoising step): an edited config.json would otherwise build another model around them."""
    import dataclasses
    import hashlib

    fixed = {"model": dataclasses.asdict(cfg.model), "noise": cfg.train.final_noise_sigma()}
    return hashlib.sha256(json.dumps(fixed, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_trained_with(metadata: dict[str, str], cfg: Config, class_names: list[str], run_dir: Path) -> None:
    """``config.json``'s model settings and class names must be those the weights were trained with (weights from
    before the record pass): an edited file would build another model around them, or turn ``--class 3`` into
    another class."""
    for key, digest, what in (("model", model_digest(cfg), "model settings (model.*, train.noise_*)"),
                              ("classes", label_map_digest(class_names), "class_names (the label map)")):
        if metadata.get(key, digest) != digest:
            raise CheckpointError(f"{run_dir}/{CONFIG_FILE}: its {what} are not those {MODEL_FILE} was trained "
                                  "with (the file was edited); restore the run's own config.json")


def lock_holder(run_dir: Path) -> str | None:
    """The pid, as its lock file says, of another process holding ``run_dir``'s lock (training or distilling it),
    or None. A probe: a shared lock that cannot be had means an exclusive holder; links are not followed."""
    try:
        import fcntl

        fd = os.open(run_dir / LOCK_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except (ImportError, OSError):
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except OSError:
        return "".join(ch for ch in os.read(fd, 32).decode(errors="replace") if ch.isdigit()) or "unknown"
    finally:
        os.close(fd)  # drops the probe's shared lock


def load_model(run_dir: str | Path, device: str | torch.device = "cpu"):
    """-> (Farmer in eval mode with the EMA weights on ``device``, config, class names, step).

    The weights file is checked against the config before any memory is allocated."""
    from farmer_cli.model import Farmer

    run_dir = Path(run_dir)
    cfg, class_names, payload = load_config(run_dir)
    check_trained_with(check_model_file(cfg, run_dir), cfg, class_names, run_dir)
    model = Farmer(cfg.model, trained_noise_sigma=cfg.train.final_noise_sigma())
    step = load_weights(model, run_dir / MODEL_FILE)
    recorded = payload.get("step")  # both are written at every checkpoint; results are named by the step
    if isinstance(recorded, int) and not isinstance(recorded, bool) and recorded != step:
        holder = lock_holder(run_dir)
        if holder is not None:  # a checkpoint being written between the two files: not an edit
            raise CheckpointError(f"{run_dir} is being saved by the farmer process training or distilling it (pid "
                                  f"{holder}) right now: try again in a moment, or give --ckpt a step checkpoint "
                                  f"({run_dir}/checkpoints/step-*)")
        raise CheckpointError(f"{run_dir}: {MODEL_FILE} says step {step} but {CONFIG_FILE} says step {recorded}: "
                              "one of them was edited or a save was cut short; continue the run with farmer train "
                              "--resume (which writes both again) or restore the files")
    return model.to(device).eval(), cfg, class_names, step


def stored_distill_settings(run_dir: Path) -> dict | None:
    """The distill.* settings a run's student was trained with (stored in its metadata), or None where there is no
    student or it records none; CheckpointError where the file or its record cannot be read."""
    import dataclasses

    from safetensors import SafetensorError, safe_open

    from farmer_cli.config.schema import DistillConfig

    path = Path(run_dir) / STUDENT_FILE
    if not path.exists():
        return None
    check_regular(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            text = (fh.metadata() or {}).get("distill")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable ({err}), so the settings of the distillation to resume are "
                              "unknown; restore it from checkpoints/distill-step-*/ or start afresh with "
                              "--overwrite") from None
    if not text:
        return None
    try:
        settings = parse_json(text)
    except ValueError:
        settings = None
    known = {f.name for f in dataclasses.fields(DistillConfig)}
    if not isinstance(settings, dict) or not set(settings) <= known:
        raise CheckpointError(f"{path}: its 'distill' metadata {text[:60]!r} is not the distill settings farmer "
                              "records (the file was edited or not written by farmer); restore the run's own file "
                              "or start afresh with --overwrite")
    return settings


def load_student(run_dir: Path, model):
    """The distilled student AF of ``model`` from ``student.safetensors`` (clear error when there is none, or when
    it was distilled from other teacher weights than the run's ``model.safetensors``). Its ``distilled`` attribute
    is (steps distilled, steps asked for, or None where the file records none)."""
    from farmer_cli.model.distill import make_student

    run_dir = Path(run_dir)
    path = run_dir / STUDENT_FILE
    if not path.exists():
        raise CheckpointError(f"{run_dir} has no distilled student ({STUDENT_FILE}); run "
                              f"`farmer distill --ckpt {shlex.quote(str(run_dir))}` first, or choose another --decoder")
    student = make_student(model.flow)
    metadata = _check_header(student, path)
    if metadata.get("teacher") != weights_fingerprint(run_dir / MODEL_FILE):
        raise CheckpointError(f"{path} was distilled from other weights than {run_dir / MODEL_FILE} (the run was "
                              "retrained or replaced); run "
                              f"`farmer distill --ckpt {shlex.quote(str(run_dir))} --overwrite` again")
    step = load_weights(student, path)
    total = (stored_distill_settings(run_dir) or {}).get("steps")
    student.distilled = (step, total if isinstance(total, int) else None)  # an unfinished student says so
    return student.eval().requires_grad_(False)
