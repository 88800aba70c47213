"""Durable atomic file writes: the one way visrec replaces a file that something else reads.

A reader sees the old content or the new, never a part, and once the call returns the new content
survives a crash or power loss: write a temporary file beside the target, fsync it, rename it over the
target, fsync the folder (the rename itself lives in the folder's metadata).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


@contextmanager
def replacing(path: Path) -> Iterator[IO[bytes]]:
    """A binary file to write `path`'s new content to; it replaces `path` when the block ends without an
    error, and is removed otherwise (the old content stays). Creates the parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sync_folder(path.parent)


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
