"""Typer root of the ``farmer`` command. Heavy libraries (torch, accelerate) load inside the commands,
so ``farmer --help`` is instant."""

from __future__ import annotations

import os
import signal
import sys

import typer

from farmer_cli.commands import distill, evaluate, inspect_channels, ood, sample, score, train

app = typer.Typer(
    name="farmer",
    help="FARMER: pixel-space flow + autoregressive generative models with exact likelihoods.\n\n"
    "Quick start: `farmer train` (5 minutes on 2 AVX-512 cores, about 12-16 on AVX2 laptops), then `farmer sample --class 3 --n 16`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
for module in (train, score, sample, distill, inspect_channels, evaluate, ood):
    app.command(name=module.NAME, help=module.__doc__)(module.run)


# click's UsageError (unknown option, bad value, missing argument), reached through typer's public BadParameter:
# typer may run on its own copy of click, so ``click.UsageError`` is not always the class raised.
USAGE_ERROR = typer.BadParameter.__base__


def _refuse_empty_arguments(args: list[str]) -> None:
    """No value of farmer's is an empty string, and an empty path would silently mean the current directory
    (``--out ""`` would train into it): an empty argument (or ``--opt=``) is one red line, exit status 2."""
    for k, arg in enumerate(args):
        if not arg.strip() or (arg.startswith("--") and arg.endswith("=")):
            from farmer_cli.commands.ui import console, escape

            before = arg[:-1] if arg.endswith("=") else (args[k - 1] if k else "")
            where = f" for {before}" if before.startswith("-") else f" after '{before}'" if before else ""
            why = ("a class name or index (a class whose name is blank is chosen by its index)"
                   if before in ("--class", "-c") else "a value (an empty path would mean the current directory)")
            console.print(f"[red]error:[/] an empty value{escape(where)}: give {why}", highlight=False)
            raise SystemExit(2)


class _Interruption:
    """SIGINT and SIGTERM as a KeyboardInterrupt in this process (not in forked helpers such as data-loader
    workers): the command unwinds, so no half-written file is left (:func:`farmer_cli.storage.atomic_write`), and
    :func:`main` can say which signal ended it. Training installs its own handlers around its loop (a first signal
    saves a checkpoint: :mod:`farmer_cli.train.stop_signals`)."""

    def __init__(self) -> None:
        self.pid, self.signame = os.getpid(), ""

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: keep the defaults
                return

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self.pid and signum == signal.SIGTERM:  # a forked worker: its parent decides
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signame = self.signame or signal.Signals(signum).name
        raise KeyboardInterrupt

    def report(self) -> int:
        """Say which signal ended the command; its exit status (130 for SIGINT, 143 for SIGTERM)."""
        from farmer_cli.commands.ui import console, escape

        name = sys.argv[1] if len(sys.argv) > 1 else ""
        kept = " (a run keeps its last saved checkpoint: continue it with --resume)" if name in ("train", "distill") \
            else ""
        console.print(f"[yellow]farmer {escape(name)}: interrupted by {self.signame or 'SIGINT'} before it finished; "
                      f"no half-written file is left{kept}[/]", highlight=False)
        return 143 if self.signame == "SIGTERM" else 130


def _refuse_repeated_options(args: list[str]) -> None:
    """An option that takes one value, given twice (``--steps 3 --steps 2``), would silently keep the last: one red
    line naming both values, exit status 2. Options that may repeat (``--class``, ``--set``) and flags are not
    counted."""
    group = typer.main.get_command(app)
    command = group.commands.get(args[0]) if args and hasattr(group, "commands") else None
    if command is None or "--" in args:
        return
    for param in command.params:
        if getattr(param, "multiple", True) or getattr(param, "is_flag", False) or getattr(param, "count", False):
            continue
        values = []
        for k, arg in enumerate(args[1:], 1):
            name = arg.split("=", 1)[0] if arg.startswith("--") else arg
            if name in param.opts:
                values.append(arg.split("=", 1)[1] if "=" in arg and arg.startswith("--") else
                              args[k + 1] if k + 1 < len(args) else "")
        if len(values) > 1:
            from farmer_cli.commands.ui import console, escape

            console.print(f"[red]error:[/] {escape(param.opts[0])} is given {len(values)} times "
                          f"({escape(', then '.join(values))}); it takes one value: give it once", highlight=False)
            raise SystemExit(2)


def main() -> None:
    """Run the app. A usage error that typer/click catch (an unknown option, a value of the wrong type, a missing
    argument) is one red line on stderr naming the option and the command's --help, exit status 2; bare ``farmer``
    still shows the help. SIGINT or SIGTERM outside a training loop ends the command with one yellow line and exit
    status 130 or 143. Hugging Face libraries run offline unless the environment says otherwise: nothing is
    downloaded at run time."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    _refuse_empty_arguments(sys.argv[1:])
    _refuse_repeated_options(sys.argv[1:])
    interruption = _Interruption()
    interruption.install()
    try:
        code = app(standalone_mode=False)
    except KeyboardInterrupt:  # raised outside typer's own handling (it turns the rest into exit status 130)
        raise SystemExit(interruption.report()) from None
    except USAGE_ERROR as err:
        if not sys.argv[1:]:
            err.show()
        else:
            from farmer_cli.commands.ui import console, escape

            ctx = getattr(err, "ctx", None)
            where = f" (see {ctx.command_path} --help)" if ctx is not None else ""
            console.print(f"[red]error:[/] {escape(err.format_message())}{where}", highlight=False)
        raise SystemExit(err.exit_code) from None
    if code == 130:
        raise SystemExit(interruption.report())
    raise SystemExit(code if isinstance(code, int) else 0)
