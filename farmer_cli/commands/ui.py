"""How the commands show things: consoles, the library's log messages, progress bars and plain progress lines.

The library reports through the ``farmer`` logger and callbacks; this module is the one place that turns them
into terminal output. On a terminal long loops draw a rich progress bar; when stderr is not a terminal (a SLURM
log, a pipe) they print one plain line every ``log_every`` steps instead, so progress is readable in a file.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import time

from rich.console import Console
from rich.markup import escape as escape_markup
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, soft_wrap=True)  # progress, notes, warnings and errors
stdout = Console()  # results (tables) so they can be piped
if not stdout.is_terminal:  # piped or captured: do not squeeze tables into 80 columns
    stdout = Console(width=160)

__all__ = ["console", "stdout", "escape", "shell_word", "figure", "progress", "LoopProgress", "show_library_messages"]

# C0 controls, DEL and C1: an ANSI escape sequence in a file name would recolour, move or clear the terminal (or a
# log viewer) when printed, and a newline would split one line of output in two
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SHOWN = {"\n": "\\n", "\t": "\\t"}


def escape(text: str) -> str:
    """User text (file names, messages quoting them) made safe to print on one line: rich markup is escaped,
    newlines and tabs are shown as ``\\n`` and ``\\t`` (as in error lines) and other control characters as
    ``\\xNN``, so ``$'\\e[31m.png'`` prints as ``\\x1b[31m.png``."""
    return escape_markup(_CONTROL.sub(lambda m: _SHOWN.get(m.group(), f"\\x{ord(m.group()):02x}"), text))


def shell_word(text: str) -> str:
    """``text`` (a path in a suggested command) as one word that a POSIX shell reads back as it is: quoted where
    needed (``'runs/my run'``), and as ``$'...'`` with ``\\xNN`` escapes where it holds control characters, so the
    command stays on one line and can be pasted. Not markup-escaped: print it through :func:`escape`."""
    if not _CONTROL.search(text):
        return shlex.quote(text)
    def code(c: str) -> str:
        return f"\\u{ord(c):04x}" if ord(c) > 0x7f else f"\\x{ord(c):02x}"  # C1 characters: their code point

    return "$'" + "".join(code(c) if _CONTROL.match(c) or c in "\\'" else c for c in text) + "'"


class _ConsoleHandler(logging.Handler):
    """Library log records -> one console line each (warnings in yellow); user text is escaped, never markup."""

    def emit(self, record: logging.LogRecord) -> None:
        text = escape(record.getMessage())
        if record.levelno >= logging.WARNING:
            console.print(f"[yellow]warning:[/] {text}", highlight=False)
        else:
            console.print(text, highlight=False)


def show_library_messages() -> None:
    """Route the ``farmer`` logger to the console (once per process)."""
    logger = logging.getLogger("farmer")
    if not any(isinstance(h, _ConsoleHandler) for h in logger.handlers):
        logger.addHandler(_ConsoleHandler())
        logger.setLevel(logging.INFO)
        logger.propagate = False


def progress_disabled() -> bool:
    """``FARMER_NO_PROGRESS=1`` turns progress bars and progress lines off (tests, scripted runs)."""
    return os.environ.get("FARMER_NO_PROGRESS") == "1"


def progress(disable: bool = False, **fields: str) -> Progress:
    """A rich progress bar: description, bar, n/total, extra ``{task.fields[...]}`` columns, elapsed and ETA."""
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
    columns += [TextColumn(f"{label} {{task.fields[{key}]}}") for key, label in fields.items()]
    columns += [TimeElapsedColumn(), TimeRemainingColumn()]
    return Progress(*columns, console=console, disable=disable or progress_disabled())


class LoopProgress:
    """Renders the training engine's events: a rich bar on a terminal, else one plain line per logged step
    (``train step 500/2000 (25%)  bits/dim 4.912  img/s 412  ETA 0:06:10``). Use as a context manager and pass
    the instance as ``on_event``. How the loop ends is shown too: a divergence is one red line and exit status 1;
    a stop signal (checkpoint saved) prints ``resume_hint`` and exits 130 (SIGINT) or 143 (SIGTERM, SIGUSR1)."""

    def __init__(self, name: str, total: int, loss_key: str, loss_label: str, enabled: bool,
                 resume_hint: str = "") -> None:
        self.name, self.total, self.loss_key, self.loss_label = name, total, loss_key, loss_label
        self.resume_hint, self.main = resume_hint, enabled  # main: the process that reports
        self.start = 0  # the first step this invocation runs (a resumed run starts later)
        self.enabled = enabled and not progress_disabled()
        self.bar = progress(disable=not (self.enabled and console.is_terminal), loss=loss_label, ips="img/s")
        self.t0 = time.time()

    def __enter__(self) -> "LoopProgress":
        self.bar.__enter__()
        self.task = self.bar.add_task(self.name, total=self.total, loss="-", ips="-")
        return self

    def __exit__(self, kind, err, tb) -> None:
        from farmer_cli.train.divergence import TrainingDiverged
        from farmer_cli.train.stop_signals import Stopped

        self.bar.__exit__(kind, err, tb)
        if isinstance(err, TrainingDiverged):
            console.print(f"[red]error:[/] {escape(str(err))}")
            raise SystemExit(1) from None
        if isinstance(err, Stopped):
            if self.main:
                console.print(f"[yellow]{escape(str(err))}[/]: {escape(self.resume_hint)}")
            raise SystemExit(130 if err.signame == "SIGINT" else 143) from None

    def __call__(self, event) -> None:
        if event.kind == "start":
            self.start, self.t0 = event.step, time.time()
            self.bar.update(self.task, completed=event.step)
        elif event.kind == "step":
            self.bar.update(self.task, completed=event.step)
        elif event.kind == "log" and event.record is not None:
            loss, ips = event.record.get(self.loss_key, float("nan")), event.record.get("images_per_s", 0.0)
            self.bar.update(self.task, loss=f"{loss:.4g}", ips=_rate(ips))
            if self.enabled and not console.is_terminal:
                done = event.step - self.start
                left = (time.time() - self.t0) / max(1, done) * (self.total - event.step)
                console.print(f"{self.name} step {event.step}/{self.total} ({100 * event.step / self.total:.0f}%)  "
                              f"{self.loss_label} {loss:.4f}  img/s {_rate(ips)}  ETA {_hms(left)}", highlight=False)


def _rate(per_second: float) -> str:
    return f"{per_second:.0f}" if per_second >= 10 else f"{per_second:.2f}"


def _hms(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def figure(value, spec: str) -> str:
    """A number for a table, or n/a where it is undefined (None in the JSON, e.g. the error of a single image)."""
    return "n/a" if value is None else format(value, spec)
