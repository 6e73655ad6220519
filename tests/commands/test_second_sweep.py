"""Cases of the second hostile sweep's re-run (GitHub issue 24): outputs that would mix with an earlier call's,
an edited data split, sampling settings beyond float32, empty, over-long and dangling output paths, flow depths and
step counts no machine could run. Each ends in one "error:" line and exit status 2, before any work.

Timing (2 cores): eight short commands on copies of the shared ``tiny_run``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cli_helpers import farmer, refused, resplit
from farmer_cli.config.files import apply_overrides, load_preset
from farmer_cli.config.schema import ConfigError


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
    run = resplit(shutil.copytree(tiny_run, tmp_path / "run"))
    line = refused("evaluate", "--ckpt", run, "--metrics", "bpd")
    assert "its data no longer splits as when the run trained" in line and "train / " in line
    line = refused("evaluate", "--ckpt", run, "--metrics", "bpd", "--data", "digits")  # its own data, named: the same
    assert "its data no longer splits as when the run trained" in line


def test_sampling_scales_beyond_any_use_are_refused(tiny_run: Path):
    for key in ("var_scale", "temperature", "cfg"):
        with pytest.raises(ConfigError, match=rf"sampling.{key} must be <= 1,000"):
            apply_overrides(load_preset("tiny"), [f"sampling.{key}=1e39"])
    line = refused("inspect-channels", "--ckpt", tiny_run, "--mode", "variance", "--factors", "0,1e39")
    assert "--factors must be between 0 and 1000" in line


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
    assert {"empty": "an empty value for --out", "too-long": "File name too long",
            "dangling": "is a symbolic link to nothing"}[case] in line


def test_odd_small_cases_are_one_line(tiny_run: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    payload = json.loads((run / "config.json").read_text())
    payload["class_names"][1] = payload["class_names"][0]
    (run / "config.json").write_text(json.dumps(payload))
    assert "more than once" in refused("sample", "--ckpt", run, "--class", payload["class_names"][0], "--n", "1")
    assert "names no metric" in refused("evaluate", "--ckpt", tiny_run, "--metrics", ",")
    with pytest.raises(ConfigError, match="the preset name is empty"):
        load_preset("")
    assert "pass --out DIR" in farmer("train", "--resume", cwd=tmp_path, check=False).stderr


def test_an_edited_folder_index_is_rebuilt_not_trusted(tmp_path: Path, monkeypatch):
    import numpy as np
    from PIL import Image

    from farmer_cli.data.folder_index import folder_index
    from farmer_cli.storage import cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for name in ("a", "b"):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for k in range(3):
            Image.fromarray(np.full((8, 8), 40 * k, dtype=np.uint8)).save(tmp_path / "imgs" / name / f"{k}.png")
    truth = folder_index(tmp_path / "imgs")
    (cached,) = cache_dir("folder-index").glob("*.json")
    for edit in (lambda i: i.update(labels=[1 - y for y in i["labels"]]),  # flipped labels
                 lambda i: i.update(paths=i["paths"][:3], labels=i["labels"][:3]),  # entries cut
                 lambda i: i.update(paths=[i["paths"][0]] * 6)):  # one file six times
        index = json.loads(cached.read_text())
        edit(index)
        cached.write_text(json.dumps(index))
        again = folder_index(tmp_path / "imgs")
        assert (again["paths"], again["labels"]) == (truth["paths"], truth["labels"])


def test_weights_and_config_that_disagree_on_the_step_are_refused(tiny_run: Path, tmp_path: Path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from farmer_cli.checkpoint import CheckpointError, load_model, save_weights

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    path = run / "model.safetensors"
    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata()
    save_weights(path, load_file(str(path)), 0, metadata | {"step": "999"})
    with pytest.raises(CheckpointError, match=r"model.safetensors says step 999 but config.json says step 30"):
        load_model(run)


def test_derived_heatmap_names_never_mix_with_an_earlier_call_s(tiny_run: Path, digit_png: Path, tmp_path: Path):
    for folder in ("ha", "hb"):
        (tmp_path / folder).mkdir()
        shutil.copy(digit_png, tmp_path / folder / "x.png")
    images = [str(tmp_path / "ha" / "x.png"), str(tmp_path / "hb" / "x.png")]
    farmer("score", *images, "--ckpt", str(tiny_run), "--heatmap", str(tmp_path / "hm" / "h.png"))
    before = {p.name: p.read_bytes() for p in (tmp_path / "hm").iterdir()}
    line = refused("score", *reversed(images), "--ckpt", tiny_run, "--heatmap", tmp_path / "hm" / "h.png")
    assert "2 of the 2 maps this call would write exist already" in line
    assert {p.name: p.read_bytes() for p in (tmp_path / "hm").iterdir()} == before


def test_an_empty_argument_is_refused_not_read_as_the_current_directory(tmp_path: Path):
    for args in (["train", "--preset", "tiny", "--steps", "1", "--out", ""], ["sample", "--out-dir="], ["score", ""]):
        proc = farmer(*args, cwd=tmp_path, check=False)
        assert proc.returncode == 2 and proc.stderr.strip().startswith("error: an empty value"), proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_links_under_farmer_s_checkpoint_names_are_removed_not_followed(tmp_path: Path):
    from farmer_cli.rundir import remove_distillation, snapshot

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "model.safetensors").write_text("weights")
    (run / "checkpoints" / "step-00000020.partial").symlink_to(outside)
    (run / "checkpoints" / "distill-step-00000010").symlink_to(outside)
    snapshot(run, ("model.safetensors",), 20, "step", keep=3)
    remove_distillation(run)
    assert (outside / "keep.txt").read_text() == "keep" and sorted(p.name for p in outside.iterdir()) == ["keep.txt"]
    assert (run / "checkpoints" / "step-00000020" / "model.safetensors").read_text() == "weights"
    assert not (run / "checkpoints" / "distill-step-00000010").is_symlink()


def test_third_sweep_cases(tiny_run: Path, digit_png: Path, tmp_path: Path):
    import numpy as np

    from farmer_cli.config.schema import DataConfig
    from farmer_cli.data.dataset import load_data
    from farmer_cli.data.sources import DataError
    from farmer_cli.eval.ref_stats import StatsError, load_ref_stats

    # every class of the model counts toward the per-call image cap
    assert "10000 x 10 class(es) is more than 10,000 images" in refused("sample", "--ckpt", tiny_run, "--n", "10000")
    # a class folder linked to another gives no image two labels
    for name in ("a", "b"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for k in range(3):
            shutil.copy(digit_png, tmp_path / "data" / name / f"{k}.png")
    (tmp_path / "data" / "c").symlink_to(tmp_path / "data" / "a")
    with pytest.raises(DataError, match="class folders a and c are the same folder"):
        load_data(DataConfig(source=str(tmp_path / "data")), 1, 8)
    # evaluate on data of other classes would compare other classes
    (tmp_path / "data" / "c").unlink()
    line = refused("evaluate", "--ckpt", tiny_run, "--data", tmp_path / "data", "--metrics", "bpd")
    assert "its classes (a, b) are not the model's" in line
    # a reference sigma that is no covariance gives no FID
    np.savez(tmp_path / "bad.npz", mu=np.zeros(4), sigma=-np.eye(4))
    with pytest.raises(StatsError, match="sigma is not a covariance matrix"):
        load_ref_stats(tmp_path / "bad.npz")


def test_a_config_json_edited_since_the_last_checkpoint_is_not_resumed(tiny_run: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    payload = json.loads((run / "config.json").read_text())
    payload["config"]["train"]["lr"] = 0.5  # around the --resume guard, which compares with config.json
    (run / "config.json").write_text(json.dumps(payload))
    line = refused("train", "--out", run, "--resume")
    assert "config.json and model.safetensors disagree" in line
