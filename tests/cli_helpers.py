"""Running the ``farmer`` command from tests as users run it: a process of its own (Accelerate's state is a
per-process singleton), with its own exit status, stdout and stderr, progress bars off and Hugging Face offline.

Most of a short command's time is start-up: the interpreter importing torch, accelerate and the rest. So each
command is forked from one server process that imported those libraries once (a fork server: :func:`serve`);
farmer itself is imported fresh in every command's process, as ``python -m farmer_cli`` would. A command that
changes what libraries read when they load (``ATEN_CPU_CAPABILITY``, ...) runs in a fresh interpreter, and
commands sent signals while running, or run by ``accelerate launch``, use ``subprocess`` directly.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ENV = {**os.environ, "FARMER_NO_PROGRESS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}

# third-party libraries only: farmer's import-time choices (the consoles look at their streams) happen per command
PRELOAD = ("torch", "torch._dynamo", "torch.distributed.checkpoint.state_dict", "torch.distributed.tensor", "numpy",
           "scipy.linalg", "PIL.Image", "safetensors.torch", "accelerate", "typer", "rich.console", "rich.progress")
# read by libraries when they load, so a command that changes them needs a fresh interpreter
READ_AT_IMPORT = ("ATEN_", "ONEDNN_", "MKL_ENABLE", "CUDA_", "PYTHON", "LD_", "TORCH_", "KMP_")


def serve() -> None:
    """The fork server (its own process): preload, then for each request line on stdin (JSON: args, env, cwd and
    the stdout/stderr files) fork one command, answer its pid, wait, answer its exit status."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _run_forked(**request)
        print(pid, flush=True)
        status = os.waitpid(pid, 0)[1]
        print(os.waitstatus_to_exitcode(status), flush=True)


def _run_forked(args: list[str], env: dict, cwd: str | None, out: str, err: str) -> None:
    """In the forked process: the streams, environment, directory and argv of ``farmer ARGS``; runs the command
    and exits as the interpreter would (exit handlers run, the status of ``SystemExit``, 1 after a traceback)."""
    import atexit
    import traceback

    code = 1
    try:
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, out, os.O_WRONLY), (2, err, os.O_WRONLY)):
            target = os.open(path, flags)
            os.dup2(target, fd)
            os.close(target)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.environ.clear()
        os.environ.update(env)
        if "OMP_NUM_THREADS" in env:  # OpenMP read it when torch loaded in the server
            import torch

            torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
        sys.argv = ["farmer", *args]
        from farmer_cli.app import main

        if cwd is not None:
            os.chdir(cwd)
        main()
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
        if not isinstance(stop.code, (int, type(None))):
            print(stop.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class _ForkServer:
    """The test process's end of :func:`serve`, started at a thread's first command."""

    def __init__(self) -> None:
        here = str(Path(__file__).resolve().parent)
        path = [os.path.abspath(p or os.curdir) for p in sys.path]
        code = f"import sys; sys.path[:] = {path!r}; sys.path.insert(0, {here!r}); import cli_helpers; cli_helpers.serve()"
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=ENV)

    def run(self, args: list[str], env: dict, cwd: str | None, timeout: float) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory(prefix="farmer-cmd-") as folder:
            out, err = Path(folder, "stdout"), Path(folder, "stderr")
            out.touch()
            err.touch()
            request = dict(args=args, env=env, cwd=cwd, out=str(out), err=str(err))
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            pid = int(self.proc.stdout.readline())
            ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
            if not ready:
                os.kill(pid, signal.SIGKILL)
            code = int(self.proc.stdout.readline())
            result = (out.read_text(errors="replace"), err.read_text(errors="replace"))
        if not ready:
            raise subprocess.TimeoutExpired(["farmer", *args], timeout, *result)
        return subprocess.CompletedProcess(["farmer", *args], code, *result)


_servers = threading.local()  # one server per thread: each runs one command at a time


def run_command(args, env: dict | None = None, cwd: Path | None = None, timeout: float = 600
                ) -> subprocess.CompletedProcess:
    """``farmer ARGS`` in a process of its own; raises ``subprocess.TimeoutExpired`` like ``subprocess.run``."""
    args = [str(a) for a in args]
    env = dict(ENV if env is None else env)
    changed = {key for key in set(env) | set(ENV) if env.get(key) != ENV.get(key)}
    if any(key.startswith(READ_AT_IMPORT) for key in changed):
        return subprocess.run([sys.executable, "-m", "farmer_cli", *args], capture_output=True, text=True, env=env,
                              cwd=cwd, timeout=timeout)
    server = getattr(_servers, "server", None)
    if server is None or server.proc.poll() is not None:
        server = _servers.server = _ForkServer()
    return server.run(args, env, None if cwd is None else str(cwd), timeout)


def farmer(*args: str, cwd: Path | None = None, check: bool = True, env: dict | None = None
           ) -> subprocess.CompletedProcess:
    proc = run_command(args, env=env, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"farmer {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
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


def refused(*args) -> str:
    """``farmer ARGS`` exits 2 with one "error:" line last on stderr and no traceback; returns that line."""
    proc = farmer(*map(str, args), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:"), proc.stderr[-2000:]
    return last


def resplit(run: Path, test_fraction: float = 0.5) -> Path:
    """Edit ``run``'s config.json so that its recorded split no longer holds (another data.test_fraction)."""
    path = Path(run) / "config.json"
    payload = json.loads(path.read_text())
    payload["config"]["data"]["test_fraction"] = test_fraction
    path.write_text(json.dumps(payload))
    return Path(run)
