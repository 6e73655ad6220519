"""What exact likelihoods are for: per-patch bits, compression figures, OOD scores, the Fashion-MNIST source."""

from __future__ import annotations

import json
import shutil
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from farmer_cli.eval import ood
from farmer_cli.config.schema import DataConfig
from farmer_cli.config.files import apply_overrides, load_preset
from farmer_cli.data.dataset import load_data
from farmer_cli.data.sources import DataError
from farmer_cli.model import Farmer, dequantize
from cli_helpers import farmer


def _model(overrides: list[str]) -> Farmer:
    torch.manual_seed(0)
    model = Farmer(apply_overrides(load_preset("tiny"), overrides).model).eval()
    for block in model.flow.blocks:
        torch.nn.init.normal_(block.out_proj.weight, std=0.1)
    return model


@pytest.mark.parametrize("overrides", [[], ["model.token_merge=2", "model.merge_order=interleave",
                                            "model.final_permute=flip", "model.informative_dims=3"],
                                       ["model.token_basis=dct", "model.af_permutation=always-flip"]])
def test_patch_bits_sum_to_the_exact_nll(overrides):
    model = _model(overrides)
    u = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    x = dequantize(u, "uniform", generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 2, 10])  # 10: the null class
    with torch.no_grad():
        parts = model.patch_bits(x, y)
        total = model.nll_continuous(x, y)["nll"] / math.log(2.0)
    assert parts["bits"].shape == (3, 16)
    torch.testing.assert_close(parts["bits"].sum(1), total, rtol=1e-4, atol=0)


def test_patch_logdets_follow_each_blocks_token_order():
    """Only the second (flipped) block scales: its first token in block order, the image's last patch, passes
    unchanged, so that patch alone has log-det 0 and every other patch -sum(alpha)."""
    model = _model([])
    block0, block1 = model.flow.blocks
    for p in (block0.out_proj.weight, block0.out_proj.bias, block1.out_proj.weight):
        torch.nn.init.zeros_(p)
    with torch.no_grad():
        block1.out_proj.bias.zero_()
        block1.out_proj.bias[:4] = 0.5  # raw alpha of every channel
    x = torch.rand(1, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        logdet = model.patch_bits(x)["logdet"][0]
    alpha = 3.0 * math.tanh(0.5 / 3.0)
    expected = torch.full((16,), -4 * alpha)
    expected[-1] = 0.0
    torch.testing.assert_close(logdet, expected, rtol=1e-5, atol=1e-6)


def test_heatmaps_of_images_with_the_same_name_do_not_overwrite_each_other(tiny_run: Path, digit_png: Path,  # noqa: F811
                                                                          tmp_path: Path):
    import shutil

    for sub in ("a", "b"):
        (tmp_path / "d" / sub).mkdir(parents=True)
        shutil.copy(digit_png, tmp_path / "d" / sub / "0.png")
    heat = tmp_path / "heat.png"
    proc = farmer("score", str(tmp_path / "d"), "--ckpt", str(tiny_run), "--heatmap", str(heat), "--json")
    written = sorted(json.loads(line)["heatmap"] for line in proc.stdout.splitlines())
    assert written == [str(tmp_path / "heat_a_0.png"), str(tmp_path / "heat_b_0.png")]
    assert all(Path(p).is_file() for p in written)


def test_score_heatmap_and_compression_figures(tiny_run: Path, digit_png: Path, tmp_path: Path):  # noqa: F811
    heat = tmp_path / "bits.png"
    proc = farmer("score", str(digit_png), "--ckpt", str(tiny_run), "--heatmap", str(heat), "--json")
    row = json.loads(proc.stdout.splitlines()[0])
    patches = np.array(row["patch_bits"])
    assert patches.shape == (4, 4)  # 8x8 image, patch 2
    total_bits = row["nll_nats"] / math.log(2.0)
    assert abs(patches.sum() - total_bits) <= 1e-4 * total_bits + 0.01  # rounding of the printed figures
    assert row["png_bytes"] > 0 and row["model_bytes"] == pytest.approx(row["bits_per_dim"] * 64 / 8, rel=1e-3)
    with Image.open(heat) as im:
        assert im.width > 500 and im.height > 256  # image and map at >= 256 px, colour bar
    table = farmer("score", str(digit_png), "--ckpt", str(tiny_run))
    assert "PNG bytes" in table.stdout and "model bytes" in table.stdout


@pytest.fixture(scope="module")
def two_folders(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ood")
    digits = load_data(DataConfig(source="digits"), 1, 8).test
    rng = np.random.default_rng(0)
    for side, make in (("in", lambda i: digits[i][0][0].numpy()),
                       ("out", lambda i: rng.integers(0, 256, (8, 8), dtype=np.uint8))):
        (root / side).mkdir()
        for i in range(12):
            Image.fromarray(make(i)).save(root / side / f"{i}.png")
    return root / "in", root / "out"


def test_ood_command_separates_noise_from_digits(tiny_run: Path, two_folders, tmp_path: Path):  # noqa: F811
    inside, outside = two_folders
    proc = farmer("ood", "--in", str(inside), "--out", str(outside), "--ckpt", str(tiny_run), "--score", "all",
                  "--figure", str(tmp_path / "h.png"), "--json")
    result = json.loads(proc.stdout)
    assert set(result["separation"]) == {"combined", "complexity", "bpd", "typicality"}  # ratio needs --background
    assert result["separation"]["bpd"]["auroc"] > 0.9  # uniform noise is far less likely than digits
    assert len(result["scores"]["bpd"]["in"]) == len(result["scores"]["bpd"]["out"]) == 12
    assert (tmp_path / "h.png").exists()
    twin = shutil.copytree(tiny_run, tmp_path / "twin")  # a copy of the run: every ratio would be 0
    args = ["ood", "--in", str(inside), "--out", str(outside), "--ckpt", str(tiny_run), "--score", "ratio",
            "--figure", str(tmp_path / "r.png"), "--json"]
    copied = farmer(*args, "--background", str(twin), check=False)
    assert copied.returncode == 2 and "holds the same weights as --ckpt" in copied.stderr, copied.stderr
    background = tmp_path / "background"
    farmer("train", "--preset", "tiny", "--steps", "2", "--seed", "1", "--out", str(background))
    ratio = json.loads(farmer(*args, "--background", str(background)).stdout)
    bpd = {side: farmer("ood", "--in", str(folder), "--ckpt", str(run), "--score", "bpd", "--json",
                        "--figure", str(tmp_path / f"{side}.png")).stdout for side, folder, run in
           (("own", inside, tiny_run), ("other", inside, background))}
    own, other = (np.array(json.loads(bpd[k])["scores"]["bpd"]["in"]) for k in ("own", "other"))
    assert np.allclose(ratio["scores"]["ratio"]["in"], own - other, atol=1e-4)  # log-likelihood ratio in bits/dim


@pytest.mark.parametrize("case, message", [
    ("empty", "holds no image files"),
    ("unreadable", "not a readable image"),
    ("ratio", "needs --background"),
    ("same-run", "is the --ckpt run itself"),
])
def test_ood_bad_sides_exit_2(case, message, tiny_run: Path, two_folders, tmp_path: Path):  # noqa: F811
    inside, outside = two_folders
    bad = tmp_path / "bad"
    bad.mkdir()
    if case == "unreadable":
        (bad / "x.png").write_text("not an image")
    args = ["ood", "--in", str(inside), "--out", str(outside if case == "ratio" else bad), "--ckpt", str(tiny_run),
            "--figure", str(tmp_path / "h.png")] + (["--score", "ratio"] if case == "ratio" else [])
    if case == "same-run":
        args[4] = str(outside)
        args += ["--score", "ratio", "--background", str(tiny_run / ".")]
    proc = farmer(*args, check=False)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_separation_figures():
    perfect = ood.separation(np.array([0.0, 0.1, 0.2]), np.array([1.0, 1.1]))
    assert perfect["auroc"] == 1.0 and perfect["fpr_at_95_tpr"] == 0.0
    inverted = ood.separation(np.array([1.0, 1.1]), np.array([0.0, 0.1]))
    assert inverted["auroc"] == 0.0 and inverted["fpr_at_95_tpr"] == 1.0


def test_complexity_score_subtracts_png_bits():
    flat = torch.full((1, 1, 28, 28), 128, dtype=torch.uint8)
    noisy = torch.randint(0, 256, (1, 1, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    png = ood.png_bits_per_dim(torch.cat([flat, noisy]))
    assert png[0] < 1.0 < 7.0 < png[1]  # a flat image compresses to almost nothing, noise not at all
    bpd = np.array([3.0, 3.0])
    np.testing.assert_allclose(ood.scores("complexity", bpd, torch.cat([flat, noisy])), bpd - png)


def test_combined_score_is_the_larger_two_sided_z_score():
    images = torch.randint(0, 256, (3, 1, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    bpd = np.array([4.0, 6.0, 9.0])
    train = {"bpd_mean": 5.0, "bpd_std": 0.5, "complexity_mean": -1.0, "complexity_std": 2.0}
    corrected = bpd - ood.png_bits_per_dim(images)
    expected = np.maximum(np.abs(bpd - 5.0) / 0.5, np.abs(corrected + 1.0) / 2.0)
    np.testing.assert_allclose(ood.scores("combined", bpd, images, train), expected)
    with pytest.raises(ValueError, match="statistics"):
        ood.scores("combined", bpd, images)


def test_fashion_mnist_source(monkeypatch, tmp_path: Path):
    from farmer_cli.data import sources as data

    if all((data.FASHION_MNIST_DIR / f).exists() for f in ("train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")):
        bundle = load_data(DataConfig(source="fashion-mnist"), 1, 28)
        assert (len(bundle.train), len(bundle.test)) == (60000, 10000) and bundle.class_names[9] == "Ankle boot"
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path / "nowhere")
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_data(DataConfig(source="fashion-mnist"), 1, 28)
