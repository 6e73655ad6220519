"""Training at scale, checked on the CPU: the patch-8 channel layout, the memory plan, picklable data, presets."""

from __future__ import annotations

import json
import multiprocessing
import pickle
from pathlib import Path

import pytest
import torch

from farmer_cli.config.schema import DataConfig
from farmer_cli.config.files import apply_overrides, load_preset
from farmer_cli.data.batching import make_loader
from farmer_cli.data.dataset import load_data
from farmer_cli.model import Farmer
from farmer_cli.model.patchify import dct_basis, merge_tokens, split_tokens
from farmer_cli.memory_plan import make_plan
from cli_helpers import farmer


@pytest.mark.parametrize("interleave", [False, True])
def test_merge_and_split_are_inverse(interleave):
    z = torch.randn(2, 16, 5)
    assert torch.equal(split_tokens(merge_tokens(z, 2, interleave), 2, interleave), z)


def test_interleaved_informative_channels_cover_every_sub_patch():
    """Patch-8 layout: the first 128 of 768 merged channels hold channels 0..31 of each of the 4 sub-patches
    (with the blocks layout they would all come from sub-patch 0)."""
    d, m = 192, 2
    z = torch.arange(16 * d, dtype=torch.float32).reshape(1, 16, d)  # 4x4 grid; entry = token * d + channel
    merged = merge_tokens(z, m, interleave=True)[0, 0, :128]  # first merged token: grid tokens 0, 1, 4, 5
    tokens, channels = (merged // d).long(), (merged % d).long()
    assert set(tokens.tolist()) == {0, 1, 4, 5}
    for t in (0, 1, 4, 5):
        assert sorted(channels[tokens == t].tolist()) == list(range(32))
    blocks = merge_tokens(z, m, interleave=False)[0, 0, :128]
    assert set((blocks // d).long().tolist()) == {0}


def test_patch8_presets_make_the_lowest_frequencies_informative():
    cfg = load_preset("imagenet256-patch8").model
    assert (cfg.token_basis, cfg.merge_order, cfg.informative_dims, cfg.ar_token_dim) == ("dct", "interleave", 128, 768)
    # Per 8x8x3 sub-patch the first 32 DCT coefficients hold a smooth ramp almost entirely, a checkerboard not at all.
    Q = dct_basis(8, 3)
    r = torch.arange(8.0)
    ramp = (r[:, None] + r[None, :]).expand(3, 8, 8).flatten()
    checker = ((-1.0) ** (r[:, None] + r[None, :])).expand(3, 8, 8).flatten()
    energy = lambda v: ((Q @ v)[:32] ** 2).sum() / (v**2).sum()  # noqa: E731
    assert energy(ramp) > 0.99 and energy(checker) < 0.01


def test_model_with_interleaved_merge_round_trips(tiny_cfg):
    torch.manual_seed(0)
    model = Farmer(tiny_cfg(token_merge=2, merge_order="interleave", informative_dims=3)).eval()
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    tokens, _ = model.encode(x)
    torch.testing.assert_close(model.decode(tokens), x, atol=1e-4, rtol=0)


def test_imagenet64_bpd_is_unconditional():
    cfg = load_preset("imagenet64-bpd")
    assert cfg.data.use_labels is False and cfg.model.num_classes == 1
    bundle = load_data(DataConfig(source="digits", use_labels=False), 1, 8)
    assert bundle.class_names == ["all"] and {bundle.train[i][1] for i in range(50)} == {0}


def test_imagenet64_bpd_informative_channels_are_whole_pixels_on_a_stride_2_grid():
    """The preset's split, chosen by bench/channel_split.py (docs/deviations.md): the 12 informative channels of an
    AR token are the R, G, B of every other pixel of its 4x4 area."""
    cfg = apply_overrides(load_preset("imagenet64-bpd"), ["model.af_blocks=1", "model.af_layers=1",
                                                          "model.ar_layers=1", "model.af_width=64", "model.ar_width=64",
                                                          "model.af_heads=1", "model.ar_heads=1"])
    model = Farmer(cfg.model)
    x = torch.arange(3 * 64 * 64, dtype=torch.float32).reshape(1, 3, 64, 64)
    merged = merge_tokens(model.to_tokens(x), 2, interleave=True)  # (1, 256, 48): the AR tokens' channel order
    informative = merged[0, 0, : cfg.model.informative_dims].reshape(3, 4).T  # (sub-token, colour)
    torch.testing.assert_close(informative, x[0, :, 0:4:2, 0:4:2].permute(1, 2, 0).reshape(4, 3))


# ----- the memory plan -----
def test_plan_counts_parameters_and_checkpointing_saves_activations():
    cfg = apply_overrides(load_preset("imagenet256-patch8"), ["model.af_blocks=2", "model.af_layers=1",
                                                              "model.ar_layers=1"])
    plan = make_plan(cfg)
    with torch.device("meta"):
        total = sum(p.numel() for p in Farmer(cfg.model).parameters())
    assert plan.total_parameters == total
    assert plan.static_bytes["adamw"] == 8 * total
    assert plan.activation_bytes_per_image_ckpt < plan.activation_bytes_per_image / 2
    assert plan.train_flops_per_image > 0
    assert plan.peak_bytes(4) == sum(plan.static_bytes.values()) + 4 * plan.per_image()
    assert plan.largest_micro_batch(plan.peak_bytes(7)) == 7


def test_partial_checkpointing_plan_and_the_least_that_fits():
    """A share of layers recomputed sits between none and all in memory and FLOPs; the dry-run's pick is the least
    recomputation whose peak fits, and None when nothing does."""
    cfg = apply_overrides(load_preset("tiny"), ["model.af_layers=2", "model.ar_layers=2", "model.grad_checkpoint=true",
                                                "model.checkpoint_fraction=0.5"])
    plan = make_plan(cfg)
    none, half, full = (plan.peak_bytes(16, checkpoint=share) for share in (0.0, 0.5, 1.0))
    assert full < half < none and plan.peak_bytes(16) == half
    assert plan.model_flops_per_image < plan.train_flops_per_image < make_plan(
        apply_overrides(cfg, ["model.checkpoint_fraction=1"])).train_flops_per_image
    assert plan.least_checkpointing(none, 16, 2) == 0.0
    assert plan.least_checkpointing(half, 16, 2) == 0.5
    assert plan.least_checkpointing(full, 16, 2) == 1.0
    assert plan.least_checkpointing(full - 1, 16, 2) is None


def test_dry_run_refuses_a_gpu_memory_that_is_not_a_real_size():
    for value in ("inf", "nan", "0"):
        proc = farmer("train", "--preset", "tiny", "--dry-run", "--gpu-memory", value, check=False)
        assert proc.returncode == 2 and "--gpu-memory must be a number of GiB" in proc.stderr, proc.stderr


def test_plan_activations_grow_with_depth():
    shallow, deep = (make_plan(apply_overrides(load_preset("tiny"), [f"model.af_blocks={n}"])) for n in (1, 3))
    assert deep.activation_bytes_per_image > shallow.activation_bytes_per_image


def test_dry_run_prints_the_plan_and_allocates_nothing(tmp_path: Path):
    proc = farmer("train", "--preset", "imagenet256-1.1b-patch16", "--dry-run", "--json", cwd=tmp_path)
    plan = json.loads(proc.stdout)
    assert 1.0e9 < plan["total_parameters"] < 1.3e9
    assert plan["global_batch"] == 512 and plan["largest_micro_batch"] >= plan["micro_batch"]
    assert plan["least_checkpointing_that_fits"] in [j / 4 for j in range(5)]  # AF blocks of 4 layers
    assert not (tmp_path / "runs").exists()
    table = farmer("train", "--preset", "tiny", "--dry-run", cwd=tmp_path)
    assert "predicted peak" in table.stdout and "largest micro-batch" in table.stdout


# ----- data loading at scale -----
def test_datasets_pickle_and_load_in_spawned_workers():
    bundle = load_data(DataConfig(source="digits"), 1, 8)
    pickle.loads(pickle.dumps(bundle.train))
    if "spawn" not in multiprocessing.get_all_start_methods():
        pytest.skip("no spawn start method")
    loader = make_loader(bundle.train, 8, 1, 0, 0, 0, workers=1)
    loader.multiprocessing_context = "spawn"
    u, y, skipped = next(iter(loader))
    assert u.shape == (8, 1, 8, 8) and skipped == 0


def test_image_folder_index_is_built_once_and_rebuilt_when_a_folder_changes(tmp_path: Path, monkeypatch):
    import numpy as np
    from PIL import Image

    from farmer_cli.data import folder_index

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = tmp_path / "images"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)).save(root / c / f"{i}.png")
    first = load_data(DataConfig(source=str(root), test_fraction=0.34), 1, 8)
    walks = []
    real_walk = folder_index._walk
    monkeypatch.setattr(folder_index, "_walk", lambda *a: walks.append(a) or real_walk(*a))
    again = load_data(DataConfig(source=str(root), test_fraction=0.34), 1, 8)
    assert not walks and len(again.train) + len(again.test) == len(first.train) + len(first.test) == 6
    import os
    import time

    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(root / "b" / "new.png")
    os.utime(root / "b", ns=(time.time_ns(), time.time_ns() + 10**9))  # coarse file-system clocks
    grown = load_data(DataConfig(source=str(root), test_fraction=0.34), 1, 8)
    assert len(walks) == 1 and len(grown.train) + len(grown.test) == 7
    # images added in a sub-folder of a class (its class folder's time does not change) are seen too
    (root / "a" / "sub").mkdir()
    os.utime(root / "a", ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    load_data(DataConfig(source=str(root), test_fraction=0.34), 1, 8)
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(root / "a" / "sub" / "deep.png")
    os.utime(root / "a" / "sub", ns=(time.time_ns(), time.time_ns() + 3 * 10**9))
    deeper = load_data(DataConfig(source=str(root), test_fraction=0.34), 1, 8)
    assert len(walks) == 3 and len(deeper.train) + len(deeper.test) == 8
    # a cached index that is not farmer's (a path outside the folder) is ignored and rebuilt
    cached = max((tmp_path / "cache" / "farmer" / "folder-index").glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
    index = json.loads(cached.read_text())
    cached.write_text(json.dumps(index | {"paths": ["/etc/passwd"] + index["paths"][1:]}))
    rebuilt = load_data(DataConfig(source=str(root), test_fraction=0.34), 1, 8)
    assert len(walks) == 4 and all("passwd" not in str(p) for p in rebuilt.train.source.paths)


def test_report_to_tensorboard_writes_event_files(tmp_path: Path):
    pytest.importorskip("tensorboard")
    farmer("train", "--preset", "tiny", "--steps", "4", "--out", str(tmp_path / "r"), "--report-to", "tensorboard")
    assert list((tmp_path / "r").rglob("events.out.tfevents.*"))
    proc = farmer("train", "--preset", "tiny", "--out", str(tmp_path / "s"), "--report-to", "wandb", check=False)
    assert proc.returncode == 2 and "'wandb' is not one of 'none', 'tensorboard'" in proc.stderr


def test_sample_grids_during_training(tmp_path: Path):
    farmer("train", "--preset", "tiny", "--steps", "6", "--out", str(tmp_path / "r"), "--set", "train.sample_every=3")
    grids = sorted(p.name for p in (tmp_path / "r" / "samples").iterdir())
    assert grids == ["step-00000003.png", "step-00000006.png"]


@pytest.mark.slow
def test_sharded_fsdp2_training_saves_and_resumes_like_one_run(tmp_path: Path):
    """2 gloo processes, model sharded with fully_shard (as Accelerate's FSDP plugin does on GPUs): the gathered
    state, EMA and optimiser checkpoints are collective-safe, and 3 steps + resume + 3 equal 6 steps."""
    import socket
    import subprocess
    import sys

    from safetensors.torch import load_file

    from cli_helpers import ENV

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), str(Path(__file__).parent / "fsdp_check.py"), str(tmp_path)],
                          capture_output=True, text=True, env={**ENV, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    whole, split = torch.load(tmp_path / "whole-weights.pt"), torch.load(tmp_path / "split-weights.pt")
    assert whole.keys() == split.keys() and len(whole) > 0
    for key in whole:
        torch.testing.assert_close(split[key], whole[key], rtol=1e-6, atol=1e-7, msg=key)
    ema_whole, ema_split = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "split" / "model.safetensors")
    for key in ema_whole:
        torch.testing.assert_close(ema_split[key], ema_whole[key], rtol=1e-6, atol=1e-7, msg=key)
    assert any(not torch.equal(ema_whole[k], whole[k]) for k in whole)  # the EMA is its own average
    state = torch.load(tmp_path / "split" / "training_state.pt", weights_only=True)
    assert state["step"] == 6 and set(state["model"]) == set(whole)
    assert set(state["optimizer"]["state"]) <= set(whole)  # optimiser state keyed by parameter names


def test_other_ranks_do_not_stall_when_rank0_cannot_write_the_folder_index(tmp_path: Path, monkeypatch):
    """A read-only cache: rank 0 writes neither the index nor its marker; rank 1 walks the folder itself after the
    start grace instead of waiting an hour; a dead builder's marker ends the wait at once."""
    import numpy as np
    from PIL import Image

    from farmer_cli.data import folder_index

    root = tmp_path / "images"
    (root / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(root / "a" / "0.png")
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(folder_index, "START_GRACE_SECONDS", 0.2)
    waited = []
    monkeypatch.setattr(folder_index.time, "sleep", lambda s: waited.append(s))
    assert folder_index.folder_index(root)["paths"] == ["a/0.png"]
    from farmer_cli.storage import cache_dir

    index_dir = cache_dir("folder-index")
    assert not index_dir.exists() or not list(index_dir.glob("*.json"))  # rank 1 never writes the index
    # a marker left by a builder that died: no grace needed, the wait ends at the first look
    index_dir.mkdir(parents=True, exist_ok=True)
    key = folder_index._key(root, ["a"])
    (index_dir / f"{key}.building").write_text("999999999")
    monkeypatch.setattr(folder_index, "START_GRACE_SECONDS", 3600.0)
    waited.clear()
    assert folder_index.folder_index(root)["labels"] == [0] and waited == []
