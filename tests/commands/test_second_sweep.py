"""Cases of the second hostile sweep's re-run (GitHub issue 24): outputs that would mix with an earlier call's,
an edited data split, sampling settings beyond float32, empty, over-long and dangling output paths, flow depths and
step counts no machine could run. Each ends in one "error:" line and exit status 2, before any work.

Timing (2 cores): eight short commands on copies of the shared ``tiny_run``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cli_helpers import farmer
from farmer_cli.config.files import apply_overrides, load_preset
from farmer_cli.config.schema import ConfigError


def refused(*args: str) -> str:
    """Exit 2, no traceback, the last stderr line an "error:" line; returns it."""
    proc = farmer(*map(str, args), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:"), proc.stderr[-2000:]
    return last


def test_sample_never_mixes_its_images_with_an_earlier_call_s(tiny_run: Path, tmp_path: Path):
    out_dir = tmp_path / "each"
    farmer("sample", "--ckpt", str(tiny_run), "--class", "0", "--n", "3", "--out", str(tmp_path / "a.png"),
           "--out-dir", str(out_dir))
    before = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    line = refused("sample", "--ckpt", tiny_run, "--class", "0", "--n", "2", "--seed", "5", "--out",
                   tmp_path / "b.png", "--out-dir", out_dir)
    assert "already holds 2 of the 2 images this call would write" in line
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == before and not (tmp_path / "b.png").exists()


def test_sample_replaces_a_link_in_the_output_folder_instead_of_writing_through_it(tiny_run: Path, tmp_path: Path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / "g.png").symlink_to(victim)
    farmer("sample", "--ckpt", str(tiny_run), "--class", "0", "--n", "1", "--out", str(tmp_path / "g.png"))
    assert victim.read_text() == "keep me" and not (tmp_path / "g.png").is_symlink()


def test_evaluate_refuses_a_run_whose_recorded_split_no_longer_holds(tiny_run: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    payload = json.loads((run / "config.json").read_text())
    payload["config"]["data"]["test_fraction"] = 0.5
    (run / "config.json").write_text(json.dumps(payload))
    line = refused("evaluate", "--ckpt", run, "--metrics", "bpd")
    assert "its data no longer splits as when the run trained" in line and "train / " in line
    farmer("evaluate", "--ckpt", str(run), "--metrics", "bpd", "--limit", "4", "--data", "digits")  # named: allowed


def test_sampling_scales_beyond_any_use_are_refused():
    for key in ("var_scale", "temperature", "cfg"):
        with pytest.raises(ConfigError, match=rf"sampling.{key} must be <= 1,000"):
            apply_overrides(load_preset("tiny"), [f"sampling.{key}=1e39"])


def test_flow_depths_and_step_counts_no_machine_runs_are_refused():
    with pytest.raises(ConfigError, match=r"model.af_blocks=1024 x model.af_layers=1024 is 1,048,576 flow layers"):
        apply_overrides(load_preset("tiny"), ["model.af_blocks=1024", "model.af_layers=1024"])
    for key in ("train.steps", "distill.steps"):
        with pytest.raises(ConfigError, match=rf"{key} must be <= 2,147,483,647"):
            apply_overrides(load_preset("tiny"), [f"{key}=99999999999999999999"])


@pytest.mark.parametrize("case", ["empty", "too-long", "dangling"])
def test_output_paths_the_file_system_cannot_take_are_one_line(tiny_run: Path, tmp_path: Path, case: str):
    (tmp_path / "dangling").symlink_to(tmp_path / "nothing" / "here")
    out = {"empty": "", "too-long": str(tmp_path / ("a" * 300 + ".png")),
           "dangling": str(tmp_path / "dangling" / "x.png")}[case]
    line = refused("sample", "--ckpt", tiny_run, "--n", "1", "--out", out)
    assert {"empty": "give a file name", "too-long": "File name too long",
            "dangling": "is a symbolic link to nothing"}[case] in line


def test_odd_small_cases_are_one_line(tiny_run: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    payload = json.loads((run / "config.json").read_text())
    payload["class_names"][1] = payload["class_names"][0]
    (run / "config.json").write_text(json.dumps(payload))
    assert "more than once" in refused("sample", "--ckpt", run, "--class", payload["class_names"][0], "--n", "1")
    assert "names no metric" in refused("evaluate", "--ckpt", tiny_run, "--metrics", ",")
    assert "the preset name is empty" in refused("train", "--preset", "", "--steps", "1", "--out", tmp_path / "p")
    assert "pass --out DIR" in farmer("train", "--resume", cwd=tmp_path, check=False).stderr
