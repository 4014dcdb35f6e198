"""Atomic writes: a reader (or a crash) never sees a half-written file or directory.

Every file lmforge produces goes through `atomic_write` (temp file in the same directory, fsync,
rename), so a kill at any moment leaves either the old version or the new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform/filesystem can open a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success fsync it and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files private; give them the usual permissions
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write(path: str | Path, data: bytes | str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def staged_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Write a whole directory beside `out`, then move it into place: a failure midway leaves
    nothing at `out` (or the previous contents untouched)."""
    from .errors import LMForgeError

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise LMForgeError(f"{out} exists and is not empty (pass --overwrite to replace it)")
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(tmp, out)
    _fsync_dir(out.parent)


def replace_dir(new: Path, dest: Path) -> None:
    """Swap a fully written directory `new` into place at `dest`.

    Crash-safe: until the final rename `dest` (or its backup `dest.old`) stays complete, and
    `recover_dir` repairs the one in-between state a crash can leave.
    """
    old = dest.with_name(dest.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if dest.exists():
        os.replace(dest, old)
    os.replace(new, dest)
    _fsync_dir(dest.parent)
    if old.exists():
        shutil.rmtree(old)


def recover_dir(dest: Path, complete_marker: str) -> None:
    """Undo a crash in the middle of `replace_dir` or of writing `dest.new`."""
    new = dest.with_name(dest.name + ".new")
    old = dest.with_name(dest.name + ".old")
    if not dest.exists():
        if (new / complete_marker).exists():
            os.replace(new, dest)
        elif old.exists():
            os.replace(old, dest)
    for leftover in (new, old):
        if leftover.exists():
            shutil.rmtree(leftover)
