"""Cases of the twelfth hostile sweep (GitHub issue 24): settings that training never reads are refused like
sampling's, images beside the class folders are not dropped without a word, figures are never resized by their
format, printed paths stay on one line and suggested commands can be pasted, and inspect-channels checks the run's
split like evaluate (a copy of the run as ood's background: tests/eval/test_likelihood_tools.py). Refusals are one
"error:" line and exit status 2, before any work."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_helpers import farmer, refused
from farmer_cli.commands.ui import escape, shell_word
from farmer_cli.config.schema import ModelConfig, TrainConfig


def _png(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8), dtype=np.uint8)).save(path)
    return path


def test_unread_model_and_training_settings_are_named():
    assert set(ModelConfig(channel_split=False).unread()) == {"informative_dims", "redundant_components",
                                                              "merge_order", "checkpoint_fraction"}
    assert set(ModelConfig(token_merge=2, grad_checkpoint=True).unread()) == set()
    assert set(TrainConfig(noise="uniform", epochs=3).unread()) == {"noise_start", "noise_end", "steps"}
    assert TrainConfig().unread() == {}


@pytest.mark.parametrize("settings, named", [
    (["model.channel_split=false", "model.redundant_components=50"], "--set model.redundant_components"),
    (["model.merge_order=interleave"], "model.token_merge is 1"),
    (["model.checkpoint_fraction=0.5"], "model.grad_checkpoint is false"),
    (["train.noise=uniform", "train.noise_end=0.01"], "train.noise is uniform"),
    (["sampling.cfg=2", "sampling.temperature=0.5"], "--set sampling.temperature"),
    (["sampling.jacobi_tol=0.1"], "sampling.decoder is sequential"),
])
def test_train_refuses_settings_nothing_reads(settings, named, tmp_path: Path):
    """They were stored in config.json and trained exactly as without them (byte-identical weights)."""
    sets = [a for s in settings for a in ("--set", s)]
    line = refused("train", "--preset", "tiny", "--steps", "2", "--out", tmp_path / "r", *sets)
    assert "has no effect" in line and named in line, line
    assert not (tmp_path / "r").exists()


def test_uniform_noise_logs_no_sigma(tmp_path: Path):
    farmer("train", "--preset", "tiny", "--steps", "1", "--out", tmp_path / "r", "--set", "train.noise=uniform")
    record = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "bpd" in record and "sigma" not in record, record


def test_images_beside_the_class_folders_are_refused_not_dropped(tmp_path: Path):
    for k in range(3):
        _png(tmp_path / "mix" / "a" / f"{k}.png", k)
        _png(tmp_path / "mix" / "b" / f"{k}.png", 10 + k)
    _png(tmp_path / "mix" / "loose.png", 99)
    (tmp_path / "mix" / "notes.txt").write_text("not an image: no harm")
    line = refused("train", "--preset", "tiny", "--steps", "1", "--data", tmp_path / "mix", "--out", tmp_path / "r")
    assert "1 image file(s) lie directly in it" in line and "loose.png" in line, line
    (tmp_path / "mix" / "loose.png").unlink()
    farmer("train", "--preset", "tiny", "--steps", "1", "--data", tmp_path / "mix", "--out", tmp_path / "r")


@pytest.mark.parametrize("name, kind", [("grid.ico", "ICO"), ("grid.icns", "ICNS")])
def test_figure_formats_that_resize_the_picture_are_refused(name, kind, tiny_run: Path, tmp_path: Path):
    line = refused("sample", "--ckpt", tiny_run, "--n", "2", "--class", "1", "--out", tmp_path / name)
    assert f"{kind} files keep pictures only at fixed sizes" in line and "grid.png" in line, line
    assert not (tmp_path / name).exists()


def test_printed_paths_stay_on_one_line_and_suggested_commands_paste(tmp_path: Path):
    assert escape("tab\tand\nnewline \x1b[1m") == "tab\\tand\\nnewline \\x1b[1m"
    for path in ("runs/plain", "runs/my run", "it's", "runs/nl\nx", "a\\b\x85c"):
        word = shell_word(path)
        assert "\n" not in word
        echoed = subprocess.run(["bash", "-c", f"printf %s {word}"], capture_output=True, text=True).stdout
        assert echoed == path, (path, word, echoed)
    run = tmp_path / "my run"
    proc = farmer("train", "--preset", "tiny", "--steps", "4", "--stop-after", "1", "--out", run)
    assert f"continue: farmer train --out {shlex.quote(str(run))} --resume" in proc.stderr, proc.stderr


def test_inspect_channels_checks_the_recorded_split(tiny_run: Path, tmp_path: Path):
    run = tmp_path / "edited"
    shutil.copytree(tiny_run, run)
    payload = json.loads((run / "config.json").read_text())
    payload["config"]["data"]["test_fraction"] = 0.5
    (run / "config.json").write_text(json.dumps(payload))
    line = refused("inspect-channels", "--ckpt", run, "--out", tmp_path / "ic.png")
    assert "no longer splits as when the run trained" in line and "give an IMAGE" in line, line
    line = refused("inspect-channels", "--ckpt", tiny_run, "--levels", "0,0.5,0", "--out", tmp_path / "ic.png")
    assert "a value is named twice" in line, line


def test_an_unfinished_student_says_how_far_it_was_distilled(tiny_run: Path, tmp_path: Path):
    """A distillation stopped early (SIGTERM) leaves a student of fewer steps than asked for; sampling with it says
    so, and how to continue."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from farmer_cli.checkpoint import save_weights

    run = Path(shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns(".lock", "eval-*")))
    farmer("distill", "--ckpt", run, "--steps", "3")
    args = ("sample", "--ckpt", run, "--decoder", "student", "--n", "1", "--class", "1")
    assert "student (3 distillation steps)" in farmer(*args, "--out", tmp_path / "a.png").stderr
    path = run / "student.safetensors"
    with safe_open(str(path), "pt") as fh:
        metadata = {k: v for k, v in fh.metadata().items() if k not in ("step", "format_version")}
    save_weights(path, load_file(str(path)), 1, metadata)  # what a stop after step 1 of 3 leaves
    said = farmer(*args, "--out", tmp_path / "b.png").stderr
    assert "student (unfinished: distilled 1 of 3 steps; farmer distill --resume continues it)" in said, said
