"""How farmer writes files, and where it keeps those that belong to no run.

* :func:`atomic_write`: every file farmer writes (checkpoints, config.json, metrics, evaluation results, caches)
  goes through it.
* :func:`cache_dir`: ``$XDG_CACHE_HOME/farmer`` (default ``~/.cache/farmer``): FID weights and statistics, folder
  indexes.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Callable


class WriteError(ValueError):
    """A file could not be written for lack of room or permission; the message names it and says what to do."""


def cache_dir(*parts: str) -> Path:
    """``$XDG_CACHE_HOME/farmer/<parts>`` (``~/.cache/farmer/...`` when the variable is unset); not created here."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "farmer", *parts)


def within(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder``, or lies inside it when ``folder`` is a directory (both resolved, links
    followed)."""
    place, outer = Path(path).resolve(), Path(folder).resolve()
    return place == outer or (Path(folder).is_dir() and outer in place.parents)


def free_name(path: Path) -> Path:
    """``path``, or ``<stem>-2<suffix>``, ``-3`` ... where it exists (a link included): a file farmer names itself
    never replaces one that is there."""
    free, k = path, 2
    while free.exists() or free.is_symlink():
        free, k = path.with_name(f"{path.stem}-{k}{path.suffix}"), k + 1
    return free


def parse_json(text: str | bytes):
    """``json.loads``, where text nested too deeply for the decoder (it recurses, and would end in a RecursionError)
    is malformed JSON like any other: a :class:`json.JSONDecodeError` (a ValueError)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", text if isinstance(text, str) else "", 0) from None


TEMPORARY_MARK = "farmer-"  # .<name>.farmer-<random>.tmp: a temporary name no one else uses, so cleaning up after a
# killed writer (farmer_cli.rundir.remove_stale_writes) deletes only farmer's


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Write ``path`` through ``write(temporary name)`` and rename it into place (``os.replace``, atomic on POSIX):
    killed at any moment, the file is the old one or the new one, never truncated. A full disk, a file-size limit,
    a read-only file system or a directory that cannot be created or written is a :class:`WriteError` naming the
    file; other errors pass through."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{TEMPORARY_MARK}", suffix=".tmp")
    except OSError as err:
        if not _failed_write(err) and not isinstance(err, (FileExistsError, NotADirectoryError)):
            raise
        raise WriteError(f"{path}: could not be written ({err.strerror or err}): {path.parent} cannot be created "
                         "or written; fix its permissions or choose another place") from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 (and some writers recreate the file): usual permissions
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if _failed_write(err):
            why = err.strerror if isinstance(err, OSError) and err.strerror else "a short write"
            fix = ("fix the permissions" if isinstance(err, OSError) and err.errno in PERMISSION_ERRNOS else
                   "free some disk space (or raise the file-size limit)")
            raise WriteError(f"{path}: could not be written ({why}); the file that was there is kept: {fix} and "
                             "run the command again (training and distillation: with --resume)") from None
        raise


PERMISSION_ERRNOS = (errno.EACCES, errno.EPERM)


def _failed_write(err: BaseException) -> bool:
    """A full disk, a file-size limit, a read-only file system or no permission while writing; torch.save's zip
    writer reports a short write as a RuntimeError ("unexpected pos", "file write failed")."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EIO, *PERMISSION_ERRNOS)
    return isinstance(err, RuntimeError) and any(k in str(err) for k in ("unexpected pos", "file write failed"))
