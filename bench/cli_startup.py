"""What a test's ``farmer`` command costs: forked from the tests' server (``tests/cli_helpers.py``, libraries
imported once) against a fresh ``python -m farmer_cli``; interleaved pairs, medians and ratios.

    python bench/cli_startup.py        # trains a 30-step tiny run in a temporary folder first (seconds)
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from cli_helpers import ENV, farmer, run_command  # noqa: E402


def main(pairs: int = 5) -> None:
    folder = Path(tempfile.mkdtemp(prefix="cli-startup-"))
    farmer("train", "--preset", "tiny", "--steps", "30", "--out", str(folder / "run"))
    Image.fromarray((np.random.RandomState(0).rand(8, 8) * 255).astype(np.uint8)).save(folder / "x.png")
    cases = {"a refusal (train --steps -1)": ["train", "--steps", "-1"],
             "score of one image": ["score", "--ckpt", str(folder / "run"), str(folder / "x.png")]}
    for name, args in cases.items():
        forked, fresh = [], []
        for _ in range(pairs):
            t = time.perf_counter()
            one = run_command(args)
            forked.append(time.perf_counter() - t)
            t = time.perf_counter()
            two = subprocess.run([sys.executable, "-m", "farmer_cli", *args], capture_output=True, text=True, env=ENV)
            fresh.append(time.perf_counter() - t)
            assert one.returncode == two.returncode, (one, two)
        f, s = statistics.median(forked), statistics.median(fresh)
        print(f"{name}: fork server {f:.2f} s, fresh interpreter {s:.2f} s: {s / f:.1f}x")


if __name__ == "__main__":
    main()
