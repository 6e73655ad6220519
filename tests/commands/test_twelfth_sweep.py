"""Cases of the twelfth to twentieth hostile sweeps (GitHub issue 24): settings that training never reads are
refused (from --set) or warned about (from a preset file), while stored sampling settings stay the defaults of later
commands; images beside the class folders are not dropped without a word; figures are never resized by their format;
printed paths stay on one line and suggested commands can be pasted; inspect-channels checks the run's split like
evaluate; FID options, class metrics and data settings that nothing would read are refused; a dataset's rows
without images, undecodable rows, mismatched splits and raw label columns are named; classes are reported as
resolved (a copy of the run as ood's background: tests/eval/test_likelihood_tools.py); a preset file may not pass
for a built-in; bounds above the data, a replaced test split and images kept by an interrupted sample are noted;
an image named twice is refused; a user's files in a step folder are kept; entries below class folders that are not
read are named; a run caught mid-save is not called edited; huge state files are refused unread; an untrained
null class is named where it is read; a one-value option given twice is refused. Refusals are one "error:"
line and exit status 2, before any work."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_helpers import ENV, farmer, refused, resplit
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
])
def test_train_refuses_settings_nothing_reads(settings, named, tmp_path: Path):
    """They were stored in config.json and trained exactly as without them (byte-identical weights)."""
    sets = [a for s in settings for a in ("--set", s)]
    line = refused("train", "--preset", "tiny", "--steps", "2", "--out", tmp_path / "r", *sets)
    assert "has no effect" in line and named in line, line
    assert not (tmp_path / "r").exists()


def test_uniform_noise_logs_no_sigma_and_sampling_settings_are_stored_for_later(tmp_path: Path):
    """Sampling settings a run stores are the defaults of sample and evaluate, which may change the guidance or
    decoder: a temperature stored beside cfg 2 is read by a later unguided `farmer sample --cfg 0`."""
    farmer("train", "--preset", "tiny", "--steps", "1", "--out", tmp_path / "r", "--set", "train.noise=uniform",
           "--set", "sampling.cfg=2", "--set", "sampling.temperature=0.5")
    record = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "bpd" in record and "sigma" not in record, record
    said = farmer("sample", "--ckpt", tmp_path / "r", "--cfg", "0", "--n", "1", "--class", "1", "--out",
                  tmp_path / "s.png").stderr
    assert "unguided (T=0.5" in said, said


def test_a_preset_files_settings_that_nothing_reads_are_warned_about(tmp_path: Path):
    from farmer_cli.config.files import load_preset, preset_names, preset_settings
    from farmer_cli.data.sources import unread_data_settings

    preset = tmp_path / "mine.toml"
    text = (Path(__file__).resolve().parents[2] / "presets" / "tiny.toml").read_text()
    preset.write_text(text.replace("[model]", "[model]\nchannel_split = false", 1).replace('"tiny"', '"mine"'))
    said = farmer("train", "--preset", preset, "--steps", "1", "--out", tmp_path / "r").stderr
    assert "warning: preset" in said and "sets model.informative_dims, which has no effect" in said, said
    for name in preset_names():  # the built-in presets name nothing that their own settings leave unread
        cfg = load_preset(name)
        unread = {f"{section}.{key}" for section in ("model", "train") for key in getattr(cfg, section).unread()}
        unread |= {f"data.{key}" for key in unread_data_settings(cfg.data)}
        assert not unread & set(preset_settings(name)), name


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
    run = resplit(shutil.copytree(tiny_run, tmp_path / "edited"))
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


# ----- thirteenth sweep -----
def test_evaluate_refuses_fid_options_when_fid_would_be_skipped(tiny_run: Path, tmp_path: Path):
    """Without --metrics, missing FID weights skip fid and pr with a note; an FID option given with them would then
    do nothing (no statistics file written), so the missing weights are the error."""
    proc = farmer("evaluate", "--ckpt", tiny_run, "--save-ref-stats", tmp_path / "ref.npz", "-n", "10", check=False,
                  env={**ENV, "FARMER_FID_WEIGHTS": str(tmp_path / "absent.pt")})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "absent.pt" in proc.stderr.strip().splitlines()[-1] and not (tmp_path / "ref.npz").exists()


def test_a_one_class_model_is_evaluated_without_class_metrics(tmp_path: Path):
    run = tmp_path / "one-class"
    farmer("train", "--preset", "tiny", "--steps", "1", "--out", run, "--set", "data.use_labels=false")
    line = refused("evaluate", "--ckpt", run, "--metrics", "bpd,sample-acc", "-n", "10")
    assert "models one class, so sample-acc" in line, line
    result = json.loads(farmer("evaluate", "--ckpt", run, "--json", "--limit", "8").stdout)
    assert set(result["metrics"]) == {"bpd_unconditional", "bpd_conditional"}, result["metrics"]


@pytest.mark.parametrize("args, said", [
    (["distill", "--steps", "2", "--set", "data.use_labels=false"], "not their labels"),
    (["distill", "--steps", "2", "--set", "data.split_seed=3"], "the split is the run's"),
    (["evaluate", "--metrics", "bpd", "--set", "data.num_workers=2"], "in its own process"),
])
def test_data_settings_a_command_never_reads_are_refused(args, said, tiny_run: Path):
    line = refused(args[0], "--ckpt", tiny_run, *args[1:])
    assert "has no effect" in line and said in line, line


def test_a_finished_run_refuses_settings_a_resume_would_not_read(tmp_path: Path):
    run = tmp_path / "r"
    said = farmer("train", "--preset", "tiny", "--epochs", "1", "--stop-after", "2", "--out", run).stderr
    assert "warning" not in said, said  # the preset's train.steps is left unread by --epochs, not by the preset
    farmer("train", "--out", run, "--resume")  # to the end of its epoch
    for option in (["--set", "sampling.cfg=2"], ["--stop-after", "1"]):
        line = refused("train", "--out", run, "--resume", *option)
        assert "has finished its" in line and option[0] in line, line
    farmer("distill", "--ckpt", run, "--steps", "2")
    line = refused("distill", "--ckpt", run, "--resume", "--mixed-precision", "bf16")
    assert "the distillation of" in line and "has finished its 2 steps" in line, line


def test_distill_checks_the_runs_recorded_split(tiny_run: Path, tmp_path: Path):
    run = resplit(shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns(".lock", "eval-*")))
    line = refused("distill", "--ckpt", run, "--steps", "2")
    assert "no longer splits as when the run trained" in line and "measured on images the run trained on" in line


def test_dataset_dictionaries_and_columns_that_would_be_guessed(tmp_path: Path):
    import datasets

    from farmer_cli.config.schema import DataConfig
    from farmer_cli.data.images import load_image
    from farmer_cli.data.sources import DataError, open_source, unread_data_settings

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    rows = datasets.Dataset.from_dict({"image": [Image.new("L", (8, 8), 9 * k) for k in range(12)],
                                       "label": [k % 2 for k in range(12)]}, features=features)
    datasets.DatasetDict({"test": rows}).save_to_disk(tmp_path / "only-test")
    with pytest.raises(DataError, match="without a 'train' split \\(it has 'test'\\)"):
        open_source(DataConfig(source=str(tmp_path / "only-test")))
    datasets.DatasetDict({"train": rows.select(range(8)), "test": rows.select(range(8, 12))}).save_to_disk(tmp_path / "tt")
    unread = unread_data_settings(DataConfig(source=str(tmp_path / "tt"), use_labels=False))
    assert {"test_fraction", "split_seed", "label_column"} <= set(unread), unread
    assert "its own test split" in unread["test_fraction"]
    assert open_source(DataConfig(source=str(tmp_path / "tt"))).row_name(9) == "test row 1"
    two = datasets.Features({"a": datasets.Image(), "b": datasets.Image()})
    images = [Image.new("L", (8, 8), k) for k in range(4)]
    datasets.Dataset.from_dict({"a": images, "b": images}, features=two).save_to_disk(tmp_path / "two")
    with pytest.raises(DataError, match="columns 'a', 'b' are all Images; name the one to use"):
        open_source(DataConfig(source=str(tmp_path / "two")))
    assert open_source(DataConfig(source=str(tmp_path / "two"), image_column="b")).image_col == "b"
    (tmp_path / "l1.png").symlink_to("l2.png")
    (tmp_path / "l2.png").symlink_to("l1.png")
    with pytest.raises(DataError, match="a loop of symbolic links"):
        load_image(tmp_path / "l1.png", 1, 8)


def test_evaluate_split_and_max_classes_that_nothing_reads(tiny_run: Path):
    line = refused("evaluate", "--ckpt", tiny_run, "--metrics", "sample-acc", "--split", "train", "-n", "10")
    assert "--split has no effect" in line, line
    line = refused("evaluate", "--ckpt", tiny_run, "--metrics", "classify", "--max-classes", "1")
    assert "at least 2 classes" in line, line


def test_dataset_rows_without_images_or_undecodable_and_unnamed_labels(tmp_path: Path, caplog):
    import io

    import datasets

    from farmer_cli.config.schema import DataConfig
    from farmer_cli.data.dataset import load_data
    from farmer_cli.data.sources import DataError, open_source

    def png(k: int) -> bytes:
        out = io.BytesIO()
        Image.new("L", (8, 8), 9 * k).save(out, "PNG")
        return out.getvalue()

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["x", "y"])})
    rows = [{"bytes": png(k), "path": None} for k in range(12)]
    labels = [k % 2 for k in range(12)]
    datasets.Dataset.from_dict({"image": rows[:5] + [None] + rows[6:], "label": labels},
                               features=features).save_to_disk(tmp_path / "none")
    with pytest.raises(DataError, match=r"1 row\(s\) have no image in column 'image' \(row 5\)"):
        open_source(DataConfig(source=str(tmp_path / "none")))
    broken = rows[:7] + [{"bytes": b"garbage", "path": None}] + rows[8:]
    datasets.Dataset.from_dict({"image": broken, "label": labels}, features=features).save_to_disk(tmp_path / "bad")
    bundle = load_data(DataConfig(source=str(tmp_path / "bad"), test_fraction=0.5), 1, 8)
    every = [bundle.train[k] for k in range(len(bundle.train))] + [bundle.test[k] for k in range(len(bundle.test))]
    assert sum(item is None for item in every) == 1  # skipped like an unreadable file, not an error
    assert f"row 7 of {tmp_path / 'bad'}" in caplog.text, caplog.text
    other = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["p", "q"])})
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"image": rows[:8], "label": labels[:8]},
                                                              features=features),
                          "test": datasets.Dataset.from_dict({"image": rows[8:], "label": labels[8:]},
                                                             features=other)}).save_to_disk(tmp_path / "dict")
    with pytest.raises(DataError, match="splits differ in their columns or label names"):
        open_source(DataConfig(source=str(tmp_path / "dict")))
    raw = datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")})
    datasets.Dataset.from_dict({"image": rows, "label": ["cat", "dog"] * 6}, features=raw).save_to_disk(tmp_path / "raw")
    with pytest.raises(DataError, match="--set data.label_column=label to use it"):
        open_source(DataConfig(source=str(tmp_path / "raw")))
    assert open_source(DataConfig(source=str(tmp_path / "raw"), label_column="label")).class_names == ["cat", "dog"]


def test_named_classes_broken_links_and_empty_items(tmp_path: Path):
    for name in ("01", "02"):
        for k in range(6):
            _png(tmp_path / "z" / name / f"{k}.png", k + 10 * int(name))
    run = tmp_path / "r"
    farmer("train", "--preset", "tiny", "--steps", "1", "--data", tmp_path / "z", "--out", run)
    image = tmp_path / "z" / "01" / "0.png"
    row = json.loads(farmer("score", image, "--ckpt", run, "--class", "1", "--json").stdout)
    assert (row["class"], row["class_name"]) == (1, "02"), row  # index 1 is the folder "02"
    said = farmer("sample", "--ckpt", run, "--class", "02", "--n", "1", "--out", tmp_path / "s.png").stderr
    assert "1 samples of 1 class(es), 1 (02), from step" in said, said
    (tmp_path / "loose").mkdir()
    shutil.copy(image, tmp_path / "loose" / "a.png")
    (tmp_path / "loose" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    assert "gone.png: a link to a missing file" in refused("score", tmp_path / "loose", "--ckpt", run)
    line = refused("inspect-channels", "--ckpt", run, "--levels", "0,,1", "--out", tmp_path / "i.png")
    assert "an empty item between commas" in line, line


# ----- fifteenth sweep -----
def test_the_runs_own_folder_named_relatively_and_other_folders_as_runs(tmp_path: Path):
    for name in ("cat", "dog"):
        for k in range(6):
            _png(tmp_path / "fa" / name / f"{k}.png", k + 10 * len(name) * (name == "dog"))
    farmer("train", "--preset", "tiny", "--steps", "1", "--data", "./fa", "--out", "runs/k", cwd=tmp_path)
    result = json.loads(farmer("evaluate", "--ckpt", "runs/k", "--metrics", "bpd", "--data", "fa", "--json",
                               cwd=tmp_path).stdout)  # the run's own folder, named relatively: its own split
    assert result["metrics"]["bpd_conditional"]["n"] >= 1 and result["data"] == str(tmp_path / "fa")
    for out in ("fa", "runs"):  # a folder of images, a folder of runs: no new run is mixed into them
        line = refused("train", "--preset", "tiny", "--steps", "1", "--out", tmp_path / out)
        assert "holds other files" in line and "no farmer run" in line, line
    line = refused("train", "--preset", "tiny", "--steps", "1", "--data", tmp_path / "fa", "--out", tmp_path / "n",
                   "--set", "model.num_classes=5")
    assert "the data has 2 classes" in line, line
    line = refused("train", "--preset", "tiny", "--steps", "3", "--out", tmp_path / "s", "--set",
                   "train.sample_every=10")
    assert "before the first sample grid" in line, line


def test_labels_only_a_test_split_holds_are_refused(tmp_path: Path):
    import datasets

    from farmer_cli.config.schema import DataConfig
    from farmer_cli.data.sources import DataError, open_source

    features = datasets.Features({"image": datasets.Image(), "lab": datasets.Value("string")})
    part = lambda labels: datasets.Dataset.from_dict(  # noqa: E731
        {"image": [Image.new("L", (8, 8), 9 * k) for k in range(len(labels))], "lab": labels}, features=features)
    datasets.DatasetDict({"train": part(["a", "b"] * 4), "test": part(["a", "c"] * 2)}).save_to_disk(tmp_path / "d")
    with pytest.raises(DataError, match=r"'test' split has labels its 'train' split lacks \(c\)"):
        open_source(DataConfig(source=str(tmp_path / "d"), label_column="lab"))


# ----- sixteenth sweep -----
def test_a_dictionarys_test_split_that_repeats_training_images_is_refused(tmp_path: Path):
    import datasets

    from farmer_cli.config.schema import DataConfig
    from farmer_cli.data.sources import DataError, open_source

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    rng = np.random.default_rng(16)
    train = datasets.Dataset.from_dict({"image": [Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8))
                                                  for _ in range(20)], "label": [k % 2 for k in range(20)]},
                                       features=features)
    datasets.DatasetDict({"train": train, "test": train.select(range(4))}).save_to_disk(tmp_path / "dup")
    with pytest.raises(DataError, match="'test' split repeats training images \\(.* test row 0 is the first image"):
        open_source(DataConfig(source=str(tmp_path / "dup")))


# ----- sixteenth sweep, the rest -----
def test_a_preset_file_under_a_built_in_name_is_refused_and_resume_reads_a_files_name(tiny_run: Path, tmp_path: Path):
    """An edited copy of presets/tiny.toml kept `preset = "tiny"`: its runs were recorded as preset tiny, and
    `--resume --preset tiny` passed the name check without reading that preset's settings."""
    from farmer_cli.config.files import load_preset
    from farmer_cli.config.schema import ConfigError

    text = (Path(__file__).resolve().parents[2] / "presets" / "tiny.toml").read_text()
    (tmp_path / "same.toml").write_text(text)
    assert load_preset(str(tmp_path / "same.toml")).preset == "tiny"  # the built-in itself, byte for byte
    (tmp_path / "edited.toml").write_text(text.replace("lr = 2e-3", "lr = 1e-3"))
    with pytest.raises(ConfigError, match="its name 'tiny' is a built-in preset's, but its settings are not"):
        load_preset(str(tmp_path / "edited.toml"))
    (tmp_path / "other.toml").write_text(text.replace('preset = "tiny"', 'preset = "other"'))
    line = refused("train", "--resume", "--out", tiny_run, "--preset", tmp_path / "other.toml")
    assert "trained with preset 'tiny', not 'other' (named by" in line, line


def test_explicit_bounds_above_the_data_are_noted(tmp_path: Path):
    """train.eval_batches beyond the test split, and evaluate --limit / --max-classes above the data, were capped
    without a word."""
    run = tmp_path / "r"
    proc = farmer("train", "--preset", "tiny", "--steps", "1", "--out", run, "--set", "train.eval_batches=100")
    assert "(all 180 test images)" in proc.stderr, proc.stderr
    proc = farmer("evaluate", "--ckpt", run, "--metrics", "bpd,classify", "--limit", "1000", "--max-classes", "50",
                  "--json")
    assert "note: --limit 1000, but there are only 180 test images: using all of them" in proc.stderr, proc.stderr
    assert "note: --max-classes 50, but there are only 10 classes" in proc.stderr, proc.stderr
    found = json.loads(proc.stdout)["metrics"]
    assert found["bpd_conditional"]["n"] == found["classify"]["n"] == 180 and found["classify"]["classes"] == 10


def test_image_arguments_naming_a_file_twice_are_refused(tmp_path: Path, tiny_run: Path):
    from farmer_cli.data.images import image_files
    from farmer_cli.data.sources import DataError

    a, b = _png(tmp_path / "d" / "a.png"), _png(tmp_path / "d" / "sub" / "b.png", 1)
    assert image_files([a, b]) == [a, b] and image_files([tmp_path / "d"]) == [a, b]
    for args in ([a, a], [tmp_path / "d", a], [tmp_path / "d" / "sub", tmp_path / "d"], [a, Path(f"{a.parent}/./a.png")]):
        with pytest.raises(DataError, match="is given twice"):
            image_files(args)
    line = refused("score", "--ckpt", tiny_run, a, tmp_path / "d")
    assert "a.png is given twice" in line, line


def test_distilling_a_step_checkpoint_inside_a_run_names_the_run(tiny_run: Path):
    step = sorted((tiny_run / "checkpoints").iterdir())[-1]
    line = refused("distill", "--ckpt", step, "--steps", "1")
    assert f"give --ckpt {tiny_run.resolve()} (its latest weights), or copy the step checkpoint out" in line, line
    assert "--out" not in line, line


def test_test_images_beside_a_dictionarys_own_test_split_are_noted(tmp_path: Path):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    rng = np.random.default_rng(17)
    rows = lambda k: datasets.Dataset.from_dict(  # noqa: E731
        {"image": [Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)) for _ in range(k)],
         "label": [i % 2 for i in range(k)]}, features=features)
    datasets.DatasetDict({"train": rows(16), "test": rows(4)}).save_to_disk(tmp_path / "dict")
    for name in ("a", "b"):
        _png(tmp_path / "held" / name / "0.png", 40 + len(name))
    proc = farmer("train", "--preset", "tiny", "--steps", "1", "--out", tmp_path / "r", "--data", tmp_path / "dict",
                  "--test-data", tmp_path / "held")
    assert f"note: the test images {tmp_path / 'held'} replace the test split that {tmp_path / 'dict'} brings" \
        in proc.stderr, proc.stderr


def test_an_interrupted_sample_names_the_images_it_kept(tiny_run: Path, tmp_path: Path):
    """A SIGTERMed `sample --out-dir` left its finished PNGs without a word, and a rerun into the folder is
    refused."""
    import os
    import signal
    import sys
    import time

    out = tmp_path / "many"
    proc = subprocess.Popen([sys.executable, "-m", "farmer_cli", "sample", "--ckpt", str(tiny_run), "--class", "1",
                             "--n", "2000", "--batch-size", "1", "--out", str(tmp_path / "g.png"), "--out-dir",
                             str(out)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (out.is_dir() and any(out.iterdir())) and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    kept = len(list(out.iterdir()))
    assert proc.returncode == 143 and 0 < kept < 2000, (proc.returncode, kept, err)
    assert f"kept the {kept} of 2000 images already written to {out}/ (1-1_0000.png ...)" in err, err


# ----- seventeenth sweep -----
def test_files_of_the_users_under_farmers_names_in_a_step_folder_are_kept(tmp_path: Path, caplog):
    """A user's notes saved as checkpoints/step-N/config.json (and a model.safetensors of theirs) were replaced by
    the step-N checkpoint, and pruning then deleted the folder."""
    import torch

    from farmer_cli.checkpoint import save_config, save_training_state, save_weights
    from farmer_cli.config.files import load_preset
    from farmer_cli.rundir import remove, snapshot, written_by_farmer

    run = tmp_path / "run"
    run.mkdir()
    save_config(run, load_preset("tiny"), ["a"])
    save_weights(run / "model.safetensors", {"w": torch.zeros(2)}, 20)
    save_training_state(run, "training_state.pt", {"step": 20})
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    assert all(written_by_farmer(run / name) for name in ("config.json", "model.safetensors", "training_state.pt",
                                                          "metrics.jsonl"))
    mine = run / "checkpoints" / "step-00000020"
    mine.mkdir(parents=True)
    (mine / "config.json").write_text('{"my": "notes"}')
    (mine / "model.safetensors").write_text("userdata")
    (mine / "training_state.pt").write_bytes(b"\x80\x04N.")  # a plain pickle: not what torch.save writes
    assert not any(written_by_farmer(mine / name) for name in ("config.json", "model.safetensors", "training_state.pt"))
    snapshot(run, ("training_state.pt", "model.safetensors", "config.json"), 20, "step", keep=1)
    assert (mine / "config.json").read_text() == '{"my": "notes"}' and (mine / "model.safetensors").read_text() == "userdata"
    assert "holds files that are not farmer's: no step checkpoint is kept there" in caplog.text
    snapshot(run, ("training_state.pt", "model.safetensors", "config.json"), 30, "step", keep=1)  # prunes step 20
    assert (mine / "config.json").read_text() == '{"my": "notes"}'
    assert written_by_farmer(run / "checkpoints" / "step-00000030" / "model.safetensors")
    remove(run / "checkpoints" / "step-00000030")
    assert not (run / "checkpoints" / "step-00000030").exists()


def test_linked_folders_and_non_files_below_class_folders_are_named(tmp_path: Path, tiny_run: Path):
    """A linked folder inside a class folder was left out of training (and of score) without a word, as were a FIFO
    and a broken link under image names."""
    import os

    for k in range(4):
        _png(tmp_path / "data" / "a" / f"{k}.png", k)
        _png(tmp_path / "data" / "b" / f"{k}.png", 10 + k)
        _png(tmp_path / "elsewhere" / f"{k}.png", 20 + k)
    os.symlink(tmp_path / "elsewhere", tmp_path / "data" / "a" / "more")
    os.mkfifo(tmp_path / "data" / "b" / "pipe.png")
    os.symlink(tmp_path / "nowhere.png", tmp_path / "data" / "b" / "gone.png")
    said = farmer("train", "--preset", "tiny", "--steps", "1", "--data", tmp_path / "data", "--out", tmp_path / "r",
                  env={**ENV, "XDG_CACHE_HOME": str(tmp_path / "cache")}).stderr
    assert ("3 entries below the class folders are not read: a/more (a linked folder, which farmer does not enter), "
            "b/gone.png (a broken link), b/pipe.png (not a regular file: a FIFO, device or socket)") in said, said
    said = farmer("score", "--ckpt", tiny_run, tmp_path / "data" / "a").stderr
    assert f"1 linked folder(s) below it not entered: {tmp_path / 'data' / 'a' / 'more'}" in said, said


def test_epochs_that_make_more_steps_than_a_run_may_take_are_refused(tmp_path: Path):
    line = refused("train", "--preset", "tiny", "--epochs", "1000000000", "--out", tmp_path / "r")
    assert "train.epochs 1000000000 makes 50,000,000,000 steps (50 per epoch), more than the 2,147,483,647" in line
    assert not (tmp_path / "r").exists()


def test_an_empty_state_file_is_called_empty(tmp_path: Path):
    from farmer_cli.checkpoint import CheckpointError, load_training_state

    (tmp_path / "training_state.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"training_state.pt: unreadable or unsafe training state \(an empty file\)"):
        load_training_state(tmp_path, "training_state.pt", ["model"])
    (tmp_path / "training_state.pt").write_bytes(b"\x80\x04N.")
    with pytest.raises(CheckpointError, match=r"\(not a file torch.save wrote \(no zip archive\)\)"):
        load_training_state(tmp_path, "training_state.pt", ["model"])


def test_a_run_caught_between_its_two_files_while_saving_is_not_called_edited(tiny_run: Path, tmp_path: Path):
    """evaluate or distill reading a run in the middle of its save blamed the user for an edit, and suggested a
    --resume that the run's lock would refuse."""
    from farmer_cli.checkpoint import CheckpointError, load_model, lock_holder
    from farmer_cli.rundir import RunLock

    run = shutil.copytree(tiny_run, tmp_path / "live", ignore=shutil.ignore_patterns(".lock"))
    payload = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**payload, "step": payload["step"] - 10}))
    with pytest.raises(CheckpointError, match="one of them was edited or a save was cut short"):
        load_model(run)
    assert lock_holder(run) is None
    lock = RunLock(run).acquire()
    try:
        import os

        assert lock_holder(run) == str(os.getpid())
        with pytest.raises(CheckpointError, match=r"is being saved by the farmer process training or distilling it "
                                                  rf"\(pid {os.getpid()}\) right now"):
            load_model(run)
    finally:
        lock.release()


def test_evaluate_names_config_json_when_its_data_has_other_classes(tiny_run: Path, tmp_path: Path):
    run = shutil.copytree(tiny_run, tmp_path / "edited")
    for name in ("c0", "c1"):
        _png(tmp_path / "other" / name / "0.png")
        _png(tmp_path / "other" / name / "1.png", 1)
    payload = json.loads((run / "config.json").read_text())
    payload["config"]["data"]["source"] = str(tmp_path / "other")
    (run / "config.json").write_text(json.dumps(payload))
    line = refused("evaluate", "--ckpt", run, "--metrics", "bpd")
    assert f"{run}/config.json's data.source {tmp_path / 'other'}: its classes (c0, c1) are not the model's" in line, line


# ----- eighteenth sweep -----
def test_huge_preset_config_and_metrics_files_are_refused_unread(tmp_path: Path, tiny_run: Path):
    """A 20 GB sparse preset, config.json or metrics.jsonl was read whole (a MemoryError traceback under a limit)."""
    import os

    from farmer_cli.checkpoint import CheckpointError, check_metrics, load_config
    from farmer_cli.config.files import load_preset
    from farmer_cli.config.schema import ConfigError

    big = tmp_path / "big.toml"
    big.touch()
    os.truncate(big, 20 << 30)
    with pytest.raises(ConfigError, match="a preset is a short TOML file"):
        load_preset(str(big))
    run = shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns(".lock", "checkpoints"))
    os.truncate(run / "config.json", 20 << 30)
    with pytest.raises(CheckpointError, match="far more than a config farmer writes"):
        load_config(run)
    records = (run / "metrics.jsonl").read_text().count("\n")  # then a line of 20 GB of zero bytes
    os.truncate(run / "metrics.jsonl", 20 << 30)
    with pytest.raises(CheckpointError, match=rf"line {records + 1}: longer than 1,048,576 bytes"):
        check_metrics(run, "metrics.jsonl")


def test_distill_resume_without_its_student_or_its_state_says_which(tiny_run: Path, tmp_path: Path):
    run = shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns(".lock"))
    farmer("distill", "--ckpt", run, "--steps", "2")
    (run / "student.safetensors").rename(tmp_path / "student.safetensors")
    line = refused("distill", "--ckpt", run, "--resume")
    assert f"{run}/student.safetensors is missing beside its distill_state.pt: restore it" in line, line
    (tmp_path / "student.safetensors").rename(run / "student.safetensors")
    (run / "distill_state.pt").unlink()
    line = refused("distill", "--ckpt", run, "--resume")
    assert f"start it again with farmer distill --ckpt {run} --overwrite" in line, line


def test_messages_name_what_can_be_done(tmp_path: Path, tiny_run: Path):
    import datasets

    from farmer_cli.checkpoint import CheckpointError, load_config
    from farmer_cli.commands import _as_png
    from farmer_cli.config.schema import DataConfig
    from farmer_cli.data.sources import DataError, open_source

    assert [_as_png(Path(n)).name for n in (".png", "x.jpg.", "a.psd")] == ["png.png", "x.png", "a.png"]
    rows = {"image": [np.zeros((4, 4), dtype=np.uint8)] * 4, "label": [0, 1, 0, 1]}
    features = datasets.Features({"image": datasets.Array2D((4, 4), "uint8"),
                                  "label": datasets.ClassLabel(names=["a", "b"])})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(tmp_path / "arrays")
    with pytest.raises(DataError, match=r"not images; no column of this dataset holds images"):
        open_source(DataConfig(source=str(tmp_path / "arrays"), image_column="image"))
    run = shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns(".lock"))
    payload = json.loads((run / "config.json").read_text())
    payload["config"]["sampling"]["temperature"] = -1
    (run / "config.json").write_text(json.dumps(payload))
    with pytest.raises(CheckpointError, match=r"sampling.temperature must be > 0.*: the file was edited, or written "
                                              "by another farmer version"):
        load_config(run)
    line = refused("sample", "--ckpt", tiny_run, "--class", " ")
    assert "give a class name or index (a class whose name is blank is chosen by its index)" in line, line


# ----- nineteenth sweep -----
def test_a_broken_link_that_is_mended_is_read_not_kept_as_skipped(tmp_path: Path, monkeypatch):
    """The cached folder index kept calling a mended link broken, and left its image out."""
    import os

    from farmer_cli.data.folder_index import folder_index

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for k in range(2):
        _png(tmp_path / "data" / "a" / f"{k}.png", k)
    os.symlink(tmp_path / "target.png", tmp_path / "data" / "a" / "linked.png")
    first = folder_index(tmp_path / "data")
    assert first["skipped"] == [["a/linked.png", "a broken link"]] and len(first["paths"]) == 2
    _png(tmp_path / "target.png", 9)
    mended = folder_index(tmp_path / "data")
    assert mended["skipped"] == [] and "a/linked.png" in mended["paths"]


def test_an_untrained_null_class_is_named_where_it_is_read(tmp_path: Path):
    said = farmer("train", "--preset", "tiny", "--steps", "1", "--out", tmp_path / "r", "--set",
                  "train.label_dropout=0").stderr
    assert "warning: train.label_dropout = 0: the null class" in said, said
    said = farmer("sample", "--ckpt", tmp_path / "r", "--class", "1", "--n", "1", "--cfg", "2", "--out",
                  tmp_path / "s.png").stderr
    assert "its null class (the unconditional model) was never trained: guidance (cfg 2.0) reads it" in said, said
    said = farmer("sample", "--ckpt", tmp_path / "r", "--class", "1", "--n", "1", "--cfg", "0", "--out",
                  tmp_path / "u.png").stderr
    assert "null class" not in said, said


def test_undecoded_image_columns_and_missing_columns(tmp_path: Path, tiny_run: Path):
    import datasets

    from farmer_cli.checkpoint import CheckpointError, load_model
    from farmer_cli.config.schema import DataConfig
    from farmer_cli.data.dataset import load_data
    from farmer_cli.data.sources import DataError, open_source

    files = [_png(tmp_path / "img" / f"{k}.png", k) for k in range(8)]
    features = datasets.Features({"image": datasets.Image(decode=False), "label": datasets.ClassLabel(names=["a", "b"])})
    datasets.Dataset.from_dict({"image": [{"path": str(f), "bytes": None} for f in files],
                                "label": [k % 2 for k in range(8)]}, features=features).save_to_disk(tmp_path / "raw")
    bundle = load_data(DataConfig(source=str(tmp_path / "raw")), 1, 8)  # was a traceback: rows were dicts
    assert tuple(bundle.train[0][0].shape) == (1, 8, 8)
    with pytest.raises(DataError, match=r"data.image_column 'nope' is not a column of .*raw; its columns"):
        open_source(DataConfig(source=str(tmp_path / "raw"), image_column="nope"))
    run = shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns(".lock"))
    (run / "model.safetensors").unlink()
    newest = sorted((run / "checkpoints").iterdir())[-1]
    with pytest.raises(CheckpointError, match=rf"missing; the run keeps copies .* give --ckpt {newest}"):
        load_model(run)
    line = refused("evaluate", "--ckpt", tiny_run, "--metrics", "bpd", "--set", "data.use_labels=false")
    assert "--set data.use_labels: evaluate reads the data's labels as the run read them" in line, line


# ----- twentieth sweep -----
@pytest.mark.parametrize("args, named", [
    (["train", "--preset", "tiny", "--steps", "3", "--steps", "2"], "--steps is given 2 times (3, then 2)"),
    (["score", "--class", "3", "-c", "4", "x.png"], "--class is given 2 times (3, then 4)"),
    (["sample", "--class", "1", "--class", "2", "--n", "1", "--n=2"], "--n is given 2 times (1, then 2)"),
])
def test_an_option_that_takes_one_value_given_twice_is_refused(args, named, tmp_path: Path):
    """The last value silently won (score --class 3 --class 4 scored class 4 only); options that may repeat
    (sample --class, --set) still do."""
    line = refused(*args, "--out" if args[0] == "train" else "--device", tmp_path / "r" if args[0] == "train" else "cpu")
    assert named in line and "it takes one value: give it once" in line, line
    assert not (tmp_path / "r").exists()
