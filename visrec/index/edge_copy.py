"""Copies of an embedded collection's folder, taken beside its writes and settled with them held: to
optimize apart (`Writer`'s optimized copy) and to snapshot. A copy lives in the collection's next
generation folder (`products__v1.g3`: the third copy of version 1) until its pointer names it. Its
bytes are read and written in a process of its own (`visrec.fs_apart`): in the service's, every read
would wait for the GIL behind the request threads' searches, with writes held."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from visrec.child import ChildProcess, how_it_ended
from visrec.errors import IndexUnavailable
from visrec.fs import allocated_bytes, write_atomically
from visrec.fs_apart import copy_apart, match_apart
from visrec.index.base import IndexCopy, VectorIndex

log = logging.getLogger(__name__)

GENERATION = ".g"  # `products__v1.g3`: the third optimized copy of version 1 (collection names have no dot)
COPY_HEADROOM = 1.1  # a copy may grow while it is optimized; refused unless the disk holds 110 % of it
# And this much beside it: the engine preallocates what it maps (a shard opened with 48 MiB free on a
# tmpfs died of SIGBUS here, with 80 MiB it ran), and both the child optimizing the copy and the live
# version's writes meanwhile need their share. Running out is no error the engine can return: a mapped
# page it cannot allocate kills the process.
COPY_SPARE_BYTES = 256 * 1024**2


def pointer(root: Path, collection: str) -> Path:
    """The file naming the folder that holds `collection` now (`<collection>.current`), when a copy does."""
    return root / f"{collection}.current"


def take_copy(
    source: Path, collection: str, flush: Callable[[], None], opener: Callable[[Path], VectorIndex]
) -> EdgeCopy:
    """Copy the collection folder `source` (sparse) to its next generation beside writes, if the disk has
    room for it, then match it once more with what was written meanwhile (the settle, with writes held,
    then finds less). `flush`: the live handle's; `opener`: a handle on a folder of this collection.
    Raises `IndexUnavailable` (nothing left behind) if it cannot."""
    flush()
    root = source.parent
    needed = int(allocated_bytes(source) * COPY_HEADROOM) + COPY_SPARE_BYTES
    free = shutil.disk_usage(root).free
    if free < needed:
        raise IndexUnavailable(
            f"embedded store {root}: not copied to optimize it: {free // 2**20} MiB free, "
            f"{needed // 2**20} MiB needed"
        )
    target = _next_copy(root, collection)
    try:
        copy_apart(source, target)
        flush()
        match_apart(source, target)  # what was written during the copy: the settle then finds less
    except OSError as exc:
        shutil.rmtree(target, ignore_errors=True)
        raise IndexUnavailable(f"embedded store {source}: cannot copy it to optimize: {exc}") from exc
    return EdgeCopy(source, target, pointer(root, collection), flush, opener)


class EdgeCopy(IndexCopy):
    """A copy of an embedded collection's folder (`take_copy`)."""

    def __init__(
        self,
        source: Path,
        folder: Path,
        pointer_file: Path,
        flush: Callable[[], None],
        opener: Callable[[Path], VectorIndex],
    ) -> None:
        self.source, self.folder, self.pointer = source, folder, pointer_file
        self._flush, self._opener = flush, opener

    def settle(self) -> None:
        try:
            self._flush()  # here: the engine's handle is this process's
            rewritten = match_apart(self.source, self.folder)
        except OSError as exc:
            self.discard()
            raise IndexUnavailable(f"embedded store {self.source}: cannot copy it: {exc}") from exc
        log.info("%s: copy settled, %d bytes rewritten", self.folder.name, rewritten)

    def optimize(self) -> None:
        optimize_in_child(self.folder)

    def open(self) -> VectorIndex:
        return self._opener(self.folder)

    def make_current(self) -> None:
        write_atomically(self.pointer, self.folder.name)

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _next_copy(root: Path, collection: str) -> Path:
    """A new, empty folder for the next copy of `collection`, above every copy there is (one a crash
    left too), made here: two copies taken at once (an optimized copy, a snapshot) never share one."""
    while True:
        taken = [
            int(p.name.rpartition(GENERATION)[2])
            for p in root.glob(f"{collection}{GENERATION}*")
            if p.name.rpartition(GENERATION)[2].isdigit()
        ]
        folder = root / f"{collection}{GENERATION}{max(taken, default=0) + 1}"
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        return folder


def optimize_in_child(folder: Path) -> None:
    """optimize() of `folder` in a process of its own (`visrec.index.compact`): the GIL stays free. The
    child ends with this thread, which waits for it."""
    request = {"folder": str(folder), "parent": os.getpid()}
    with ChildProcess("visrec.index.compact", request) as child:
        answers = list(child.messages())
        code = child.wait()
    if code != 0:
        cause = next((str(a["error"]) for a in answers if "error" in a), f"it {how_it_ended(code)}")
        raise IndexUnavailable(f"embedded store {folder}: optimize failed in its process: {cause}")
    log.info("optimized %s in %.1f s", folder, next((a["seconds"] for a in answers if "seconds" in a), 0.0))
