"""The file index of an ImageNet-style image folder (``root/<class>/<images>``), built once and cached.

Walking 1.28M files takes minutes on network storage, and every process of a multi-GPU job would do it. The index
(class names, relative paths, labels) is written as JSON under ``<cache>/farmer/folder-index/``, keyed by the
folder's absolute path and the modification times of its class folders (adding or removing a file changes its
folder's time, so the index is rebuilt). In a multi-process job, the first process of each machine
(``LOCAL_RANK`` 0) builds it and the others wait for it.
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
    paths, labels = [], []
    for k, name in enumerate(classes):
        files = sorted(f for f in (root / name).rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        paths += [str(f.relative_to(root)) for f in files]
        labels += [k] * len(files)
    return {"root": str(root.resolve()), "classes": classes, "paths": paths, "labels": labels}


def folder_index(root: Path) -> dict:
    """-> {"classes", "paths" (relative to root), "labels"} for ``root``, from the cache where it is current."""
    classes = class_folders(root)
    path = cache_dir() / f"{_key(root, classes)}.json"
    if path.exists():
        return json.loads(path.read_text())
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        deadline = time.time() + WAIT_SECONDS
        while not path.exists() and time.time() < deadline:
            time.sleep(1.0)
        if path.exists():
            return json.loads(path.read_text())
    index = _walk(root, classes)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(index))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs the walk next time
    return index
