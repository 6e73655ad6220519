"""The file index of an ImageNet-style image folder (``root/<class>/<images>``), built once and cached.

Walking 1.28M files takes minutes on network storage, and every process of a multi-GPU job would do it. The index
(class names, relative paths, labels) is written as JSON under ``<cache>/farmer/folder-index/``, keyed by the
folder's absolute path and the modification times of its class folders; it also records the modification time of
every sub-folder below them and is used only while all of those are unchanged (adding or removing a file changes
its own folder's time, however deep; checking costs one stat per folder, not a walk). An index that is not what
farmer writes (unreadable, wrong types, paths outside the folder) is ignored and rebuilt. In a multi-process job,
the first process of each machine (``LOCAL_RANK`` 0) builds it and the others wait for it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
WAIT_SECONDS = 3600  # how long another process may take to build the index


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "farmer" / "folder-index"


def class_folders(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _key(root: Path, classes: list[str]) -> str:
    stamp = [str(root.resolve())] + [f"{c}:{(root / c).stat().st_mtime_ns}" for c in classes]
    return hashlib.sha256("\n".join(stamp).encode()).hexdigest()[:24]


def _walk(root: Path, classes: list[str]) -> dict:
    paths, labels, folders = [], [], {}
    for k, name in enumerate(classes):
        found = []
        for here, _, files in os.walk(root / name):  # symlinked folders are not entered
            folders[os.path.relpath(here, root)] = Path(here).stat().st_mtime_ns
            found += [os.path.join(here, f) for f in files
                      if Path(f).suffix.lower() in IMAGE_SUFFIXES and os.path.isfile(os.path.join(here, f))]
        paths += sorted((os.path.relpath(f, root) for f in found), key=lambda p: Path(p).parts)
        labels += [k] * len(found)
    return {"root": str(root.resolve()), "classes": classes, "paths": paths, "labels": labels, "folders": folders}


def _current(index, root: Path, classes: list[str]) -> bool:
    """Whether a cached index is farmer's and still describes ``root``: the right shape and types, every path
    inside the folder, and every folder it saw unchanged."""
    if not (isinstance(index, dict) and index.get("root") == str(root.resolve()) and index.get("classes") == classes
            and isinstance(index.get("paths"), list) and isinstance(index.get("labels"), list)
            and isinstance(index.get("folders"), dict) and len(index["paths"]) == len(index["labels"])):
        return False
    if not all(isinstance(p, str) and not os.path.isabs(p) and ".." not in Path(p).parts for p in index["paths"]):
        return False
    if not all(isinstance(y, int) and 0 <= y < len(classes) for y in index["labels"]):
        return False
    try:
        return all(isinstance(t, int) and ".." not in Path(f).parts and (root / f).stat().st_mtime_ns == t
                   for f, t in index["folders"].items())
    except OSError:
        return False


def _read(path: Path, root: Path, classes: list[str]) -> dict | None:
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return index if _current(index, root, classes) else None


def folder_index(root: Path) -> dict:
    """-> {"classes", "paths" (relative to root), "labels"} for ``root``, from the cache where it is current."""
    classes = class_folders(root)
    path = cache_dir() / f"{_key(root, classes)}.json"
    cached = _read(path, root, classes)
    if cached is not None:
        return cached
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        deadline = time.time() + WAIT_SECONDS
        while cached is None and time.time() < deadline:
            time.sleep(1.0)
            cached = _read(path, root, classes)
        if cached is not None:
            return cached
    index = _walk(root, classes)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(index))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs the walk next time
    return index
