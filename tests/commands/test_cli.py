"""End-to-end CLI tests on the tiny preset (scikit-learn's 8x8 digits), CPU only.

Commands run in subprocesses: Accelerate's state is a per-process singleton, and this is how users run them.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cli_helpers import ENV, farmer, sigterm_once_logged


def test_train_writes_a_complete_run(tiny_run: Path):
    for name in ("config.json", "model.safetensors", "training_state.pt", "metrics.jsonl"):
        assert (tiny_run / name).exists(), name
    cfg = json.loads((tiny_run / "config.json").read_text())
    assert cfg["config"]["preset"] == "tiny" and cfg["class_names"] == [str(i) for i in range(10)]
    records = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 30 and all(np.isfinite(r["bpd"]) for r in records)


def test_train_improves_test_bits_per_dim(tmp_path: Path):
    proc = farmer("train", "--preset", "tiny", "--out", str(tmp_path / "r"), "--steps", "150")
    line = next(ln for ln in proc.stderr.splitlines() if "test bits/dim" in ln and "->" in ln)
    found = re.search(r"test bits/dim ([\d.]+) -> ([\d.]+) \((first \d+ of|all) 180 test images\)", line)
    before, after = float(found[1]), float(found[2])
    assert after < before - 0.3, line


def test_resume_equals_uninterrupted(tmp_path: Path):
    farmer("train", "--preset", "tiny", "--out", str(tmp_path / "full"), "--steps", "16")
    farmer("train", "--preset", "tiny", "--out", str(tmp_path / "split"), "--steps", "16", "--stop-after", "8")
    farmer("train", "--out", str(tmp_path / "split"), "--resume")
    full = torch.load(tmp_path / "full" / "training_state.pt", weights_only=False)
    split = torch.load(tmp_path / "split" / "training_state.pt", weights_only=False)
    assert full["step"] == split["step"] == 16
    for key in full["model"]:
        torch.testing.assert_close(split["model"][key], full["model"][key], rtol=1e-5, atol=1e-6, msg=key)
        torch.testing.assert_close(split["ema"][key], full["ema"][key], rtol=1e-5, atol=1e-6, msg=key)


def test_train_on_image_folder_skips_corrupt_files(tmp_path: Path):
    from farmer_cli.config.schema import DataConfig
    from farmer_cli.data.dataset import load_data

    data = load_data(DataConfig(source="digits"), 1, 8).train
    root = tmp_path / "folder"
    for i in range(60):
        u, y = data[i]
        (root / f"class_{y}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(u[0].numpy()).resize((12, 10)).convert("RGB").save(root / f"class_{y}" / f"{i}.png")
    (root / "class_0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    proc = farmer("train", "--preset", "tiny", "--data", str(root), "--out", str(tmp_path / "r"), "--steps", "6",
                  "--batch-size", "16", "--set", "data.test_fraction=0.1")
    assert "skipping unreadable image" in proc.stderr and "broken.png" in proc.stderr
    assert "skipped" in proc.stderr and "unreadable images in total" in proc.stderr
    names = json.loads((tmp_path / "r" / "config.json").read_text())["class_names"]
    assert names == sorted(names) and all(n.startswith("class_") for n in names)


def test_train_on_saved_hf_dataset(tmp_path: Path):
    import datasets

    from farmer_cli.config.schema import DataConfig
    from farmer_cli.data.dataset import load_data

    data = load_data(DataConfig(source="digits"), 1, 8).train
    images = [Image.fromarray(data[i][0][0].numpy()) for i in range(40)]
    labels = [data[i][1] for i in range(40)]
    features = datasets.Features({"img": datasets.Image(), "digit": datasets.ClassLabel(names=[str(i) for i in range(10)])})
    datasets.Dataset.from_dict({"img": images, "digit": labels}, features=features).save_to_disk(tmp_path / "ds")
    farmer("train", "--preset", "tiny", "--data", str(tmp_path / "ds"), "--out", str(tmp_path / "r"), "--steps", "3",
           "--batch-size", "8")
    assert (tmp_path / "r" / "model.safetensors").exists()


def test_score_data_image_beats_noise(tiny_run: Path, digit_png: Path, tmp_path: Path):
    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)).save(noise)
    proc = farmer("score", str(digit_png), str(noise), "--ckpt", str(tiny_run), "--json")
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [Path(r["file"]).name for r in rows] == ["digit.png", "noise.png"]
    assert rows[0]["bits_per_dim"] < rows[1]["bits_per_dim"]
    table = farmer("score", str(digit_png.parent), "--ckpt", str(tiny_run), "--class", "3")
    assert "digit.png" in table.stdout and "bits/dim" in table.stdout


@pytest.mark.parametrize("args, message", [
    (["sample", "--n", "abc"], "error: Invalid value for '--n'"),
    (["train", "--steps", "1.5"], "error: Invalid value for '--steps'"),
    (["sample", "--bogus"], "error: No such option: --bogus"),
    (["smaple"], "error: No such command 'smaple'"),
])
def test_option_parsing_errors_are_one_line_with_status_2(args, message):
    """What typer/click reject before farmer runs (wrong type, unknown option or command) is one line naming the
    option and the --help to read, not a usage box."""
    proc = farmer(*args, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
    assert proc.stderr.startswith(message) and "--help)" in proc.stderr and "Traceback" not in proc.stderr


def test_bare_farmer_still_shows_the_help():
    proc = farmer(check=False)
    out = proc.stdout + proc.stderr
    assert "Usage:" in out and "sample" in out and "error:" not in out


@pytest.mark.parametrize("args, message", [
    (["score", "missing.png"], "no such file"),
    (["score", "{notimage}"], "not a readable image"),
    (["score", "{digit}", "--ckpt", "{nockpt}"], "not a farmer checkpoint"),
    (["score", "{digit}", "--ckpt", "{badweights}"], "unreadable weights"),
    (["score", "{digit}", "--ckpt", "{otherconfig}"], "do not fit the model"),
    (["score", "{digit}", "--class", "11"], "out of range"),
    (["train", "--preset", "quickstrat"], "did you mean 'quickstart'"),
    (["train", "--preset", "tiny", "--set", "model.af_blockz=3"], "did you mean 'af_blocks'"),
    (["train", "--preset", "tiny", "--set", "train.lr=fast"], "expects float"),
    (["train", "--preset", "tiny", "--data", "/nonexistent/dir"], "not found"),
    (["sample", "--class", "12"], "out of range"),
    (["sample", "--class", "seven"], "unknown class"),
    (["sample", "--n", "0"], "--n must be at least 1"),
    (["sample", "--decoder", "student"], "run `farmer distill"),
])
def test_bad_input_gives_one_line_error_and_status_2(args, message, tiny_run: Path, digit_png: Path, tmp_path: Path):
    notimage = tmp_path / "notes.png"
    notimage.write_text("hello")
    nockpt = tmp_path / "empty"
    nockpt.mkdir()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((tiny_run / "config.json").read_text())
    (bad / "model.safetensors").write_bytes(b"garbage")
    other = tmp_path / "other"
    other.mkdir()
    cfg = json.loads((tiny_run / "config.json").read_text())
    cfg["config"]["model"]["af_width"] = 48
    (other / "config.json").write_text(json.dumps(cfg))
    (other / "model.safetensors").write_bytes((tiny_run / "model.safetensors").read_bytes())
    subs = {"{notimage}": str(notimage), "{digit}": str(digit_png), "{nockpt}": str(nockpt), "{badweights}": str(bad),
            "{otherconfig}": str(other)}
    argv = [subs.get(a, a) for a in args]
    if argv[0] in ("score", "sample") and "--ckpt" not in argv:
        argv += ["--ckpt", str(tiny_run)]
    proc = farmer(*argv, cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_sample_writes_grid_and_files(tiny_run: Path, tmp_path: Path):
    out = tmp_path / "grid.png"
    farmer("sample", "--ckpt", str(tiny_run), "--class", "3", "--class", "5", "--n", "4", "--cfg", "1.5",
           "--out", str(out), "--out-dir", str(tmp_path / "each"), "--scale", "2")
    with Image.open(out) as im:
        assert im.size == (2 + 4 * (16 + 2), 2 + 2 * (16 + 2))  # 4 columns, 2 class rows, 2-pixel padding
    files = sorted(p.name for p in (tmp_path / "each").iterdir())
    assert len(files) == 8 and files[0].startswith("3-3_") and files[-1].startswith("5-5_")
    with Image.open(tmp_path / "each" / files[0]) as im:
        assert im.size == (8, 8)


def test_an_output_format_pil_cannot_write_is_refused_before_work(tiny_run: Path, tmp_path: Path):
    proc = farmer("sample", "--ckpt", str(tiny_run), "--out", str(tmp_path / "x.psd"), check=False)
    assert proc.returncode == 2 and "PSD images can be read but not written" in proc.stderr, proc.stderr
    assert "sample" not in proc.stderr.split("error:")[0]  # no progress bar: nothing was sampled
    assert not (tmp_path / "x.psd").exists()


def test_sample_with_a_class_given_twice_writes_every_image(tiny_run: Path, tmp_path: Path):
    proc = farmer("sample", "--ckpt", str(tiny_run), "--class", "3", "--class", "3", "--n", "2", "--cfg", "2",
                  "--out", str(tmp_path / "g.png"), "--out-dir", str(tmp_path / "each"))
    assert "effective sample size" in proc.stderr and "in the redundant pool" in proc.stderr  # guided: reported
    assert sorted(p.name for p in (tmp_path / "each").iterdir()) == [f"3-3_{i:04d}.png" for i in range(4)]


def test_sample_is_deterministic_for_a_seed(tiny_run: Path, tmp_path: Path):
    for name in ("a", "b"):
        farmer("sample", "--ckpt", str(tiny_run), "--n", "3", "--seed", "7", "--out", str(tmp_path / f"{name}.png"))
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_distill_then_sample_with_student(tmp_path: Path):
    run = tmp_path / "r"
    farmer("train", "--preset", "tiny", "--out", str(run), "--steps", "20")
    proc = farmer("distill", "--ckpt", str(run), "--steps", "30")
    assert (run / "student.safetensors").exists()
    before, after = (float(v) for v in proc.stderr.split("held-out images):")[1].split("\n")[0].split("->"))
    assert after < before
    farmer("sample", "--ckpt", str(run), "--decoder", "student", "--n", "2", "--out", str(tmp_path / "s.png"))
    assert (tmp_path / "s.png").exists()


@pytest.mark.slow
def test_two_process_accelerate_training_keeps_ranks_identical(tmp_path: Path):
    # On a CPU-only machine `--multi_gpu` starts torchrun workers that Accelerate joins with gloo on the CPU
    # (`--cpu` with several processes would need mpirun).
    import socket

    with socket.socket() as sock:  # a free rendezvous port: the default 29500 may still be held by an earlier run
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(port)]
    proc = subprocess.run(launch + [str(Path(__file__).parent / "dist_check.py"), str(tmp_path)],
                          capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    w0 = torch.load(tmp_path / "rank0.pt")
    w1 = torch.load(tmp_path / "rank1.pt")
    assert w0.keys() == w1.keys()
    for key in w0:
        torch.testing.assert_close(w0[key], w1[key], rtol=0, atol=0, msg=key)
    s0, s1 = torch.load(tmp_path / "student0.pt"), torch.load(tmp_path / "student1.pt")
    for key in s0:  # distillation under DDP: gradients synchronised, students identical
        torch.testing.assert_close(s0[key], s1[key], rtol=0, atol=0, msg=key)
    first = load_file(tmp_path / "run" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in first.values())
    proc = subprocess.run(launch + ["-m", "farmer_cli", "train", "--preset", "tiny", "--steps", "4", "--out",
                                    str(tmp_path / "cli")], capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stderr and (tmp_path / "cli" / "model.safetensors").exists()


@pytest.mark.slow
def test_two_process_sigterm_saves_and_resumes(tmp_path: Path):
    """SIGTERM to `accelerate launch` (as a scheduler sends it) reaches both ranks; they agree on one step, save it,
    and a 2-process --resume continues from there without repeating a logged step."""
    import socket

    def launch() -> list[str]:  # a fresh rendezvous port each time: the last one may still be held
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(port), "-m", "farmer_cli", "train"]

    run = tmp_path / "run"
    proc = subprocess.Popen(launch() + ["--preset", "tiny", "--steps", "100000", "--out", str(run), "--set",
                                      "train.log_every=1", "--set", "train.ckpt_every=100000"],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    err = sigterm_once_logged(proc, metrics, 4)
    assert "stopped by SIGTERM" in err, err[-3000:]
    saved = torch.load(run / "training_state.pt", weights_only=True)["step"]
    assert saved >= 4
    proc = subprocess.run(launch() + ["--out", str(run), "--resume", "--stop-after", "2"], capture_output=True,
                          text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, saved + 3))
