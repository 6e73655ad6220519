"""Cases of the sixth and seventh hostile sweeps (GitHub issue 24): a test split is never made of images the run
trained on (re-split, named again, linked class folders, a copy), data changed in place or swapped between classes
is noticed, ood's training statistics come from the images the model learned, and nothing is written where the
run's images really are. Refusals are one "error:" line and exit status 2, before any work. (The run lock's cases are in
tests/test_rundir.py.)"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_helpers import farmer, refused
from farmer_cli.config.schema import DataConfig
from farmer_cli.data.dataset import layout_change, load_data, relation_to_training


def _images(root: Path, classes=("a", "b"), n: int = 10, size: int = 8, seed: int = 0) -> Path:
    """``n`` random grey ``size``² PNGs per class; every file of one size in bytes (uncompressed-like noise)."""
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(root / c / f"img{i:03d}.png")
    return root


@pytest.fixture
def folder_run(tmp_path: Path, monkeypatch) -> Path:
    """A tiny run trained on a folder of two classes (``tmp_path/data``), with its own cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _images(tmp_path / "data")
    farmer("train", "--preset", "tiny", "--data", str(tmp_path / "data"), "--steps", "2", "--out", str(tmp_path / "r"))
    return tmp_path / "r"


def test_a_test_split_of_training_images_is_refused():
    trained = DataConfig(source="digits")
    assert relation_to_training(trained, DataConfig(source="digits")) == "own"
    assert relation_to_training(trained, DataConfig(source="digits", split_seed=7)) == "resplit"
    assert relation_to_training(trained, DataConfig(source="digits", test_fraction=0.5)) == "resplit"
    assert relation_to_training(trained, DataConfig(source="mnist5k")) == "other"
    assert relation_to_training(trained, DataConfig(source="mnist5k", test_source="digits")) == "training"
    official = DataConfig(source="digits", test_source="mnist5k")  # trained on all of digits
    assert relation_to_training(official, DataConfig(source="digits")) == "training"
    assert relation_to_training(official, DataConfig(source="digits", test_source="mnist5k")) == "own"
    assert relation_to_training(official, DataConfig(source="mnist5k")) == "other"


def test_evaluate_refuses_a_resplit_or_the_same_folder_changed(folder_run: Path, tmp_path: Path):
    said = refused("evaluate", "--ckpt", folder_run, "--metrics", "bpd", "--set", "data.split_seed=7")
    assert "split the training data" in said and "seed 0" in said
    assert "split the training data" in refused("evaluate", "--ckpt", folder_run, "--metrics", "bpd",
                                                "--set", "data.test_fraction=0.5")
    data = tmp_path / "data"
    (data / "a" / "new.png").write_bytes((data / "a" / "img000.png").read_bytes())
    for given in ([], ["--data", data], ["--data", f"{data}/"]):  # naming the run's own folder checks it the same
        assert "no longer splits as when the run trained" in refused("evaluate", "--ckpt", folder_run, "--metrics",
                                                                     "bpd", *given)


def test_images_replaced_in_place_are_noticed_through_a_cached_index(folder_run: Path, tmp_path: Path):
    data = tmp_path / "data"
    times = {c: os.stat(data / c).st_mtime_ns for c in "ab"}
    for path in sorted(data.glob("*/*.png"))[1:]:  # every image but the first: white, and of another size
        Image.fromarray(np.full((8, 8), 255, dtype=np.uint8)).save(path)
    assert {c: os.stat(data / c).st_mtime_ns for c in "ab"} == times  # the folders look unchanged
    assert "other file sizes" in refused("evaluate", "--ckpt", folder_run, "--metrics", "bpd")
    assert "changed since the run started" in refused("train", "--out", folder_run, "--resume")


def test_class_folders_of_equal_sized_files_swapped_are_noticed(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = _images(tmp_path / "data")
    assert len({p.stat().st_size for p in root.glob("*/*.png")}) == 1  # names, counts and sizes cannot tell
    before = load_data(DataConfig(source=str(root)), 1, 8).layout
    (root / "a").rename(root / "x")
    (root / "b").rename(root / "a")
    (root / "x").rename(root / "b")
    assert "contents" in layout_change(before, load_data(DataConfig(source=str(root)), 1, 8).layout)


def test_a_renamed_file_under_a_restored_folder_time_rebuilds_the_index(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = _images(tmp_path / "data")
    load_data(DataConfig(source=str(root)), 1, 8)
    stamp = os.stat(root / "a")
    (root / "a" / "img000.png").rename(root / "a" / "zzz.png")
    os.utime(root / "a", ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    bundle = load_data(DataConfig(source=str(root)), 1, 8)
    names = {Path(p).relative_to(root).as_posix() for p in bundle.train.source.paths}
    assert "a/zzz.png" in names and "a/img000.png" not in names


def test_ood_typicality_refuses_training_data_that_changed(folder_run: Path, tmp_path: Path):
    inside = _images(tmp_path / "in", classes=("x",), n=3)
    for path in (tmp_path / "data" / "b").glob("*.png"):
        path.unlink()
    said = refused("ood", "--ckpt", folder_run, "--in", inside, "--score", "typicality", "--figure",
                   tmp_path / "f.png")
    assert "typicality statistics would come from other images" in said and not (tmp_path / "f.png").exists()


def test_evaluate_on_the_folder_a_run_trained_on_whole_is_refused(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    train, test = _images(tmp_path / "train"), _images(tmp_path / "test", n=4, seed=1)
    farmer("train", "--preset", "tiny", "--data", str(train), "--test-data", str(test), "--steps", "1", "--out",
           str(tmp_path / "r"))
    said = refused("evaluate", "--ckpt", tmp_path / "r", "--metrics", "bpd", "--data", train)
    assert "trained on all of" in said and "leave --data out" in said


@pytest.mark.parametrize("args, said", [
    (["evaluate", "--metrics", "bpd", "--cfg", "3"], "--cfg has no effect with --metrics bpd (only fid, pr and"),
    (["evaluate", "--metrics", "bpd", "--decoder", "student", "-n", "5"], "--n-samples, --decoder have no effect"),
    (["evaluate", "--metrics", "bpd", "--set", "sampling.t_pi=2"], "--set sampling.t_pi has no effect"),
    (["evaluate", "--metrics", "bpd", "--max-classes", "3"], "--max-classes has no effect with --metrics bpd"),
    (["evaluate", "--metrics", "classify", "--bpd-draws", "3"], "--bpd-draws has no effect"),
    (["evaluate", "--metrics", "sample-acc", "--limit", "3"], "--limit has no effect"),
    (["evaluate", "--metrics", "sample-acc", "--set", "sampling.jacobi_tol=0.5"], "only the jacobi decoder reads it"),
    (["sample", "--decoder", "student", "--set", "sampling.jacobi_tol=0.5"], "--set sampling.jacobi_tol has no effect"),
    (["sample", "--decoder", "sequential", "--set", "sampling.jacobi_max_iter=3"], "only the jacobi decoder reads it"),
    (["sample", "--cfg", "2", "--guidance", "simple", "--set", "sampling.t_resample=3"],
     "only resampling guidance reads it, and sampling.guidance is simple"),
    (["sample", "--cfg", "0", "--set", "sampling.t_pi=3"], "only guided sampling reads it, and sampling.cfg is 0"),
])
def test_options_and_settings_nothing_reads_are_refused(args, said: str, tiny_run: Path, tmp_path: Path):
    assert said in refused(*args, "--ckpt", tiny_run, *(["--out", tmp_path / "s.png"] if args[0] == "sample" else []))
    assert not (tmp_path / "s.png").exists()


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_a_fifo_under_a_run_files_name_is_refused_not_waited_on(name: str, tiny_run: Path, digit_png: Path,
                                                                tmp_path: Path):
    import shutil

    run = Path(shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns(".lock")))
    (run / name).unlink()
    os.mkfifo(run / name)
    assert "is not a regular file" in refused("score", "--ckpt", run, digit_png)


def test_outputs_inside_the_runs_data_are_refused(folder_run: Path, tmp_path: Path):
    data = tmp_path / "data"
    image = data / "b" / "img000.png"
    for args in (["sample", "--class", "a", "--n", "1", "--out", data / "a" / "grid.png"],
                 ["sample", "--class", "a", "--n", "1", "--out", tmp_path / "s.png", "--out-dir", data / "a"],
                 ["score", image, "--heatmap", data / "b" / "heat.png"],
                 ["inspect-channels", "--out", data / "insp.png"],
                 ["ood", "--in", image, "--figure", data / "a" / "ood.png"]):
        assert "where the run's images" in refused(*args, "--ckpt", folder_run)
    assert sorted(p.name for p in data.rglob("*")) == sorted(["a", "b", *[f"img{i:03d}.png" for i in range(10)] * 2])


def test_a_grid_larger_than_pil_opens_is_refused_before_sampling(tiny_run: Path, tmp_path: Path):
    import torch

    from farmer_cli.viz import class_blocks, class_grid_pixels, grid

    for classes, n, size, scale in [(1, 1, 8, 8), (3, 5, 8, 2), (2, 17, 8, 1), (1, 40, 28, 2)]:
        image = grid(*class_blocks(torch.zeros(classes * n, 1, size, size, dtype=torch.uint8), n), scale=scale)
        assert image.size[0] * image.size[1] == class_grid_pixels(classes, n, size, scale)
    said = refused("sample", "--ckpt", tiny_run, "--class", "0", "--n", "10000", "--scale", "64", "--out",
                   tmp_path / "big.png")
    assert "megapixels, more than an image viewer or PIL opens" in said and not (tmp_path / "big.png").exists()


def test_preset_files_named_unlike_a_run_or_not_regular_are_named_for_what_they_are(tmp_path: Path):
    from farmer_cli.config.files import ConfigError, load_preset
    from farmer_cli.config.files import _preset_dir

    text = "\n".join(line for line in (_preset_dir() / "tiny.toml").read_text().splitlines()
                     if not line.startswith("preset"))
    (tmp_path / "my preset.toml").write_text(text)
    with pytest.raises(ConfigError, match="its name 'my preset' names the runs .* rename the file or add a line"):
        load_preset(str(tmp_path / "my preset.toml"))
    os.mkfifo(tmp_path / "fifo.toml")
    with pytest.raises(ConfigError, match="is not a regular file"):
        load_preset(str(tmp_path / "fifo.toml"))


def test_distill_resume_names_only_the_settings_that_were_given(tiny_run: Path, tmp_path: Path):
    import shutil

    run = Path(shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns(".lock")))
    farmer("distill", "--ckpt", str(run), "--steps", "3", "--batch-size", "8")
    said = refused("distill", "--ckpt", run, "--resume", "--lr", "0.5")
    assert "distill.lr: " in said and "-> 0.5" in said and "distill.steps" not in said


# ----- seventh sweep -----
def _linked(folder: Path, target: Path) -> Path:
    """A folder whose class folders are symbolic links to ``target``'s."""
    folder.mkdir()
    for c in sorted(p.name for p in target.iterdir()):
        (folder / c).symlink_to(target / c)
    return folder


def test_test_data_of_linked_class_folders_or_a_copy_is_refused(tmp_path: Path, monkeypatch):
    import shutil

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = _images(tmp_path / "data")
    linked, copy = _linked(tmp_path / "linked", data), Path(shutil.copytree(data, tmp_path / "copy"))
    for train, test, said in ((data, linked, "is, or lies in"), (linked, data, "is, or lies in"),
                              (data, copy, "is the first image of a training class: a copy")):
        line = refused("train", "--preset", "tiny", "--data", train, "--test-data", test, "--out", tmp_path / "r")
        assert "holds training images" in line and said in line and not (tmp_path / "r").exists()


def test_evaluate_on_linked_or_copied_training_images_is_refused(folder_run: Path, tmp_path: Path):
    import shutil

    data = tmp_path / "data"
    linked = _linked(tmp_path / "linked", data)
    assert "holds training images" in refused("evaluate", "--ckpt", folder_run, "--metrics", "bpd",
                                              "--set", f"data.test_source={linked}")
    copy = Path(shutil.copytree(data, tmp_path / "copy"))
    shutil.copy(data / "a" / "img000.png", copy / "a" / "zzz_extra.png")  # another count: another split
    said = refused("evaluate", "--ckpt", folder_run, "--metrics", "bpd", "--data", copy)
    assert "hold images" in said and "a copy" in said


def test_nothing_goes_where_linked_class_folders_keep_their_images(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    real = _images(tmp_path / "real")
    linked = _linked(tmp_path / "linked", real)
    said = refused("train", "--preset", "tiny", "--data", linked, "--out", real / "a" / "run")
    assert "is inside --data" in said and not (real / "a" / "run").exists()
    farmer("train", "--preset", "tiny", "--data", str(linked), "--steps", "1", "--out", str(tmp_path / "r"))
    assert "where the run's images" in refused("sample", "--ckpt", tmp_path / "r", "--class", "a", "--n", "1",
                                               "--out", real / "a" / "x.png")


def test_a_data_folder_from_a_preset_or_set_is_recorded_as_its_absolute_path(tmp_path: Path, monkeypatch):
    import json

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _images(tmp_path / "imgs")
    farmer("train", "--preset", "tiny", "--set", "data.source=imgs", "--steps", "1", "--out", "r", cwd=tmp_path)
    recorded = json.loads((tmp_path / "r" / "config.json").read_text())["config"]["data"]["source"]
    assert recorded == str((tmp_path / "imgs").resolve())


def test_settings_given_twice_or_planned_from_nothing_are_refused(tiny_run: Path, tmp_path: Path):
    from farmer_cli.config.files import ConfigError, apply_overrides, load_preset

    with pytest.raises(ConfigError, match="both decide train.lr: give it once"):
        apply_overrides(load_preset("tiny"), ["train.lr=1e-3", "train.lr=2e-3"])
    with pytest.raises(ConfigError, match="both decide train.epochs"):
        apply_overrides(load_preset("tiny"), ["train.steps=5", "train.epochs=2"])
    assert "--set train.lr, --set data.source have no effect with --dry-run" in refused(
        "train", "--preset", "tiny", "--dry-run", "--set", "train.lr=0.1", "--set", "data.source=digits",
        "--set", "model.af_width=64")
    assert "--preset has no effect with --dry-run --resume" in refused(
        "train", "--preset", "quickstart", "--dry-run", "--resume", "--out", tiny_run)
    assert "--epochs 0: give at least 1" in refused("train", "--preset", "tiny", "--epochs", "0", "--out",
                                                     tmp_path / "r")
    said = refused("sample", "--ckpt", tiny_run, "--class", "0", "--n", "1", "--preset-sampling", "unguided",
                   "--cfg", "2", "--out", tmp_path / "s.png")
    assert "--preset-sampling unguided (sampling.var_scale)" in said and "only unguided sampling" in said


def test_unlabelled_rows_of_a_class_label_column_are_named(tmp_path: Path):
    import datasets

    from farmer_cli.data.sources import DataError

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["x", "y", "z"])})
    rows = lambda n, label, shade: {"image": [Image.new("L", (8, 8), shade + 9 * i) for i in range(n)],  # noqa: E731
                                    "label": [label] * n}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows(6, 1, 0), features=features),
                          "test": datasets.Dataset.from_dict(rows(3, -1, 100), features=features)}
                         ).save_to_disk(tmp_path / "ds")  # test images of their own: not repeats of training ones
    with pytest.raises(DataError, match=r"holds -1, which is no class of its 3 .* data.use_labels=false"):
        load_data(DataConfig(source=str(tmp_path / "ds")), 1, 8)
    assert len(load_data(DataConfig(source=str(tmp_path / "ds"), use_labels=False), 1, 8).test) == 3


def test_a_device_given_as_an_input_file_is_named_as_one():
    from farmer_cli.data.images import load_image
    from farmer_cli.data.sources import DataError
    from farmer_cli.eval.inception import find_fid_weights
    from farmer_cli.eval.ref_stats import load_ref_stats

    with pytest.raises(DataError, match="not a regular file"):
        load_image("/dev/zero", 1, 8)
    with pytest.raises(ValueError, match="not a regular file"):
        load_ref_stats(Path("/dev/zero"))
    with pytest.raises(Exception, match="not a regular file"):
        find_fid_weights(Path("/dev/zero"))


# ----- eighth sweep -----
def test_moved_or_renamed_copies_of_the_training_data_are_no_test_set(folder_run: Path, tmp_path: Path):
    import shutil

    data, moved, renamed = tmp_path / "data", tmp_path / "moved", tmp_path / "renamed"
    for old, new in (("a", "x"), ("b", "y")):  # the classes renamed: what a copy shares is its images
        shutil.copytree(data / old, renamed / new)
    said = refused("evaluate", "--ckpt", folder_run, "--metrics", "bpd", "--set", f"data.test_source={renamed}")
    assert "holds training images" in said and "a copy" in said
    data.rename(moved)
    assert "which is missing (moved or deleted): restore it" in refused("evaluate", "--ckpt", folder_run,
                                                                        "--metrics", "bpd")
    for given in (["--data", moved], ["--data", moved, "--set", "data.split_seed=7"], ["--data", renamed]):
        said = refused("evaluate", "--ckpt", folder_run, "--metrics", "bpd", *given)
        assert "is the first image of a training class: a copy" in said, said


def test_a_dataset_dicts_own_train_split_is_never_a_test_set(tmp_path: Path):
    import datasets

    from farmer_cli.data.sources import DataError

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    rows = lambda n, shade: {"image": [Image.new("L", (8, 8), shade + 9 * i) for i in range(n)],  # noqa: E731
                             "label": [i % 2 for i in range(n)]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows(8, 0), features=features),
                          "test": datasets.Dataset.from_dict(rows(4, 100), features=features)}).save_to_disk(tmp_path / "hf")
    folder = _images(tmp_path / "folder", seed=3)
    bundle = load_data(DataConfig(source=str(folder), test_source=str(tmp_path / "hf")), 1, 8)
    assert len(bundle.test) == 4  # the dict's test split, not its 8 + 4 rows
    with pytest.raises(DataError, match="one is, or lies inside, the other"):
        load_data(DataConfig(source=str(tmp_path / "hf"), test_source=str(tmp_path / "hf" / "train")), 1, 8)


@pytest.mark.parametrize("args, said", [
    (["train", "--preset", "tiny", "--dry-run", "--out", "RUN"], "--out has no effect with --dry-run alone"),
    (["evaluate", "--ckpt", "RUN", "--metrics", "bpd", "--resize", "tf-legacy"], "only fid and pr run the Inception"),
    (["evaluate", "--ckpt", "RUN", "--metrics", "bpd", "--trust-weights"], "--trust-weights has no effect"),
    (["sample", "--ckpt", "RUN", "--n", "1", "--class", "0", "--denoise-batch", "5", "--set", "sampling.denoise=false"],
     "--denoise-batch has no effect (no denoising step runs"),
    (["train", "--preset", "tiny", "--data", "DATA", "--test-data", "TEST", "--set", "data.test_fraction=0.5"],
     "--set data.test_fraction has no effect (a separate test set"),
    (["train", "--preset", "tiny", "--data", "DATA", "--set", "data.label_column=lbl"],
     "--set data.label_column has no effect (only Hugging Face datasets have columns"),
    (["evaluate", "--ckpt", "RUN", "--metrics", "bpd", "--set", "data.image_column=foo"], "only Hugging Face"),
])
def test_options_and_data_settings_nothing_reads_are_refused(args, said: str, tiny_run: Path, tmp_path: Path,
                                                             monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    places = {"RUN": tiny_run, "DATA": _images(tmp_path / "data"), "TEST": _images(tmp_path / "test", seed=1)}
    out = ["--out", tmp_path / "o.png"] if args[0] == "sample" else ["--out", tmp_path / "r"] * (args[0] == "train"
                                                                                               and "RUN" not in args)
    assert said in refused(*[places.get(a, a) for a in args], *out)
    assert not (tmp_path / "r").exists() and not (tmp_path / "o.png").exists()


# ----- ninth sweep -----
def test_a_saved_datasets_copy_or_shuffle_is_noticed(tmp_path: Path):
    import shutil

    import datasets

    from farmer_cli.data.sources import DataError

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    rng = np.random.default_rng(10)
    images = [Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)) for _ in range(30)]
    datasets.Dataset.from_dict({"image": images, "label": [i % 3 for i in range(30)]},
                               features=features).save_to_disk(tmp_path / "hf")
    shutil.copytree(tmp_path / "hf", tmp_path / "copy")
    with pytest.raises(DataError, match="holds training images .* a copy"):
        load_data(DataConfig(source=str(tmp_path / "hf"), test_source=str(tmp_path / "copy")), 1, 8)
    before = load_data(DataConfig(source=str(tmp_path / "hf")), 1, 8).layout
    shuffled = datasets.load_from_disk(str(tmp_path / "hf")).shuffle(seed=5).flatten_indices()
    shuffled.save_to_disk(tmp_path / "shuffled")
    shutil.rmtree(tmp_path / "hf")
    (tmp_path / "shuffled").rename(tmp_path / "hf")
    assert layout_change(before, load_data(DataConfig(source=str(tmp_path / "hf")), 1, 8).layout)


# ----- tenth sweep -----
def test_outputs_into_a_runs_own_folders_are_refused(tiny_run: Path, digit_png: Path, tmp_path: Path):
    for args in (["sample", "--class", "0", "--n", "1", "--out", tiny_run / "samples" / "step-00000099.png"],
                 ["sample", "--class", "0", "--n", "1", "--out", tmp_path / "s.png", "--out-dir",
                  tiny_run / "checkpoints" / "mine"],
                 ["ood", "--in", digit_png, "--figure", tiny_run / "samples" / "ood.png"],
                 ["score", digit_png, "--heatmap", tiny_run / "checkpoints" / "heat.png"]):
        assert "where farmer writes, prunes and deletes" in refused(*args, "--ckpt", tiny_run)
    assert not (tiny_run / "samples" / "step-00000099.png").exists() and not (tiny_run / "checkpoints" / "mine").exists()


# ----- eleventh sweep -----
def test_a_shuffled_copy_and_images_regenerated_under_the_same_names_are_noticed(tmp_path: Path, monkeypatch):
    import shutil

    import datasets

    from farmer_cli.data.sources import DataError

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)) for _ in range(40)]
    datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in range(40)]},
                               features=features).save_to_disk(tmp_path / "hf")
    datasets.load_from_disk(str(tmp_path / "hf")).shuffle(seed=3).flatten_indices().save_to_disk(tmp_path / "shuf")
    with pytest.raises(DataError, match="holds training images .* a copy"):
        load_data(DataConfig(source=str(tmp_path / "hf"), test_source=str(tmp_path / "shuf")), 1, 8)
    root = _images(tmp_path / "data")
    before = load_data(DataConfig(source=str(root)), 1, 8).layout
    keep = {c: (root / c / "img000.png").read_bytes() for c in "ab"}
    shutil.rmtree(root)
    _images(root, seed=9)  # other images under the same names and sizes ...
    for c, data in keep.items():  # ... but every class's first file as it was
        (root / c / "img000.png").write_bytes(data)
    assert "other file sizes or contents" in layout_change(before, load_data(DataConfig(source=str(root)), 1, 8).layout)


@pytest.mark.parametrize("signame, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_outside_a_training_loop_unwinds_the_command_and_is_named(signame, code, tmp_path, monkeypatch,
                                                                         capsys):
    """sample, score, evaluate ...: SIGINT or SIGTERM becomes a KeyboardInterrupt in the command's own process, so
    what it was writing is removed on the way out (atomic_write), and the command ends with one line naming the
    signal and exit status 130 / 143, where a SIGTERM used to kill it without a word."""
    import signal

    from farmer_cli.app import _Interruption
    from farmer_cli.storage import atomic_write

    monkeypatch.setattr("sys.argv", ["farmer", "sample"])
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    interruption = _Interruption()
    try:
        interruption.install()
        with pytest.raises(KeyboardInterrupt):
            atomic_write(tmp_path / "never.png", lambda tmp: os.kill(os.getpid(), getattr(signal, signame)))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert not list(tmp_path.iterdir())  # the temporary file went with the interruption
    assert interruption.report() == code
    err = capsys.readouterr().err
    assert f"farmer sample: interrupted by {signame} before it finished; no half-written file is left" in err
