"""Cases of the fourth hostile sweep (GitHub issue 24), each with the behaviour it now has: nothing outside a run
is written through a link, a training state belongs to its weights, images are read as they are shown, non-finite
weights and outputs are named, output figures never replace an input, and options that would do nothing are
refused. Refusals are one "error:" line and exit status 2, before any work."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import farmer, refused, resplit
from farmer_cli.checkpoint import CheckpointError, load_training_state
from farmer_cli.commands import UsageError, resolve_class
from farmer_cli.data.images import image_files, load_image
from farmer_cli.data.sources import DataError
from farmer_cli.rundir import check_own_paths


@pytest.fixture
def run(tiny_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))


# ----- nothing outside the run is written -----
def test_a_folder_index_marker_planted_as_a_link_is_not_written_through(tmp_path: Path, monkeypatch):
    from farmer_cli.data import folder_index as fi

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = tmp_path / "data"
    for c in "ab":
        (root / c).mkdir(parents=True)
        Image.new("L", (8, 8), 9).save(root / c / "0.png")
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    marker = fi.storage.cache_dir("folder-index", f"{fi._key(root, fi.class_folders(root))}.building")
    marker.parent.mkdir(parents=True)
    marker.symlink_to(victim)
    assert fi.folder_index(root)["paths"] == ["a/0.png", "b/0.png"]
    assert victim.read_text() == "keep me" and not marker.exists() and not marker.is_symlink()


@pytest.mark.parametrize("name", ["metrics.jsonl", "distill_metrics.jsonl", "model.safetensors"])
def test_a_run_file_that_is_a_link_is_refused_even_a_dangling_one(name: str, run: Path, tmp_path: Path):
    target = tmp_path / "outside" / "new.jsonl"  # does not exist: a dangling link
    (run / name).unlink(missing_ok=True)
    (run / name).symlink_to(target)
    with pytest.raises(CheckpointError, match=f"{name} is a symbolic link .*: farmer writes it, so it must be a file inside the run"):
        check_own_paths(run)
    if name == "metrics.jsonl":
        line = refused("train", "--out", run, "--resume")
        assert "symbolic link" in line
    elif name == "distill_metrics.jsonl":
        assert "symbolic link" in refused("distill", "--ckpt", run, "--steps", "2")
    assert not target.exists() and not target.parent.exists()


def test_runs_are_not_made_in_the_root_home_or_another_runs_checkpoints(run: Path):
    for place, said in ((Path("/"), "the root folder"), (Path.home(), "your home folder"),
                        (run / "checkpoints", "a folder of the run"),
                        (run / "checkpoints" / "step-00000020", "a folder of the run")):
        with pytest.raises(CheckpointError, match=said):
            check_own_paths(place)
    check_own_paths(run / "elsewhere")  # a new folder inside a run's folder (not its checkpoints) is its own


# ----- a training state belongs to its weights -----
def _edit_state(run: Path, change) -> None:
    state = torch.load(run / "training_state.pt", weights_only=True)
    change(state)
    torch.save(state, run / "training_state.pt")


def test_the_training_state_of_another_run_of_the_same_config_is_refused(run: Path):
    def other_run(state):  # the same names and shapes, other values: another seed's run
        state["ema"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in state["ema"].items()}
    _edit_state(run, other_run)
    with pytest.raises(CheckpointError, match="ema weights are not those of model.safetensors at the same step"):
        load_training_state(run, "training_state.pt", ["ema", "model"])


@pytest.mark.parametrize("step, outcome", [(10**12, "not a farmer training state"), (2**63, "not a farmer training state"),
                                           (3, "older than model.safetensors"), (40, "cut short")])
def test_a_training_state_step_is_checked_against_its_weights(step: int, outcome: str, run: Path, caplog):
    _edit_state(run, lambda state: state.update(step=step))
    if outcome == "cut short":  # a later step: a save cut between the two files, resumed with a warning
        assert load_training_state(run, "training_state.pt", ["ema", "model"])["step"] == 40
        assert "the last save was cut short" in caplog.text
    else:
        with pytest.raises(CheckpointError, match=outcome):
            load_training_state(run, "training_state.pt", ["ema", "model"])


# ----- images as they are shown -----
def test_float_and_transparent_images_are_scaled_and_composited(tmp_path: Path):
    square = np.zeros((8, 8), np.float32)
    square[2:6, 2:6] = 1.0
    Image.fromarray(square, "F").save(tmp_path / "unit.tiff")
    assert load_image(tmp_path / "unit.tiff", 1, 8)[0][0, 3, 3] == 255  # [0, 1] floats scaled, not clipped to 0/1
    Image.fromarray(square * 200, "F").save(tmp_path / "bytes.tiff")
    assert load_image(tmp_path / "bytes.tiff", 1, 8)[0][0, 3, 3] == 200  # 0..255 floats read as they are
    Image.fromarray(square * -3, "F").save(tmp_path / "bad.tiff")
    with pytest.raises(DataError, match="floating-point image with values from -3"):
        load_image(tmp_path / "bad.tiff", 1, 8)
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[2:6, 2:6, 3] = 255  # a white square drawn in the alpha channel only
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    u = load_image(tmp_path / "alpha.png", 1, 8)[0][0]
    assert u[3, 3] == 255 and u[0, 0] == 0  # composited onto black, not flattened to all white


def test_images_over_pils_pixel_limit_are_refused_before_decoding(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL only warns between the limit and twice it
    Image.new("L", (40, 40)).save(tmp_path / "big.png")  # 1,600 pixels
    with pytest.raises(DataError, match="big.png: not a readable image .*decompression bomb"):
        load_image(tmp_path / "big.png", 1, 8)


def test_hidden_folders_hold_no_data_and_a_folder_time_set_back_does_not_hide_new_files(tmp_path: Path,
                                                                                        monkeypatch):
    from farmer_cli.data.folder_index import folder_index

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = tmp_path / "data"
    (root / "a" / ".ipynb_checkpoints").mkdir(parents=True)
    for name in ("0.png", ".ipynb_checkpoints/0-checkpoint.png"):
        Image.new("L", (8, 8), 9).save(root / "a" / name)
    assert folder_index(root)["paths"] == ["a/0.png"] and image_files([root]) == [root / "a" / "0.png"]
    times = os.stat(root / "a")
    Image.new("L", (8, 8), 9).save(root / "a" / "1.png")
    os.utime(root / "a", ns=(times.st_atime_ns, times.st_mtime_ns))  # touch -r: the folder's time set back
    assert folder_index(root)["paths"] == ["a/0.png", "a/1.png"]


def test_the_test_data_must_not_be_the_training_data(tmp_path: Path):
    from farmer_cli.config.schema import DataConfig
    from farmer_cli.data.dataset import load_data

    for c in "ab":
        (tmp_path / "d" / c).mkdir(parents=True)
        Image.new("L", (8, 8), 9).save(tmp_path / "d" / c / "0.png")
    (tmp_path / "link").symlink_to(tmp_path / "d")
    with pytest.raises(DataError, match="is the training data"):
        load_data(DataConfig(source=str(tmp_path / "d"), test_source=str(tmp_path / "link")), 1, 8)


# ----- non-finite weights and outputs -----
def test_non_finite_weights_are_refused_and_diverged_ones_named_when_sampling(run: Path, tmp_path: Path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = run / "model.safetensors"
    with safe_open(str(path), "pt") as fh:
        metadata = fh.metadata()
    tensors = load_file(str(path))
    broken = dict(tensors)
    name = sorted(broken)[0]
    broken[name] = broken[name].clone().fill_(float("nan"))
    save_file(broken, str(path), metadata=metadata)
    assert "holds NaN or infinite values" in refused("sample", "--ckpt", run, "--class", "1", "--n", "2", "--out",
                                                     tmp_path / "s.png")
    huge = {k: v * 1e30 if v.is_floating_point() else v for k, v in tensors.items()}  # finite, but every output is not
    save_file(huge, str(path), metadata=metadata)
    assert "the sampled images are not finite" in refused("sample", "--ckpt", run, "--class", "1", "--n", "2",
                                                          "--out", tmp_path / "s.png")
    assert not (tmp_path / "s.png").exists()


# ----- outputs never replace an input; options that would do nothing -----
def test_a_figure_is_never_written_over_or_into_its_input(tiny_run: Path, digit_png: Path, tmp_path: Path):
    image = Path(shutil.copy(digit_png, tmp_path / "in.png"))
    before = image.read_bytes()
    assert "is the input" in refused("score", "--ckpt", tiny_run, image, "--heatmap", image)
    assert "is the input" in refused("inspect-channels", "--ckpt", tiny_run, image, "--out", image)
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(digit_png, folder / "0.png")
    assert "is inside the input" in refused("ood", "--ckpt", tiny_run, "--in", folder, "--figure", folder / "h.png")
    assert image.read_bytes() == before and sorted(os.listdir(folder)) == ["0.png"]


@pytest.mark.parametrize("args, said", [
    (["sample", "--class", "1", "--cfg", "2", "--temperature", "5"], "--temperature has no effect (only unguided sampling"),
    (["sample", "--class", "1", "--cfg", "0", "--candidates", "7"], "--candidates has no effect (only guided sampling reads it, and sampling.cfg is 0)"),
    (["inspect-channels", "--factors", "0,1"], "--factors has no effect in --mode interpolate (for --mode variance)"),
    (["inspect-channels", "--mode", "variance", "--levels", "0,1"], "--levels has no effect in --mode variance (for --mode interpolate)"),
    (["ood", "--in", "IN", "--background", "RUN"], "--background is used by the ratio score only"),
    (["ood", "--in", "IN", "--out", "IN"], "share images (one is, or holds, the other"),
    (["inspect-channels", "--blocks", "1,1"], "a block is named twice"),
])
def test_options_that_would_do_nothing_are_refused(args, said: str, tiny_run: Path, digit_png: Path):
    args = [str(digit_png) if a == "IN" else str(tiny_run) if a == "RUN" else a for a in args]
    assert said in refused(*args, "--ckpt", tiny_run)


def test_dry_run_options_without_dry_run_are_refused(tmp_path: Path):
    said = refused("train", "--preset", "tiny", "--steps", "2", "--gpu-memory", "10", "--out", tmp_path / "r")
    assert "--gpu-memory has no effect without --dry-run" in said
    assert not (tmp_path / "r").exists()


def test_class_names_that_differ_only_in_case_or_normalisation():
    with pytest.raises(UsageError, match="could be any of 'Cat', 'cat'"):
        resolve_class("CAT", ["Cat", "cat", "dog"], 3)
    assert resolve_class("cat", ["Cat", "cat", "dog"], 3) == 1  # the exact name
    assert resolve_class("DOG", ["Cat", "cat", "dog"], 3) == 2
    assert resolve_class("do\u0308g", ["d\u00f6g"], 1) == 0  # typed decomposed (NFD), stored composed (NFC)


def test_settings_that_build_nothing_are_refused():
    from farmer_cli.config.files import apply_overrides, load_preset
    from farmer_cli.config.schema import ConfigError

    for override, said in (("model.mlp_ratio=1e-9", "needs a hidden unit"), ("data.num_workers=100000", "<= 256"),
                           ("train.eval_batches=0", "train.eval_batches must be >= 1"),
                           ("train.noise_start=1e300", "train.noise_start must be <= 2"),
                           ("distill.latent_noise_max=1e9", "distill.latent_noise_max must be <= 2")):
        with pytest.raises(ConfigError, match=said):
            apply_overrides(load_preset("tiny"), [override])
    line = json.dumps(refused("train", "--preset", "tiny", "--set", "model.mlp_ratio=1e-9", "--dry-run"))
    assert "mlp_ratio" in line


# ----- the sweep's re-run on these fixes -----
def test_a_run_inside_another_runs_folders_is_refused_and_overwrite_keeps_a_users_files(run: Path):
    from farmer_cli.rundir import claim

    for folder in ("tensorboard", "samples"):
        with pytest.raises(CheckpointError, match=f"is in .*{folder}, a folder of the run"):
            check_own_paths(run / folder / "inner")
    events = run / "tensorboard" / "run"
    events.mkdir(parents=True)
    (events / "events.out.tfevents.1.host").write_text("old run")
    (run / "tensorboard" / "NOTES.txt").write_text("mine")
    claim(run, resume=False, overwrite=True).release()
    assert not events.exists() and (run / "tensorboard" / "NOTES.txt").read_text() == "mine"


def test_a_state_saved_by_another_run_or_past_the_runs_end_is_refused(run: Path):
    from farmer_cli.config.files import from_dict
    from farmer_cli.rundir import settings_digest

    identity = settings_digest(from_dict(json.loads((run / "config.json").read_text())["config"]))
    assert load_training_state(run, "training_state.pt", ["ema", "model"], identity, 30)["identity"] == identity
    with pytest.raises(CheckpointError, match="beyond the run's 20 steps"):
        load_training_state(run, "training_state.pt", ["ema", "model"], identity, 20)
    _edit_state(run, lambda state: state.update(identity="another run's settings", step=40))
    with pytest.raises(CheckpointError, match="saved by a run with other settings"):
        load_training_state(run, "training_state.pt", ["ema", "model"], identity, 60)


def test_heatmap_names_stay_unique_when_a_suffix_meets_another_images_name(tmp_path: Path):
    from farmer_cli.commands.score import _heatmap_paths

    files = [tmp_path / name for name in ("in/a/0.png", "in/a_0_0.png", "in/b/0.png", "in/a_0.png")]
    for f in files:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("x")
    paths = _heatmap_paths(files, tmp_path / "h.png")
    assert len(set(paths)) == len(files)


def test_a_run_inside_its_data_and_an_accumulation_past_the_data_are_refused(tmp_path: Path):
    data = tmp_path / "data"
    for c in "ab":
        (data / c).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (8, 8), 40 * i).save(data / c / f"{i}.png")
    assert "is inside --data" in refused("train", "--preset", "tiny", "--data", data, "--out", data / "a" / "run")
    assert "more than the" in refused("train", "--preset", "tiny", "--steps", "2", "--grad-accum", "1000000000",
                                      "--out", tmp_path / "r")
    assert not (data / "a" / "run").exists() and not (tmp_path / "r").exists()


def test_distill_refuses_training_settings_it_does_not_read_and_resumes_on_its_own(run: Path):
    line = refused("distill", "--ckpt", run, "--steps", "2", "--set", "train.lr=0.5", "--set", "train.log_every=1")
    assert "--set train.lr: distillation does not read it" in line
    assert "--data would change them" in refused("distill", "--ckpt", run, "--resume", "--data", "mnist5k")


def test_dry_run_refuses_what_it_does_not_plan_with():
    said = refused("train", "--preset", "tiny", "--dry-run", "--steps", "3", "--seed", "7")
    assert "--steps, --seed have no effect with --dry-run" in said
    assert "--gpus between 1 and 1,000,000" in refused("train", "--preset", "tiny", "--dry-run", "--gpus", str(10**21))


def test_a_learning_rate_above_one_and_odd_run_files_are_named(run: Path):
    from farmer_cli.checkpoint import check_metrics, load_model
    from farmer_cli.config.files import apply_overrides, load_preset
    from farmer_cli.config.schema import ConfigError

    with pytest.raises(ConfigError, match="train.lr must be <= 1"):
        apply_overrides(load_preset("tiny"), ["train.lr=1e300"])
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(run / "config.json")
    with pytest.raises(CheckpointError, match="metrics.jsonl is a symbolic link"):
        check_metrics(run, "metrics.jsonl")
    (run / "model.safetensors").unlink()
    (run / "model.safetensors").mkdir()
    with pytest.raises(CheckpointError, match="is not a regular file"):
        load_model(run)


def test_an_edited_label_map_is_refused(run: Path, tmp_path: Path):
    payload = json.loads((run / "config.json").read_text())
    names = payload["class_names"]
    names[3], names[4] = names[4], names[3]  # --class 3 would draw class 4
    (run / "config.json").write_text(json.dumps(payload))
    said = "class_names (the label map) are not those model.safetensors was trained with"
    assert said in refused("sample", "--ckpt", run, "--class", "3", "--n", "1", "--out", tmp_path / "s.png")
    assert said in refused("train", "--out", run, "--resume")


# ----- the sweep's second re-run -----
def test_a_users_files_in_a_step_checkpoint_survive_overwrite_and_pruning(run: Path, caplog):
    from farmer_cli.rundir import claim, history, remove

    step = run / "checkpoints" / "step-00000030"
    (step / "NOTES.txt").write_text("mine")
    remove(step)  # what pruning and --overwrite do with a step checkpoint
    assert sorted(os.listdir(step)) == ["NOTES.txt"] and "the folder is kept" in caplog.text
    assert step not in history(run, "step")  # no longer a checkpoint: nothing of farmer's left in it
    claim(run, resume=False, overwrite=True).release()
    assert (step / "NOTES.txt").read_text() == "mine"


def test_ambiguous_names_a_relative_data_folder_and_an_edited_model_setting(run: Path, digit_png: Path,
                                                                             tmp_path: Path, monkeypatch):
    from farmer_cli.config.files import load_preset

    here = tmp_path / "here"
    for c in "ab":
        (here / "digits" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (8, 8), 40 * i).save(here / "digits" / c / f"{i}.png")
    proc = farmer("train", "--preset", "tiny", "--data", "digits", "--out", str(tmp_path / "r"), cwd=here,
                  check=False)
    assert proc.returncode == 2 and "both a built-in data set and a folder here" in proc.stderr, proc.stderr
    farmer("train", "--preset", "tiny", "--steps", "1", "--data", "./digits", "--out", str(tmp_path / "r"), cwd=here)
    recorded = json.loads((tmp_path / "r" / "config.json").read_text())["config"]["data"]["source"]
    assert recorded == str((here / "digits").resolve())  # resumed from anywhere, it reads the same folder
    (here / "tiny").write_text('[train]\nsteps = 7\n')
    monkeypatch.chdir(here)
    assert load_preset("tiny").train.steps != 7  # the built-in preset, not a file that happens to share its name
    payload = json.loads((run / "config.json").read_text())
    payload["config"]["model"]["gelu"] = "tanh"  # another model around the same weights
    (run / "config.json").write_text(json.dumps(payload))
    assert "model settings (model.*, train.noise_*) are not those" in refused("score", "--ckpt", run, digit_png)


def test_outputs_pil_cannot_write_and_a_class_named_random(tiny_run: Path, tmp_path: Path):
    from farmer_cli.commands.sample import _labels

    for name in ("grid.xbm", "grid.blp"):
        assert "PIL cannot write" in refused("sample", "--ckpt", tiny_run, "--class", "1", "--n", "1", "--out",
                                             tmp_path / name)
    assert _labels(["random"], 2, ["other", "random"], seed=0) == [1]


def test_reference_features_must_be_finite_and_a_loader_setting_does_not_bypass_the_split_check(run: Path,
                                                                                                tmp_path: Path):
    from farmer_cli.eval.ref_stats import StatsError, load_ref_stats

    act = np.random.RandomState(0).rand(10, 4)
    act[0, 0] = np.nan
    np.savez(tmp_path / "ref.npz", mu=np.zeros(4), sigma=np.eye(4), act=act)
    with pytest.raises(StatsError, match="act .* holds NaN"):
        load_ref_stats(tmp_path / "ref.npz")
    np.savez(tmp_path / "two.npz", mu=np.zeros(4), sigma=np.eye(4), act=np.zeros((2, 4)))
    assert "needs at least 4" in refused("evaluate", "--ckpt", run, "--metrics", "pr", "-n", "20", "--ref-stats",
                                         tmp_path / "two.npz")
    resplit(run)  # the recorded split no longer holds
    line = refused("evaluate", "--ckpt", run, "--metrics", "bpd")  # (a loader setting is refused outright now)
    assert "its data no longer splits as when the run trained" in line


def test_dataset_columns_that_are_not_images_or_labels_are_named(tmp_path: Path):
    import datasets

    from farmer_cli.config.schema import DataConfig
    from farmer_cli.data.dataset import load_data

    images = [Image.new("L", (8, 8), 40 * i) for i in range(4)]
    features = datasets.Features({"img": datasets.Image(), "score": datasets.Value("float32"),
                                  "tag": datasets.Value("int64")})
    datasets.Dataset.from_dict({"img": images, "score": [0.5, 1.0, float("nan"), 2.0], "tag": [0, 1, None, 1]},
                               features=features).save_to_disk(tmp_path / "ds")
    for column, said in ((dict(image_column="score"), "holds Value"), (dict(label_column="score"), "labels are a"),
                         (dict(label_column="tag"), "has missing values")):
        with pytest.raises(DataError, match=said):
            load_data(DataConfig(source=str(tmp_path / "ds"), **column), 1, 8)


def test_the_newest_run_is_the_one_whose_weights_were_written_last(tmp_path: Path, monkeypatch):
    from farmer_cli.rundir import find_checkpoint

    monkeypatch.chdir(tmp_path)
    for name, when in (("a", 100), ("b", 200)):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "model.safetensors").write_text("weights")
        os.utime(tmp_path / "runs" / name / "model.safetensors", (when, when))
    (tmp_path / "runs" / "a" / "eval-30.json").write_text("{}")  # the folder of a changed after b's weights
    assert find_checkpoint(None) == Path("runs/b")


# ----- the fourth sweep's re-run -----
def test_class_folders_swapped_under_the_same_file_names_are_noticed(tmp_path: Path, monkeypatch):
    from farmer_cli.config.schema import DataConfig
    from farmer_cli.data.dataset import layout_change, load_data

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = tmp_path / "data"
    for c, size in (("cat", 8), ("dog", 12)):
        (root / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray((np.random.RandomState(i).rand(size, size) * 255).astype(np.uint8)).save(root / c / f"{i}.png")
    cfg = DataConfig(source=str(root))
    before = load_data(cfg, 1, 8).layout
    (root / "cat").rename(root / "x")
    (root / "dog").rename(root / "cat")
    (root / "x").rename(root / "dog")
    assert "other file sizes or contents" in layout_change(before, load_data(cfg, 1, 8).layout)
    older = {k: v for k, v in before.items() if k not in ("sizes", "contents")}  # earlier releases recorded neither
    assert layout_change(older, load_data(cfg, 1, 8).layout) == ""
    with pytest.raises(DataError, match="leaving none to train on"):
        load_data(DataConfig(source=str(root), test_fraction=0.9999), 1, 8)


def test_a_folder_given_as_an_image_and_damaged_weights_point_at_what_to_do(run: Path, tmp_path: Path):
    with pytest.raises(DataError, match="is a folder; give one image file"):
        load_image(tmp_path, 1, 8)
    (run / "model.safetensors").write_bytes((run / "model.safetensors").read_bytes()[:100])
    assert "checkpoints/step-*/" in refused("train", "--out", run, "--resume")


# ----- the fifth sweep -----
def test_default_outputs_never_replace_a_file_and_ood_sides_may_not_nest(tiny_run: Path, digit_png: Path,
                                                                         tmp_path: Path):
    (tmp_path / "samples.png").write_text("my notes")
    farmer("sample", "--ckpt", str(tiny_run), "--class", "1", "--n", "1", cwd=tmp_path)
    assert (tmp_path / "samples.png").read_text() == "my notes" and (tmp_path / "samples-2.png").exists()
    inner = tmp_path / "in" / "sub"
    inner.mkdir(parents=True)
    shutil.copy(digit_png, tmp_path / "in" / "a.png")
    shutil.copy(digit_png, inner / "b.png")
    assert "share images" in refused("ood", "--ckpt", tiny_run, "--in", tmp_path / "in", "--out", inner)


def test_a_step_checkpoint_name_holding_a_users_folder_is_skipped_not_fatal(tmp_path: Path, caplog):
    from farmer_cli.rundir import snapshot

    run = tmp_path / "run"
    (run / "checkpoints" / "step-00000030").mkdir(parents=True)
    (run / "checkpoints" / "step-00000030" / "notes.txt").write_text("mine")
    (run / "model.safetensors").write_text("weights")
    snapshot(run, ("model.safetensors",), 30, "step", 3)
    assert sorted(os.listdir(run / "checkpoints")) == ["step-00000030"] and "no step checkpoint is kept" in caplog.text
    assert sorted(os.listdir(run / "checkpoints" / "step-00000030")) == ["notes.txt"]


def test_evaluate_data_replaces_a_recorded_test_set(tmp_path: Path):
    def folder(name: str, per_class: int) -> Path:
        for c in "ab":
            (tmp_path / name / c).mkdir(parents=True)
            for i in range(per_class):
                shade = 20 * i + (c == "b") * 100 + {"train": 0, "test": 7, "other": 3}[name]  # three sets' images
                Image.new("L", (8, 8), shade).save(tmp_path / name / c / f"{i}.png")
        return tmp_path / name
    train, test, other = folder("train", 6), folder("test", 2), folder("other", 10)
    farmer("train", "--preset", "tiny", "--steps", "2", "--data", str(train), "--test-data", str(test), "--out",
           str(tmp_path / "run"))
    result = json.loads(farmer("evaluate", "--ckpt", str(tmp_path / "run"), "--metrics", "bpd", "--data", str(other),
                               "--json").stdout)
    assert result["metrics"]["bpd_conditional"]["n"] == 2  # the held-out tenth of --data's 20 images, not test/'s 4


def test_classify_on_a_one_class_model_is_refused(tmp_path: Path):
    for i in range(6):
        (tmp_path / "data" / "only").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (8, 8), dtype=np.uint8)).save(
            tmp_path / "data" / "only" / f"{i}.png")
    farmer("train", "--preset", "tiny", "--data", str(tmp_path / "data"), "--steps", "1", "--out", str(tmp_path / "r"))
    said = refused("evaluate", "--ckpt", tmp_path / "r", "--metrics", "classify")
    assert "models one class, so classify" in said
