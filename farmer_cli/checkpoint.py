"""Checkpoints: a run directory with ``config.json``, ``model.safetensors`` (EMA weights), ``training_state.pt``
(raw weights, EMA, optimiser, scheduler, step: everything ``--resume`` needs) and, after distillation,
``student.safetensors``.

Every file is written to a temporary name in the same directory and then renamed over the old one
(``os.replace`` is atomic on POSIX), so killing the process at any moment leaves each file either old or new,
never truncated.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .config import Config, ConfigError

FORMAT_VERSION = 1
CONFIG_FILE, MODEL_FILE, STATE_FILE, STUDENT_FILE = "config.json", "model.safetensors", "training_state.pt", "student.safetensors"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or from an incompatible version/config."""


def atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; checkpoints get the usual permissions
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_config(run_dir: Path, cfg: Config, class_names: list[str], extra: dict[str, Any] | None = None) -> None:
    payload = {"format_version": FORMAT_VERSION, "config": cfg.to_dict(), "class_names": class_names, **(extra or {})}
    atomic_write(run_dir / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=2)))


def save_weights(path: Path, state: dict[str, torch.Tensor], step: int) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"step": str(step), "format_version": str(FORMAT_VERSION)}))


def save_training_state(run_dir: Path, state: dict[str, Any]) -> None:
    atomic_write(run_dir / STATE_FILE, lambda tmp: torch.save(state, tmp))


def load_training_state(run_dir: Path) -> dict[str, Any]:
    path = run_dir / STATE_FILE
    if not path.exists():
        raise CheckpointError(f"{run_dir}: no {STATE_FILE} to resume from (was the run started with this version?)")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise CheckpointError(f"{path}: unreadable training state ({err})") from None


def load_config(run_dir: Path) -> tuple[Config, list[str], dict[str, Any]]:
    """-> (config, class names, the whole JSON payload)."""
    path = run_dir / CONFIG_FILE
    if not path.exists():
        raise CheckpointError(f"{run_dir}: not a farmer checkpoint (no {CONFIG_FILE})")
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable ({err})") from None
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {payload.get('format_version')!r}, this farmer reads "
                              f"{FORMAT_VERSION}; retrain or use the farmer version that wrote it")
    try:
        cfg = Config.from_dict(payload["config"], origin=str(path))
    except (ConfigError, KeyError) as err:
        raise CheckpointError(f"{path}: config does not match this farmer version ({err})") from None
    return cfg, payload.get("class_names", []), payload


def load_weights(module: torch.nn.Module, path: Path) -> int:
    """Load a safetensors file into ``module`` strictly; returns the step stored with it."""
    from safetensors import SafetensorError, safe_open

    if not path.exists():
        raise CheckpointError(f"{path}: missing")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            state = {key: fh.get_tensor(key) for key in fh.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable weights ({err})") from None
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise CheckpointError(f"{path}: weights do not fit the model in config.json ({first}); "
                              "checkpoint from another version or config") from None
    return int(metadata.get("step", 0))


def load_model(run_dir: Path, device: str | torch.device = "cpu"):
    """-> (Farmer in eval mode with the EMA weights, config, class names, step)."""
    from .model import Farmer

    cfg, class_names, _ = load_config(run_dir)
    model = Farmer(cfg.model)
    step = load_weights(model, run_dir / MODEL_FILE)
    return model.to(device).eval(), cfg, class_names, step


def load_student(run_dir: Path, model):
    """The distilled student AF of ``model`` from ``student.safetensors`` (clear error when there is none)."""
    from .model.distill import make_student

    path = run_dir / STUDENT_FILE
    if not path.exists():
        raise CheckpointError(f"{run_dir} has no distilled student ({STUDENT_FILE}); run "
                              f"`farmer distill --ckpt {run_dir}` first, or sample without --student")
    student = make_student(model.flow)
    load_weights(student, path)
    return student.eval().requires_grad_(False)
