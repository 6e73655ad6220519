"""Owning a run directory (farmer_cli/rundir.py): only farmer's runs are replaced, only farmer's files deleted, and
the lock file is never followed through a link or opened when it is not a regular file."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

import torch

from farmer_cli.checkpoint import CheckpointError, save_weights
from farmer_cli.rundir import claim, history, snapshot

from cli_helpers import farmer


def _farmer_run(run: Path) -> Path:
    """A directory laid out as farmer leaves a run, with a user's own files beside farmer's (a step checkpoint's
    files are deleted only when they hold what farmer writes: :func:`farmer_cli.rundir.written_by_farmer`)."""
    (run / "samples").mkdir(parents=True)
    (run / "checkpoints" / "step-00000010").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"format_version": 1, "config": {}}))
    for name in ("model.safetensors", "metrics.jsonl", "samples/step-00000010.png"):
        (run / name).write_text("farmer's")
    for name in ("eval-10.json", "eval-10-2.json"):
        (run / name).write_text(json.dumps({"checkpoint": str(run), "step": 10, "metrics": {}}))
    save_weights(run / "checkpoints" / "step-00000010" / "model.safetensors", {"w": torch.zeros(1)}, 10)
    for name in ("samples/mine.png", "eval-notes.json", "eval-7.json", "checkpoints/README", "notes.txt"):
        (run / name).write_text("the user's")
    return run


def test_overwrite_deletes_only_what_farmer_names(tmp_path: Path):
    run = _farmer_run(tmp_path / "run")
    claim(run, resume=False, overwrite=True).release()
    left = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    assert left == [".lock", "checkpoints/README", "eval-7.json", "eval-notes.json", "notes.txt", "samples/mine.png"]


def test_a_directory_that_is_not_a_run_is_never_written_over(tmp_path: Path):
    out = tmp_path / "p"
    (out / "samples").mkdir(parents=True)
    (out / "samples" / "mine.png").write_text("x")
    (out / "config.json").write_text('{"app": 1}')
    for overwrite in (False, True):
        with pytest.raises(CheckpointError, match=r"not a farmer run's \(config.json\)"):
            claim(out, resume=False, overwrite=overwrite)
    assert (out / "config.json").read_text() == '{"app": 1}' and (out / "samples" / "mine.png").exists()
    proc = farmer("train", "--preset", "tiny", "--steps", "1", "--out", str(out), "--overwrite", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "not a farmer run's" in proc.stderr.strip().splitlines()[-1]
    assert (out / "config.json").read_text() == '{"app": 1}' and (out / "samples" / "mine.png").exists()


def test_a_lock_that_is_a_link_directory_or_fifo_is_refused(tmp_path: Path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    for kind in ("symlink", "directory", "fifo"):
        run = _farmer_run(tmp_path / kind)
        lock = run / ".lock"
        if kind == "symlink":
            lock.symlink_to(victim)
        elif kind == "directory":
            lock.mkdir()
        else:
            os.mkfifo(lock)
        with pytest.raises(CheckpointError, match=r"\.lock: .*remove it"):
            claim(run, resume=True)
    assert victim.read_text() == "keep me"


def test_a_lock_that_is_a_hard_link_or_another_tools_file_is_never_written(tmp_path: Path):
    victim = tmp_path / "victim.txt"
    victim.write_text("VICTIM DATA 99999")
    run = _farmer_run(tmp_path / "linked")
    os.link(victim, run / ".lock")
    with pytest.raises(CheckpointError, match=r"\.lock: a hard link .*remove it"):
        claim(run, resume=True)
    assert victim.read_text() == "VICTIM DATA 99999"
    user = tmp_path / "user"
    user.mkdir()
    (user / ".lock").write_text("owned by another tool")
    with pytest.raises(CheckpointError, match="a file farmer did not write"):
        claim(user, resume=False)
    assert (user / ".lock").read_text() == "owned by another tool"
    (user / ".lock").write_text("4242")  # a bare pid is farmer's only inside a run (earlier releases wrote that)
    with pytest.raises(CheckpointError, match="a file farmer did not write"):
        claim(user, resume=False)
    old = _farmer_run(tmp_path / "old")
    (old / ".lock").write_text("12345")  # an earlier release's lock inside a run is taken over
    claim(old, resume=True).release()
    assert (old / ".lock").read_text() == f"farmer pid {os.getpid()}"
    fresh = claim(tmp_path / "fresh", resume=False)
    assert (tmp_path / "fresh" / ".lock").read_text() == f"farmer pid {os.getpid()}"
    fresh.release()
    claim(tmp_path / "fresh", resume=False).release()  # farmer's own lock, left behind, is taken again


def test_weights_cast_to_integers_are_refused(tiny_run: Path, tmp_path: Path):  # noqa: F811
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from farmer_cli.checkpoint import load_model

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns(".lock", "checkpoints"))
    weights = load_file(run / "model.safetensors")
    save_file({k: v.to(torch.int8) for k, v in weights.items()}, run / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"stored as I8 .*not a floating-point type"):
        load_model(run)


def test_a_full_disk_at_checkpoint_time_is_one_line_and_keeps_the_last_checkpoint(tmp_path: Path):
    """A file-size limit (as a full disk) while writing the training state: exit 2, one line naming the file, and
    the previous checkpoint still loads."""
    import resource
    import subprocess
    import sys

    import torch

    from cli_helpers import ENV

    run = tmp_path / "run"
    farmer("train", "--preset", "tiny", "--steps", "4", "--stop-after", "2", "--out", str(run))
    before = torch.load(run / "training_state.pt", weights_only=True)["step"]
    limit = (run / "config.json").stat().st_size + 20_000  # room for small files, not for the training state
    proc = subprocess.run([sys.executable, "-m", "farmer_cli", "train", "--out", str(run), "--resume"],
                          capture_output=True, text=True, env=ENV, timeout=600,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "training_state.pt: could not be written" in last and "--resume" in last
    assert before == 2 and torch.load(run / "training_state.pt", weights_only=True)["step"] == 2
    assert not list(run.glob(".*.tmp"))


@pytest.mark.parametrize("folder", ["checkpoints", "samples", "tensorboard"])
def test_a_run_folder_that_is_a_link_outside_is_refused_and_nothing_there_is_touched(tmp_path: Path, folder: str):
    outside = tmp_path / "outside"
    (outside / "step-00000010").mkdir(parents=True)
    (outside / "step-00000010" / "precious.txt").write_text("keep")
    (outside / "step-00000099.png").write_text("keep")
    for resume, overwrite in ((True, False), (False, True)):
        run = _farmer_run(tmp_path / f"run-{resume}")
        shutil.rmtree(run / folder, ignore_errors=True)
        (run / folder).symlink_to(outside)
        with pytest.raises(CheckpointError, match=rf"{folder} is a symbolic link to .*outside: farmer writes and "
                                                  "deletes"):
            claim(run, resume=resume, overwrite=overwrite)
    assert (outside / "step-00000010" / "precious.txt").read_text() == "keep"
    assert (outside / "step-00000099.png").read_text() == "keep"


def test_farmer_named_entries_in_a_directory_that_is_not_a_run_are_never_written_over(tmp_path: Path):
    out = tmp_path / "nr"
    (out / "checkpoints" / "step-00000001").mkdir(parents=True)
    (out / "checkpoints" / "step-00000001" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"holds files that are not a farmer run's \(checkpoints/step-00000001\)"):
        claim(out, resume=False)
    assert (out / "checkpoints" / "step-00000001" / "notes.txt").read_text() == "mine"


def test_step_checkpoints_are_only_farmer_s_names_and_a_file_in_their_place_is_replaced(tmp_path: Path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-99999999999999999999").mkdir(parents=True)  # not a name farmer writes
    (run / "checkpoints" / "step-00000030").write_text("junk")  # a file where a checkpoint folder goes
    save_weights(run / "model.safetensors", {"w": torch.zeros(1)}, 30)
    for step in (10, 20, 30):
        snapshot(run, ("model.safetensors",), step, "step", keep=2)
    assert [p.name for p in history(run, "step")] == ["step-00000030", "step-00000020"]
    assert (run / "checkpoints" / "step-99999999999999999999").is_dir()
    assert (run / "checkpoints" / "step-00000030" / "model.safetensors").read_bytes() == \
        (run / "model.safetensors").read_bytes()


def test_overwrite_removes_the_old_run_s_tensorboard_events(tmp_path: Path):
    run = _farmer_run(tmp_path / "run")
    (run / "tensorboard" / "old").mkdir(parents=True)
    (run / "tensorboard" / "old" / "events.out.tfevents.1").write_text("old run")
    claim(run, resume=False, overwrite=True).release()
    assert not (run / "tensorboard").exists()
