"""What a run leaves behind and what a terminal is shown (GitHub issue 24, the low items): control characters in
file names, a run killed before its first checkpoint, temporary files of a write cut by ``kill -9``, step checkpoints
that share nothing with the live files, ``evaluate --limit`` for the classifier, a file given as a data set, and a
data set too small to hold out test images.

Timing (2 cores): five short commands on copies of the shared ``tiny_run``, the rest library calls."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from cli_helpers import farmer
from farmer_cli.commands.ui import escape
from farmer_cli.config.schema import DataConfig
from farmer_cli.data.sources import DataError, open_source
from farmer_cli.rundir import claim, never_saved, snapshot


def _killed_before_first_checkpoint(tiny_run: Path, run: Path) -> Path:
    """What ``farmer train`` leaves when killed while it loads data or measures the first test bits/dim."""
    run.mkdir(parents=True)
    payload = json.loads((tiny_run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**payload, "step": 0}))
    (run / ".lock").write_text("12345")
    return run


def test_control_characters_in_names_are_shown_not_sent_to_the_terminal(tiny_run: Path, digit_png: Path,
                                                                        tmp_path: Path):
    assert escape("\x1b[31mred\x07.png [b]x[/b]") == "\\x1b[31mred\\x07.png \\[b]x\\[/b]"
    assert escape("tab\tand\nnewline") == "tab\\tand\\nnewline"  # shown, as in error lines: output stays one line
    proc = farmer("score", "--ckpt", str(tiny_run), str(tmp_path / "\x1b[2J\x1b[31mgone.png"), check=False)
    assert proc.returncode == 2 and "\x1b" not in proc.stderr, proc.stderr
    assert "\\x1b[2J\\x1b[31mgone.png" in proc.stderr
    proc = farmer("score", "--ckpt", str(tmp_path / "two\nlines"), str(digit_png), check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr  # a newline in a name: still one line
    assert proc.stderr.startswith("error: ") and "two\\nlines" in proc.stderr


def test_a_run_killed_before_its_first_checkpoint_is_started_again(tiny_run: Path, tmp_path: Path):
    fresh = _killed_before_first_checkpoint(tiny_run, tmp_path / "fresh")
    assert never_saved(fresh) and not never_saved(tiny_run)
    claim(fresh, resume=False).release()  # not "already holds a run": nothing trained would be lost
    assert not (fresh / "config.json").exists()

    requeued = _killed_before_first_checkpoint(tiny_run, tmp_path / "requeued")
    proc = farmer("train", "--out", str(requeued), "--resume", "--steps", "1")
    assert "stopped before its first checkpoint" in proc.stderr and "starting it from step 0" in proc.stderr
    assert (requeued / "model.safetensors").exists() and json.loads((requeued / "config.json").read_text())["step"] == 1


def test_temporary_files_of_a_killed_write_are_removed_at_the_next_start(tmp_path: Path):
    """Only what farmer marks as its own: ``.<run file>.farmer-<random>.tmp`` and ``.partial`` step folders holding
    farmer's mark; a user's ``.config.json.backup.tmp`` or notes in a ``.partial`` folder of theirs are kept."""
    from farmer_cli.rundir import PARTIAL_MARK

    run = tmp_path / "run"
    (run / "checkpoints" / "step-00000010.partial").mkdir(parents=True)
    (run / "checkpoints" / "step-00000010.partial" / "model.safetensors").write_text("half")
    (run / "checkpoints" / "step-00000010.partial" / PARTIAL_MARK).write_text("farmer pid 1")
    (run / "checkpoints" / "step-00000030.partial").mkdir(parents=True)
    (run / "checkpoints" / "step-00000030.partial" / "config.json").write_text("my notes")
    (run / "config.json").write_text(json.dumps({"format_version": 1, "config": {}}))
    stale = [".model.safetensors.farmer-k3j_x9.tmp", ".training_state.pt.farmer-abc123.tmp",
             ".config.json.farmer-q1w2e3.tmp"]
    mine = [".notes.txt.farmer-abc123.tmp", "draft.tmp", ".model.safetensors.tmp", ".config.json.backup.tmp"]
    for name in stale + mine:
        (run / name).write_text("x")
    claim(run, resume=True).release()
    assert sorted(p.name for p in run.iterdir()) == sorted([".lock", "checkpoints", "config.json", *mine])
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000030.partial"]
    assert (run / "checkpoints" / "step-00000030.partial" / "config.json").read_text() == "my notes"
    (run / "model.safetensors").write_text("weights")  # a step whose temporary name a user's folder holds
    snapshot(run, ("model.safetensors",), 30, "step", keep=3)
    assert not (run / "checkpoints" / "step-00000030").exists()
    assert sorted(p.name for p in (run / "checkpoints" / "step-00000030.partial").iterdir()) == ["config.json"]


def test_step_checkpoints_are_copies_not_links_to_the_live_files(tmp_path: Path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes(b"weights at step 10")
    snapshot(run, ("model.safetensors",), 10, "step", keep=3)
    kept = run / "checkpoints" / "step-00000010" / "model.safetensors"
    assert os.stat(run / "model.safetensors").st_nlink == 1 and os.stat(kept).st_nlink == 1
    with open(run / "model.safetensors", "r+b") as live:  # damage in place: the backup keeps its bytes
        live.write(b"XXXX")
    assert kept.read_bytes() == b"weights at step 10"


def test_evaluate_limit_is_exact_for_the_classifier(tiny_run: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    proc = farmer("evaluate", "--ckpt", str(run), "--metrics", "classify", "--limit", "7", "--json")
    assert json.loads(proc.stdout)["metrics"]["classify"]["n"] == 7


def test_a_file_given_as_a_data_set_is_called_a_file(digit_png: Path):
    with pytest.raises(DataError, match=r"is a file, not a data set: give a folder of images"):
        open_source(DataConfig(source=str(digit_png)))


def test_a_data_set_too_small_for_test_images_says_so(digit_png: Path, tmp_path: Path):
    (tmp_path / "data" / "seven").mkdir(parents=True)
    Image.open(digit_png).save(tmp_path / "data" / "seven" / "a.png")
    proc = farmer("train", "--preset", "tiny", "--steps", "1", "--data", str(tmp_path / "data"),
                  "--out", str(tmp_path / "run"))
    assert "no test bits/dim (the data set is too small to hold out test images)" in proc.stderr
    assert "nan" not in proc.stderr
