"""Typer root of the ``farmer`` command. Heavy libraries (torch, accelerate) load inside the commands,
so ``farmer --help`` is instant."""

from __future__ import annotations

import typer

from .commands import distill, evaluate, inspect_channels, ood, sample, score, train

app = typer.Typer(
    name="farmer",
    help="FARMER: pixel-space flow + autoregressive generative models with exact likelihoods.\n\n"
    "Quick start: `farmer train` (about 5 minutes on 2 CPU cores), then `farmer sample --class 3 --n 16`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
for module in (train, score, sample, distill, inspect_channels, evaluate, ood):
    app.command(name=module.NAME, help=module.__doc__)(module.run)


def main() -> None:
    """Run the app. A usage error that typer/click catch (an unknown option, a value of the wrong type, a missing
    argument) is one red line on stderr naming the option and the command's --help, exit status 2; bare ``farmer``
    still shows the help."""
    try:
        code = app(standalone_mode=False)
    except Exception as err:  # click's errors, matched by their interface (typer may ship its own copy of click)
        if not (hasattr(err, "format_message") and isinstance(getattr(err, "exit_code", None), int)):
            raise
        if type(err).__name__ == "NoArgsIsHelpError":
            err.show()
        else:
            from .commands.ui import console, escape

            ctx = getattr(err, "ctx", None)
            where = f" (see {ctx.command_path} --help)" if ctx is not None else ""
            console.print(f"[red]error:[/] {escape(err.format_message())}{where}", highlight=False)
        raise SystemExit(err.exit_code) from None
    raise SystemExit(code if isinstance(code, int) else 0)
