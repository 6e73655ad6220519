"""The file index of an ImageNet-style image folder (``root/<class>/<images>``), built once and cached.

Walking 1.28M files takes minutes on network storage, and every process of a multi-GPU job would do it. The index
(class names, relative paths, labels) is written as JSON under ``<cache>/farmer/folder-index/``, keyed by the
folder's absolute path and the modification times of its class folders; it also records the modification time and
number of entries of every sub-folder below them, and every file's size and modification time, and is used only
while all of those are unchanged (adding or removing a file changes its own folder's time and count, however deep;
a time set back by ``touch -r`` leaves the count; an image replaced in place changes its own size or time).
Checking costs one stat and one listing per folder and one stat per file for up to :data:`FILES_CHECKED` files
(spread evenly over larger folders: a few seconds at most, where the walk takes minutes). Hidden folders and files (a
leading dot: ``.ipynb_checkpoints/``) are not images of the data set. An index that is not what
farmer writes (unreadable, wrong types, paths outside the folder, a path twice, a label that is not its class
folder, or content that no longer matches its SHA-256 checksum) is ignored and rebuilt.

In a multi-process job the first process of each machine (``LOCAL_RANK`` 0) builds the index and the others wait
for it, boundedly: rank 0 marks the build with ``<key>.building`` (holding its pid); another rank waits while that
marker exists and its process lives, and walks the folder itself, with a log line saying why, when the marker is
gone without an index (rank 0 could not write the cache, or died), when no marker appears within
:data:`START_GRACE_SECONDS`, or after :data:`WAIT_SECONDS`. A read-only cache costs a walk per process, never a
stall.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

from farmer_cli import storage

log = logging.getLogger("farmer")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
WAIT_SECONDS = 3600  # the longest another process may take to build the index (1.28M files on network storage)
INDEX_VERSION = "5"  # in the key: an index of an earlier layout (or rules) is rebuilt, not misread
START_GRACE_SECONDS = 30.0  # how long rank 0 may take to start building before the others walk on their own
FILES_CHECKED = 20_000  # files whose size and time are compared with the index on every read (evenly spread)


def class_folders(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def loose_images(root: Path) -> list[str]:
    """Image files directly in ``root``, beside its class folders: no class holds them (names sorted)."""
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".") and
                  p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def passed_over(here: str, subfolders: list[str], files: list[str]) -> list[tuple[str, str]]:
    """The entries of one folder of a walk (``os.walk``: links to folders are listed, not entered) that farmer's data
    walks do not read, each with why (:func:`unread_why`): a linked folder (a link may lead back up, or into another
    class) and an image name that is no regular file (a FIFO, device or socket, a broken link). Hidden names are not
    data; not listed."""
    found = [os.path.join(here, d) for d in subfolders if not d.startswith(".")]
    found += [os.path.join(here, f) for f in files if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return [(path, why) for path in found for why in [unread_why(path)] if why]


def unread_why(path: str) -> str:
    """Why a data walk does not read the entry ``path`` (a folder or an image name), or "" when it does."""
    if os.path.isdir(path):
        return "a linked folder, which farmer does not enter" if os.path.islink(path) else ""
    if os.path.isfile(path):
        return ""
    return "a broken link" if not os.path.exists(path) else "not a regular file: a FIFO, device or socket"


def _key(root: Path, classes: list[str]) -> str:
    stamp = [INDEX_VERSION, str(root.resolve())] + [f"{c}:{(root / c).stat().st_mtime_ns}" for c in classes]
    return hashlib.sha256("\n".join(stamp).encode()).hexdigest()[:24]


def _walk(root: Path, classes: list[str]) -> dict:
    paths, labels, sizes, times, folders, skipped = [], [], [], [], {}, []
    for k, name in enumerate(classes):
        found = {}  # relative path -> (size, modification time): the stat that tells a file from a folder
        for here, subfolders, files in os.walk(root / name):  # linked folders are listed, not entered
            folders[os.path.relpath(here, root)] = [Path(here).stat().st_mtime_ns, len(subfolders) + len(files)]
            subfolders[:] = [d for d in subfolders if not d.startswith(".")]  # hidden, like hidden class folders
            skipped += [[os.path.relpath(path, root), why] for path, why in passed_over(here, subfolders, files)]
            for f in files:
                full = os.path.join(here, f)
                if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES and os.path.isfile(full):
                    st = os.stat(full)
                    found[os.path.relpath(full, root)] = (st.st_size, st.st_mtime_ns)
        ordered = sorted(found, key=lambda p: Path(p).parts)
        paths += ordered
        sizes += [found[p][0] for p in ordered]
        times += [found[p][1] for p in ordered]
        labels += [k] * len(found)
    index = {"root": str(root.resolve()), "classes": classes, "paths": paths, "labels": labels, "sizes": sizes,
             "times": times, "folders": folders, "skipped": sorted(skipped)}
    return index | {"checksum": _checksum(index)}


def _checksum(index: dict) -> str:
    """SHA-256 of what the index says (its classes, files, labels and folder times): an index edited or cut after
    it was written no longer matches and is rebuilt."""
    content = [index.get(k) for k in ("root", "classes", "paths", "labels", "sizes", "times", "folders", "skipped")]
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _current(index, root: Path, classes: list[str]) -> bool:
    """Whether a cached index is farmer's and still describes ``root``: the right shape and types, every path
    inside the folder, every folder it saw unchanged (the same modification time and number of entries: a time set
    back by ``touch -r`` or a copying tool does not hide added or removed files), and its files unchanged (the same
    size and modification time: an image replaced in place changes neither its folder's time nor its count) —
    every file of a folder of up to :data:`FILES_CHECKED`, that many spread evenly over a larger one."""
    if not (isinstance(index, dict) and index.get("root") == str(root.resolve()) and index.get("classes") == classes
            and isinstance(index.get("paths"), list) and isinstance(index.get("labels"), list)
            and isinstance(index.get("folders"), dict) and len(index["paths"]) == len(index["labels"])
            and isinstance(index.get("skipped"), list)
            and all(isinstance(e, list) and len(e) == 2 and all(isinstance(v, str) for v in e) for e in index["skipped"])
            and all(isinstance(index.get(k), list) and len(index[k]) == len(index["paths"]) for k in ("sizes", "times"))):
        return False
    if not all(isinstance(p, str) and not os.path.isabs(p) and ".." not in Path(p).parts for p in index["paths"]):
        return False
    if not all(isinstance(y, int) and 0 <= y < len(classes) for y in index["labels"]):
        return False
    if index.get("checksum") != _checksum(index) or len(set(index["paths"])) != len(index["paths"]):
        return False
    if not all(Path(p).parts[0] == classes[y] for p, y in zip(index["paths"], index["labels"])):
        return False  # every image's label is its class folder
    if not all(".." not in Path(f).parts and unread_why(str(root / f)) == why for f, why in index["skipped"]):
        return False  # an entry passed over that is readable now (a broken link's target restored)
    n = len(index["paths"])
    checked = range(n) if n <= FILES_CHECKED else (k * n // FILES_CHECKED for k in range(FILES_CHECKED))
    try:
        return all(isinstance(seen, list) and len(seen) == 2 and ".." not in Path(f).parts
                   and [(root / f).stat().st_mtime_ns, len(os.listdir(root / f))] == seen
                   for f, seen in index["folders"].items()) and \
            all(_stamp(root / index["paths"][k]) == (index["sizes"][k], index["times"][k]) for k in checked)
    except OSError:
        return False


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _read(path: Path, root: Path, classes: list[str]) -> dict | None:
    try:
        index = storage.parse_json(path.read_text())
    except (OSError, ValueError):
        return None
    return index if _current(index, root, classes) else None


def _builder_alive(marker: Path) -> bool:
    """Whether the build marked by ``marker`` is still running (its pid is a live process on this machine)."""
    try:
        pid = int(marker.read_text() or "0")
    except (OSError, ValueError):
        return marker.exists()  # being written: treat as alive
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's live process
        return True
    return pid > 0


def _wait_for_rank0(path: Path, marker: Path, root: Path, classes: list[str]) -> dict | None:
    """The index rank 0 writes, or None (with the reason logged) when this process should walk the folder itself."""
    started, deadline = time.monotonic(), time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        cached = _read(path, root, classes)
        if cached is not None:
            return cached
        if marker.exists():
            if not _builder_alive(marker):
                log.warning("the folder index of %s was not written by the first process (its build ended without "
                            "writing %s); this process walks the folder itself", root, path)
                return None
        elif time.monotonic() - started > START_GRACE_SECONDS:
            log.warning("no folder index of %s appeared in %s within %.0f s (read-only cache?); this process walks "
                        "the folder itself", root, path.parent, START_GRACE_SECONDS)
            return None
        time.sleep(0.5)
    log.warning("the folder index of %s took over %d s; this process walks the folder itself", root, WAIT_SECONDS)
    return None


def _write(path: Path, index: dict) -> None:
    try:
        storage.atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(index)))
    except (OSError, storage.WriteError):
        pass  # a read-only cache only costs the walk next time


def folder_index(root: Path) -> dict:
    """-> {"classes", "paths" (relative to root), "labels", "skipped" ([path, why] of the entries not read:
    :func:`passed_over`)} for ``root``, from the cache where it is current."""
    classes = class_folders(root)
    path = storage.cache_dir("folder-index", f"{_key(root, classes)}.json")
    marker = path.with_suffix(".building")
    cached = _read(path, root, classes)
    if cached is not None:
        return cached
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        cached = _wait_for_rank0(path, marker, root, classes)
        return cached if cached is not None else _walk(root, classes)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        marker.unlink(missing_ok=True)  # a stale marker, or a link planted there: removed, never written through
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
    except OSError:
        marker = None  # a read-only cache: the other ranks see no marker and walk on their own
    try:
        index = _walk(root, classes)
        _write(path, index)
    finally:
        if marker is not None:
            marker.unlink(missing_ok=True)
    return index
