"""What a sync must do, decided before anything is written: the catalogue's rows against what the index
recorded of each product.

A product's record splits what decides its vectors (its photos as seen, the payload version, the model)
from what decides only its payload (the catalogue's other fields): a price change rewrites the payload
in place, and only a changed photo, photo list or model is embedded again. Local photos are hashed only
when their size, modification time or file identity differ from what was recorded (rsync's quick check;
`checksum` hashes them all); a remote photo is identified by its URL. Points from before the split carry
one hash of both, and are adopted without re-embedding while that hash still matches their row.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visrec import payload
from visrec.catalogue import Catalogue, Product
from visrec.errors import InvalidSetting
from visrec.index import SyncRecord
from visrec.payload import Bookkeeping
from visrec.urls import is_url

# Part of every vectors hash: bump it when what a point takes from its photos changes (as when colour was
# added), so the next sync re-processes every photo. The catalogue's own fields need no bump.
PAYLOAD_VERSION = 2
PARTIAL = "+partial"  # marks the vectors hash of a product indexed without some of its photos


def partial_hash(vectors_hash: str, embedded: Sequence[str]) -> str:
    """The vectors hash of a product indexed with only the photos `embedded` (the others failed): never
    the hash a sync desires (those are tried again), and naming which photos the vectors are of, as a
    vectors hash must (a feed's delta trusts it: two nights that each failed another photo of one
    product hold other vectors, and say so)."""
    held = hashlib.sha256("\n".join(embedded).encode()).hexdigest()[:16]
    return f"{vectors_hash}{PARTIAL}:{held}"


_UNREADABLE = "unreadable"


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count`: the products whose id hashes to it. N workers, each given one shard,
    cover the catalogue exactly once (sha256, so every machine and Python process agrees)."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> Shard:
        """'i/N' with 0 <= i < N; raises `InvalidSetting` otherwise."""
        index, sep, count = text.partition("/")
        if not (sep and index.strip().isdigit() and count.strip().isdigit()) or not 0 <= int(index) < int(
            count
        ):
            raise InvalidSetting(f"--shard takes i/N with 0 <= i < N (e.g. 0/4), got {text!r}")
        return cls(int(index), int(count))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def __contains__(self, product_id: object) -> bool:
        digest = hashlib.sha256(str(product_id).encode()).digest()
        return int.from_bytes(digest[:8], "big") % self.count == self.index


@dataclass(frozen=True)
class Desired:
    """A product as the catalogue wants it, and the bookkeeping its point will carry."""

    product: Product
    bookkeeping: Bookkeeping


@dataclass
class SyncPlan:
    added: list[Desired] = field(default_factory=list)  # new: embed
    updated: list[Desired] = field(default_factory=list)  # photos, their list or the model changed: embed
    repayload: list[Desired] = field(default_factory=list)  # only the catalogue's other fields changed
    # Vectors and payload stand but the record changes (photos touched with the same bytes, points from
    # before the split): rewritten like `repayload`, not counted as changed.
    refresh: list[Desired] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    held_back: list[str] = field(default_factory=list)  # would be removed, but a row could not be read
    unchanged: int = 0
    photo_bytes_hashed: int = 0  # bytes of local photos read to hash them (the quick check's misses)

    @property
    def to_embed(self) -> list[Desired]:
        return self.added + self.updated

    @property
    def to_rewrite(self) -> list[Desired]:
        """Payloads rewritten in place, vectors kept."""
        return self.repayload + self.refresh


def plan_sync(
    catalogue: Catalogue,
    indexed: dict[str, SyncRecord],
    model_version: str,
    shard: Shard = Shard(),
    *,
    checksum: bool = False,
    source: str = "catalogue",
    deletes: bool = True,
) -> SyncPlan:
    """Decide what to embed, what to rewrite and what to delete, within `shard`; the rows' products are
    owned by `source` from now on.

    Deletes are earned: a product is deleted only when the catalogue proves it gone. One whose row is
    invalid this time is neither embedded nor deleted (a typo in a row must not drop it), and a row that
    could not be read at all, or has no usable id, could be any product: then nothing is deleted
    (`held_back`). Points of other shards are left alone, and so are products another source owns (a
    product written over HTTP is not the catalogue's to delete). Without `deletes` (rows from the API),
    only the rows' products are touched.
    """
    plan = SyncPlan()
    for product in (p for p in catalogue.products if p.id in shard):
        record = indexed.get(product.id)
        refs = catalogue.photo_refs(product)
        files, read = photo_files(refs, record.photo_files if record and not checksum else [])
        plan.photo_bytes_hashed += read
        desired = Desired(product, bookkeeping(product, refs, files, model_version, source))
        if record is None:
            plan.added.append(desired)
        elif record.vectors_hash is None:  # a point from before the split: one hash of both
            if record.content_hash == legacy_content_hash(catalogue, product) and record.model_version == (
                model_version
            ):
                plan.refresh.append(desired)
            else:
                plan.updated.append(desired)
        elif record.vectors_hash != desired.bookkeeping.vectors_hash or record.model_version != model_version:
            plan.updated.append(desired)
        elif record.metadata_hash != desired.bookkeeping.metadata_hash or record.source != source:
            plan.repayload.append(desired)
        elif record.photo_files != files:  # same bytes, but the files were touched: record them anew
            plan.refresh.append(desired)
        else:
            plan.unchanged += 1
    if not deletes:
        return plan
    keep = {p.id for p in catalogue.products} | {e.product_id for e in catalogue.errors if e.product_id}
    gone = sorted(p for p, r in indexed.items() if p not in keep and p in shard and r.source == source)
    if catalogue.unidentified:
        plan.held_back = gone
    else:
        plan.removed = gone
    return plan


def bookkeeping(
    product: Product,
    refs: Iterable[str],
    files: list[list[Any]],
    model_version: str,
    source: str = "catalogue",
) -> Bookkeeping:
    """The record a product's point carries: its vectors hash (photo digests in order), its metadata
    hash, the local photos' files, the model."""
    digests = {entry[0]: entry[5] for entry in files}
    photos = hashlib.sha256()
    for ref in refs:
        photos.update(json.dumps([ref if is_url(ref) else digests[ref]]).encode())
    return Bookkeeping(
        vectors_hash=f"{PAYLOAD_VERSION}:{photos.hexdigest()}",
        metadata_hash=metadata_hash(product),
        photo_files=files,
        model_version=model_version,
        source=source,
    )


def metadata_hash(product: Product) -> str:
    return payload.digest(product.metadata())


def photo_files(refs: Iterable[str], recorded: list[list[Any]]) -> tuple[list[list[Any]], int]:
    """[ref, size, mtime_ns, inode, device, sha256] of each local photo among `refs`, and the bytes read.

    A photo whose size, modification time and file identity equal its `recorded` entry keeps the
    recorded digest without being read (rsync's quick check): a file rewritten with the same size and its
    time set back is the one change this misses (`--checksum`). A photo that cannot be read hashes as
    "unreadable" (embedding reports why).
    """
    known = {str(entry[0]): entry for entry in recorded if isinstance(entry, list) and len(entry) == 6}
    files: list[list[Any]] = []
    read = 0
    for ref in refs:
        if is_url(ref):
            continue
        try:
            info = os.stat(ref)
            if not stat.S_ISREG(info.st_mode):  # a FIFO or a device would block: decoding says why
                raise OSError
        except (OSError, ValueError):
            files.append([ref, -1, -1, -1, -1, _UNREADABLE])
            continue
        seen = [ref, info.st_size, info.st_mtime_ns, info.st_ino, info.st_dev]
        entry = known.get(ref)
        if entry is not None and entry[:5] == seen and entry[5] != _UNREADABLE:
            files.append(entry)
            continue
        digest, size = _sha256_file(ref)
        read += size
        files.append([*seen, digest])
    return files, read


def _sha256_file(ref: str) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    try:
        with Path(ref).open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
    except OSError:
        return _UNREADABLE, size
    return digest.hexdigest(), size


def legacy_content_hash(catalogue: Catalogue, product: Product) -> str:
    """The one hash points carried before the split (payload version 2): sha256 of the metadata and each
    usable photo's bytes (a remote one's URL). Read once per product, to adopt its point."""
    digest = hashlib.sha256()
    digest.update(json.dumps(product.metadata(), sort_keys=True, default=str).encode())
    for ref in catalogue.photo_refs(product):
        if is_url(ref):
            digest.update(ref.encode())
            continue
        try:
            if not Path(ref).is_file():
                raise OSError
            with Path(ref).open("rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
        except OSError:
            digest.update(b"\0unreadable")
    return f"2:{digest.hexdigest()}"
