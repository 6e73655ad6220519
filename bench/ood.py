"""Out-of-distribution detection, offline, in both directions: quickstart-sized models trained on MNIST-5k and on
Fashion-MNIST each score their own held-out test images against the other set's, uniform noise and constant
images; AUROC of each score of farmer_cli/eval/ood.py (larger = more out-of-distribution).

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


def test_images(source: str, limit: int) -> torch.Tensor:
    return torch.cat([u for u, _ in iterate_batches(load_data(DataConfig(source=source), 1, 28).test, 256, limit)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mnist-run", type=Path)
    ap.add_argument("--fashion-run", type=Path)
    ap.add_argument("--limit", type=int, default=1000, help="test images per data set")
    args = ap.parse_args()
    runs = {"mnist5k": ensure_run(args.mnist_run, "mnist5k"), "fashion-mnist": ensure_run(args.fashion_run,
                                                                                        "fashion-mnist")}
    gen = torch.Generator().manual_seed(0)
    sets = {name: test_images(name, args.limit) for name in runs}
    sets["uniform noise"] = torch.randint(0, 256, (200, 1, 28, 28), generator=gen, dtype=torch.uint8)
    sets["constant"] = torch.randint(0, 256, (200, 1, 1, 1), generator=gen, dtype=torch.uint8).expand(-1, 1, 28, 28)
    rows = []
    for trained_on, run in runs.items():
        model, cfg, _, _ = load_model(run)
        train = ood.training_statistics(model, load_data(cfg.data, 1, 28).train)
        bpd = {name: ood.bits_per_dim_of(model, images) for name, images in sets.items()}
        values = {score: {name: ood.scores(score, bpd[name], sets[name], train) for name in sets}
                  for score in ("bpd", "complexity", "typicality", "combined")}
        for other in sets:
            if other == trained_on:
                continue
            row = {"trained on": trained_on, "out-of-distribution": other,
                   "bpd in / out": f"{bpd[trained_on].mean():.2f} / {bpd[other].mean():.2f}"}
            for score, by_set in values.items():
                row[f"AUROC {score}"] = ood.separation(by_set[trained_on], by_set[other])["auroc"]
            rows.append(row)
            print(row, flush=True)
    report("ood", rows, {"limit": args.limit, "runs": {k: str(v) for k, v in runs.items()},
                         "note": "typicality/combined centre and scale: 1000 training images of each model"})


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
