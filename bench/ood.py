"""Out-of-distribution detection, offline, in both directions: quickstart-sized models trained on MNIST-5k and on
Fashion-MNIST each score their own held-out test images (the run's own split, from its config.json) against other
sets; AUROC and FPR at 95% TPR of each score of farmer_cli/eval/ood.py (larger = more out-of-distribution).

Development cases (the six the default score was designed on): the other data set, uniform noise, constant images.
Held-out cases (named here before their results were seen, and not used to choose anything): the model's own test
images inverted (255 - u), and scikit-learn's 8x8 digits upscaled to 28x28.

    python bench/ood.py --mnist-run runs/mnist --fashion-run runs/fashion      # reuse trained runs
    python bench/ood.py                                                         # train both first (~2 x 5 min)

Fashion-MNIST comes from Debian's dataset-fashion-mnist package.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report  # noqa: E402

from farmer_cli.eval import ood  # noqa: E402
from farmer_cli.data.batching import iterate_batches  # noqa: E402
from farmer_cli.checkpoint import load_model  # noqa: E402
from farmer_cli.config.schema import DataConfig  # noqa: E402
from farmer_cli.config.files import apply_overrides, load_preset  # noqa: E402
from farmer_cli.data.dataset import load_data  # noqa: E402
from farmer_cli.data.sources import DataError  # noqa: E402
from farmer_cli.device import make_accelerator  # noqa: E402
from farmer_cli.train.trainer import train  # noqa: E402


def ensure_run(path: Path | None, source: str) -> Path:
    if path is not None and (path / "model.safetensors").exists():
        return path
    path = path or Path("runs") / f"ood-{source}"
    cfg = apply_overrides(load_preset("quickstart"), [f"data.source={source}"])
    data = load_data(cfg.data, cfg.model.channels, cfg.model.image_size)
    train(cfg, data, path, make_accelerator(cfg.train.mixed_precision))
    return path


def test_images(data: DataConfig, limit: int) -> torch.Tensor:
    return torch.cat([u for u, _ in iterate_batches(load_data(data, 1, 28).test, 256, limit)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mnist-run", type=Path)
    ap.add_argument("--fashion-run", type=Path)
    ap.add_argument("--limit", type=int, default=1000, help="test images per data set")
    args = ap.parse_args()
    runs = {"mnist5k": ensure_run(args.mnist_run, "mnist5k")}
    try:
        runs["fashion-mnist"] = ensure_run(args.fashion_run, "fashion-mnist")
    except DataError as err:  # Debian's dataset-fashion-mnist is not on every machine
        print(f"skipping the Fashion-MNIST model and set: {err}", flush=True)
    gen = torch.Generator().manual_seed(0)
    configs = {name: load_model(run)[1].data for name, run in runs.items()}
    shared = {name: test_images(data, args.limit) for name, data in configs.items()}
    shared["uniform noise"] = torch.randint(0, 256, (200, 1, 28, 28), generator=gen, dtype=torch.uint8)
    shared["constant"] = torch.randint(0, 256, (200, 1, 1, 1), generator=gen, dtype=torch.uint8).expand(-1, 1, 28, 28)
    digits = test_images(DataConfig(source="digits", test_fraction=0.5), args.limit)
    rows = []
    for trained_on, run in runs.items():
        model, cfg, _, _ = load_model(run)
        train = ood.training_statistics(model, load_data(cfg.data, 1, 28).train)
        sets = {**shared, "inverted (held out)": 255 - shared[trained_on], "sklearn digits (held out)": digits}
        bpd = {name: ood.bits_per_dim_of(model, images) for name, images in sets.items()}
        values = {score: {name: ood.scores(score, bpd[name], sets[name], train) for name in sets}
                  for score in ood.SCORES if score != "ratio"}
        for other in sets:
            if other == trained_on:
                continue
            row = {"trained on": trained_on, "out-of-distribution": other,
                   "bpd in / out": f"{bpd[trained_on].mean():.2f} / {bpd[other].mean():.2f}"}
            for score, by_set in values.items():
                sep = ood.separation(by_set[trained_on], by_set[other])
                row[f"AUROC {score}"], row[f"FPR95 {score}"] = sep["auroc"], sep["fpr_at_95_tpr"]
            rows.append(row)
            print(row, flush=True)
    report("ood", rows, {"limit": args.limit, "runs": {k: str(v) for k, v in runs.items()},
                         "note": "typicality/combined centre and scale: 1000 training images of each model"})


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
