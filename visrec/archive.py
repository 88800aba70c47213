"""The snapshot archive: one collection version as a self-contained, backend-neutral file
(`visrec snapshot`, `visrec restore`; the stage is `visrec.snapshot`).

A plain tar (no compression: random-looking float32 vectors do not shrink, and a tar is read by anyone):
the points in chunks of `CHUNK` products, `points/NNNNNN.jsonl` (one line a product: its id, how many
photos, its payload) beside `points/NNNNNN.f32` (their vectors, float32 little-endian, photo after
photo); the model's `model/manifest.json` and, with `--with-model`, its weights; and `header.json`, last
because it counts what came before: format version, the cut, the collection version and alias record,
the collection's metadata, the model's manifest and checksum, visrec's and the engine's versions, the
dimension, the counts and each member's sha256.

The archive is written as a hidden `.NAME.partial` file (mode 0600) locked by its writer, renamed once
complete; its checksum file `NAME.sha256` (`sha256sum -c` reads it) is written just after that rename.
A writer killed midway leaves a partial, or a temporary checksum file, nobody holds: the next snapshot
into that folder removes them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import tarfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, cast

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from visrec.errors import OutputUnwritable, Refused
from visrec.fs import sweep_temporaries, sync_folder, write_atomically
from visrec.index.points import IndexPoint, SyncRecord

FORMAT = "visrec-snapshot"
FORMAT_VERSION = 1
CHUNK = 1000  # products a chunk: one page of the store's scroll
SUFFIX = ".visrec.tar"
HEADER = "header.json"
MODEL_DIR = "model"


class SnapshotDamaged(Refused):
    """A snapshot that cannot be restored as it is: damaged, truncated, of another format, or vectors that
    do not fit its model. Nothing was changed."""


class Header(BaseModel):
    """What `header.json` says (unknown keys are kept: a newer visrec may add some)."""

    model_config = ConfigDict(extra="allow")

    format: str
    format_version: int
    created_at: str
    cut: dict[str, Any]  # when the version was read and what that guarantees
    visrec_version: str
    engine: str
    collection: dict[str, Any]  # name (the alias), version, versions, live
    metadata: dict[str, str]  # the collection version's own: the model that built it, quality figures
    layout: dict[str, Any] | None
    dim: int | None
    points: int
    photos: int
    model: dict[str, Any] | None  # model_version, weights_sha256, manifest, included (files), or None
    members: dict[str, dict[str, Any]]  # name → sha256, bytes (and points, photos for a chunk)


# `snapshot_name`'s names after the collection, and of any collection (regular expressions).
_STAMP = rf"-[0-9]{{8}}T[0-9]{{12}}Z{re.escape(SUFFIX)}"
SNAPSHOT_NAME = ".+" + _STAMP


def snapshot_name(collection: str, when: datetime) -> str:
    """`products-20261207T101500123456Z.visrec.tar`: sorts by time, per collection."""
    return f"{collection}-{when.strftime('%Y%m%dT%H%M%S%fZ')}{SUFFIX}"


def checksum_file(snapshot: Path) -> Path:
    return snapshot.with_name(snapshot.name + ".sha256")


class _Hashing:
    """A file written through: counts and hashes what passes (tar's stream mode only writes)."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw, self.digest, self.size = raw, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.raw.write(data)


class ArchiveWriter:
    """Writes one snapshot into `folder` (created 0700 if missing): `add_points` chunk by chunk, `add_file`
    for the model, then `finish(header)`; `abort()` (or leaving the `with` block with an error) removes
    the partial file. The partial is locked for the writer's life, so a sweep removes only dead ones."""

    def __init__(self, folder: Path, name: str) -> None:
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.final = folder / name
            self.partial = folder / f".{name}.partial"
            fd = os.open(self.partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise OutputUnwritable(f"cannot write a snapshot into {folder}: {exc.strerror or exc}") from None
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._file = os.fdopen(fd, "wb")
        self._hashing = _Hashing(self._file)
        # Closed by `finish` or `abort`: the archive outlives this call.
        through = cast(IO[bytes], self._hashing)
        self._tar = tarfile.open(fileobj=through, mode="w|", format=tarfile.PAX_FORMAT)  # noqa: SIM115
        self.members: dict[str, dict[str, Any]] = {}
        self.points = 0
        self.photos = 0
        self.dim: int | None = None
        self._chunks = 0

    def __enter__(self) -> ArchiveWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None:
            self.abort()

    def _add(self, name: str, data: bytes, **facts: Any) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), int(time.time()), 0o600
        self._tar.addfile(info, io.BytesIO(data))
        self.members[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), **facts}

    def add_points(self, points: Sequence[IndexPoint]) -> None:
        """One chunk of products (their vectors all of one dimension)."""
        if not points:
            return
        lines, vectors = [], []
        for p in points:
            rows = p.photo_vectors
            if self.dim is None:
                self.dim = int(rows.shape[1])
            elif rows.shape[1] != self.dim:
                raise Refused(
                    f"product {p.product_id!r} has {rows.shape[1]}-d vectors, the others {self.dim}-d"
                )
            lines.append(json.dumps({"id": p.product_id, "photos": len(rows), "payload": p.payload}) + "\n")
            vectors.append(rows.astype("<f4", copy=False).tobytes())
        stem = f"points/{self._chunks:06d}"
        photos = sum(len(p.photo_vectors) for p in points)
        self._add(f"{stem}.jsonl", "".join(lines).encode(), points=len(points), photos=photos)
        self._add(f"{stem}.f32", b"".join(vectors))
        self._chunks += 1
        self.points += len(points)
        self.photos += photos

    def add_file(self, name: str, path: Path) -> None:
        self._add(name, path.read_bytes())

    def finish(self, header: dict[str, Any]) -> tuple[Path, int, str]:
        """Write the header, close, write the checksum file, then make the snapshot visible under its
        name. Returns (path, bytes, sha256)."""
        header = {**header, "members": self.members}
        self._add(HEADER, json.dumps(header, indent=1, sort_keys=True).encode())
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        digest, size = self._hashing.digest.hexdigest(), self._hashing.size
        # The archive first, then its checksum file: a `.sha256` never names an archive that is not
        # there (one killed between is an archive without its checksum, which a restore refuses).
        os.replace(self.partial, self.final)
        sync_folder(self.final.parent)
        self._file.close()  # the lock goes with it, once the partial is gone
        write_atomically(checksum_file(self.final), f"{digest}  {self.final.name}\n")
        return self.final, size, digest

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.partial.unlink()
        # The tar stream first (its last blocks go to the unlinked partial, or fail on a full disk): left
        # open, it would write them into the closed file when collected ("Exception ignored" in the log).
        with contextlib.suppress(OSError, ValueError, tarfile.TarError):
            self._tar.close()
        with contextlib.suppress(OSError, tarfile.TarError):
            self._file.close()


def sweep_partials(folder: Path) -> list[str]:
    """Remove the partial snapshots in `folder` whose writer is gone (killed: nobody holds their lock),
    with the temporary checksum files killed writers left (`fs.sweep_temporaries`: only those nobody
    holds, so two snapshots into one folder never remove each other's); a checksum file whose snapshot
    never appeared (earlier visrec versions wrote it first) goes too. Returns what was removed."""
    removed = sweep_temporaries(folder, SNAPSHOT_NAME + re.escape(".sha256"))
    for partial in sorted(folder.glob(f".*{SUFFIX}.partial")):
        try:
            fd = os.open(partial, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # another snapshot is being written
        finally:
            os.close(fd)
        final = folder / partial.name[1 : -len(".partial")]
        with contextlib.suppress(OSError):
            partial.unlink()
            removed.append(partial.name)
        orphan = checksum_file(final)
        if orphan.exists() and not final.exists():
            with contextlib.suppress(OSError):
                orphan.unlink()
                removed.append(orphan.name)
    return removed


def keep_last(folder: Path, collection: str, keep: int) -> list[str]:
    """Remove all but the newest `keep` snapshots of `collection` in `folder` (each with its checksum
    file). Returns the names removed."""
    pattern = re.compile(re.escape(collection) + _STAMP)
    found = sorted(p for p in folder.iterdir() if pattern.fullmatch(p.name))
    removed: list[str] = []
    for old in found[: max(0, len(found) - keep)]:
        for path in (old, checksum_file(old)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        removed.append(old.name)
    if removed:
        sync_folder(folder)
    return removed


@dataclass(frozen=True)
class Archive:
    """A snapshot checked whole against its checksum file, and its header (`Archive.open`)."""

    path: Path
    header: Header
    sha256: str

    @classmethod
    def open(cls, path: Path) -> Archive:
        """The snapshot at `path`, once its bytes match its checksum file and its header is one this
        visrec reads. Raises `SnapshotDamaged` (exit 2) saying what is wrong."""
        if not path.is_file():
            raise SnapshotDamaged(f"no snapshot at {path}")
        expected = _expected_sha256(path)
        digest = hashlib.sha256()
        try:
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        except OSError as exc:
            raise SnapshotDamaged(f"cannot read the snapshot {path}: {exc.strerror or exc}") from None
        if digest.hexdigest() != expected:
            raise SnapshotDamaged(
                f"the snapshot {path} is damaged or truncated: its sha256 is not the one its checksum file "
                f"{checksum_file(path).name} records; nothing was changed (use another snapshot)"
            )
        try:
            with tarfile.open(path, mode="r:") as tar:
                member = tar.extractfile(HEADER)
                header = Header.model_validate_json(member.read() if member else b"")
        except (tarfile.TarError, KeyError, OSError, ValidationError) as exc:
            raise SnapshotDamaged(f"{path} is not a visrec snapshot ({type(exc).__name__}: {exc})") from None
        if header.format != FORMAT or header.format_version > FORMAT_VERSION:
            raise SnapshotDamaged(
                f"{path} is a {header.format} of format version {header.format_version}; this visrec reads "
                f"{FORMAT} up to version {FORMAT_VERSION}: restore it with a newer visrec"
            )
        return cls(path, header, digest.hexdigest())

    def chunks(self) -> Iterator[list[IndexPoint]]:
        """The products, chunk by chunk, each chunk checked against the header (its sha256, its counts,
        its vectors' size). Raises `SnapshotDamaged` at the first that does not fit."""
        dim = self.header.dim
        with tarfile.open(self.path, mode="r:") as tar:
            for name, facts in sorted(self.header.members.items()):
                if not name.endswith(".jsonl"):
                    continue
                lines = self._text(tar, name)
                raw = self._member(tar, name.removesuffix(".jsonl") + ".f32")
                photos = facts.get("photos")
                if (
                    dim is None
                    or dim < 1
                    or len(lines) != facts.get("points")
                    or type(photos) is not int
                    or len(raw) != 4 * dim * photos
                ):
                    raise SnapshotDamaged(f"{self.path}: {name} does not hold what the header counts")
                vectors = np.frombuffer(raw, dtype="<f4").reshape(-1, dim)
                points, row = [], 0
                for n, line in enumerate(lines, 1):
                    product_id, photos, payload = self._point(line, f"{name} line {n}")
                    rows = vectors[row : row + photos]
                    if len(rows) != photos or not np.isfinite(rows).all():
                        what = "has a vector that is not finite" if len(rows) == photos else "lacks vectors"
                        raise self._forged(f"{name} line {n}: product {product_id!r} {what}")
                    points.append(IndexPoint(product_id, rows, payload))
                    row += photos
                if row != len(vectors):
                    raise self._forged(f"{name}: its products have {row} photos, its vectors {len(vectors)}")
                yield points

    def _point(self, line: str, where: str) -> tuple[str, int, dict[str, Any]]:
        """One product's line (id, photos, payload), checked: a snapshot whose bytes match its checksums
        may still have been written by something else than visrec (forged, or a buggy tool)."""
        try:
            item = json.loads(line)
        except ValueError:
            raise self._forged(f"{where} is not JSON") from None
        if not isinstance(item, dict):
            raise self._forged(f"{where} is not a product")
        product_id, photos, payload = item.get("id"), item.get("photos"), item.get("payload")
        if not isinstance(product_id, str) or not product_id.strip():
            raise self._forged(f"{where}: the product id is {product_id!r}, not a non-empty text")
        if not isinstance(payload, dict):
            raise self._forged(f"{where}: product {product_id!r} has a payload that is not an object")
        if payload.get("product_id") != product_id:
            raise self._forged(f"{where}: product {product_id!r} has a payload naming another product")
        if type(photos) is not int or photos < 1:
            raise self._forged(f"{where}: product {product_id!r} has {photos!r} photos")
        return product_id, photos, payload

    def _forged(self, what: str) -> SnapshotDamaged:
        return SnapshotDamaged(
            f"not restored: {self.path} does not hold what a visrec snapshot holds ({what}); "
            "nothing was changed (use another snapshot)"
        )

    def _lines(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Each product's id and payload (checked as `chunks` checks them), without reading the vectors."""
        with tarfile.open(self.path, mode="r:") as tar:
            for name in sorted(n for n in self.header.members if n.endswith(".jsonl")):
                for n, line in enumerate(self._text(tar, name), 1):
                    product_id, _, payload = self._point(line, f"{name} line {n}")
                    yield product_id, payload

    def records(self) -> dict[str, SyncRecord]:
        """product id → what a sync would compare of it (`SyncRecord`), as the snapshot holds it."""
        return {product_id: SyncRecord.from_payload(payload) for product_id, payload in self._lines()}

    def payloads(self, product_ids: list[str]) -> dict[str, dict[str, Any]]:
        """product id → payload, for these products (those the snapshot holds)."""
        wanted = set(product_ids)
        return {product_id: payload for product_id, payload in self._lines() if product_id in wanted}

    def _text(self, tar: tarfile.TarFile, name: str) -> list[str]:
        try:
            return self._member(tar, name).decode().splitlines()
        except UnicodeDecodeError:
            raise self._forged(f"{name} is not UTF-8 text") from None

    def _member(self, tar: tarfile.TarFile, name: str) -> bytes:
        try:
            member = tar.extractfile(name)
            data = member.read() if member else b""
        except (KeyError, tarfile.TarError) as exc:
            raise SnapshotDamaged(f"{self.path}: {name} is missing ({exc})") from None
        if hashlib.sha256(data).hexdigest() != self.header.members[name]["sha256"]:
            raise SnapshotDamaged(f"{self.path}: {name} does not match its sha256 in the header")
        return data

    def extract_model(self, into: Path) -> None:
        """Write the model carried in the snapshot into the folder `into`: the weights first, the manifest
        that names them last (as an export does), each checked against the header."""
        included = (self.header.model or {}).get("included") or []
        with tarfile.open(self.path, mode="r:") as tar:
            names = sorted(included, key=lambda n: n.endswith("manifest.json"))
            for name in names:
                write_atomically(into / Path(name).name, self._member(tar, name))


def _expected_sha256(path: Path) -> str:
    beside = checksum_file(path)
    try:
        line = beside.read_text().split()
    except FileNotFoundError:
        raise SnapshotDamaged(
            f"the snapshot {path} has no checksum file beside it ({beside.name}): copy it with the "
            f"snapshot (or, if you trust this copy, `sha256sum {path.name} > {beside.name}`)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SnapshotDamaged(f"cannot read {beside}: {exc}") from None
    if not line or not re.fullmatch(r"[0-9a-f]{64}", line[0]):
        raise SnapshotDamaged(f"{beside} is not a sha256 checksum file")
    return line[0]


def now() -> datetime:
    return datetime.now(UTC)
