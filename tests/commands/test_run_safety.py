"""Run safety and hostile input, black-box through the CLI (tiny preset, CPU, subprocesses as in test_cli.py).

General rule for every bad input: exit status 2, no traceback, the error is one line and the last on stderr
(progress and "warning:" lines before it are allowed), and nothing of an existing run is changed or lost.

Timing (2 cores): the ~30 one-shot commands are started in the background, two at a time, when the module's first
test runs (fixture ``jobs``; only those whose test is selected), while the tests that need a sequence of processes
(SIGTERM, resume, second writer, distillation, overwrite, image folders) run in the foreground; the tests at the
end of the file check the background results. Trained here besides the shared ``tiny_run``: one interrupted and
resumed run, one interrupted and resumed distillation, a 2-step overwrite, a 2-step image-folder run and two
1-step runs started together. Every process uses one intra-op thread.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import ENV, run_command

REPO = Path(__file__).resolve().parents[2]
BASE_STEPS = 30  # tiny_run trains 30 steps
# One intra-op thread per process: the tiny model gains nothing from more, and several processes share 2 cores.
JOB_ENV = {**ENV, "OMP_NUM_THREADS": "1"}
FAST_S = 30.0  # "fails fast": refused before any real work


# ----------------------------------------------------------------------------------------------------------------
# helpers

HANG_LIMIT = 900  # seconds: only a command that hangs reaches it, however loaded the machine (no test times work)


@dataclass
class Result:
    args: tuple
    returncode: int | None  # None: killed at the timeout
    stdout: str
    stderr: str
    seconds: float

    def __str__(self) -> str:
        status = "timed out" if self.returncode is None else f"exit {self.returncode}"
        return (f"farmer {' '.join(map(str, self.args))}\n-> {status} after {self.seconds:.1f} s\n"
                f"--- stdout (tail) ---\n{self.stdout[-1500:]}\n--- stderr (tail) ---\n{self.stderr[-2500:]}")


def _text(data) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def cli(*args, cwd: Path | None = None, timeout: float = HANG_LIMIT, env: dict | None = None,
        memory_kb: int | None = None) -> Result:
    """``python -m farmer_cli ARGS`` in a subprocess; never raises on failure or timeout."""
    args = tuple(str(a) for a in args)
    argv = [sys.executable, "-m", "farmer_cli", *args]
    if memory_kb:  # cap the address space: a huge allocation fails instead of eating the machine's memory
        argv = ["bash", "-c", f'ulimit -v {memory_kb} && exec "$0" "$@"', *argv]
    t0 = time.monotonic()
    try:
        if memory_kb:
            proc = subprocess.run(argv, capture_output=True, text=True, env=env or JOB_ENV, cwd=cwd, timeout=timeout)
        else:
            proc = run_command(args, env=env or JOB_ENV, cwd=cwd, timeout=timeout)
        return Result(args, proc.returncode, proc.stdout, proc.stderr, time.monotonic() - t0)
    except subprocess.TimeoutExpired as err:
        return Result(args, None, _text(err.stdout), _text(err.stderr), time.monotonic() - t0)


def popen(*args, cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "farmer_cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=JOB_ENV, cwd=cwd)


def finish(proc: subprocess.Popen, args: tuple, t0: float, timeout: float = HANG_LIMIT) -> Result:
    try:
        out, err = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        rc = None
    return Result(tuple(map(str, args)), rc, out, err, time.monotonic() - t0)


def stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.communicate()


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.strip() and not ln.lstrip().lower().startswith("warning:")]


def assert_refused(res: Result, message: str | None = None) -> None:
    """The general rule: exit 2, no traceback, the error is one line, the last on stderr. Progress lines that a
    command printed before it found the problem, and warning: lines, are allowed."""
    assert res.returncode == 2, str(res)
    assert "Traceback" not in res.stderr, str(res)
    lines = error_lines(res.stderr)
    errors = [ln for ln in lines if ln.lstrip().lower().startswith("error")]
    assert len(errors) == 1 and lines and lines[-1] == errors[0], \
        f"expected the error as one line, the last on stderr; got {len(errors)} error line(s)\n{res}"
    if message is not None:
        assert message in res.stderr.lower(), f"expected {message!r} in the error\n{res}"


def assert_ok(res: Result) -> None:
    assert res.returncode == 0, str(res)
    assert "Traceback" not in res.stderr, str(res)


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock", "eval-*.json"))
    return dst


def snapshot(run: Path) -> dict[str, bytes]:
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def assert_unchanged(run: Path, before: dict[str, bytes]) -> None:
    lost = [name for name in before if not (run / name).exists()]
    changed = [name for name in before if name not in lost and (run / name).read_bytes() != before[name]]
    assert not lost and not changed, f"{run}: lost {lost}, changed {changed}"


def metric_steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def n_lines(path: Path) -> int:
    try:
        return path.read_text().count("\n")
    except FileNotFoundError:
        return 0


def wait_for(condition, proc: subprocess.Popen | None = None, timeout: float = HANG_LIMIT, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process ended (exit {proc.returncode}) before {what}\n{out[-1000:]}\n{err[-2000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def state_step(path: Path) -> int:
    """The step of a checkpoint, loaded the safe way (weights_only=True)."""
    return int(torch.load(path, weights_only=True, map_location="cpu")["step"])


def strict_json(text: str):
    def no_constants(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=no_constants)


class _Touch:
    """Pickles as ``pathlib.Path.touch(marker)``: loading it with pickle runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = Path(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def write_payload(path: Path, marker: Path) -> None:
    torch.save({"step": BASE_STEPS, "model": {}, "ema": {}, "payload": _Touch(marker)}, path)


def digit_images(n: int) -> list[tuple[np.ndarray, int]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(digits.images * 16, 0, 255).astype(np.uint8)
    return [(images[i], int(digits.target[i])) for i in range(n)]


def make_bomb(path: Path) -> Path:
    Image.new("1", (20000, 20000)).save(path)  # 400 Mpixel, ~50-80 KB on disk
    return path


# ----------------------------------------------------------------------------------------------------------------
# background one-shot commands


@dataclass
class Job:
    args: list
    timeout: float = HANG_LIMIT
    memory_kb: int | None = None
    cwd: Path | None = None
    protect: Path | None = None  # a run that must come out byte-identical
    markers: list = field(default_factory=list)  # files that must not exist afterwards
    before: dict = field(default_factory=dict)
    future: Future | None = None
    extra: dict = field(default_factory=dict)

    def start(self, pool: ThreadPoolExecutor, cwd: Path) -> None:
        if self.protect is not None:
            self.before = snapshot(self.protect)
        self.cwd = self.cwd or cwd
        self.future = pool.submit(self._run)

    def _run(self) -> Result:
        return cli(*self.args, cwd=self.cwd, timeout=self.timeout, env=JOB_ENV, memory_kb=self.memory_kb)

    def result(self) -> Result:
        if self.future is None or self.future.cancel():  # not started: run it now
            self.future = Future()
            self.future.set_result(self._run())
        return self.future.result()


REFUSED = [  # job names whose command must be refused (exit 2)
    "exec-train-resume", "exec-distill-resume", "train-over-existing-run", "resume-token-basis",
    "resume-other-preset", "resume-fewer-steps", "sample-out-no-extension", "sample-out-dir-is-file",
    "sample-cfg-nan", "sample-cfg-inf", "sample-temperature-nan", "sample-var-scale-nan", "train-lr-0",
    "train-log-every-0", "train-test-fraction-1", "sample-class-superscript", "sample-n-huge",
    "evaluate-n-samples-huge", "config-null", "config-list", "config-class-names-null", "state-foreign-dict",
    "config-af-width-huge", "train-out-under-file", "train-noise-foo", "inspect-factors-nan", "score-bomb",
]
MARKUP_NAMES = ["scan [draft].png", "x[/bold].png"]
FAST = {"sample-out-no-extension", "sample-out-dir-is-file", "sample-n-huge", "evaluate-n-samples-huge",
        "config-af-width-huge"}


@pytest.fixture(scope="module", autouse=True)  # autouse: start at once, so they overlap the foreground tests
def jobs(tiny_run: Path, tmp_path_factory, request):  # noqa: F811
    """Prepare every one-shot case and start them, two at a time, in the background."""
    base = tiny_run
    t = tmp_path_factory.mktemp("jobs")
    work = t / "cwd"
    work.mkdir()
    out = t / "out"
    out.mkdir()
    digit = t / "digit.png"
    Image.fromarray(digit_images(1)[0][0]).save(digit)
    cfg = json.loads((base / "config.json").read_text())
    j: dict[str, Job] = {}

    def run_copy(name: str) -> Path:
        return copy_run(base, t / name)

    # code execution through pickles
    probe = t / "probe-marker"
    write_payload(t / "probe.pt", probe)
    torch.load(t / "probe.pt", weights_only=False)
    assert probe.exists(), "the test's pickle payload does not run code: fix the test"
    # every copy of the state is poisoned (a run may keep older step checkpoints to fall back on)
    c = run_copy("exec-train")
    for state in c.rglob("training_state.pt"):
        write_payload(state, t / "MARKER-train")
    j["exec-train-resume"] = Job(["train", "--out", c, "--resume"], protect=c, markers=[t / "MARKER-train"])
    c = run_copy("exec-distill")
    for state in {c / "distill_state.pt", *c.rglob("distill_state.pt")}:
        write_payload(state, t / "MARKER-distill")
    j["exec-distill-resume"] = Job(["distill", "--ckpt", c, "--resume"], protect=c, markers=[t / "MARKER-distill"])

    # existing runs are neither replaced without --overwrite nor changed on --resume
    c = run_copy("existing")
    j["train-over-existing-run"] = Job(["train", "--preset", "tiny", "--out", c, "--steps", "2"], protect=c)
    c = run_copy("resume-dct")
    j["resume-token-basis"] = Job(["train", "--out", c, "--resume", "--set", "model.token_basis=dct"], protect=c)
    c = run_copy("resume-preset")
    j["resume-other-preset"] = Job(["train", "--out", c, "--resume", "--preset", "quickstart"], protect=c)
    c = run_copy("resume-steps")
    j["resume-fewer-steps"] = Job(["train", "--out", c, "--resume", "--steps", "20"], protect=c)

    # output paths are checked before any work (--n 200: sampling first would take minutes)
    j["sample-out-no-extension"] = Job(["sample", "--ckpt", base, "--n", "200", "--out", out / "noext"],
                                       timeout=60, markers=[out / "noext"])
    a_file = out / "existing-file"
    a_file.write_text("keep me")
    j["sample-out-dir-is-file"] = Job(["sample", "--ckpt", base, "--n", "200", "--out", out / "grid.png",
                                       "--out-dir", a_file], markers=[out / "grid.png"])
    j["sample-out-dir-is-file"].extra["file"] = a_file

    # low cases
    for name, opts in {"sample-cfg-nan": ["--cfg", "nan"], "sample-cfg-inf": ["--cfg", "inf"],
                       "sample-temperature-nan": ["--temperature", "nan"],
                       "sample-var-scale-nan": ["--var-scale", "nan"],
                       "sample-class-superscript": ["--class", "\u00b2"]}.items():
        j[name] = Job(["sample", "--ckpt", base, "--n", "1", "--out", out / f"{name}.png", *opts])
    j["sample-n-huge"] = Job(["sample", "--ckpt", base, "--n", "1000000000", "--out", out / "huge.png"])
    for name, opts in {"train-lr-0": ["--lr", "0"], "train-log-every-0": ["--set", "train.log_every=0"],
                       "train-test-fraction-1": ["--set", "data.test_fraction=1"],
                       "train-noise-foo": ["--set", "train.noise=foo"]}.items():
        j[name] = Job(["train", "--preset", "tiny", "--out", t / f"new-{name}", "--steps", "1", *opts])
    c = run_copy("evaluate-huge")
    j["evaluate-n-samples-huge"] = Job(["evaluate", "--ckpt", c, "--metrics", "sample-acc", "--n-samples",
                                        "1000000000000"], memory_kb=8_000_000, protect=c)
    for name, text in {"config-null": "null", "config-list": json.dumps([cfg]),
                       "config-class-names-null": json.dumps({**cfg, "class_names": None})}.items():
        c = run_copy(name)
        (c / "config.json").write_text(text)
        j[name] = Job(["sample", "--ckpt", c, "--n", "1", "--out", out / f"{name}.png"], protect=c)
    c = run_copy("foreign-state")
    for state in c.rglob("training_state.pt"):
        torch.save({"foo": 1}, state)
    j["state-foreign-dict"] = Job(["train", "--out", c, "--resume"], protect=c)
    c = run_copy("af-width")
    wide = json.loads(json.dumps(cfg))
    wide["config"]["model"]["af_width"] = 16384
    (c / "config.json").write_text(json.dumps(wide))
    j["config-af-width-huge"] = Job(["sample", "--ckpt", c, "--n", "1", "--out", out / "wide.png"],
                                    memory_kb=8_000_000, protect=c)
    a_file2 = out / "somefile"
    a_file2.write_text("not a directory")
    j["train-out-under-file"] = Job(["train", "--preset", "tiny", "--out", a_file2 / "run", "--steps", "1"])
    j["inspect-factors-nan"] = Job(["inspect-channels", "--ckpt", base, "--mode", "variance", "--factors", "nan",
                                    "--out", out / "inspect.png"])
    bomb = make_bomb(t / "bomb.png")
    j["score-bomb"] = Job(["score", bomb, "--ckpt", base], memory_kb=8_000_000)

    # user text is not rich markup
    for name in MARKUP_NAMES:  # the second is the file "bold].png" in a folder "x["
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(digit, out / name)
        j[f"markup:{name}"] = Job(["score", name, "--ckpt", base], cwd=out)  # relative: printed as given
        j[f"markup:{name}"].extra["name"] = name

    # JSON never holds NaN
    c = run_copy("evaluate-json")
    j["json-evaluate-bpd"] = Job(["evaluate", "--ckpt", c, "--metrics", "bpd", "--limit", "1", "--json"])
    c = run_copy("nan-weights")
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(base / "model.safetensors"), "pt") as f:
        metadata = f.metadata() or {}
    metadata = {**metadata, "format_version": "1"}
    # finite weights whose scores are not (weights holding NaN are refused on loading)
    weights = {k: torch.full_like(v, 1e30) if v.is_floating_point() else v
               for k, v in load_file(base / "model.safetensors").items()}
    save_file(weights, str(c / "model.safetensors"), metadata=metadata)
    j["json-score-nan-weights"] = Job(["score", digit, "--ckpt", c, "--json"])

    # a preset name may not steer the run directory out of ./runs
    esc = tmp_path_factory.mktemp("preset-escape")
    toml = (REPO / "presets" / "tiny.toml").read_text().replace('preset = "tiny"', 'preset = "../../x"')
    assert 'preset = "../../x"' in toml
    (esc / "evil.toml").write_text(toml)
    j["preset-escape"] = Job(["train", "--preset", esc / "evil.toml", "--steps", "1"], cwd=esc)
    j["preset-escape"].extra.update(dir=esc, outside={p: set(os.listdir(p)) for p in (esc.parent, esc.parent.parent)})

    # start only the jobs whose test is selected (-k, a node id): the others are not run at all
    tests = {name: f"test_bad_input_is_refused_cleanly[{name}]" for name in REFUSED}
    tests.update({f"markup:{n}": f"test_file_names_are_not_rich_markup[{n}]" for n in MARKUP_NAMES})
    tests.update({"json-evaluate-bpd": "test_evaluate_json_has_no_nan",
                  "json-score-nan-weights": "test_score_json_with_nan_weights_has_no_nan",
                  "preset-escape": "test_preset_name_cannot_leave_the_runs_folder"})
    assert set(tests) == set(j), set(tests) ^ set(j)
    selected = {item.name for item in request.session.items if item.module is sys.modules[__name__]}
    pool = ThreadPoolExecutor(max_workers=2)
    for name, job in j.items():
        job.cwd = job.cwd or work
        if tests[name] in selected:
            job.start(pool, work)
    yield j
    pool.shutdown(wait=True, cancel_futures=True)  # jobs of tests that were not selected never start


# ----------------------------------------------------------------------------------------------------------------
# foreground: file permissions


def test_model_file_has_same_permissions_as_config(tiny_run: Path):  # noqa: F811
    model = (tiny_run / "model.safetensors").stat().st_mode & 0o7777
    config = (tiny_run / "config.json").stat().st_mode & 0o7777
    assert model == config, f"model.safetensors {oct(model)} vs config.json {oct(config)}"


# ----------------------------------------------------------------------------------------------------------------
# foreground: SIGTERM, resume, and a second writer into the same directory


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> dict:
    """Train with SIGTERM after >= 3 logged steps; resume it; while the resumed run trains, a second process tries
    to --resume / --overwrite the same directory; then SIGTERM the resumed run too."""
    run = tmp_path_factory.mktemp("sigterm") / "run"
    metrics = run / "metrics.jsonl"
    state = run / "training_state.pt"
    rec: dict = {"run": run}
    p1 = p2 = None
    try:
        args1 = ("train", "--preset", "tiny", "--out", run, "--steps", "100000", "--set", "train.log_every=1",
                 "--set", "train.ckpt_every=100000")
        t0 = time.monotonic()
        p1 = popen(*args1)
        wait_for(lambda: n_lines(metrics) >= 3, p1, what="3 lines in metrics.jsonl")
        p1.send_signal(signal.SIGTERM)
        rec["first"] = finish(p1, args1, t0)
        rec["lines_after_first"] = n_lines(metrics)
        rec["steps_after_first"] = metric_steps(metrics)
        rec["config_step_after_first"] = json.loads((run / "config.json").read_text()).get("step")
        try:
            rec["first_step"] = state_step(state)
        except Exception as err:  # noqa: BLE001 - recorded, asserted by the tests
            rec["first_step_error"] = f"{type(err).__name__}: {err}"
        if "first_step" in rec:
            args2 = ("train", "--out", run, "--resume")
            ready = lambda: n_lines(metrics) > rec["lines_after_first"]  # noqa: E731
        else:  # no usable checkpoint: hold the directory with a fresh run so the locking can still be tested
            args2 = ("train", "--preset", "tiny", "--out", run, "--overwrite", "--steps", "100000", "--set",
                     "train.log_every=1", "--set", "train.ckpt_every=1")
            ready = lambda: state.exists() and n_lines(metrics) >= 2  # noqa: E731
        t0 = time.monotonic()
        p2 = popen(*args2)
        wait_for(ready, p2, what="the second training to log a step")
        with ThreadPoolExecutor(max_workers=2) as pool:
            futures = {"resume": pool.submit(cli, "train", "--out", run, "--resume"),
                       "overwrite": pool.submit(cli, "train", "--preset", "tiny", "--out", run, "--overwrite",
                                                "--steps", "5")}
            rec["intruders"] = {k: f.result() for k, f in futures.items()}
        rec["holder_alive"] = p2.poll() is None
        rec["files_after_intruders"] = {name: (run / name).exists() for name in ("config.json", "metrics.jsonl")}
        lines = n_lines(metrics)
        wait_for(lambda: n_lines(metrics) >= lines + 2, p2, what="the resumed run to log two more steps")
        p2.send_signal(signal.SIGTERM)
        rec["second"] = finish(p2, args2, t0)
        try:
            rec["second_step"] = state_step(state)
        except Exception as err:  # noqa: BLE001
            rec["second_step_error"] = f"{type(err).__name__}: {err}"
        return rec
    finally:
        stop(p1)
        stop(p2)


@pytest.mark.slow
@pytest.mark.parametrize("command, fixture, state", [("train", "interrupted", "training_state.pt"),
                                                     ("distill", "distilled", "distill_state.pt")])
def test_sigterm_saves_a_checkpoint(command: str, fixture: str, state: str, request):
    record = request.getfixturevalue(fixture)
    first = record["first"]
    assert first.returncode is not None, f"{command} did not stop on SIGTERM\n{first}"
    assert "Traceback" not in first.stderr, str(first)
    assert "first_step" in record, f"no loadable {state} after SIGTERM: {record.get('first_step_error')}\n{first}"
    assert record["first_step"] >= 3, record["first_step"]
    if command == "train":  # the scheduler's signal: exit status 128 + 15, the step saved is the step logged last
        assert first.returncode == 143 and "stopped by SIGTERM" in first.stderr, str(first)
        assert record["config_step_after_first"] == record["first_step"]
        assert record["steps_after_first"] == list(range(1, record["first_step"] + 1))


@pytest.mark.slow
def test_resume_after_sigterm_never_repeats_a_step(interrupted: dict):
    assert "first_step" in interrupted, "the SIGTERM checkpoint is missing (see the test above)"
    second = interrupted["second"]
    assert "Traceback" not in second.stderr, str(second)
    steps = metric_steps(interrupted["run"] / "metrics.jsonl")
    assert all(a < b for a, b in zip(steps, steps[1:])), f"metrics.jsonl steps repeat or go back: {steps}"
    assert steps[-1] > interrupted["first_step"]
    assert interrupted.get("second_step", -1) >= steps[-1], \
        f"SIGTERM of the resumed run: checkpoint step {interrupted.get('second_step')}, " \
        f"{interrupted.get('second_step_error', '')}, last logged step {steps[-1]}"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["resume", "overwrite"])
def test_second_process_cannot_write_a_run_in_use(interrupted: dict, mode: str):
    res = interrupted["intruders"][mode]
    assert_refused(res, message="in use")
    assert interrupted["holder_alive"], "the first training died while the second process tried the directory"
    assert all(interrupted["files_after_intruders"].values()), interrupted["files_after_intruders"]


# ----------------------------------------------------------------------------------------------------------------
# foreground: distillation SIGTERM + resume; then --overwrite of a run with a student


@pytest.fixture(scope="module")
def distilled(tiny_run: Path, tmp_path_factory) -> dict:  # noqa: F811
    run = copy_run(tiny_run, tmp_path_factory.mktemp("distill") / "run")
    metrics = run / "distill_metrics.jsonl"
    rec: dict = {"run": run}
    args = ("distill", "--ckpt", run, "--steps", "400", "--set", "train.log_every=1",
            "--set", "train.ckpt_every=100000")
    t0 = time.monotonic()
    proc = popen(*args)
    try:
        wait_for(lambda: n_lines(metrics) >= 3, proc, what="3 lines in distill_metrics.jsonl")
        proc.send_signal(signal.SIGTERM)
        rec["first"] = finish(proc, args, t0)
    finally:
        stop(proc)
    try:
        rec["first_step"] = state_step(run / "distill_state.pt")
    except Exception as err:  # noqa: BLE001
        rec["first_step_error"] = f"{type(err).__name__}: {err}"
    rec["target"] = 400  # a resumed distillation keeps its schedule: it runs on to the first run's --steps
    rec["resumed"] = cli("distill", "--ckpt", run, "--resume", "--set", "train.log_every=1", "--set",
                         "train.ckpt_every=100000")
    return rec


@pytest.mark.slow
def test_distill_resume_continues_without_repeating_steps(distilled: dict):
    assert_ok(distilled["resumed"])
    steps = metric_steps(distilled["run"] / "distill_metrics.jsonl")
    assert all(a < b for a, b in zip(steps, steps[1:])), f"distill_metrics.jsonl steps repeat or go back: {steps}"
    assert steps[-1] == distilled["target"], steps
    assert (distilled["run"] / "student.safetensors").exists()


@pytest.mark.slow
def test_overwrite_trains_fresh_run_and_old_student_is_not_used(distilled: dict, tmp_path: Path):
    run = copy_run(distilled["run"], tmp_path / "run")
    assert (run / "student.safetensors").exists(), "precondition: the distilled run has a student"
    assert_ok(cli("train", "--preset", "tiny", "--out", run, "--overwrite", "--steps", "2"))
    assert state_step(run / "training_state.pt") == 2
    assert metric_steps(run / "metrics.jsonl")[-1] == 2
    res = cli("sample", "--ckpt", run, "--decoder", "student", "--n", "1", "--out", tmp_path / "s.png")
    assert_refused(res)
    assert not (tmp_path / "s.png").exists()


# ----------------------------------------------------------------------------------------------------------------
# foreground: image folders (decompression bomb, class folders named 1..10)


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory) -> dict:
    """Class folders "1".."10" of 8x8 digits, plus a 400-Mpixel bomb in folder "3"; 2 training steps."""
    t = tmp_path_factory.mktemp("folder")
    root = t / "data"
    for k, (img, y) in enumerate(digit_images(60)):
        folder = root / str(y + 1)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{k}.png")
    make_bomb(root / "3" / "bomb.png")
    rec = {"run": t / "run"}
    rec["train"] = cli("train", "--preset", "tiny", "--data", root, "--steps", "2", "--out", rec["run"])
    if rec["train"].returncode != 0:  # keep the class-name tests independent of the bomb handling
        (root / "3" / "bomb.png").unlink()
        rec["run"] = t / "run-without-bomb"
        cli("train", "--preset", "tiny", "--data", root, "--steps", "2", "--out", rec["run"])
    return rec


def test_decompression_bomb_in_training_folder_is_skipped(folder_run: dict):
    res = folder_run["train"]
    assert_ok(res)
    assert "bomb.png" in res.stderr and "warning" in res.stderr.lower(), str(res)


@pytest.mark.parametrize("name", ["1", "10"])
def test_numeric_class_folder_names_win_over_indices(folder_run: dict, name: str, tmp_path: Path):
    run = folder_run["run"]
    assert (run / "model.safetensors").exists(), "the folder run did not train"
    names = json.loads((run / "config.json").read_text())["class_names"]
    assert sorted(names) == sorted(str(i) for i in range(1, 11)), names
    res = cli("sample", "--ckpt", run, "--class", name, "--n", "1", "--out", tmp_path / "g.png",
              "--out-dir", tmp_path / "each")
    assert_ok(res)
    files = sorted(p.name for p in (tmp_path / "each").iterdir())
    sampled = {f.split("-", 1)[1].rsplit("_", 1)[0] for f in files}  # <index>-<class name>_<n>.png
    assert sampled == {name}, files


# ----------------------------------------------------------------------------------------------------------------
# foreground: two runs started in the same second


def test_runs_started_in_the_same_second_get_different_directories(tmp_path: Path):
    args = ("train", "--preset", "tiny", "--steps", "1")
    t0 = time.monotonic()
    procs = [popen(*args, cwd=tmp_path) for _ in range(2)]
    results = [finish(p, args, t0, timeout=300) for p in procs]
    for res in results:
        assert_ok(res)
    runs = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    assert len(runs) == 2, runs
    assert all((r / "model.safetensors").exists() for r in runs), runs


# ----------------------------------------------------------------------------------------------------------------
# background results


@pytest.mark.parametrize("name", REFUSED)
def test_bad_input_is_refused_cleanly(jobs: dict, name: str):
    job = jobs[name]
    res = job.result()
    assert res.returncode is not None, f"no answer within {job.timeout} s\n{res}"
    assert_refused(res)
    if name in FAST:
        assert res.seconds < FAST_S, f"took {res.seconds:.1f} s: not refused before the work\n{res}"
    for marker in job.markers:
        assert not Path(marker).exists(), f"{marker} exists: the command ran code or wrote output\n{res}"
    if job.protect is not None:
        assert_unchanged(job.protect, job.before)
    if name == "resume-fewer-steps":
        assert state_step(job.protect / "training_state.pt") == BASE_STEPS
    if name == "sample-out-dir-is-file":
        assert job.extra["file"].read_text() == "keep me"


def test_evaluate_on_read_only_run_is_refused_before_work(tiny_run: Path, tmp_path: Path):  # noqa: F811
    run = copy_run(tiny_run, tmp_path / "ro")
    before = snapshot(run)
    run.chmod(0o555)
    try:
        if os.access(run, os.W_OK):
            pytest.skip("running as root: a 0o555 directory is still writable")
        res = cli("evaluate", "--ckpt", run, "--metrics", "bpd", cwd=tmp_path)
        assert_refused(res)
        assert_unchanged(run, before)
    finally:
        run.chmod(0o755)


@pytest.mark.parametrize("name", MARKUP_NAMES)
def test_file_names_are_not_rich_markup(jobs: dict, name: str):
    res = jobs[f"markup:{name}"].result()
    assert_ok(res)
    assert name in res.stdout, str(res)


def test_evaluate_json_has_no_nan(jobs: dict):
    res = jobs["json-evaluate-bpd"].result()
    assert_ok(res)
    strict_json(res.stdout)


def test_score_json_with_nan_weights_has_no_nan(jobs: dict):
    res = jobs["json-score-nan-weights"].result()
    assert_ok(res)
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    assert lines, str(res)
    for line in lines:
        strict_json(line)


def test_preset_name_cannot_leave_the_runs_folder(jobs: dict):
    job = jobs["preset-escape"]
    res = job.result()
    esc: Path = job.extra["dir"]
    for parent, before in job.extra["outside"].items():
        new = sorted(set(os.listdir(parent)) - before)
        assert not [n for n in new if n.startswith("x")], f"created outside the runs folder: {parent}: {new}\n{res}"
    assert sorted(os.listdir(esc)) in (["evil.toml"], ["evil.toml", "runs"]), os.listdir(esc)
    if res.returncode == 0:
        assert "Traceback" not in res.stderr
        made = [p for p in (esc / "runs").iterdir()]
        assert made and all(p.resolve().parent == (esc / "runs").resolve() for p in made), made
    else:
        assert_refused(res)
