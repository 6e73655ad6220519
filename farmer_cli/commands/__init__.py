"""One thin module per subcommand: parse options, call the library, render with rich (see ui.py).

Every command turns the library's user-facing errors (bad config, data, checkpoint, device or argument) into one
red line on stderr and exit status 2 via :func:`user_errors`.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from pathlib import Path
from typing import Iterator

import typer


class UsageError(ValueError):
    """A bad command-line value that typer could not catch by type alone."""


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Show the library's messages; turn any user-facing error into one line on stderr and exit status 2."""
    from farmer_cli.checkpoint import CheckpointError
    from farmer_cli.config.schema import ConfigError
    from farmer_cli.data.sources import DataError
    from farmer_cli.eval.feature_metrics import WeightsError
    from farmer_cli.device import DeviceError
    from farmer_cli.model.farmer import NonFiniteError
    from farmer_cli.storage import WriteError
    from farmer_cli.commands.ui import console, escape, show_library_messages

    def refuse(message: str) -> None:
        line = message.replace("\n", "\\n")  # a newline in a quoted name is shown, not obeyed: one line
        console.print(f"[red]error:[/] {escape(line)}", highlight=False)
        sys.exit(2)

    show_library_messages()
    try:
        yield
    except (ConfigError, DataError, CheckpointError, DeviceError, WeightsError, WriteError, UsageError,
            NonFiniteError) as err:
        refuse(str(err))
    except OSError as err:  # what the file system refuses: a name too long, a link loop, a path through a file
        where = f"{err.filename}: " if err.filename else ""
        refuse(f"{where}{err.strerror or err}; check the path")


def command(implementation):
    """A command's implementation as its Typer callback: its options are its own parameters (each written once)
    and it runs inside :func:`user_errors`."""
    @functools.wraps(implementation)
    def run(*args, **kwargs):
        with user_errors():
            return implementation(*args, **kwargs)
    return run


def exit_with(message: str) -> None:
    raise UsageError(message)


def check_recorded_data(run_dir, data) -> None:
    """Exit 2 when a data folder the run recorded (config.json keeps absolute paths) no longer exists: one line
    saying so and how to bring it back, instead of "not found"."""
    import os

    for setting, source in (("data.source", data.source), ("data.test_source", data.test_source)):
        if source and os.path.isabs(source) and not os.path.exists(source):
            exit_with(f"{run_dir} trained with {setting} {source}, which is missing (moved or deleted): restore it "
                      "at that path, or link it there")


def check_data_unchanged(run_dir, recorded, bundle, consequence: str, remedy: str = "") -> None:
    """Exit 2 when the run's own data ``bundle`` no longer has the layout the run ``recorded`` in its config.json
    (images added, removed, replaced or moved between classes; an edited file): one line saying so, what it would
    cause (``consequence``) and what to do."""
    from farmer_cli.data.dataset import layout_change

    changed = layout_change(recorded, bundle.layout)
    if changed:
        exit_with(f"{run_dir}: its data no longer splits as when the run trained ({changed}), so {consequence}; "
                  f"restore the data (or config.json){', ' + remedy if remedy else ''}")


def refuse_outputs_in_data(data, outputs) -> None:
    """Exit 2 when an output ((option, path or None) pairs) is, or lies inside, a folder the run's data comes from
    (``data``: its DataConfig; ``source`` and ``test_source``): written there, it would be read as an image of the
    data set by the next training or evaluation."""
    from farmer_cli.data.sources import data_folders
    from farmer_cli.storage import within

    for option, path in outputs:
        for source in (data.source, data.test_source):
            inside = next((f for f in data_folders(source) if path is not None and within(path, f)), None)
            if inside is not None:
                exit_with(f"{option} {path} is inside {inside}, where the run's images ({source}) are: it would be "
                          "read as an image of the data set next time; choose a place outside it")


def refuse_unused(options, where: str, why: str) -> None:
    """Exit 2 when any of ``options`` ((name, value) pairs; None means not given) was given although it would do
    nothing ``where`` ("with --dry-run", or ""): one line naming them and ``why``."""
    given = [name for name, value in options if value is not None]
    if given:
        one = len(given) == 1
        exit_with(f"{', '.join(given)} {'has' if one else 'have'} no effect{' ' + where if where else ''} ({why}); "
                  f"leave {'it' if one else 'them'} out")


def set_keys(overrides, section: str = "") -> list[tuple[str, str]]:
    """(``--set SECTION.KEY``, KEY) for each setting of ``section`` among --set overrides; without a section,
    every setting with its whole dotted name."""
    prefix = f"{section}." if section else ""
    keys = [item.split("=", 1)[0].strip() for item in overrides]
    return [(f"--set {key}", key[len(prefix):]) for key in keys if key.startswith(prefix)]


def refuse_unread(unread: dict, given) -> None:
    """Exit 2 when a setting that was given (``given``: (name shown, setting name) pairs) is among ``unread``
    (setting name -> why nothing reads it)."""
    found = [(name, unread[key]) for name, key in given if key in unread]
    refuse_unused([(name, True) for name, _ in found], "", "; ".join(dict.fromkeys(why for _, why in found)))


def resolve_class(spec: str, class_names: list[str], num_classes: int) -> int:
    """A class given by name or index: a name from the checkpoint's label map wins (class folders named "1".."10"
    mean those folders), otherwise a whole number is an index 0..K-1."""
    import unicodedata

    if spec in class_names:
        return class_names.index(spec)

    def folded(name: str) -> str:  # "Cat" is "cat"; a name typed decomposed (NFD) is the same name composed (NFC)
        return unicodedata.normalize("NFC", name).casefold()

    lowered = [folded(n) for n in class_names]
    matches = [k for k, name in enumerate(lowered) if name == folded(spec)]
    if len(matches) > 1:
        raise UsageError(f"class '{spec}' could be any of {', '.join(repr(class_names[k]) for k in matches)} (they "
                         f"differ only in case); give the exact name or an index ({', '.join(map(str, matches))})")
    if matches:
        return matches[0]
    text = spec.strip()
    if text.isascii() and text.lstrip("-").isdigit():
        index = int(text)
        if not 0 <= index < num_classes:
            exit_with(f"class {index} is out of range: this model has classes 0..{num_classes - 1}")
        return index
    import difflib

    close = difflib.get_close_matches(folded(spec), lowered, n=1)
    hint = f" (did you mean '{class_names[lowered.index(close[0])]}'?)" if close else ""
    raise UsageError(f"unknown class '{spec}'{hint}; give an index 0..{num_classes - 1} or a name from the label map")


CKPT_HELP = "Checkpoint (run) directory. Default: the newest run under ./runs/."
SET_HELP = "Override any config value, e.g. --set train.lr=3e-4 --set model.af_blocks=8 (repeatable)."
CLASS_HELP = ("Class name from the checkpoint's label map, or index 0..K-1. A name wins over an index: with class "
              "folders named 1..10, '--class 1' means folder '1'.")
DEVICE_HELP = "auto (a GPU when there is one), cpu, cuda or cuda:N."
SEEDED_DEVICE_HELP = DEVICE_HELP + " Samples drawn with a seed are reproducible on the same device, not across devices."
Option = typer.Option


def warn_untrained_null_class(cfg, run_dir, use: str) -> None:
    """A run trained with ``train.label_dropout = 0`` never trained its null class (the unconditional model of
    Sec. 3.4's guidance): say so where ``use`` (guided sampling, an unconditional score) reads it."""
    if cfg.train.label_dropout == 0:
        from farmer_cli.commands.ui import console, escape

        console.print(f"[yellow]warning:[/] {escape(str(run_dir))} was trained with train.label_dropout = 0, so its "
                      f"null class (the unconditional model) was never trained: {use} reads it and means little",
                      highlight=False)


def default_output(given, name: str):
    """The output file a command writes: the one the user named, else ``name`` in the current folder, or
    ``<stem>-2<suffix>``, ``-3`` ... where that exists (:func:`farmer_cli.storage.free_name`)."""
    from pathlib import Path

    from farmer_cli.storage import free_name

    return given if given is not None else free_name(Path(name))


def _as_png(path: Path) -> Path:
    """The PNG name suggested for an output ``path`` of another format: ``a.psd`` -> ``a.png``, ``x.jpg.`` ->
    ``x.png``, ``.png`` -> ``png.png`` (never a hidden or doubled name)."""
    return path.with_name((Path(path.name.rstrip(".")).stem.lstrip(".") or "figure") + ".png")


def check_output_image(path, option: str = "--out", inputs=()) -> None:
    """Before any work: ``path`` must name an image format PIL writes and lie in a directory that exists (or can be
    made) and is writable, so nothing computed is lost at the end; it must not be one of the ``inputs`` (files or
    folders of images) or lie inside one, where it would replace an input or be read as one next time."""
    import io
    import os

    from PIL import Image

    if not path.name or path.name == "..":
        exit_with(f"{option} '{path}': give a file name, e.g. {option} samples.png")
    kind = Image.registered_extensions().get(path.suffix.lower())
    if kind is None:
        exit_with(f"{option} {path}: give a file name with an image extension, e.g. {_as_png(path)}")
    if kind not in Image.SAVE:  # PIL reads it but cannot write it (.psd): say so now, not after the work
        exit_with(f"{option} {path}: {kind} images can be read but not written; use e.g. {_as_png(path)}")
    for mode in ("L", "RGB"):  # farmer writes grey and colour pictures: some formats take neither (XBM, BLP)
        try:
            Image.new(mode, (8, 8)).save(io.BytesIO(), format=kind)
        except Exception:  # noqa: BLE001 - whatever the writer raises, it cannot write this picture
            exit_with(f"{option} {path}: PIL cannot write {'grey' if mode == 'L' else 'colour'} {kind} images; use "
                      f"e.g. {_as_png(path)}")
    stored = _stored_size(kind, (300, 20))
    if stored not in (None, (300, 20)):  # ICO keeps at most 256 px squares, ICNS stretches to a square
        exit_with(f"{option} {path}: {kind} files keep pictures only at fixed sizes (a 300x20 picture comes back "
                  f"{stored[0]}x{stored[1]}), so the figure would be resized; use e.g. {_as_png(path)}")
    if path.is_dir():
        exit_with(f"{option} {path} is a directory; give a file name such as {path / 'figure.png'}")
    check_output_dir(path.parent, option)
    if path.exists() and not os.access(path, os.W_OK):
        exit_with(f"{option} {path} exists and is not writable")
    from farmer_cli.storage import within

    for given in inputs:
        if within(path, given):
            same = path.resolve() == given.resolve()
            exit_with(f"{option} {path} {'is' if same else 'is inside'} the input {given}: the figure would "
                      f"{'replace it' if same else 'be read as an input next time'}; write it elsewhere")


def _stored_size(kind: str, size: tuple[int, int]) -> tuple[int, int] | None:
    """The size a colour picture of ``size`` has once written as ``kind`` and read back; None when PIL cannot read
    that format back (PDF) or write it at that size."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    try:
        Image.new("RGB", size).save(buffer, format=kind)
        buffer.seek(0)
        with Image.open(buffer) as image:
            return image.size
    except Exception:  # noqa: BLE001 - a writer or reader that cannot take it says nothing about resizing
        return None


def check_output_dir(path, option: str = "--out-dir") -> None:
    """Before any work: ``path`` is a writable directory, or can be created as one."""
    import os

    existing = next((p for p in [path, *path.parents] if p.exists() or p.is_symlink()), None)
    if existing is not None and existing.is_symlink() and not existing.exists():
        exit_with(f"{option} {path}: {existing} is a symbolic link to nothing (or a loop of links)")
    if existing is not None and not existing.is_dir():
        exit_with(f"{option} {path}: {existing} is a file, not a directory")
    if existing is not None and not (os.access(existing, os.W_OK | os.X_OK) and _can_create_in(existing)):
        exit_with(f"{option} {path}: {existing} is not writable")
    from farmer_cli.rundir import managed_folder

    managed = managed_folder(path)
    if managed is not None:
        exit_with(f"{option} {path} is in {managed}, where farmer writes, prunes and deletes the run's own files "
                  f"(--overwrite and checkpoint pruning would remove yours); write it elsewhere, e.g. {managed.parent}")


def _can_create_in(directory) -> bool:
    """Whether a file can really be created in ``directory`` (permissions say yes to root on read-only or virtual
    file systems such as /proc)."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=directory, prefix=".farmer-probe-"):
            return True
    except OSError:
        return False


MAX_DRAWS = 1024  # dequantisation draws per image: the mean's noise falls as 1/sqrt(draws), to 3% of one draw's here


def check_draws(option: str, draws: int) -> None:
    """``--samples`` / ``--bpd-draws``: 1 to :data:`MAX_DRAWS` dequantisation draws per image (each draw scores the
    whole batch again, so the time grows with it; the memory does not, see farmer_cli.eval.bits.draw_passes)."""
    if not 1 <= draws <= MAX_DRAWS:
        exit_with(f"{option} {draws}: give 1 to {MAX_DRAWS} dequantisation draws per image (each draw scores the "
                  "images again; the mean's noise falls only as 1/sqrt(draws))")


MAX_SEED = 2**63 - 1


def check_seed(seed: int | None, bits: int = 63) -> None:
    """``--seed`` (None: not given) must be a whole number from 0 to 2**bits - 1: 63 bits where it seeds a torch
    generator directly; fewer where more is computed from it (train.seed: see config.schema.MAX_TRAIN_SEED)."""
    if seed is not None and not 0 <= seed < 2**bits:
        exit_with(f"--seed {seed}: give a whole number from 0 to 2**{bits} - 1")
