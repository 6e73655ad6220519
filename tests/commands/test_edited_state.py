"""Edited or odd state (GitHub issue 24): every case ends in one "error:" line on stderr and exit status 2, naming the
file or option, with no traceback; or works where working is right. Runs are copies of the shared ``tiny_run``
(never trained here); library functions are called directly where that shows the same thing faster.

Timing (2 cores): ~20 short commands, most refused before any work, and one 2-step distillation."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cli_helpers import ENV, run_command
from farmer_cli.checkpoint import (CheckpointError, check_metrics, load_config, load_model, load_training_state,
                                   save_weights, stored_distill_settings)
from farmer_cli.config.schema import ConfigError

ONE_THREAD = {**ENV, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def cli(*args, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return run_command(args, env={**ONE_THREAD, **(env or {})}, cwd=cwd, timeout=300)


def refused(proc: subprocess.CompletedProcess, *named: str) -> str:
    """Exit 2, no traceback, exactly one "error:" line (the last), naming every one of ``named``."""
    detail = f"rc={proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, detail
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and proc.stderr.strip().splitlines()[-1] == errors[0], detail
    for name in named:
        assert str(name) in errors[0], detail
    return errors[0]


def worked(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"


@pytest.fixture
def run(tiny_run: Path, tmp_path: Path) -> Path:
    """A writable copy of the shared tiny run."""
    return Path(shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns(".lock", "eval-*")))


def edit_config(run: Path, change) -> Path:
    path = run / "config.json"
    payload = json.loads(path.read_text())
    change(payload)
    path.write_text(json.dumps(payload))
    return path


def png(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8), dtype=np.uint8)).save(path)
    return path


# ----- 1. config.json and weights metadata -----
NESTED = {"lists": "[" * 100_000 + "]" * 100_000, "objects": '{"a":' * 100_000 + "1" + "}" * 100_000}


def _names(k: int):
    return lambda p: p.update(class_names=[str(i) for i in range(k)])


@pytest.mark.parametrize("edit, said", [
    (_names(3), "class_names lists 3 classes but model.num_classes is 10"),
    (_names(12), "class_names lists 12 classes but model.num_classes is 10"),
    (lambda p: p["config"]["model"].update(image_size=2**40), "model.image_size must be <= 65,536"),
])
def test_edited_config_json_is_refused_on_loading(edit, said, run: Path):
    path = edit_config(run, edit)
    with pytest.raises(CheckpointError, match=said) as err:
        load_config(run)  # before any model is built: an image_size of 2**40 allocates nothing
    assert str(path) in str(err.value)


def test_config_json_step_is_not_read_and_weights_step_is_checked(run: Path):
    edit_config(run, lambda p: p.update(step="abc"))  # a note of the run's, read by nothing: still loads
    assert load_model(run)[3] == 30  # the step comes from the weights file's metadata
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = run / "model.safetensors"
    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata()
    save_weights(path, load_file(str(path)), 0, metadata | {"step": "abc"})
    with pytest.raises(CheckpointError, match="its metadata step 'abc' is not a step number") as err:
        load_model(run)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("nesting", list(NESTED))
def test_deeply_nested_config_json_is_one_line(nesting: str, run: Path, tmp_path: Path):
    (run / "config.json").write_text(NESTED[nesting])
    if nesting == "lists":
        refused(cli("sample", "--ckpt", run, "--out", tmp_path / "s.png"), run / "config.json", "nested too deeply")
    else:  # a new run over it: refused as a directory holding files that are not a run's, not a traceback
        refused(cli("train", "--preset", "tiny", "--out", run, "--steps", "1"), run, "not a farmer run's")


def test_student_metadata_of_the_wrong_type(run: Path):
    model = load_model(run)[0]
    student = run / "student.safetensors"
    for text in ("[1, 2]", "abc", '{"steps": 2, "unknown": 1}'):
        save_weights(student, model.flow.state_dict(), 2, {"teacher": "x", "distill": text})
        with pytest.raises(CheckpointError, match="is not the distill settings farmer records") as err:
            stored_distill_settings(run)
        assert str(student) in str(err.value)
    save_weights(student, model.flow.state_dict(), 2, {"distill": json.dumps({"steps": 2})})
    assert stored_distill_settings(run) == {"steps": 2}
    # a value that is not a string: safetensors refuses the header, and so does farmer, naming the file
    header = student.read_bytes()
    n = int.from_bytes(header[:8], "little")
    meta = json.loads(header[8:8 + n])
    meta["__metadata__"]["distill"] = 5
    raw = json.dumps(meta).encode()
    raw += b" " * (-len(raw) % 8)
    student.write_bytes(len(raw).to_bytes(8, "little") + raw + header[8 + n:])
    with pytest.raises(CheckpointError, match="unreadable") as err:
        stored_distill_settings(run)
    assert str(student) in str(err.value)


# ----- 2. a training state of another config -----
def _state_of_width(width: int) -> dict:
    from farmer_cli.config.files import load_preset
    from farmer_cli.model import Farmer

    cfg = load_preset("tiny")
    cfg.model.af_width = width
    weights = Farmer(cfg.model).state_dict()
    return {"ema": weights, "model": weights, "optimizer": {"state": {}, "param_groups": []}, "scheduler": {},
            "step": 30}


def test_training_state_of_another_config_is_refused(run: Path):
    torch.save(_state_of_width(64), run / "training_state.pt")
    with pytest.raises(CheckpointError, match=r"its ema state does not fit model.safetensors .*\(64,\)"):
        load_training_state(run, "training_state.pt", ["ema", "model"])
    shutil.rmtree(run / "checkpoints")  # with step checkpoints, resuming falls back to the newest (a warning)
    refused(cli("train", "--out", run, "--resume"), run / "training_state.pt", "another run or config")


# ----- 3. metrics.jsonl -----
@pytest.mark.parametrize("line, said", [
    ('{"step":"7"}\n', 'step "7" is not a whole number'),
    ('{"step": true}\n', "step true is not a whole number"),
    ("not json\n", "not a JSON record"),
    ("[1, 2]\n", "not a JSON object"),
    ("[" * 100_000 + "]" * 100_000 + "\n", "nested too deeply"),
])
def test_edited_metrics_lines_are_refused(line: str, said: str, tmp_path: Path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 5, "lr": 0.1}\n' + line + '{"step": 10}\n')
    with pytest.raises(CheckpointError, match=said) as err:
        check_metrics(tmp_path, "metrics.jsonl")
    assert f"{path} line 2" in str(err.value)


def test_a_cut_last_line_and_blank_lines_are_not_edits(tmp_path: Path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 5}\n\n{"step": 10, "lr"')  # killed while writing the last record
    check_metrics(tmp_path, "metrics.jsonl")
    path.write_bytes(b'{"step": 5}\n\xff\xfe\n')
    with pytest.raises(CheckpointError, match="not UTF-8"):
        check_metrics(tmp_path, "metrics.jsonl")


def test_resume_with_edited_metrics_train_and_distill(run: Path):
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write('{"step":"7"}\n')
    refused(cli("train", "--out", run, "--resume"), run / "metrics.jsonl", "line")
    (run / "distill_state.pt").write_bytes(b"")  # what --resume looks for first; the metrics are checked before it
    (run / "distill_metrics.jsonl").write_text("garbage\n")
    refused(cli("distill", "--ckpt", run, "--resume"), run / "distill_metrics.jsonl", "line 1")


# ----- 4. preset files -----
def test_preset_not_utf8_or_nested_too_deeply(tmp_path: Path):
    from farmer_cli.config.files import load_preset

    latin = tmp_path / "latin.toml"
    latin.write_bytes('preset = "x"\n# caf\xe9\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=f"preset file {latin}: not UTF-8"):
        load_preset(str(latin))
    deep = tmp_path / "bad.toml"
    deep.write_text("a = " + "[" * 100_000 + "]" * 100_000 + "\n")
    refused(cli("train", "--preset", "./bad.toml", "--out", tmp_path / "r", cwd=tmp_path), "bad.toml",
            "nested too deeply")
    assert not (tmp_path / "r").exists()


# ----- 5. a folder of unreadable images -----
def test_all_images_unreadable_is_one_line_before_training(tmp_path: Path):
    for label in ("a", "b"):
        for i in range(3):
            (tmp_path / "bad" / label).mkdir(parents=True, exist_ok=True)
            (tmp_path / "bad" / label / f"{i}.png").write_bytes(os.urandom(64))
    message = refused(cli("train", "--preset", "tiny", "--data", tmp_path / "bad", "--out", tmp_path / "r",
                          "--steps", "3"), tmp_path / "bad", "can be read")
    assert "warning" not in message and not (tmp_path / "r").exists()


def test_a_batch_of_unreadable_images_is_a_data_error(tmp_path: Path):
    from farmer_cli.data.batching import iterate_batches, make_loader
    from farmer_cli.data.dataset import ImageDataset
    from farmer_cli.data.sources import DataError, FileSource

    files = [tmp_path / f"{i}.png" for i in range(4)]
    for f in files:
        f.write_bytes(b"not an image")
    dataset = ImageDataset(FileSource("junk", ["a"], files, [0] * 4), list(range(4)), 1, 8)
    assert list(iterate_batches(dataset, 2)) == []  # evaluation skips them: no empty batch reaches a model
    with pytest.raises(DataError, match="data source junk: none of the 2 images of a training batch"):
        next(iter(make_loader(dataset, 2, 1, 0, 0, 0, 0)))


# ----- 6. a one-image data set -----
def test_one_image_data_set_in_distill_and_inspect_channels(run: Path, tmp_path: Path):
    one = tmp_path / "one"
    png(one / "only" / "x.png")
    edit_config(run, lambda p: p["config"]["data"].update(source=str(one)))  # not the data the run trained on
    refused(cli("inspect-channels", "--ckpt", run, "--out", tmp_path / "i.png"), "no longer splits")
    trained = tmp_path / "one-run"
    worked(cli("train", "--preset", "tiny", "--data", one, "--steps", "1", "--out", trained))
    proc = cli("distill", "--ckpt", trained, "--steps", "2")
    worked(proc)
    assert "training images)" in proc.stderr  # no held-out image: the student is measured on the training one
    worked(cli("inspect-channels", "--ckpt", trained, "--out", tmp_path / "i.png"))
    assert (tmp_path / "i.png").exists()


# ----- 7. seeds -----
@pytest.mark.parametrize("command, seed, said", [
    ("train", 2**63, "from 0 to 2**32 - 1"),
    ("train", -1, "from 0 to 2**32 - 1"),
    ("inspect-channels", 2**63, "from 0 to 2**63 - 1"),
    ("inspect-channels", -1, "from 0 to 2**63 - 1"),
    ("sample", 2**63, "from 0 to 2**63 - 1"),
    ("evaluate", -1, "from 0 to 2**63 - 1"),
])
def test_seed_out_of_range_in_every_command(command: str, seed: int, said: str, tiny_run: Path, tmp_path: Path):
    where = ["--preset", "tiny", "--out", tmp_path / "r"] if command == "train" else ["--ckpt", tiny_run]
    out = ["--out", tmp_path / "x.png"] if command in ("sample", "inspect-channels") else []
    refused(cli(command, *where, *out, "--seed", str(seed), cwd=tmp_path), f"--seed {seed}", said)


def test_seeds_in_settings_are_checked_by_the_config_gate():
    from farmer_cli.config.files import apply_overrides, load_preset

    for setting, said in (("train.seed=-1", "train.seed must be >= 0"),
                          ("train.seed=4294967296", "train.seed must be <= 4,294,967,295"),
                          ("data.split_seed=9223372036854775808", "data.split_seed must be <= ")):
        with pytest.raises(ConfigError, match=said):
            apply_overrides(load_preset("tiny"), [setting])


# ----- 8. ood --json with NaN scores -----
def test_ood_json_with_nan_scores_is_valid_json(run: Path, tmp_path: Path):
    from safetensors.torch import load_file

    path = run / "model.safetensors"
    weights = load_file(str(path))
    for key in weights:  # finite weights whose likelihoods are not (non-finite weights are refused on loading)
        if key.endswith("out_proj.bias"):
            weights[key].fill_(1e30)
    save_weights(path, weights, 30)
    images = tmp_path / "images"
    for i in range(3):
        png(images / f"{i}.png", i)
    shutil.copytree(images, tmp_path / "others")
    proc = cli("ood", "--ckpt", run, "--in", images, "--out", tmp_path / "others", "--score", "bpd", "--json",
               "--figure", tmp_path / "ood.png")
    worked(proc)

    def no_constants(name):
        raise AssertionError(f"{name} in the JSON output")

    result = json.loads(proc.stdout, parse_constant=no_constants)
    assert result["bpd"]["in"] == [None] * 3 and result["separation"]["bpd"]["auroc"] is None
    assert "not a finite number" in proc.stderr


def test_ood_separation_ranks_infinities_and_leaves_nan_undefined():
    from farmer_cli.eval.ood import separation

    assert separation(np.array([0.0, 1.0]), np.array([np.inf, 2.0]))["auroc"] == 1.0
    assert np.isnan(separation(np.array([0.0, np.nan]), np.array([1.0, 2.0]))["auroc"])


# ----- 9. output paths that collide; an unwritable FID cache -----
def test_sample_grid_and_image_folder_must_not_collide(tiny_run: Path, tmp_path: Path):
    refused(cli("sample", "--ckpt", tiny_run, "--out", "X.png", "--out-dir", "X.png", cwd=tmp_path),
            "--out X.png", "--out-dir X.png")
    refused(cli("sample", "--ckpt", tiny_run, "--class", "3", "--n", "1", "--out", "d/3-3_0000.png", "--out-dir", "d",
                cwd=tmp_path), "--out d/3-3_0000.png", "--out-dir d")
    assert not (tmp_path / "X.png").exists() and not (tmp_path / "d").exists()


class PooledPixels(torch.nn.Module):
    """A stand-in for the FID network (as in test_evaluation_scale.py): 48-d pooled pixels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, 4).flatten(1)


def test_evaluate_with_unwritable_fid_cache_fails_before_sampling(run: Path, tmp_path: Path):
    weights = tmp_path / "fid.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(PooledPixels()).save(str(weights))
    cache = tmp_path / "ro"
    cache.mkdir()
    cache.chmod(0o555)
    try:
        if os.access(cache, os.W_OK):  # root writes anywhere: a read-only file system instead
            if not Path("/proc/self").is_dir():
                pytest.skip("running as root without /proc: no read-only directory to point the cache at")
            cache = Path("/proc/self")
        proc = cli("evaluate", "--ckpt", run, "--metrics", "fid", "-n", "20", "--fid-weights", weights,
                   "--trust-weights", env={"XDG_CACHE_HOME": str(cache)})
    finally:
        (tmp_path / "ro").chmod(0o755)
    refused(proc, cache / "farmer" / "fid-stats", "XDG_CACHE_HOME")
    assert "sampling" not in proc.stderr and not list(run.glob("eval-*.json"))
