"""Decoding images as they are meant (farmer_cli/data.py): real bit depth, EXIF orientation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from farmer_cli.data.images import load_image


def test_16_bit_grey_is_scaled_not_clipped(tmp_path: Path):
    values = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)  # 0 .. 63,000
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I;16")
    u, size = load_image(tmp_path / "g16.png", 1, 8)
    assert size == (8, 8)
    np.testing.assert_array_equal(u[0].numpy(), (values >> 8).astype(np.uint8))  # PIL alone clips at 255


def test_exif_orientation_is_applied(tmp_path: Path):
    pixels = np.zeros((4, 8, 3), np.uint8)
    pixels[:, :4] = 255  # left half white, stored landscape
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    img.save(tmp_path / "o.png", exif=exif)
    u, size = load_image(tmp_path / "o.png", 3, 4)
    assert size == (4, 8)  # shown portrait
    shown = np.asarray(Image.open(tmp_path / "o.png").transpose(Image.Transpose.ROTATE_270))
    assert shown.shape[:2] == (8, 4) and shown[0, 0, 0] == 255  # white ends up on top
    assert u[0, 0, :].float().mean() > 200 and u[0, -1, :].float().mean() < 50  # top white, bottom black


def _folder(root: Path, shade: int) -> Path:
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8), shade + 10 * i, dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_reference_caches_are_keyed_by_the_images_not_the_source_name(tmp_path: Path, monkeypatch):
    """The FID reference statistics are cached under the split's content: two folders both passed as --data data
    (from different directories) differ, and so does a folder whose image changed."""
    import os

    from farmer_cli.config.schema import DataConfig
    from farmer_cli.data.dataset import load_data

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    prints = {}
    for where, shade in (("x", 0), ("y", 100)):
        _folder(tmp_path / where / "data", shade)
        monkeypatch.chdir(tmp_path / where)
        prints[where] = load_data(DataConfig(source="data", test_fraction=0.34), 1, 8).test.fingerprint()
    assert prints["x"] != prints["y"]
    again = load_data(DataConfig(source="data", test_fraction=0.34), 1, 8).test
    assert again.fingerprint() == prints["y"]
    changed = again.source.paths[again.indices[0]]
    Image.fromarray(np.full((8, 8), 255, dtype=np.uint8)).save(changed)
    os.utime(changed, ns=(0, 10**9))
    assert load_data(DataConfig(source="data", test_fraction=0.34), 1, 8).test.fingerprint() != prints["y"]


def test_a_corrupt_reference_cache_is_recomputed(tmp_path: Path):
    from farmer_cli.eval.fid import _read_cached_stats

    bad = tmp_path / "stats.npz"
    bad.write_bytes(b"PK\x03\x04 not a zip")
    assert _read_cached_stats(bad) is None
    np.savez(tmp_path / "wrong.npz", features=np.zeros((3, 4)), mu=np.zeros(5), cov=np.zeros((4, 4)))
    assert _read_cached_stats(tmp_path / "wrong.npz") is None
    np.savez(tmp_path / "nan.npz", features=np.full((3, 4), np.nan), mu=np.zeros(4), cov=np.eye(4))
    assert _read_cached_stats(tmp_path / "nan.npz") is None
    np.savez(tmp_path / "good.npz", features=np.zeros((3, 4)), mu=np.zeros(4), cov=np.eye(4))
    assert _read_cached_stats(tmp_path / "good.npz") is not None


def test_resume_refuses_data_that_changed_since_the_run_started(tmp_path: Path):
    from cli_helpers import farmer

    root = _folder(tmp_path / "data", 0)
    run = tmp_path / "run"
    farmer("train", "--preset", "tiny", "--data", str(root), "--steps", "4", "--stop-after", "2", "--out", str(run))
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(root / "b" / "new.png")
    proc = farmer("train", "--out", str(run), "--resume", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "the data of" in proc.stderr and "changed since the run started" in proc.stderr
    (root / "b" / "new.png").unlink()
    farmer("train", "--out", str(run), "--resume")  # the same data again: it continues


def test_a_sliver_image_is_cropped_before_it_is_resized(tmp_path: Path):
    """A 1 x 200,000 PNG (a few hundred bytes) would resize to 8 x 1,600,000 before the centre crop: it is cropped
    to its centre first, so memory stays at the image's own size."""
    line = np.zeros((1, 200_000), np.uint8)
    line[0, 99_990:100_010] = 255  # the centre
    Image.fromarray(line).save(tmp_path / "sliver.png")
    u, size = load_image(tmp_path / "sliver.png", 1, 8)
    assert size == (200_000, 1) and u.shape == (1, 8, 8) and u.max() > 0


def _class_folders(root: Path, counts: dict[str, int], seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for k in range(count):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(root / name / f"{k}.png")
    return root


def test_an_official_test_set_replaces_the_held_out_split(tmp_path: Path):
    import pytest

    from farmer_cli.config.schema import DataConfig
    from farmer_cli.data.dataset import load_data
    from farmer_cli.data.sources import DataError

    train = _class_folders(tmp_path / "train", {"a": 6, "b": 4}, 0)
    val = _class_folders(tmp_path / "val", {"a": 2, "b": 1}, 1)
    held_out = load_data(DataConfig(source=str(train)), 1, 8)
    official = load_data(DataConfig(source=str(train), test_source=str(val)), 1, 8)
    assert (len(held_out.train), len(held_out.test)) == (9, 1)
    assert (len(official.train), len(official.test)) == (10, 3)  # every training image trains
    assert sorted(int(y) for _, y in official.test) == [0, 0, 1]
    assert official.layout["digest"] != held_out.layout["digest"]  # a resume notices another test set
    other = _class_folders(tmp_path / "other", {"a": 1, "c": 1}, 2)
    with pytest.raises(DataError, match=r"data.test_source .*other: its 2 classes are not the 2 of data.source"):
        load_data(DataConfig(source=str(train), test_source=str(other)), 1, 8)
    unlabelled = load_data(DataConfig(source=str(train), test_source=str(other), use_labels=False), 1, 8)
    assert len(unlabelled.test) == 2


def test_train_reports_on_the_test_data_given(tmp_path: Path):
    from cli_helpers import farmer

    train = _class_folders(tmp_path / "train", {"a": 6, "b": 4}, 0)
    val = _class_folders(tmp_path / "val", {"a": 2, "b": 1}, 1)
    proc = farmer("train", "--preset", "tiny", "--steps", "1", "--data", str(train), "--test-data", str(val),
                  "--out", str(tmp_path / "run"))
    assert "10 train / 3 test images" in proc.stderr
