"""Atomic writes: a reader (or a crash) never sees a half-written file or directory.

Every file lmforge produces goes through `atomic_write` (temp file in the same directory, fsync,
rename), so a kill at any moment leaves either the old version or the new one. Logs that grow a
line at a time (metrics.jsonl) go through `append_line`: a kill leaves each line whole or absent.
"""

from __future__ import annotations

import contextlib
import errno
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


PAGE = 4096  # the granularity of the kernel's copy into the page cache (its larger folios are aligned alike)


def append_line(path: str | Path, line: str, fsync: bool = False) -> None:
    """Append `line` (no newline inside) and a newline to `path`, created if missing, such that a
    reader or a kill at any instant finds the line whole or not at all (`fsync`: and on disk when
    this returns, for records a power cut must not lose).

    One writer per file at a time (serve's --feedback writes under a lock): the padding below
    writes at an offset read before it. One `os.write` on an O_APPEND descriptor puts the line at
    the end in one piece, but it is not all-or-nothing under SIGKILL: Linux copies a write into the
    page cache a page at a time and gives up between pages once the process is being killed (a
    loop appending 2 KB lines, SIGKILLed at random, was left with a part-line in ~2% of kills; at
    a page boundary each time). A write inside one page is whole or absent. So a line that would
    straddle a page boundary first pads the previous one to that boundary with trailing blanks
    (valid JSON still; one write inside the last page), then goes in with its one write; a line
    longer than a page replaces the file instead (rename). Opened per line: a row comes at most
    once per step, and a descriptor kept open would go on writing to a file since replaced.
    """
    data = (line + "\n").encode()
    path = Path(path)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)  # read: the last byte
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":  # a file torn by other means: end its last line first
            data = b"\n" + data
        if len(data) > PAGE:
            with atomic_path(path) as tmp:  # fsyncs the new file and the directory
                tmp.write_bytes(path.read_bytes() + data)
            return
        room = PAGE - size % PAGE
        if len(data) > room and size and data[:1] != b"\n":
            _pad_last_line(path, size, room)
            size += room
        written = os.write(fd, data)
        if written != len(data):  # the disk (or the file size limit) is full: take the part-line back off
            os.ftruncate(fd, size)
            raise OSError(errno.ENOSPC, f"{path}: no room for a line ({written} of its {len(data)} bytes written)")
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _pad_last_line(path: Path, size: int, room: int) -> None:
    """Move the newline that ends `path` (of `size` bytes) `room` bytes on, to the next page
    boundary, with blanks in between: one write inside the last page (whole or absent)."""
    fd = os.open(path, os.O_WRONLY)  # not O_APPEND, where Linux would ignore pwrite's offset
    try:
        written = os.pwrite(fd, b" " * room + b"\n", size - 1)
        if written != room + 1:  # the disk (or the file size limit) is full: put the line's end back
            os.ftruncate(fd, size)
            os.pwrite(fd, b"\n", size - 1)
            raise OSError(errno.ENOSPC, f"{path}: no room to pad its last line ({written} of {room + 1} bytes)")
    finally:
        os.close(fd)


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
