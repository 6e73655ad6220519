"""How farmer writes files, and where it keeps those that belong to no run.

* :func:`atomic_write`: every file farmer writes (checkpoints, config.json, metrics, evaluation results, caches)
  goes through it.
* :func:`cache_dir`: ``$XDG_CACHE_HOME/farmer`` (default ``~/.cache/farmer``): FID weights and statistics, folder
  indexes.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Callable


class WriteError(ValueError):
    """A file could not be written for lack of room or permission; the message names it and says what to do."""


def cache_dir(*parts: str) -> Path:
    """``$XDG_CACHE_HOME/farmer/<parts>`` (``~/.cache/farmer/...`` when the variable is unset); not created here."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "farmer", *parts)


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Write ``path`` through ``write(temporary name)`` and rename it into place (``os.replace``, atomic on POSIX):
    killed at any moment, the file is the old one or the new one, never truncated. A full disk, a file-size limit
    or a read-only file system is a :class:`WriteError` naming the file; other errors pass through."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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
            raise WriteError(f"{path}: could not be written ({why}); the file that was there is kept: free "
                                  "some disk space (or raise the file-size limit) and run the command again "
                                  "(training and distillation: with --resume)") from None
        raise


def _failed_write(err: BaseException) -> bool:
    """A full disk, a file-size limit or a read-only file system while writing; torch.save's zip writer reports
    a short write as a RuntimeError ("unexpected pos", "file write failed")."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EIO)
    return isinstance(err, RuntimeError) and any(k in str(err) for k in ("unexpected pos", "file write failed"))
