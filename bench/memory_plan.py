"""Predicted (``farmer train --dry-run --plan-device cpu``) vs measured peak memory of real-width, reduced-depth
rehearsals of a preset on this CPU.

Each rehearsal is a fresh ``farmer train`` process on synthetic 256x256 images (an image folder made here), run
under ``/usr/bin/time -v``; its "Maximum resident set size" is the measured peak. The default rehearsal is the
ImageNet-256 patch-8 preset at its real widths, token counts, mixture sizes and channel split with the depth cut
to AF 2 blocks x 1 layer and AR 1 layer (about 310M parameters), micro-batch 4, accumulation 2, 4 steps.

``--baseline SRC`` also runs the same rehearsal (without accumulation) with the farmer source tree at SRC (e.g. a
``git worktree`` of an older commit) for a before/after figure.

    python bench/memory_plan.py
    python bench/memory_plan.py --checkpointing off on --precision fp32 bf16 --baseline /tmp/farmer-old
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report  # noqa: E402

CUT = ["--set", "model.af_blocks=2", "--set", "model.af_layers=1", "--set", "model.ar_layers=1",
       "--set", "model.num_classes=2", "--set", "train.eval_batches=1", "--set", "train.epochs=0"]
GiB = 1024**3


def make_images(root: Path, count: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        smooth = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
        Image.fromarray(smooth).resize((size, size), Image.Resampling.BICUBIC).save(folder / f"{i}.png")
    return root


def measured_peak(argv: list[str], env: dict) -> int:
    proc = subprocess.run(["/usr/bin/time", "-v", *argv], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"rehearsal failed:\n{proc.stderr[-3000:]}")
    kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return kib * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="imagenet256-patch8")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--checkpointing", nargs="+", default=["off", "on"])
    ap.add_argument("--precision", nargs="+", default=["fp32"])
    ap.add_argument("--baseline", type=Path, help="source tree of another farmer version to rehearse too")
    args = ap.parse_args()
    env = {**os.environ, "FARMER_NO_PROGRESS": "1"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = make_images(Path(tmp) / "images", 24, 256)
        common = [sys.executable, "-m", "farmer_cli", "train", "--preset", args.preset, *CUT]
        for precision in args.precision:
            for ckpt in args.checkpointing:
                flags = ["--batch-size", str(args.batch), "--grad-accum", str(args.accum),
                         "--mixed-precision", precision, "--set", f"model.grad_checkpoint={ckpt == 'on'}"]
                plan = json.loads(subprocess.run(common + flags + ["--dry-run", "--plan-device", "cpu", "--json"],
                                                 capture_output=True, text=True, env=env, check=True).stdout)
                out = Path(tmp) / f"run-{precision}-{ckpt}"
                peak = measured_peak(common + flags + ["--data", str(data), "--steps", str(args.steps), "--out",
                                                       str(out)], env)
                rows.append({"code": "this", "precision": precision, "checkpointing": ckpt, "micro_batch": args.batch,
                             "accum": args.accum, "predicted_GiB": plan["predicted_peak_bytes"] / GiB,
                             "measured_GiB": peak / GiB, "measured/predicted": peak / plan["predicted_peak_bytes"]})
                print(rows[-1], flush=True)
        if args.baseline is not None:
            for precision in args.precision:
                out = Path(tmp) / f"baseline-{precision}"
                argv = common + ["--batch-size", str(args.batch), "--mixed-precision", precision, "--data", str(data),
                                 "--steps", str(args.steps), "--out", str(out)]
                peak = measured_peak(argv, {**env, "PYTHONPATH": str(args.baseline)})
                rows.append({"code": f"baseline {args.baseline.name}", "precision": precision, "checkpointing": "-",
                             "micro_batch": args.batch, "accum": 1, "predicted_GiB": float("nan"),
                             "measured_GiB": peak / GiB, "measured/predicted": float("nan")})
                print(rows[-1], flush=True)
    report("memory_plan", rows, {"preset": args.preset, "steps": args.steps, "depth_cut": CUT})


if __name__ == "__main__":
    main()
