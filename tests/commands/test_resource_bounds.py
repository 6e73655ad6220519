"""Sizes bounded by what the machine can hold, checked before any work (GitHub issue 24, resources): the training
micro-batch and model size against farmer's memory plan, guided sampling's candidates against their working memory,
dequantisation draws in bounded passes and at most ``MAX_DRAWS`` per image.

Timing (2 cores): four refused commands (seconds each) and library calls on the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cli_helpers import farmer, refused
from farmer_cli.commands import MAX_DRAWS
from farmer_cli.config.files import load_preset
from farmer_cli.config.schema import SamplingConfig
from farmer_cli.device import DeviceError, memory_available, require_memory
from farmer_cli.eval.bits import IMAGES_PER_PASS, draw_passes, score_batch
from farmer_cli.memory_plan import make_plan, require_training_memory
from farmer_cli.model import Farmer

CPU = torch.device("cpu")


def test_free_memory_is_read_and_a_need_beyond_it_is_refused():
    have = memory_available(CPU)
    assert 0 < have <= 1 << 50
    require_memory(1 << 20, CPU, "a small thing", "nothing to fix")
    with pytest.raises(DeviceError, match=r"a huge thing needs about .* GiB of cpu memory, but .* GiB is free for it: "
                                          r"make it smaller"):
        require_memory(have + (1 << 40), CPU, "a huge thing", "make it smaller")


def test_a_memory_check_fails_on_every_process_together():
    from types import SimpleNamespace

    from farmer_cli.device import checked_on_every_process

    one = SimpleNamespace(num_processes=1)
    checked_on_every_process(one, lambda: None)
    with pytest.raises(DeviceError, match="too big"):
        checked_on_every_process(one, lambda: require_memory(1 << 60, CPU, "too big", "smaller"))


def test_training_memory_is_checked_against_the_plan():
    cfg = load_preset("quickstart")
    require_training_memory(cfg, CPU)  # the quickstart fits any machine that runs farmer
    plan = make_plan(cfg)
    cfg.train.batch_size = 4 * plan.largest_micro_batch(memory_available(CPU))  # 4x: beyond the plan's 25% error
    with pytest.raises(DeviceError, match=r"the largest micro-batch that fits is \d+: lower --batch-size"):
        require_training_memory(cfg, CPU)


def test_an_impossible_micro_batch_or_model_is_refused_before_training(tmp_path: Path):
    line = refused("train", "--preset", "tiny", "--steps", "1", "--batch-size", "100000000", "--out", str(tmp_path / "a"))
    assert "micro-batch 100000000 (--batch-size)" in line and "the largest micro-batch that fits is" in line
    line = refused("train", "--preset", "tiny", "--steps", "1", "--set", "model.af_width=65536", "--set",
                   "model.af_layers=8", "--out", str(tmp_path / "b"))
    assert "the model and its optimiser state alone do not fit" in line
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_an_impossible_distillation_batch_is_refused_before_work(tiny_run: Path, tmp_path: Path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    line = refused("distill", "--ckpt", str(run), "--steps", "1", "--batch-size", "1000000000")
    assert "distilling at batch 1000000000 (--batch-size) needs at least" in line and "lower --batch-size" in line
    assert not (run / "student.safetensors").exists()


def test_guidance_working_memory_grows_with_the_candidates(tiny_cfg):
    model = Farmer(tiny_cfg())
    assert model.guidance_bytes(64, SamplingConfig(cfg=0.0)) == 0
    few, many = (model.guidance_bytes(64, SamplingConfig(cfg=4.0, cond_candidates=k, uncond_candidates=k))
                 for k in (5, 5000))
    assert 0 < few < many


def test_impossible_guided_sampling_is_refused_before_the_first_image(tiny_run: Path, tmp_path: Path):
    proc = farmer("sample", "--ckpt", str(tiny_run), "--n", "4", "--class", "1", "--cfg", "4", "--candidates",
                  "1000000000", "--out", str(tmp_path / "s.png"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()  # one line: refused before any progress line
    assert line.startswith("error:") and "1000000000 + 1000000000 candidates per token" in line
    assert "lower --candidates" in line and not (tmp_path / "s.png").exists()


def test_dequantisation_draws_run_in_bounded_passes(tiny_cfg):
    assert draw_passes(10, 300) == [3, 3, 3, 1] and draw_passes(7, 5000) == [1] * 7 and draw_passes(4, 8) == [4]
    cfg = tiny_cfg()
    model = Farmer(cfg).eval()
    seen = []
    forward = model.nll_continuous
    model.nll_continuous = lambda x, y: seen.append(x.shape[0]) or forward(x, y)
    u = torch.randint(0, 256, (3, cfg.channels, cfg.image_size, cfg.image_size), dtype=torch.uint8)
    nll, bpd = score_batch(model, u, None, 1000, torch.Generator().manual_seed(0))
    assert max(seen) <= IMAGES_PER_PASS and sum(seen) == 3 * 1000
    assert nll.shape == bpd.shape == (3,) and torch.isfinite(bpd).all()


@pytest.mark.parametrize("command", [["score", "--samples"], ["evaluate", "--metrics", "bpd", "--bpd-draws"],
                                     ["ood", "--in", "x.png", "--out", "y.png", "--samples"]])
def test_draws_per_image_are_bounded(tiny_run: Path, command: list[str]):
    *head, option = command
    args = [head[0], "--ckpt", str(tiny_run), *head[1:], option, str(MAX_DRAWS + 1)]
    if head[0] == "score":
        args.append("x.png")
    line = refused(*args)
    assert f"{option} {MAX_DRAWS + 1}: give 1 to {MAX_DRAWS}" in line
