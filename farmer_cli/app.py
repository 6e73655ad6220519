"""Typer root of the ``farmer`` command. Heavy libraries (torch, accelerate) load inside the commands,
so ``farmer --help`` is instant."""

from __future__ import annotations

import os
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
            console.print(f"[red]error:[/] an empty value{escape(where)}: give a value "
                          "(an empty path would mean the current directory)", highlight=False)
            raise SystemExit(2)


def main() -> None:
    """Run the app. A usage error that typer/click catch (an unknown option, a value of the wrong type, a missing
    argument) is one red line on stderr naming the option and the command's --help, exit status 2; bare ``farmer``
    still shows the help. Hugging Face libraries run offline unless the environment says otherwise: nothing is
    downloaded at run time."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    _refuse_empty_arguments(sys.argv[1:])
    try:
        code = app(standalone_mode=False)
    except USAGE_ERROR as err:
        if not sys.argv[1:]:
            err.show()
        else:
            from farmer_cli.commands.ui import console, escape

            ctx = getattr(err, "ctx", None)
            where = f" (see {ctx.command_path} --help)" if ctx is not None else ""
            console.print(f"[red]error:[/] {escape(err.format_message())}{where}", highlight=False)
        raise SystemExit(err.exit_code) from None
    raise SystemExit(code if isinstance(code, int) else 0)
