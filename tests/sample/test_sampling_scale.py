"""Sampling at scale: per-image random streams, micro-batched denoising, the same images on 1 or 2 processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch

from farmer_cli.config.schema import SamplingConfig
from farmer_cli.config.files import load_preset
from farmer_cli.sample.generate import denoise_bytes_per_image, generate_chunks, my_chunks, plan_denoise
from farmer_cli.model import Farmer
from farmer_cli.model.randomness import ImageStreams, SharedGenerator, categorical, image_seed, normal

from cli_helpers import ENV, farmer


@pytest.fixture(scope="module")
def model() -> Farmer:
    torch.manual_seed(0)
    m = Farmer(load_preset("tiny").model, trained_noise_sigma=0.05).eval()
    for block in m.flow.blocks:  # a non-trivial flow
        torch.nn.init.normal_(block.out_proj.weight, std=0.05)
    return m


# ----- the random sources -----
@pytest.mark.parametrize("source", ["shared", "streams"])
def test_normals_and_categoricals_have_the_right_distribution(source):
    rng = (SharedGenerator(torch.Generator().manual_seed(0), torch.device("cpu")) if source == "shared"
           else ImageStreams.for_images(0, range(4), torch.device("cpu")))
    z = normal(rng, (4, 20000)).double().numpy()
    for row in z:
        assert scipy.stats.kstest(row, "norm").pvalue > 1e-3
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3]).expand(4, 4)
    draws = categorical(rng, probs, 20000)  # (4, 20000)
    counts = torch.stack([torch.bincount(row, minlength=4) for row in draws]).numpy()
    assert (counts[:, 1] == 0).all()  # a zero-probability outcome is never drawn
    for row in counts:
        expected = np.array([0.1, 0.6, 0.3]) * 20000
        assert scipy.stats.chisquare(row[[0, 2, 3]], expected).pvalue > 1e-3


def test_an_images_stream_does_not_depend_on_its_batch():
    cpu = torch.device("cpu")
    whole = ImageStreams.for_images(7, range(6), cpu)
    parts = [ImageStreams.for_images(7, r, cpu) for r in (range(0, 2), range(2, 6))]
    for shape in ((10,), (3, 5), (40000,)):  # the last one crosses a buffer refill
        a = whole.uniform((6, *shape))
        b = torch.cat([p.uniform((len(r), *shape)) for p, r in zip(parts, (range(0, 2), range(2, 6)))])
        assert torch.equal(a, b)
    assert len({image_seed(0, i) for i in range(1000)} | {image_seed(1, i) for i in range(1000)}) == 2000
    with pytest.raises(ValueError, match="streams made for 6"):
        whole.uniform((5, 3))


@pytest.mark.parametrize("cfg", [0.0, 2.0])
def test_sampled_tokens_of_an_image_do_not_depend_on_its_batch(model: Farmer, cfg: float):
    s = SamplingConfig(cfg=cfg, redundant_pool=8)
    y = torch.tensor([1, 2, 3, 4, 5])
    together = model.sample_tokens(y, s, ImageStreams.for_images(3, range(5), model.device))
    apart = torch.cat([model.sample_tokens(y[r.start:r.stop], s, ImageStreams.for_images(3, r, model.device))
                       for r in (range(0, 1), range(1, 5))])
    torch.testing.assert_close(apart, together, rtol=1e-5, atol=1e-5)
    other_seed = model.sample_tokens(y, s, ImageStreams.for_images(4, range(5), model.device))
    assert not torch.allclose(other_seed, together)


def test_chunks_are_shared_out_round_robin_and_cover_every_image():
    assert my_chunks(10, 3) == [range(0, 3), range(3, 6), range(6, 9), range(9, 10)]
    shares = [my_chunks(10, 3, rank, 2) for rank in range(2)]
    assert shares == [[range(0, 3), range(6, 9)], [range(3, 6), range(9, 10)]]
    assert sorted(i for share in shares for r in share for i in r) == list(range(10))


# ----- micro-batched denoising -----
def test_mixture_density_in_slices_equals_one_piece(monkeypatch):
    import farmer_cli.model.gmm as gmm

    g = torch.Generator().manual_seed(0)
    mix = gmm.GMM(torch.randn(3, 5, generator=g), torch.randn(3, 5, 4, generator=g),
                  torch.rand(3, 5, 4, generator=g) + 0.1)
    z = torch.randn(3, 50, 4, generator=g)
    whole = mix.log_prob(z)
    monkeypatch.setattr(gmm, "EXPANSION_BYTES", 3 * 7 * 4 * 8)  # 7 points per slice
    torch.testing.assert_close(mix.log_prob(z), whole, rtol=0, atol=0)


def test_denoising_in_micro_batches_equals_one_pass(model: Farmer):
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    y = torch.tensor([0, 1, 2, 3, 4])
    one = model.denoise(x, y, 0.05)
    torch.testing.assert_close(model.denoise(x, y, 0.05, batch=2), one, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(one, x)  # it did move the images


def test_automatic_denoise_batch_follows_the_memory_budget(model: Farmer):
    per_image, checkpointed = denoise_bytes_per_image(model, False), denoise_bytes_per_image(model, True)
    assert 0 < checkpointed < per_image
    assert plan_denoise(model, 10, budget=10 * per_image) == (10, False)  # all fit: one pass, no recomputation
    assert plan_denoise(model, 10, budget=5 * per_image) == (min(10, 5 * per_image // checkpointed), True)
    assert plan_denoise(model, 10, budget=checkpointed // 2) == (1, True)
    with torch.device("meta"):
        patch8 = Farmer(load_preset("imagenet256-patch8").model)
    # AF 32 x 6 layers x 1024 tokens x 768 wide: about 22 GB of float32 activations per image kept for backward
    assert 18e9 < denoise_bytes_per_image(patch8, False) < 25e9
    # checkpointed, one input per layer: at least 16 images per pass in a quarter of an 80 GB GPU
    assert plan_denoise(patch8, 64, budget=80 * 2**30 // 4)[0] >= 16


def test_checkpointed_denoising_equals_the_plain_pass(model: Farmer):
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    y = torch.tensor([0, 1, 2])
    torch.testing.assert_close(model.denoise(x, y, 0.05, checkpoint=True), model.denoise(x, y, 0.05),
                               rtol=1e-5, atol=1e-6)
    assert not any(stack.checkpoint for stack in model.modules() if hasattr(stack, "checkpoint_in_eval"))


def test_depth_extrapolated_saved_bytes_equal_the_full_probe(tiny_cfg, monkeypatch):
    import farmer_cli.memory_plan as plan
    from farmer_cli.memory_plan import probe_backward, saved_bytes_by_depth

    monkeypatch.setattr(plan, "DIRECT_PROBE_LAYERS", 0)  # extrapolate even this small model
    plan._saved_bytes.cache_clear()
    cfg = tiny_cfg(af_blocks=3, af_layers=2, ar_layers=3)
    for checkpoint in (False, True):
        saved, largest, _ = probe_backward(cfg, checkpoint, count_flops=False)
        assert saved_bytes_by_depth(cfg, checkpoint) == (saved, largest)


def test_generate_chunks_yields_this_process_share(model: Farmer):
    labels = torch.arange(5) % 3
    s = SamplingConfig(redundant_pool=8)
    got = {tuple(chunk): images for chunk, images in generate_chunks(model, labels, s, 0, 2, rank=1, world=2)}
    assert list(got) == [(2, 3)] and got[(2, 3)].dtype == torch.uint8 and got[(2, 3)].shape == (2, 1, 8, 8)
    alone = dict((tuple(c), im) for c, im in generate_chunks(model, labels, s, 0, 2))
    assert torch.equal(alone[(2, 3)], got[(2, 3)])


# ----- the command -----
def test_sample_rejects_bad_precision_and_needs_out_dir_for_several_processes(tiny_run: Path, tmp_path: Path):
    proc = farmer("sample", "--ckpt", str(tiny_run), "--precision", "fp8", "--out", str(tmp_path / "a.png"),
                  check=False)
    assert proc.returncode == 2 and "Invalid value for '--precision'" in proc.stderr and "'auto', 'fp32', 'bf16', 'fp16'" in proc.stderr
    assert "Traceback" not in proc.stderr
    for bad, said in ((["--seed", "-1"], "--seed -1: give a whole number"),
                      (["--seed", str(2**70)], "from 0 to 2**63 - 1"),
                      (["--out-dir", "/proc/farmer-samples"], "/proc is not writable")):  # checked before any work
        proc = farmer("sample", "--ckpt", str(tiny_run), "--out", str(tmp_path / "b.png"), *bad, check=False)
        assert proc.returncode == 2 and said in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "b.png").exists()


@pytest.mark.slow
def test_same_seed_gives_byte_identical_pngs_on_one_and_two_processes(tiny_run: Path, tmp_path: Path):
    args = ["sample", "--ckpt", str(tiny_run), "--class", "3", "--class", "5", "--n", "5", "--cfg", "2",
            "--batch-size", "3", "--seed", "11"]
    env = {**ENV, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "farmer_cli", *args, "--out", str(tmp_path / "one.png"),
                          "--out-dir", str(tmp_path / "one")], capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
              str(port), "-m", "farmer_cli"]
    two = subprocess.run(launch + args + ["--out", str(tmp_path / "two.png"), "--out-dir", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    assert "x 2 processes" in two.stderr
    files = sorted(os.listdir(tmp_path / "one"))
    assert len(files) == 10 and files == sorted(os.listdir(tmp_path / "two"))
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert (tmp_path / "one.png").read_bytes() == (tmp_path / "two.png").read_bytes()


def test_grid_wraps_many_samples_per_class_into_blocks_of_16():
    from farmer_cli.viz import class_blocks

    images = torch.arange(2 * 20, dtype=torch.uint8)[:, None, None, None].expand(-1, 1, 2, 2)
    cells, columns = class_blocks(images, 20)
    assert columns == 16 and cells.shape[0] == 64  # 2 classes x 2 rows x 16
    assert torch.equal(cells[:20], images[:20]) and (cells[20:32] == 255).all()  # class 0, then blanks
    assert torch.equal(cells[32:52], images[20:])  # class 1 starts a new row
    few, columns = class_blocks(images[:6], 3)
    assert columns == 3 and torch.equal(few, images[:6])


# ----- attention backends while decoding -----
def _sdpa_flags() -> tuple[bool, bool, bool, bool]:
    f = torch.backends.cuda
    return f.flash_sdp_enabled(), f.mem_efficient_sdp_enabled(), f.cudnn_sdp_enabled(), f.math_sdp_enabled()


def test_decoding_on_a_gpu_turns_per_shape_cudnn_attention_off_and_restores_the_flags():
    """Every decoding step has a new key length; cuDNN attention builds a graph per shape (~30 ms a step cold on
    an H100), so decoding on CUDA runs with flash / memory-efficient / math only. The flags are global: they must
    be as before afterwards, and a CPU decode must not touch them."""
    from farmer_cli.model.attention import decoding_attention

    before = _sdpa_flags()
    with decoding_attention(torch.device("cuda")):
        assert _sdpa_flags() == (True, True, False, True)
    assert _sdpa_flags() == before
    with decoding_attention(torch.device("cpu")):
        assert _sdpa_flags() == before


def test_both_decoding_loops_run_under_the_decoding_backends(model, monkeypatch):
    """The AR prior's token loop and every AF block's sequential inverse enter the decoding context."""
    import contextlib

    from farmer_cli.model import farmer as farmer_module, flow as flow_module

    entered = []

    def recorder(device):
        entered.append(torch.device(device).type)
        return contextlib.nullcontext()

    monkeypatch.setattr(farmer_module, "decoding_attention", recorder)
    monkeypatch.setattr(flow_module, "decoding_attention", recorder)
    model.sample(torch.tensor([0, 1]), SamplingConfig(cfg=2.0), torch.Generator().manual_seed(0))
    assert entered == ["cpu"] * (1 + len(model.flow.blocks))
