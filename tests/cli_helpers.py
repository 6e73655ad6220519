"""Running the ``farmer`` command from tests: in a subprocess (Accelerate's state is a per-process singleton, and
this is how users run it), with progress bars off and Hugging Face offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ENV = {**os.environ, "FARMER_NO_PROGRESS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def farmer(*args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "farmer_cli", *args], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"farmer {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def sigterm_once_logged(proc: subprocess.Popen, metrics: Path, lines: int, timeout: float = 180) -> str:
    """Send SIGTERM to a training process once ``metrics`` holds ``lines`` records; returns its stderr."""
    import signal
    import time

    deadline = time.time() + timeout
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= lines):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    return proc.communicate(timeout=timeout)[1]
