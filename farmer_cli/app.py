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
    app()
