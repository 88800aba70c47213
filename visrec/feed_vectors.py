"""The photo vectors a feed read, kept beside it (`FEED.vectors`), so that a delta on it reads from the
engine only those of the products whose vectors changed.

A feed reads every class it searches in memory whole (`class_matrix.ClassMatrix`), and a delta reads
the classes it searches again, to search them in the arithmetic of the full feed it mends: through the
engine's binding that is ~60 µs a photo (a Python list of 1000 floats built, then converted): 8 s of
a 1 % delta's 18 s at 100,000 products, before this file. The file holds each product's photos with
what says they are its (the vectors hash sync records, under the model: `neighbours.fingerprint`), so
a photo is taken from it only while that is still the product's: what a delta already trusts to leave
a product's list alone. Products without a recorded vectors hash are not kept (only their vectors say
what they are).

Layout: float32 rows, then a JSON index ({"dim", "entries": [[product id, fingerprint, first row,
rows, CRC-32 of its rows], ...]}), the index's CRC-32 (4 bytes) and length (8 bytes, both
little-endian) and `MAGIC`. A file whose index does not read so (cut short, damaged, another format)
is ignored, and a product whose rows do not check: those are read from the engine. Written as the
feed is (a temporary file, renamed after the feed; not forced to disk: a cache that checks itself),
4 KB a photo of 1000-d.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
import weakref
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np

from visrec.fs import TEMP_SUFFIX, replacing, sync_folder
from visrec.index.points import IndexPoint

MAGIC = b"visrec-feed-vectors-2\n"
log = logging.getLogger(__name__)
_TRAILER = 4 + 8 + len(MAGIC)
_WRITE_BYTES = 8 << 20


def vectors_path(feed: Path) -> Path:
    """Where a feed's photo vectors live: beside it, `FEED.vectors`."""
    return feed.with_name(feed.name + ".vectors")


class KeptVectors:
    """A previous feed's photo vectors (empty when it kept none, or what it kept does not read), its
    index read and checked when first asked for (a delta that reads no photo never reads the file), each
    product's photos read, and checked, when asked for: read with `pread`, not mapped, so a file cut or
    changed meanwhile gives a photo that does not check (taken from the engine), never a SIGBUS."""

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._opened = False
        self._entries_read: dict[str, tuple[str, int, int, int]] = {}
        self._dim = 0
        self._fd: int | None = None

    @property
    def _entries(self) -> dict[str, tuple[str, int, int, int]]:
        if not self._opened:
            self._opened = True
            try:
                self._open()
            except Exception:  # noqa: BLE001 - whatever does not read as one (even crafted): not trusted
                self._entries_read, self._dim = {}, 0
        return self._entries_read

    def _open(self) -> None:
        if self._path is None or not self._path.is_file():  # a pipe would block the open
            return
        fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        weakref.finalize(self, os.close, fd)
        size = os.fstat(fd).st_size
        trailer = os.pread(fd, _TRAILER, size - _TRAILER) if size >= _TRAILER else b""
        if len(trailer) != _TRAILER or trailer[-len(MAGIC) :] != MAGIC:
            raise ValueError("not a vectors file")
        check = int.from_bytes(trailer[:4], "little")
        length = int.from_bytes(trailer[4:12], "little")
        body = size - _TRAILER - length
        data = os.pread(fd, length, body) if body >= 0 else b""
        if len(data) != length or zlib.crc32(data) != check:
            raise ValueError("damaged")
        index = json.loads(data)
        dim = int(index["dim"])
        if dim <= 0 or body % (4 * dim):
            raise ValueError("rows cut short")
        rows = body // (4 * dim)
        entries = {}
        for product_id, fingerprint, first, count, crc in index["entries"]:
            if not (isinstance(product_id, str) and isinstance(fingerprint, str)):
                raise ValueError("an entry's names")
            first, count = int(first), int(count)
            if first < 0 or count < 1 or first + count > rows:
                raise ValueError("an entry past the rows")
            entries[product_id] = (fingerprint, first, count, int(crc))
        self._entries_read, self._dim, self._fd = entries, dim, fd

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def dim(self) -> int:
        self._entries  # noqa: B018 - read on first use
        return self._dim

    def get(self, product_id: str, fingerprint: str) -> np.ndarray | None:
        """The product's photos as kept, if they are still its own (the same fingerprint) and read
        back as they were written (their CRC-32)."""
        entry = self._entries.get(product_id)
        if entry is None or entry[0] != fingerprint or self._fd is None:
            return None
        _, first, count, crc = entry
        size = 4 * self._dim
        data = os.pread(self._fd, count * size, first * size)
        if len(data) != count * size or zlib.crc32(data) != crc:
            return None
        return np.frombuffer(data, np.float32).reshape(count, self._dim)

    def items(self) -> Iterator[tuple[str, str]]:
        """(product id, fingerprint) of each product kept."""
        return ((p, entry[0]) for p, entry in self._entries.items())


class VectorsWriter:
    """A feed's photo vectors as it reads them, kept for the next delta (its file opened at the first)."""

    def __init__(self, open_file: Callable[[], IO[bytes]]) -> None:
        self._open = open_file
        self._raw: IO[bytes] | None = None
        self._entries: dict[str, list[Any]] = {}
        self._rows = 0
        self._dim = 0
        self._pending: list[memoryview] = []  # rows not yet written: written a few MiB at a time
        self.failed: OSError | None = None  # what stopped it writing
        self._pending_bytes = 0

    def keep(self, product_id: str, fingerprint: str, rows: np.ndarray) -> None:
        """Keep a product's photos (once: a product in two classes is one entry)."""
        if product_id in self._entries or not is_recorded(fingerprint) or self.failed is not None:
            return
        rows = np.ascontiguousarray(np.atleast_2d(rows), dtype=np.float32)
        if self._dim and rows.shape[1] != self._dim:
            return
        self._dim = rows.shape[1]
        self._pending.append(rows.data)
        self._pending_bytes += rows.nbytes
        if self._pending_bytes >= _WRITE_BYTES:
            self._write(b"".join(self._pending))
            self._pending, self._pending_bytes = [], 0
            if self.failed is not None:
                return
        self._entries[product_id] = [product_id, fingerprint, self._rows, len(rows), zlib.crc32(rows.data)]
        self._rows += len(rows)

    def kept(self, product_id: str) -> bool:
        return product_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def finish(self) -> None:
        index = json.dumps({"dim": self._dim or 1, "entries": list(self._entries.values())}).encode()
        self._write(b"".join([*self._pending, memoryview(index)]))
        self._write(zlib.crc32(index).to_bytes(4, "little") + len(index).to_bytes(8, "little") + MAGIC)
        if self.failed is not None:
            raise self.failed

    def _write(self, data: bytes) -> None:
        if self.failed is not None:
            return
        try:
            self._file().write(data)
        except OSError as exc:  # a cache: the feed goes on without it (`kept_vectors` says so)
            self.failed = exc

    def _file(self) -> IO[bytes]:
        if self._raw is None:
            self._raw = self._open()
        return self._raw


def is_recorded(fingerprint: str) -> bool:
    """Whether a fingerprint is one sync recorded (the vectors hash), which says what the vectors are
    without reading them; one hashed from the vectors is not kept."""
    return not fingerprint.startswith("vectors:")


@contextmanager
def kept_vectors(feed: Path, previous: Path | None = None) -> Iterator[VectorsWriter]:
    """The writer of `feed`'s photo vectors; the file replaces the one beside it when the block ends
    without an error (see `feed.write_feed`, which this encloses: renamed after the feed). A delta that
    read no photo (`previous`: the vectors file of the feed it mends) keeps that file as it is, a link
    to it: what it holds of products changed or gone since is never taken (their fingerprints differ)."""
    target = vectors_path(feed)
    made = False  # the feed is made: from here a failure of this cache's file is only logged
    try:
        with ExitStack() as stack:
            writer = VectorsWriter(lambda: stack.enter_context(replacing(target, durable=False)))
            yield writer
            made = True
            if writer.failed is not None:
                raise writer.failed
            if len(writer) or previous is None or not previous.is_file():
                writer.finish()
            elif not (target.exists() and os.path.samefile(previous, target)):
                _link(previous, target)
    except OSError as exc:
        if not made:
            raise
        log.warning("%s not written (%s): the next delta reads its photos from the store", target, exc)


def _link(previous: Path, target: Path) -> None:
    """`target` names `previous`'s file too: a hard link under a temporary name (as `fs.replacing` names
    and locks its own: no sweep takes it), renamed into place; a copy where the file system cannot
    link. A cache: where this fails, the file is left as it was (what it holds is checked when read)."""
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent)
    os.close(fd)
    temporary, held = Path(name), None
    try:
        try:
            temporary.unlink()
            os.link(previous, temporary)
        except OSError:  # another file system, or one without links
            with previous.open("rb") as source, temporary.open("wb") as copy:
                shutil.copyfileobj(source, copy, 1 << 20)
        held = os.open(temporary, os.O_RDONLY | os.O_CLOEXEC)
        fcntl.flock(held, fcntl.LOCK_EX)
        os.replace(temporary, target)
        sync_folder(target.parent)
    except OSError as exc:
        log.warning("%s kept as it was (%s): the next delta reads what it lacks from the store", target, exc)
        temporary.unlink(missing_ok=True)
    finally:
        if held is not None:
            os.close(held)


class Photos:
    """Where a feed's classes read their photos: the previous feed's kept vectors for the products that
    did not change since, the engine for the others; every photo read is kept for the next delta, under
    the fingerprint read with it (one read of the point: a product changed between the class's scroll
    and this read is never kept under the older fingerprint, which it might hold again later)."""

    def __init__(
        self,
        read: Callable[[Sequence[str]], Sequence[IndexPoint]],
        fingerprint: Callable[[dict[str, Any]], str],
        writer: VectorsWriter,
        previous: KeptVectors | None = None,
    ) -> None:
        self._read, self._fingerprint = read, fingerprint
        self._writer = writer
        self._previous = KeptVectors(None) if previous is None else previous  # `or` would read its index
        self._unchecked = True  # its photos' length, against the store's: at the first class read
        self.reused = 0

    def __call__(self, payloads: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        prints = {str(p["product_id"]): self._fingerprint(p) for p in payloads}
        if self._unchecked and prints and len(self._previous):  # photos of another length: not this store's
            self._unchecked = False
            probe = self._read(list(prints)[:1])
            if probe and probe[0].photo_vectors.shape[1] != self._previous.dim:
                self._previous = KeptVectors(None)
        for product_id, fingerprint in prints.items():
            if is_recorded(fingerprint) and (rows := self._previous.get(product_id, fingerprint)) is not None:
                found[product_id] = rows
                self.reused += 0 if self._writer.kept(product_id) else len(rows)  # in two classes: once
                self._writer.keep(product_id, fingerprint, rows)
        unread = [p for p in prints if p not in found]
        for point in self._read(unread) if unread else ():
            found[point.product_id] = point.photo_vectors
            self._writer.keep(point.product_id, self._fingerprint(point.payload), point.photo_vectors)
        return found

    def carry(self, current: dict[str, str]) -> int:
        """Keep the previous feed's vectors of the products (id → fingerprint now) not read by this
        run, where they are still theirs; returns how many."""
        if not len(self._writer):  # it read no photo: the previous file is kept as it is (`kept_vectors`)
            return 0
        carried = 0
        for product_id, fingerprint in self._previous.items():
            if self._writer.kept(product_id) or current.get(product_id) != fingerprint:
                continue
            rows = self._previous.get(product_id, fingerprint)
            if rows is not None:
                self._writer.keep(product_id, fingerprint, rows)
                carried += 1
        return carried
