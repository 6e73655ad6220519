"""evaluate at scale: chunked precision/recall (bounded memory), streamed reference features, --ref-stats /
--save-ref-stats, the resize rules, the Inception Score hook, and 2-process evaluation.

The real Inception weights are not needed: a small TorchScript network (pooled pixels) stands in for them, through
the same --fid-weights path the real file takes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from farmer_cli.eval.inception import inception_features, logits_layer, resize_299
from farmer_cli.eval.feature_metrics import feature_stats, frechet_distance, inception_score, pr_chunk, precision_recall
from farmer_cli.eval.ref_stats import load_ref_stats, save_ref_stats

from cli_helpers import ENV, run_command


class PooledPixels(torch.nn.Module):
    """A stand-in for the FID network: 48-d features (3 channels x 4 x 4 average pools) of the 299x299 input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, 4).flatten(1)


class PooledPixelsWithLogits(torch.nn.Module):
    """The same features, plus a 10-way ``output`` layer as the NVlabs Inception port has (1008-way there)."""

    def __init__(self) -> None:
        super().__init__()
        self.output = torch.nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, 4).flatten(1)


@pytest.fixture(scope="module")
def fake_weights(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("fid")
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch >= 2.9 flags TorchScript as deprecated
        for name, cls in (("plain", PooledPixels), ("logits", PooledPixelsWithLogits)):
            torch.manual_seed(0)
            out[name] = folder / f"{name}.pt"
            torch.jit.script(cls()).save(str(out[name]))
    return out


# the tiny model gains nothing from a second thread, and a busy machine makes it much slower; torchrun's
# workers get one thread each anyway, so 1 and 2 processes also run the same kernels
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def cli(*args: str, cache: Path, check: bool = True) -> subprocess.CompletedProcess:
    """`farmer ...` in a subprocess with its cache (reference statistics) under ``cache``."""
    proc = run_command(args, env={**ENV, **ONE_THREAD, "XDG_CACHE_HOME": str(cache)}, timeout=300)
    if check and proc.returncode != 0:
        command = " ".join(map(str, args))
        raise AssertionError(f"farmer {command} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


# ----- precision / recall in blocks -----
def full_matrix_pr(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """The previous implementation: whole N x N distance matrices."""
    real, fake = real.double(), fake.double()
    r_real = torch.cdist(real, real).kthvalue(k + 1, dim=1).values
    r_fake = torch.cdist(fake, fake).kthvalue(k + 1, dim=1).values
    precision = (torch.cdist(fake, real) <= r_real[None]).any(dim=1).double().mean().item()
    recall = (torch.cdist(real, fake) <= r_fake[None]).any(dim=1).double().mean().item()
    return precision, recall


def clouds(n_real: int, n_fake: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two overlapping, differently spread clouds on a low-dimensional manifold in ``dim`` dims (non-trivial P/R)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(8, dim, generator=g)
    real = torch.randn(n_real, 8, generator=g) @ basis + 0.3 * torch.randn(n_real, dim, generator=g)
    fake = (torch.randn(n_fake, 8, generator=g) + 1.0) @ basis + 0.3 * torch.randn(n_fake, dim, generator=g)
    return real, fake


@pytest.mark.parametrize("n_real, n_fake, dim", [(500, 350, 16), (300, 420, 2048)])
def test_chunked_precision_recall_equals_full_matrices(n_real, n_fake, dim, single_thread):
    real, fake = clouds(n_real, n_fake, dim)
    expected = full_matrix_pr(real, fake)
    assert 0.05 < expected[0] < 0.95 and 0.05 < expected[1] < 0.95, expected  # neither trivially 0 nor 1
    for chunk in (1, 7, 64, None, 10_000):
        assert precision_recall(real, fake, chunk=chunk) == expected, chunk
    assert precision_recall(real.float(), fake.float()) == expected  # float32 inputs are computed in float64


def test_precision_recall_toy_clouds_unchanged(single_thread):
    g = torch.Generator().manual_seed(0)
    real = torch.randn(400, 2, generator=g)
    for chunk in (37, None):
        assert precision_recall(real, real.clone(), chunk=chunk) == (1.0, 1.0)
        assert precision_recall(real, torch.randn(400, 2, generator=g) + 100.0, chunk=chunk) == (0.0, 0.0)


MEMORY_PROBE = textwrap.dedent("""
    import json, sys, torch
    from farmer_cli.eval.feature_metrics import precision_recall

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    n, dim, chunk = (int(a) for a in sys.argv[1:4])
    torch.manual_seed(0)
    real, fake = torch.randn(n, dim, dtype=torch.float64), torch.randn(n, dim, dtype=torch.float64) + 0.1
    precision_recall(real[:100], fake[:100], chunk=chunk)  # warm-up: library pools and thread buffers
    try:  # reset the peak (VmHWM) to the current RSS; without it the peak so far only overstates the growth
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    before = status("VmRSS")
    precision_recall(real, fake, chunk=chunk)
    print(json.dumps({"growth": status("VmHWM") - before}))
""")


def measure_pr_growth(n: int, dim: int, chunk: int) -> int:
    # A fixed mmap threshold: glibc's adaptive one lets freed blocks stay in the heap, so the peak RSS growth of
    # the same run varied from 36 to 136 MB; with it every block is returned on free and the growth is what is live.
    env = {**ENV, "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(n), str(dim), str(chunk)], capture_output=True,
                          text=True, env=env, timeout=300, check=True)
    return json.loads(proc.stdout.splitlines()[-1])["growth"]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux) to read the peak RSS")
def test_precision_recall_memory_grows_with_blocks_not_n_squared():
    # N = 8,000: one N x N float64 matrix would be 512 MB; a 256-row block against N columns is 16 MB
    n, dim, chunk = 8_000, 64, 256
    growth = measure_pr_growth(n, dim, chunk)
    block = chunk * n * 8
    assert growth < 6 * block + (64 << 20), f"{growth / 2**20:.0f} MiB for 16 MiB blocks"
    assert growth < n * n * 8 / 4  # a quarter of one N x N matrix


def test_precision_recall_at_20k_by_2048_fits_2gb_by_construction():
    """The default block for N = 20,000 is 128 MB; the float64 copies of the two 20k x 2048 inputs are 655 MB; so
    the peak growth is about 1 GB (measured: see test_precision_recall_20k_measured), never N x N (3.2 GB each)."""
    n, dim = 20_000, 2048
    chunk = pr_chunk(n)
    block = chunk * n * 8
    assert block <= 128 << 20 and chunk >= 100
    inputs = 2 * n * dim * 8
    assert inputs + 4 * block < 2 << 30


@pytest.mark.skipif(os.environ.get("FARMER_PR_20K") != "1", reason="about 1.5 minutes on 2 cores: FARMER_PR_20K=1")
def test_precision_recall_20k_measured():
    assert measure_pr_growth(20_000, 2048, 0) < 2 << 30


# ----- Inception features, resize rules, Inception Score -----
def tf_legacy_by_grid_sample(x: torch.Tensor) -> torch.Tensor:
    """StyleGAN's emulation of TF1's resize_bilinear (an independent formulation: a shifted sampling grid)."""
    B, C, H, W = x.shape
    theta = torch.eye(2, 3, dtype=torch.float64)
    theta[0, 2] += 1 / W - 1 / 299
    theta[1, 2] += 1 / H - 1 / 299
    grid = F.affine_grid(theta[None].repeat(B, 1, 1), [B, C, 299, 299], align_corners=False)
    return F.grid_sample(x.double(), grid, mode="bilinear", padding_mode="border", align_corners=False)


@pytest.mark.parametrize("size", [8, 28, 256])
def test_tf_legacy_resize_matches_the_grid_emulation(size: int):
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(size)) * 255
    out = resize_299(x, "tf-legacy")
    assert out.shape == (2, 3, 299, 299)
    torch.testing.assert_close(out.double(), tf_legacy_by_grid_sample(x), rtol=0, atol=1e-3)
    torch.testing.assert_close(out[..., 0, 0], x[..., 0, 0])  # no half-pixel shift: output (0, 0) is input (0, 0)
    assert not torch.allclose(out, resize_299(x, "antialias"), atol=1e-2)


def test_inception_features_any_batch_same_numbers():
    net = PooledPixels()
    images = torch.randint(0, 256, (23, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    whole = inception_features(net, images, batch=23, device="cpu")
    assert whole.dtype == torch.float64 and whole.device.type == "cpu" and whole.shape == (23, 48)
    for batch in (1, 5):
        torch.testing.assert_close(inception_features(net, images, batch=batch), whole, rtol=1e-6, atol=1e-4)


def test_inception_score_needs_logits_and_says_why_not():
    weight, why = logits_layer(torch.jit.script(PooledPixels()), 48)
    assert weight is None and "default_1.pt" in why and "output layer" in why
    net = PooledPixelsWithLogits()
    weight, why = logits_layer(net, 48)
    assert weight.shape == (10, 48) and why == ""
    # one-hot-like predictions spread evenly over 10 classes: IS = 10; identical predictions: IS = 1
    sharp = torch.eye(10).repeat(30, 1) * 60.0
    assert inception_score(sharp, torch.eye(10))["value"] == pytest.approx(10.0, rel=1e-6)
    assert inception_score(torch.ones(300, 10), torch.eye(10))["value"] == pytest.approx(1.0)
    assert inception_score(sharp, torch.eye(10), split_size=100)["splits"] == 3


# ----- reference statistics files -----
def test_ref_stats_round_trip_gives_the_same_fid(tmp_path: Path):
    from farmer_cli.config.schema import DataConfig
    from farmer_cli.data.dataset import load_data
    from farmer_cli.eval.fid import stream_features

    data = load_data(DataConfig(source="digits"), 1, 8)
    net = PooledPixels()
    real = stream_features(net, data.test, batch=32)  # streamed: one batch of images at a time
    assert real.shape == (len(data.test), 48)
    fake = stream_features(net, data.train, batch=64, limit=300)
    mu_r, cov_r = feature_stats(real)
    path = tmp_path / "ref.npz"
    save_ref_stats(path, real, {"resize_name": "antialias"}, mu_r, cov_r)
    loaded = load_ref_stats(path, feature_dim=48)
    assert loaded["protocol"] == {"resize_name": "antialias"} and len(loaded["sha256"]) == 64
    torch.testing.assert_close(loaded["act"], real, rtol=0, atol=0)  # features are float32 values: stored exactly
    mu_f, cov_f = feature_stats(fake)
    assert frechet_distance(mu_f, cov_f, loaded["mu"], loaded["sigma"]) == frechet_distance(mu_f, cov_f, mu_r, cov_r)
    # ADM's layout: mu / sigma (and act) only, no protocol
    np.savez(tmp_path / "adm.npz", mu=mu_r, sigma=cov_r)
    adm = load_ref_stats(tmp_path / "adm.npz")
    assert adm["act"] is None and adm["protocol"] is None
    from farmer_cli.eval.ref_stats import reference_resize

    assert reference_resize(adm) == "tf-legacy" and reference_resize(loaded) == "antialias"


@pytest.mark.parametrize("compressed", [False, True])
def test_adm_layout_reference_images_are_streamed_for_pr(compressed: bool, tmp_path: Path, monkeypatch):
    """ADM's reference batches ship the reference images (arr_0, uint8 NHWC) instead of features: pr computes their
    features here, batch by batch from the archive, the same as from the data set."""
    from farmer_cli.config.schema import DataConfig
    from farmer_cli.data.dataset import load_data
    from farmer_cli.eval.fid import ref_file_features, stream_features
    from farmer_cli.eval.ref_stats import iter_npz_images

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    test = load_data(DataConfig(source="digits"), 1, 8).test
    images = torch.stack([test[i][0] for i in range(len(test))])
    net = PooledPixels()
    expected = stream_features(net, test, batch=32)
    path = tmp_path / "adm.npz"
    (np.savez_compressed if compressed else np.savez)(path, arr_0=images.permute(0, 2, 3, 1).numpy(),
                                                      mu=np.zeros(48), sigma=np.eye(48))
    stats = load_ref_stats(path, feature_dim=48)
    assert stats["act"] is None and stats["images"] == (len(test), 8, 8, 1)
    batches = list(iter_npz_images(path, batch=50))
    assert [len(b) for b in batches] == [50, 50, 50, 30] and torch.equal(torch.cat(batches), images)
    feats, cached = ref_file_features(net, stats, "weights-sha", batch=32)
    assert not cached and torch.equal(feats, expected)
    again, cached = ref_file_features(net, stats, "weights-sha", batch=32)
    assert cached and torch.equal(again, expected)
    cache_file, = (tmp_path / "cache").rglob("ref-*.npy")
    for damage in (b"\x93NUMPY damaged", np.lib.format.MAGIC_PREFIX + b"\x01\x00{'descr': '<f8'}"):
        cache_file.write_bytes(damage)  # a damaged cache is computed again and rewritten, not a traceback
        again, cached = ref_file_features(net, stats, "weights-sha", batch=32)
        assert not cached and torch.equal(again, expected)
    np.savez(tmp_path / "floats.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32), mu=np.zeros(48), sigma=np.eye(48))
    with pytest.raises(ValueError, match="expected reference images"):
        load_ref_stats(tmp_path / "floats.npz")


def test_cli_save_then_load_ref_stats_same_fid(tiny_run: Path, fake_weights, tmp_path: Path):
    ref = tmp_path / "stats" / "ref.npz"
    common = ["evaluate", "--ckpt", tiny_run, "--metrics", "fid,pr", "-n", "30", "-b", "30"]
    saved = json.loads(cli(*common, "--json", "--trust-weights", "--fid-weights", fake_weights["plain"],
                           "--save-ref-stats", ref, cache=tmp_path).stdout)
    assert saved["metrics"]["inception_score"].startswith("unavailable: ")
    assert saved["protocol"]["reference"] | {"cached": None} == {
        "kind": "data", "source": "digits", "split": "test", "n": 180, "cached": None, "saved_to": str(ref)}
    # read back, with a network that has the same features plus an output layer (other weights: flagged)
    before = set(tiny_run.glob("eval-*.json"))
    table = cli(*common, "--trust-weights", "--fid-weights", fake_weights["logits"], "--ref-stats", ref,
                cache=tmp_path).stdout
    (written,) = set(tiny_run.glob("eval-*.json")) - before  # a new file: earlier evaluations are kept
    loaded = json.loads(written.read_text())
    assert loaded["metrics"]["fid"]["value"] == saved["metrics"]["fid"]["value"]
    assert loaded["metrics"]["precision_recall"]["precision"] == saved["metrics"]["precision_recall"]["precision"]
    assert loaded["metrics"]["fid"]["n_real"] == 180 and loaded["protocol"]["reference"]["kind"] == "file"
    assert loaded["metrics"]["inception_score"]["value"] >= 1.0
    for text in ("Inception Score", "N fake = 30", "N real = 180", str(ref), "resize: antialias", "another protocol"):
        assert text in " ".join(table.split()), text


@pytest.mark.parametrize("make, extra, message", [
    (None, [], "no such file"),
    (lambda p: np.savez(p, mu=np.zeros(48)), [], "no 'sigma' array"),
    (lambda p: p.write_bytes(b"not an npz"), [], "not an .npz archive"),
    (lambda p: np.savez(p, mu=np.zeros(10), sigma=np.eye(10)), [], "10-d statistics, but the Inception network "
     "gives 48-d"),
    (lambda p: np.savez(p, mu=np.zeros(48), sigma=np.eye(48)), ["--metrics", "fid,pr"], "neither 'act'"),
    (lambda p: np.savez(p, mu=np.zeros(48), sigma=np.eye(48)), ["--save-ref-stats", "x.npz"], "not both"),
])
def test_bad_ref_stats_is_one_line_exit_2(make, extra, message, tiny_run: Path,
                                         fake_weights, tmp_path: Path):
    path = tmp_path / "ref.npz"
    if make is not None:
        make(path)
    args = ["--metrics", "fid", *extra] if "--metrics" not in extra else extra
    proc = cli("evaluate", "--ckpt", tiny_run, "--trust-weights", "--fid-weights", fake_weights["plain"],
               "--ref-stats", path, *args, cache=tmp_path, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_adm_reference_files_default_to_their_resize(tiny_run: Path, fake_weights, tmp_path: Path):  # noqa: F811
    """ADM's reference batches record no protocol and were resized by the TF graph: FID against one uses tf-legacy
    unless told otherwise, and then says the figures are not comparable."""
    ref = tmp_path / "adm.npz"
    np.savez(ref, mu=np.zeros(48), sigma=np.eye(48))
    common = ["evaluate", "--ckpt", tiny_run, "--metrics", "fid", "-n", "8", "-b", "8", "--json", "--trust-weights",
              "--fid-weights", fake_weights["plain"], "--ref-stats", ref]
    auto = json.loads(cli(*common, cache=tmp_path).stdout)["protocol"]
    assert auto["resize_name"] == "tf-legacy" and "warning" not in auto["reference"]
    mixed = json.loads(cli(*common, "--resize", "antialias", cache=tmp_path).stdout)["protocol"]
    assert mixed["resize_name"] == "antialias" and "tf-legacy" in mixed["reference"]["warning"]


# ----- several processes -----
@pytest.mark.slow
def test_two_process_evaluate_equals_one_process(tiny_run: Path, fake_weights, tmp_path: Path):
    with socket.socket() as sock:  # a free rendezvous port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = ["-m", "farmer_cli", "evaluate", "--ckpt", str(tiny_run), "--metrics", "sample-acc,fid,pr,bpd",
            "--limit", "20", "-n", "40", "-b", "20", "--trust-weights", "--fid-weights", str(fake_weights["plain"]),
            "--json"]
    env = {**ENV, **ONE_THREAD, "XDG_CACHE_HOME": str(tmp_path)}
    one = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(port)]
    two = subprocess.run(launch + args, capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    r1, r2 = json.loads(one.stdout), json.loads(two.stdout)  # only the main process prints
    assert (r1["processes"], r2["processes"]) == (1, 2)
    assert r1["metrics"] == r2["metrics"]
    assert r2["metrics"]["sample_acc"]["n"] == r2["metrics"]["fid"]["n_fake"] == 40


def test_a_zip_bomb_ref_stats_is_refused_before_it_is_decompressed(tmp_path: Path, monkeypatch):
    """An .npz whose member expands far beyond its stored size (compressed zeros) is one StatsError naming the
    member; an ordinary np.savez file of the same arrays loads."""
    import farmer_cli.eval.ref_stats as ref_stats_module
    from farmer_cli.eval.ref_stats import StatsError

    monkeypatch.setattr(ref_stats_module, "BOMB_BYTES", 1 << 20)  # the same rule at a test's size
    arrays = {"mu": np.zeros(8), "sigma": np.eye(8), "act": np.zeros((40_000, 8))}  # act: 2.56 MB of zeros
    np.savez_compressed(tmp_path / "bomb.npz", **arrays)
    with pytest.raises(StatsError, match=r"'act.npy' would expand .* refusing to decompress"):
        load_ref_stats(tmp_path / "bomb.npz")
    np.savez(tmp_path / "plain.npz", **arrays)
    assert load_ref_stats(tmp_path / "plain.npz")["act"].shape == (40_000, 8)
