"""Sampling speed: images/s for the quickstart and a mid-size model, KV-cached vs uncached decoding, guided vs
unguided. Speed does not depend on the weights, so untrained models are timed (pass --ckpt to time a trained one).

    python bench/sampling.py [--batch 16] [--repeats 3]
"""

from __future__ import annotations

import argparse

import torch

from common import interleaved, report
from farmer_cli.config.schema import SamplingConfig
from farmer_cli.config.files import apply_overrides, load_preset
from farmer_cli.model import Farmer

MID = ["model.af_blocks=8", "model.af_layers=2", "model.af_width=256", "model.ar_layers=6", "model.ar_width=256"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rows = []
    for name, overrides in (("quickstart", []), ("quickstart-mid (8x2x256 AF, 6x256 AR)", MID)):
        cfg = apply_overrides(load_preset("quickstart"), overrides)
        torch.manual_seed(0)
        model = Farmer(cfg.model).eval()
        for block in model.flow.blocks:
            torch.nn.init.normal_(block.out_proj.weight, std=0.01)
        y = torch.arange(args.batch) % cfg.model.num_classes
        unguided, guided = SamplingConfig(), SamplingConfig(cfg=2.0)

        def run(s, cache):
            return lambda: model.sample(y, s, torch.Generator().manual_seed(0), use_cache=cache)

        t = interleaved({"cached": run(unguided, True), "uncached": run(unguided, False),
                         "guided": run(guided, True)}, args.repeats)
        n_params = sum(p.numel() for p in model.parameters()) / 1e6
        rows.append({"model": name, "params_M": round(n_params, 2), "batch": args.batch,
                     "img_per_s_cached": args.batch / t["cached"], "img_per_s_uncached": args.batch / t["uncached"],
                     "cache_speedup": t["uncached"] / t["cached"], "img_per_s_guided": args.batch / t["guided"],
                     "guided_cost": t["guided"] / t["cached"]})
    report("sampling", rows, {"repeats": args.repeats, "note": "medians of interleaved runs"})


if __name__ == "__main__":
    main()
