"""Which latent channels of the ``imagenet64-bpd`` preset should be informative: test bits/dim per choice, at laptop
scale, on real colour photographs, same budget and seeds for every choice.

The preset's AR tokens hold 48 channels (patch 2 x 3 colours, 2x2 token merge); 16 go to the per-token mixtures
and the rest to the one shared mixture. Choices compared:

  pixel, 16   the preset until now: the first 4 channels of each merged sub-token, i.e. the red sub-pixels only
  dct, 16     per-patch DCT basis: each sub-token's DC of red, green and blue plus one more low frequency
  dct, 12     per-patch DCT basis: each sub-token's three colour DCs only (the patch's mean colour)
  whole-pixel, 12   whole pixels: each sub-token's pixel (0, 0) in red, green and blue, i.e. every other pixel of
              the image in full colour (a stride-2 grid)

Data: random 32x32 crops (resized from 48x48) of the two colour photographs that ship inside scikit-learn
(``china.jpg``, ``flower.jpg``); training crops from the left 70% of each photograph, test crops from the right 30%,
so no test pixel is seen in training. The model is the preset at reduced width and depth (below); the comparison
is between channel choices at equal budget, not a bits/dim for ImageNet.

    python bench/channel_split.py --steps 250 --seeds 0 1        # about 2 CPU minutes per run on 2 cores
    python bench/channel_split.py --steps 250 --seeds 0 1 --only whole-pixel   # one choice
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np

from common import report
from farmer_cli.config.files import apply_overrides, load_preset
from farmer_cli.data.dataset import load_data
from farmer_cli.device import make_accelerator
from farmer_cli.train.trainer import train

CHOICES = {
    "pixel, 16 (red sub-pixels)": ["model.token_basis=pixel", "model.informative_dims=16"],
    "dct, 16 (colour DCs + 1)": ["model.token_basis=dct", "model.informative_dims=16"],
    "dct, 12 (colour DCs)": ["model.token_basis=dct", "model.informative_dims=12"],
    "whole-pixel, 12 (stride-2 pixels, RGB)": ["model.token_basis=whole-pixel", "model.informative_dims=12"],
}
LAPTOP = ["model.image_size=32", "model.af_blocks=4", "model.af_layers=1", "model.af_width=128", "model.af_heads=4",
          "model.ar_layers=2", "model.ar_width=128", "model.ar_heads=4", "model.cond_repeat=4",
          "model.informative_components=16", "model.redundant_components=32", "model.grad_checkpoint=false",
          "train.epochs=0", "train.batch_size=32", "train.lr=1e-3", "train.min_lr=1e-5", "train.warmup_steps=50",
          "train.ema_decay=0.999", "train.log_every=100", "train.ckpt_every=1000000", "data.num_workers=0"]


def photo_crops(root: Path, per_photo: int = 1500, side: int = 48) -> Path:
    """A saved ``datasets`` DatasetDict of colour crops with its own train / test split (see the module doc)."""
    import datasets
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(0)
    split: dict[str, list] = {"train": [], "test": []}
    for photo in load_sample_images().images:
        h, w, _ = photo.shape
        cut = int(w * 0.7)
        for name, (lo, hi), n in (("train", (0, cut - side), per_photo), ("test", (cut, w - side), per_photo // 4)):
            for _ in range(n):
                y, x = rng.integers(0, h - side), rng.integers(lo, hi)
                split[name].append(Image.fromarray(photo[y:y + side, x:x + side]))
    features = datasets.Features({"image": datasets.Image()})
    dd = datasets.DatasetDict({k: datasets.Dataset.from_dict({"image": v}, features=features) for k, v in split.items()})
    path = root / "photo-crops"
    dd.save_to_disk(str(path))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--only", nargs="+", default=[], help="run only the choices whose names start with these, "
                    "e.g. --only whole-pixel (the others' figures at the same budget and seeds compare)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        source = photo_crops(Path(tmp))
        for name, choice in CHOICES.items():
            if args.only and not name.startswith(tuple(args.only)):
                continue
            bpds = []
            for seed in args.seeds:
                cfg = apply_overrides(load_preset("imagenet64-bpd"), LAPTOP + choice + [
                    f"data.source={source}", f"train.steps={args.steps}", f"train.seed={seed}"])
                data = load_data(cfg.data, cfg.model.channels, cfg.model.image_size)
                result = train(cfg, data, Path(tmp) / f"{len(rows)}-{seed}", make_accelerator(cfg.train.mixed_precision))
                bpds.append(result.bpd_after)
                print(f"{name}, seed {seed}: test bits/dim {result.bpd_after:.4f} ({len(data.train)} train / "
                      f"{len(data.test)} test crops)", flush=True)
            rows.append({"informative channels": name, "test bits/dim (mean)": statistics.mean(bpds),
                         "spread (max - min)": max(bpds) - min(bpds), "per seed": [round(b, 4) for b in bpds]})
    report("channel_split", rows, {"steps": args.steps, "seeds": args.seeds, "scale": LAPTOP})


if __name__ == "__main__":
    main()
