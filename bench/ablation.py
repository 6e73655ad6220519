"""The paper's ablation (the paper's ablation table, v2 Table 3) at laptop scale, on the embedded MNIST digits, same steps for each variant:

  (a) AF with a Gaussian base, TARFlow-like: K = 1, no channel split (the prior is one more affine AF block)
  (b) FARMER without the channel split (every channel informative, per-token GMMs)
  (c) full FARMER (informative per-token GMMs + one shared GMM for the redundant channels)

Reports test bits/dim (full test split, uniform dequantisation) and the sample accuracy of a reference
classifier (guided and unguided), mean and spread over seeds, plus parameter counts.

    python bench/ablation.py --steps 2000 --seeds 0 1        # about 8 CPU minutes per run on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


from common import report
from farmer_cli.checkpoint import load_model
from farmer_cli.config.files import apply_overrides, load_preset
from farmer_cli.data.dataset import load_data
from farmer_cli.eval.protocol import reference_classifier_accuracy
from farmer_cli.sample.generate import generate
from farmer_cli.eval.bits import bits_per_dim
from farmer_cli.device import make_accelerator
from farmer_cli.train.trainer import train

VARIANTS = {
    "(a) AF + Gaussian base (K=1, no split)": ["model.channel_split=false", "model.informative_components=1"],
    "(b) FARMER, no channel split": ["model.channel_split=false"],
    "(c) FARMER (full)": [],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--samples", type=int, default=200)
    args = ap.parse_args()
    acc = make_accelerator("auto")
    rows = []
    for name, overrides in VARIANTS.items():
        bpds, accs_guided, accs_unguided, params, minutes = [], [], [], 0, []
        for seed in args.seeds:
            cfg = apply_overrides(load_preset("quickstart"), overrides + [f"train.steps={args.steps}",
                                                                         f"train.seed={seed}"])
            data = load_data(cfg.data, cfg.model.channels, cfg.model.image_size)
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.time()
                train(cfg, data, Path(tmp) / "run", acc)
                minutes.append((time.time() - t0) / 60)
                model, _, _, _ = load_model(Path(tmp) / "run")  # the EMA weights, as users get them
            params = sum(p.numel() for p in model.parameters())
            bpds.append(bits_per_dim(model, data.test, True, 1, 100, 0)["mean"])
            for cfg_w, store in ((2.0, accs_guided), (0.0, accs_unguided)):
                cfg.sampling.cfg = cfg_w
                images, labels = generate(model, args.samples, cfg.sampling, seed, 100)
                store.append(reference_classifier_accuracy(data.train, images, labels)["accuracy"])
            print(f"{name} seed {seed}: test bpd {bpds[-1]:.3f}, sample acc guided {accs_guided[-1]:.2f} "
                  f"unguided {accs_unguided[-1]:.2f}, {minutes[-1]:.1f} min", flush=True)
        spread = (lambda v: statistics.stdev(v) if len(v) > 1 else float("nan"))
        rows.append({"variant": name, "params_M": round(params / 1e6, 3), "test_bpd": statistics.mean(bpds),
                     "bpd_sd": spread(bpds), "sample_acc_cfg2": statistics.mean(accs_guided),
                     "sample_acc_cfg0": statistics.mean(accs_unguided), "minutes_per_run": statistics.mean(minutes),
                     "seeds": len(args.seeds)})
    report("ablation", rows, {"steps": args.steps})


if __name__ == "__main__":
    main()
