"""One thin module per subcommand: parse options, call the library, print with rich.

Every command turns the library's user-facing errors (bad config, data, checkpoint or argument) into one red
line on stderr and exit status 2 via :func:`user_errors`.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

import typer


class UsageError(ValueError):
    """A bad command-line value that typer could not catch by type alone."""


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    from ..checkpoint import CheckpointError
    from ..config import ConfigError
    from ..data import DataError

    try:
        yield
    except (ConfigError, DataError, CheckpointError, UsageError) as err:
        from ..runtime import console

        console.print(f"[red]error:[/] {err}", markup=True, highlight=False)
        sys.exit(2)


def exit_with(message: str) -> None:
    raise UsageError(message)


def resolve_class(spec: str, class_names: list[str], num_classes: int) -> int:
    """A class given as an index ("3") or a name from the checkpoint's label map ("golden retriever")."""
    if spec.strip().lstrip("-").isdigit():
        index = int(spec)
        if not 0 <= index < num_classes:
            exit_with(f"class {index} is out of range: this model has classes 0..{num_classes - 1}")
        return index
    lowered = [n.lower() for n in class_names]
    if spec.lower() in lowered:
        return lowered.index(spec.lower())
    import difflib

    close = difflib.get_close_matches(spec.lower(), lowered, n=1)
    hint = f" (did you mean '{class_names[lowered.index(close[0])]}'?)" if close else ""
    exit_with(f"unknown class '{spec}'{hint}; give an index 0..{num_classes - 1} or a name from the label map")
    return -1


CKPT_HELP = "Checkpoint (run) directory. Default: the newest run under ./runs/."
SET_HELP = "Override any config value, e.g. --set train.lr=3e-4 --set model.af_blocks=8 (repeatable)."
Option = typer.Option
