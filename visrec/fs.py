"""Durable atomic file writes: the one way visrec replaces a file that something else reads.

A reader sees the old content or the new, never a part, and once the call returns the new content
survives a crash or power loss: write a temporary file beside the target, fsync it, rename it over the
target, fsync the folder (the rename itself lives in the folder's metadata).
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

MATCH_CHUNK = 1 << 20  # bytes compared a read: at 100k products 20 % faster than 256 KiB, 4 MiB slower
TEMP_SUFFIX = ".tmp"
TEMP_GRACE_S = 10.0  # a temporary file younger than this is never swept: see `sweep_temporaries`


def folder_problem(folder: Path, writing: bool = True) -> str | None:
    """Why `folder` cannot be made (missing parents too) and, `writing`, written in; None if it can.
    Asked before long work whose result goes there: an hour of training must not end in "File exists"."""
    if folder.exists() and not folder.is_dir():
        return f"{folder} is a file, not a folder"
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if writing and not os.access(existing, os.W_OK | os.X_OK):
        return f"no permission to write in {existing}"
    return None


@contextmanager
def replacing(path: Path, durable: bool = True) -> Iterator[IO[bytes]]:
    """A binary file to write `path`'s new content to; it replaces `path` when the block ends without an
    error, and is removed otherwise (the old content stays). Creates the parent folders. Not `durable`:
    its bytes are not forced to disk before the rename (a cache that checks itself: after a power cut
    it may read as damaged, never as another content).

    The temporary file, `.NAME.XXXXXXXX.tmp` beside it, is locked (flock) until it is renamed: one a
    killed writer left is unlocked, which is how `sweep_temporaries` knows it may go."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
            os.replace(tmp, path)  # with the lock still held: never a sweep between
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sync_folder(path.parent)


def sweep_temporaries(folder: Path, targets: str) -> list[str]:
    """Remove the temporary files `replacing` left in `folder` for a file whose name fully matches the
    regular expression `targets` (the names visrec writes there: nothing else is touched), once nobody
    holds them: their writer was killed. One made in the last `TEMP_GRACE_S` stays (its writer may not
    have locked it yet). Returns the names removed."""
    pattern = re.compile(rf"\.(?P<target>.+)\.[a-z0-9_]{{8}}{re.escape(TEMP_SUFFIX)}")
    wanted = re.compile(targets)
    removed: list[str] = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in sorted(entries):
        found = pattern.fullmatch(entry.name)
        if not found or not wanted.fullmatch(found["target"]):
            continue
        try:
            fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or time.time() - info.st_mtime < TEMP_GRACE_S:
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: its writer is alive
            entry.unlink()
            removed.append(entry.name)
        except OSError:
            continue
        finally:
            os.close(fd)
    if removed:
        sync_folder(folder)
    return removed


def write_atomically(path: Path, data: str | bytes) -> None:
    """Replace `path` with `data` (text is written as UTF-8), durably and atomically."""
    with replacing(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def sync_folder(folder: Path) -> None:
    """Make the folder's entries (a rename, a new file) durable. A no-op where folders cannot be opened
    (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def allocated_bytes(folder: Path) -> int:
    """The disk a folder's files occupy (their allocated blocks: a sparse file's holes take none)."""
    return sum(p.lstat().st_blocks * 512 for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def copy_tree_sparse(source: Path, target: Path) -> None:
    """Copy a folder of plain files into `target` (made if missing, else empty), keeping holes as holes:
    the engine preallocates its mmapped files sparse (a collection occupying 836 KB has files totalling
    ~200 MB), and a plain copy writes the zeros out. Only the data extents are copied (in the kernel:
    `copy_file_range`), then each file is sized as its source and fsynced; links and other special
    files are refused. Meant to run while the source is written: a file that vanishes or shrinks
    meanwhile is copied as far as it goes, and `match_tree` makes the copy exact afterwards."""
    target.mkdir(parents=True, exist_ok=True)
    for entry in sorted(source.rglob("*")):
        destination = target / entry.relative_to(source)
        try:
            if _is_folder(entry):
                destination.mkdir(exist_ok=True)
                continue
            with open(entry, "rb") as src, open(destination, "xb") as dst:
                _copy_extents(src.fileno(), dst.fileno(), os.fstat(src.fileno()).st_size)
                os.fsync(dst.fileno())
        except FileNotFoundError:  # gone since the listing (the engine replaced it): match_tree sees
            continue
    _sync_folders(target)


def match_tree(source: Path, target: Path, chunk: int = MATCH_CHUNK) -> int:
    """Make `target`, an earlier copy of `source` (`copy_tree_sparse`), hold exactly `source`'s files
    and bytes as they are now, writing only what differs: the copy is taken while the source is
    written, then matched with its writes held, which costs reading both, not writing it all again.
    Returns the bytes written; `chunk`: the bytes compared a read (the rewrite's unit too)."""
    wanted = {entry.relative_to(source): entry for entry in source.rglob("*")}
    for extra in sorted(
        (p for p in target.rglob("*") if p.relative_to(target) not in wanted),
        key=lambda p: len(p.parts),
    ):
        if extra.is_dir() and not extra.is_symlink():
            shutil.rmtree(extra)
        elif extra.exists() or extra.is_symlink():
            extra.unlink()
    written = 0
    for relative, entry in sorted(wanted.items()):
        destination = target / relative
        if _is_folder(entry):
            if not destination.is_dir():
                destination.unlink(missing_ok=True)
                destination.mkdir()
            continue
        if destination.is_dir():
            shutil.rmtree(destination)
        mode = "r+b" if destination.exists() else "x+b"
        with open(entry, "rb") as src, open(destination, mode) as dst:
            size = os.fstat(src.fileno()).st_size
            resized = os.fstat(dst.fileno()).st_size != size
            changed = _match_extents(src.fileno(), dst.fileno(), size, chunk)
            if changed or resized or mode == "x+b":
                os.fsync(dst.fileno())
            written += changed
    _sync_folders(target)
    return written


def _is_folder(entry: Path) -> bool:
    """Whether `entry` is a folder (else a plain file); raises OSError for a link or a special file,
    FileNotFoundError if it is gone."""
    mode = entry.lstat().st_mode
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
        raise OSError(f"{entry} is not a plain file or folder")
    return stat.S_ISDIR(mode)


def _sync_folders(root: Path) -> None:
    for folder in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        sync_folder(folder)


def _data_extents(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """The (start, end) ranges of `fd` between `start` and `end` that hold data (not holes)."""
    offset = start
    while offset < end:
        try:
            begin = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole is left
            return
        if begin >= end:
            return
        stop = min(os.lseek(fd, begin, os.SEEK_HOLE), end)
        yield begin, stop
        offset = stop


def _copy_extents(src: int, dst: int, size: int) -> None:
    for start, end in _data_extents(src, 0, size):
        while start < end:
            copied = os.copy_file_range(src, dst, end - start, start, start)
            if copied == 0:  # the source shrank while it was copied: match_tree finishes it
                break
            start += copied
    os.ftruncate(dst, size)


def _match_extents(src: int, dst: int, size: int, chunk: int) -> int:
    """Rewrite the parts of `dst` that differ from `src` (whose size is `size`); the bytes written."""
    written = 0
    if os.fstat(dst).st_size != size:
        os.ftruncate(dst, size)
    offset = 0
    for start, end in [*_data_extents(src, 0, size), (size, size)]:
        for begin, stop in _data_extents(dst, offset, start):  # a hole in the source: zeros here
            for at in range(begin, stop, chunk):
                length = min(chunk, stop - at)
                if any(os.pread(dst, length, at)):
                    written += _write_at(dst, bytes(length), at)
        for at in range(start, end, chunk):
            length = min(chunk, end - at)
            wanted = os.pread(src, length, at)
            if wanted != os.pread(dst, length, at):
                written += _write_at(dst, wanted, at)
        offset = end
    return written


def _write_at(fd: int, data: bytes, at: int) -> int:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], at + done)
    return done
