"""The neighbours feed on disk: its three formats, and the state kept beside it for the next delta.

A feed is JSON lines (`{"product_id": "A", "neighbours": [{"product_id": "B", "distance": 1.23,
"matched_image": 0}, ...]}`, a delta's gone products as `{"product_id": "A", "deleted": true}`), or CSV
or Parquet with one row per (product, rank, neighbour): an empty list is one row without a neighbour,
a gone product one row with `deleted` true. Its state, `FEED.state` beside it, is JSON lines too: a
header (the options, the collection version and model that made the lists), one line per product
listed (what says its vectors changed, its `same` values, its list) and a trailer with the feed's
sha256. Both files are replaced atomically (`fs.replacing`), the state first: a run killed before the
end leaves the last good feed and its state; one killed between the two renames leaves a state whose
trailer does not match the feed, and a delta on it refuses.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import re
import tempfile
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Literal

import orjson

from visrec.errors import InvalidSetting, OutputUnwritable, Refused
from visrec.fs import TEMP_SUFFIX, replacing, sweep_temporaries
from visrec.index import Hit, VectorIndex
from visrec.neighbours import FeedRules, Listed, fingerprint

log = logging.getLogger(__name__)

Format = Literal["jsonl", "csv", "parquet"]
FORMATS: tuple[Format, ...] = ("jsonl", "csv", "parquet")
STATE_KIND = "visrec neighbours state"
STATE_VERSION = 1
COLUMNS = ("product_id", "rank", "neighbour_id", "distance", "matched_image", "score", "deleted")
PARQUET_ROWS = 65_536  # rows a Parquet row group holds: memory stays a row group's


Progress = Callable[[str, int, int], None]


def tell(progress: Progress | None, stage: str, done: int, total: int) -> None:
    if progress is not None:
        progress(stage, done, total)


def state_header(index: VectorIndex, rules: FeedRules, limit: int | None = None) -> dict[str, Any]:
    """What a feed's state says of how it was made (`limit`: how many classes it read whole)."""
    return {
        "options": rules.describe(),
        "collection": index.collection,
        "model_version": index.metadata().get("model_version", ""),
        "classes_read": limit,
    }


def recorded_fingerprint(payload: dict[str, Any]) -> str:
    """What a state records of a product's vectors: the hash sync recorded (`neighbours.fingerprint`)."""
    return fingerprint(payload, None)


def format_of(out: Path, chosen: str | None) -> Format:
    """The format asked (`--format`), else the one the file's suffix names, else JSON lines; raises
    `InvalidSetting` for another, and for Parquet without pyarrow (the `parquet` extra)."""
    name = chosen or {".csv": "csv", ".parquet": "parquet"}.get(out.suffix.lower(), "jsonl")
    if name not in FORMATS:
        raise InvalidSetting(f"--format takes {', '.join(FORMATS)}, got {name!r}")
    if name == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise InvalidSetting(
                # No brackets: the CLI prints errors as rich markup, which would take `[parquet]` for a tag.
                "--format parquet needs pyarrow, not installed here: install visrec's `parquet` extra "
                "(pip install 'pyarrow>=15'), or write JSON lines or CSV"
            ) from None
    return name


def state_path(feed: Path) -> Path:
    """Where a feed's state lives: beside it, `FEED.state`."""
    return feed.with_name(feed.name + ".state")


def neighbour_dict(hit: Hit, scored: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "product_id": hit.product_id,
        "distance": hit.distance,
        "matched_image": hit.matched,
    }
    if scored and hit.score is not None:
        entry["score"] = hit.score
    return entry


class _Hashing(io.RawIOBase):
    """A binary file that hashes what is written through it (the feed's sha256, for its state)."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self.sha256 = hashlib.sha256()
        self._written = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self._raw.write(view)
        self.sha256.update(view)
        self._written += len(view)
        return len(view)

    def tell(self) -> int:
        return self._written

    def flush(self) -> None:
        self._raw.flush()

    def close(self) -> None:  # the underlying file is `fs.replacing`'s to close
        self.flush()
        super().close()


class FeedWriter(ABC):
    """Writes lists and deletions in one format."""

    def __init__(self, scored: bool) -> None:
        self.scored = scored

    @abstractmethod
    def write_list(self, product_id: str, hits: list[Hit]) -> None: ...

    @abstractmethod
    def write_deleted(self, product_id: str) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    def rows(self, product_id: str, hits: list[Hit]) -> Iterator[tuple[Any, ...]]:
        """The CSV and Parquet rows of a list (one without a neighbour for an empty list)."""
        if not hits:
            yield (product_id, None, None, None, None, None, False)
        for rank, hit in enumerate(hits, 1):
            score = hit.score if self.scored else None
            yield (product_id, rank, hit.product_id, hit.distance, hit.matched, score, False)


class JsonLinesWriter(FeedWriter):
    def __init__(self, raw: IO[bytes], scored: bool) -> None:
        super().__init__(scored)
        self._text = io.TextIOWrapper(raw, encoding="utf-8", newline="\n")

    def write_list(self, product_id: str, hits: list[Hit]) -> None:
        line = {"product_id": product_id, "neighbours": [neighbour_dict(h, self.scored) for h in hits]}
        self._text.write(json.dumps(line, ensure_ascii=False) + "\n")

    def write_deleted(self, product_id: str) -> None:
        self._text.write(json.dumps({"product_id": product_id, "deleted": True}, ensure_ascii=False) + "\n")

    def close(self) -> None:
        self._text.flush()
        self._text.detach()


class CsvWriter(FeedWriter):
    def __init__(self, raw: IO[bytes], scored: bool) -> None:
        super().__init__(scored)
        self._text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
        self._csv = csv.writer(self._text)
        self._csv.writerow(COLUMNS)

    def write_list(self, product_id: str, hits: list[Hit]) -> None:
        self._csv.writerows(self._cells(row) for row in self.rows(product_id, hits))

    def write_deleted(self, product_id: str) -> None:
        self._csv.writerow(self._cells((product_id, None, None, None, None, None, True)))

    @staticmethod
    def _cells(row: tuple[Any, ...]) -> list[Any]:
        *values, deleted = row
        return [*("" if v is None else v for v in values), "true" if deleted else "false"]

    def close(self) -> None:
        self._text.flush()
        self._text.detach()


class ParquetWriter(FeedWriter):
    def __init__(self, raw: IO[bytes], scored: bool) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        super().__init__(scored)
        self._pa = pa
        self._schema = pa.schema(
            [
                ("product_id", pa.string()),
                ("rank", pa.int32()),
                ("neighbour_id", pa.string()),
                ("distance", pa.float64()),
                ("matched_image", pa.int32()),
                ("score", pa.float64()),
                ("deleted", pa.bool_()),
            ]
        )
        self._writer = pq.ParquetWriter(raw, self._schema)
        self._pending: list[tuple[Any, ...]] = []

    def write_list(self, product_id: str, hits: list[Hit]) -> None:
        self._pending += self.rows(product_id, hits)
        if len(self._pending) >= PARQUET_ROWS:
            self._flush()

    def write_deleted(self, product_id: str) -> None:
        self._pending.append((product_id, None, None, None, None, None, True))

    def _flush(self) -> None:
        if self._pending:
            columns = list(zip(*self._pending, strict=True))
            self._writer.write_table(self._pa.Table.from_arrays(list(columns), schema=self._schema))
            self._pending = []

    def close(self) -> None:
        self._flush()
        self._writer.close()


def _writer(fmt: Format, raw: IO[bytes], scored: bool) -> FeedWriter:
    if fmt == "csv":
        return CsvWriter(raw, scored)
    if fmt == "parquet":
        return ParquetWriter(raw, scored)
    return JsonLinesWriter(raw, scored)


def state_record(listed: Listed) -> dict[str, Any]:
    """A product's line in the state: what says its vectors changed, its `same` values (or the lists'
    values that hold it), its nearest (beyond the list: `Listed.kept`) and how far they are complete."""
    record: dict[str, Any] = {
        "id": listed.product_id,
        "fp": listed.fingerprint,
        "key": None if listed.key is None else list(listed.key),
        "n": listed.kept,
        "r": listed.within,
    }
    if listed.listed_by is not None:  # no class of its own, yet lists hold it: `neighbours.listed_by`
        record["in"] = [list(values) for values in listed.listed_by]
    return record


def _state_line(data: dict[str, Any]) -> bytes:
    """A line of the state: orjson (a 100,000-product state parses in a fifth of json's time, and a
    delta reads all of it); json where orjson cannot (an integer past 64 bits)."""
    try:
        return orjson.dumps(data) + b"\n"
    except TypeError:
        return json.dumps(data, ensure_ascii=False).encode() + b"\n"


def _state_parsed(line: bytes) -> Any:
    """A line of a state, whichever wrote it (`_state_line`, or json before it)."""
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        return json.loads(line)


class StateWriter:
    """The state's lines: the header, a record per product, the trailer (`finish`). The trailer names
    the products its lists hold that have no record (deleted while the feed ran: `unlisted`), so that a
    delta need not gather every list's products to find them."""

    def __init__(self, raw: IO[bytes], header: dict[str, Any]) -> None:
        self._raw = raw
        self._sha256 = hashlib.sha256()  # of the lines before the trailer, and its lists of ids
        self.products = 0
        self.recorded: set[str] = set()  # the products recorded through `record`
        self.held: set[str] = set()  # the products their lists hold
        self.unlisted: set[str] | None = None  # set by a writer that also copies records (a delta)
        self.written: set[str] = set()  # the products written while the feed ran (`make_feed` says)
        self._line({"kind": STATE_KIND, "version": STATE_VERSION, **header})

    def _line(self, data: dict[str, Any]) -> None:
        self.write_raw(_state_line(data))

    def record(self, listed: Listed) -> None:
        self._line(state_record(listed))
        self.products += 1
        self.recorded.add(listed.product_id)
        self.held.update(n[0] for n in listed.kept)

    def write_raw(self, data: bytes) -> None:
        """Lines copied as they were (a delta's unchanged records: `StateFile.copy_span`)."""
        self._sha256.update(data)
        self._raw.write(data)

    def finish(self, feed_sha256: str) -> None:
        unlisted = sorted(self.held - self.recorded if self.unlisted is None else self.unlisted)
        trailer = {
            "end": True,
            "products": self.products,
            "feed_sha256": feed_sha256,
            "unlisted": unlisted,
            "written": sorted(self.written),
        }
        self._sha256.update(_listed_bytes(trailer))
        self._raw.write(_state_line({**trailer, "state_sha256": self._sha256.hexdigest()}))


TRAILER_LISTS = ("unlisted", "written")  # a state from before them has neither: each then says None


def _listed_bytes(trailer: dict[str, Any]) -> bytes:
    """What the state's checksum covers of its trailer's lists of ids (raises TypeError for a list that
    is not one)."""
    return b"".join(
        name.encode() + b":" + orjson.dumps(trailer[name]) for name in TRAILER_LISTS if name in trailer
    )


@dataclass
class Written:
    """What writing a feed produced: its lists and deletions, its state's products."""

    lists: int = 0
    deleted: int = 0
    state_products: int = 0


Produce = Callable[[FeedWriter, StateWriter], None]


def check_writable(out: Path) -> None:
    """Refuse a feed path that cannot be written (a folder, a read-only folder) before any work."""
    from visrec.report import check_writable as page_writable  # the one rule for a file asked for

    page_writable(
        out, ours=lambda feed: state_path(feed).is_file()
    )  # a feed made before: its state is beside it
    if out.name.endswith(".state"):
        raise OutputUnwritable(f"{out}: a name ending in .state is a feed's state; name the feed itself")


def previous_state_path(feed: Path) -> Path:
    """Where a feed's state is kept while a new feed and state replace the two (`write_feed`)."""
    return feed.with_name(feed.name + ".state.previous")


def _keep_previous_state(out: Path) -> None:
    """Link the state beside `out` as its previous one while it describes the feed there (atomically: a
    temporary name renamed); otherwise the one kept stays, if any."""
    current = state_path(out)
    try:
        _state_of(out, out, current)
    except Refused:
        return
    kept = previous_state_path(out)
    fd, name = tempfile.mkstemp(prefix=f".{kept.name}.", suffix=TEMP_SUFFIX, dir=out.parent)
    os.close(fd)
    temporary = Path(name)
    try:
        temporary.unlink()
        os.link(current, temporary)
        os.replace(temporary, kept)
    except OSError as exc:  # the run goes on: only a kill between the two renames would have needed it
        log.warning("%s: the previous state not kept (%s)", out, exc)
    finally:
        temporary.unlink(missing_ok=True)


def write_feed(
    out: Path,
    fmt: Format,
    scored: bool,
    header: dict[str, Any],
    produce: Produce,
    meanwhile: Callable[[], set[str]] = set,
) -> Written:
    """Write the feed at `out` and its state beside it: `produce` writes both through the writers;
    `meanwhile` names the products written meanwhile, once it is done (`StateWriter.written`).
    Either both are replaced (the state first) or neither; raises `OutputUnwritable` for a file
    that cannot be written."""
    written = Written()
    # What an earlier run of this feed left when it was killed (and nobody holds): this feed's only.
    sweep_temporaries(out.parent, re.escape(out.name) + r"(\.state|\.state\.previous|\.vectors)?")
    try:
        with ExitStack() as stack:
            raw_feed = stack.enter_context(replacing(out))
            hashing = _Hashing(raw_feed)
            writer = _writer(fmt, hashing, scored)  # type: ignore[arg-type]
            counting = _Counting(writer, written)
            with replacing(state_path(out)) as raw_state:
                header = {**header, "feed": out.name, "format": fmt, "made_at": datetime.now(UTC).isoformat()}
                state = StateWriter(raw_state, header)
                produce(counting, state)
                state.written = meanwhile()
                writer.close()
                hashing.flush()
                state.finish(hashing.sha256.hexdigest())
                written.state_products = state.products
                # The state of the feed there now stays beside it until the new feed replaces it: a
                # run killed between the two renames leaves the old feed with one that describes it.
                _keep_previous_state(out)
        previous_state_path(out).unlink(missing_ok=True)
    except OSError as exc:
        raise OutputUnwritable(f"cannot write {out}: {exc.strerror or exc}") from exc
    return written


class _Counting(FeedWriter):
    """A writer that counts what goes through it."""

    def __init__(self, inner: FeedWriter, written: Written) -> None:
        super().__init__(inner.scored)
        self._inner, self._written = inner, written

    def write_list(self, product_id: str, hits: list[Hit]) -> None:
        self._inner.write_list(product_id, hits)
        self._written.lists += 1

    def write_deleted(self, product_id: str) -> None:
        self._inner.write_deleted(product_id)
        self._written.deleted += 1

    def close(self) -> None:
        self._inner.close()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


_RECORD_KEYS = {"id", "fp", "key", "n", "r"}  # what `state_record` writes


@dataclass(frozen=True)
class StateFile:
    """A previous feed's state: its header and trailer (records are read by `records`), all read from
    one open file (`fd`): a run replacing the state meanwhile (writing over this feed) changes nothing a
    delta reads of it, whose records' offsets are this file's."""

    path: Path
    header: dict[str, Any]
    trailer: dict[str, Any]
    fd: int

    def records(self) -> Iterator[tuple[dict[str, Any], int, int]]:
        """Each product's record, and where its line lies in the file (offset, length). Raises `Refused`
        for a line that is not one, or lines the trailer's checksum does not match (the state was
        damaged after it was written), once it comes to them."""
        with os.fdopen(os.dup(self.fd), "rb") as f:
            f.seek(0)
            offset = len(f.readline())  # the header's
            for line in f:
                try:
                    record = _state_parsed(line)
                except ValueError:
                    record = None
                if isinstance(record, dict) and "end" in record:
                    self._check(offset, record)
                    self.trailer.clear()
                    self.trailer.update(record)  # the one checked
                    return
                if not isinstance(record, dict) or not record.keys() >= _RECORD_KEYS:
                    raise Refused(
                        f"the state {self.path} is damaged at byte {offset}: "
                        "make a full feed (without --since)"
                    )
                yield record, offset, len(line)
                offset += len(line)

    def _check(self, end: int, trailer: dict[str, Any]) -> None:
        """Raise `Refused` unless the trailer's checksum is that of the lines before it (read again, a
        few MiB at a time: hashing line by line costs twice as much) and its lists of ids."""
        digest, done = hashlib.sha256(), 0
        while done < end:
            chunk = os.pread(self.fd, min(end - done, 8 << 20), done)
            if not chunk:
                break
            digest.update(chunk)
            done += len(chunk)
        try:
            digest.update(_listed_bytes(trailer))
        except TypeError:
            digest = hashlib.sha256(b"not lists of ids")
        if trailer.get("state_sha256") != digest.hexdigest():  # one without a checksum too
            raise Refused(
                f"the state {self.path} was changed after it was written (its checksum differs): "
                "make a full feed (without --since)"
            )

    @property
    def unlisted(self) -> set[str] | None:
        """The products its lists hold without a record of their own (`StateWriter`), as its trailer
        names them, or None for a state from before the trailer did (read `records` first: its end
        checks the trailer against the checksum)."""
        return self._ids("unlisted")

    @property
    def written(self) -> set[str]:
        """The products written while its feed ran, as its trailer names them (none for a state from
        before it did; read `records` first)."""
        return self._ids("written") or set()

    def _ids(self, name: str) -> set[str] | None:
        ids = self.trailer.get(name)
        if not (isinstance(ids, list) and all(isinstance(p, str) for p in ids)):
            return None
        return set(ids)

    def read_at(self, spans: Iterable[tuple[int, int]]) -> Iterator[dict[str, Any]]:
        """The records at these (offset, length) spans."""
        for offset, length in spans:
            yield _state_parsed(os.pread(self.fd, length, offset))

    def copy_span(self, state: StateWriter, start: int, end: int, products: int) -> None:
        """Copy the lines from `start` to `end` (`products` records, kept as they were) into `state`."""
        while start < end:
            chunk = os.pread(self.fd, min(end - start, 1 << 20), start)
            if not chunk:
                raise OSError(f"{self.path} shrank while it was read")
            state.write_raw(chunk)
            start += len(chunk)
        state.products += products


def _last_line(f: IO[bytes], tail: int = 1 << 16) -> bytes:
    """The file's last line (the trailer; b"" if the last `tail` bytes hold no whole line)."""
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - tail))
    lines = f.read().rstrip(b"\n").split(b"\n")
    return lines[-1] if len(lines) > 1 or size <= tail else b""


def read_state(feed: Path) -> StateFile:
    """The state of the feed at `feed` (a link is followed: the state is beside the file it names).
    Raises `Refused` (make a full feed) for a missing, unfinished or foreign state, or a feed that is
    not the one it describes."""
    try:
        target = feed.resolve()
    except (OSError, RuntimeError) as exc:  # a loop of links
        raise Refused(f"{feed} cannot be followed ({exc}): make a full feed (without --since)") from None
    try:
        return _state_of(feed, target, state_path(target))
    except Refused:
        kept = previous_state_path(target)  # a run killed between writing the state and the feed
        if kept.is_file():
            with contextlib.suppress(Refused):
                return _state_of(feed, target, kept)
        raise


def _state_of(feed: Path, target: Path, path: Path) -> StateFile:
    """The state at `path` if it describes the feed at `target` (`read_state`)."""
    fresh = "make a full feed (without --since)"
    if not path.is_file():
        raise Refused(f"{feed} has no state beside it ({path.name}: kept by `visrec neighbours`): {fresh}")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise Refused(f"the state of {feed} cannot be read ({exc}): {fresh}") from None
    state = StateFile(path, {}, {}, fd)
    weakref.finalize(state, os.close, fd)
    try:
        with os.fdopen(os.dup(fd), "rb") as f:
            header = _state_parsed(f.readline())
            trailer = _state_parsed(_last_line(f))
    except (OSError, ValueError) as exc:
        raise Refused(f"the state of {feed} cannot be read ({exc}): {fresh}") from None
    if (
        not isinstance(header, dict)
        or header.get("kind") != STATE_KIND
        or header.get("version") != STATE_VERSION
    ):
        raise Refused(f"{path} is not a neighbours state this visrec reads: {fresh}")
    if not isinstance(trailer, dict) or not trailer.get("end"):
        raise Refused(f"the state of {feed} is unfinished (a run cut short): {fresh}")
    if target.is_file() and file_sha256(target) != trailer.get("feed_sha256"):
        raise Refused(
            f"{feed} is not the feed its state describes (changed since, or a run was stopped between "
            f"writing the two): {fresh}"
        )
    state.header.update(header)
    state.trailer.update(trailer)
    return state
