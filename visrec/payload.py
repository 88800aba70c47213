"""The payload schema: every field a point carries besides the catalogue's own columns, declared once.

Each field says whether the store indexes it (filtered queries), who sees it and whether sync computes
it. Everything else derives from this table: the payload indexes both backends create, the catalogue
columns refused as reserved, what the CLI (operators) and the HTTP API (other services) show, and the
fields a sync reads back. A new filterable or computed field is one line here.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

IndexType = Literal["keyword", "float", "bool"]
# What a stored value is, for filtering: the kinds a `where` value can match (`visrec.filters.Where`).
Kind = Literal["text", "bool", "number"]
INDEX_OF: dict[Kind, IndexType] = {"text": "keyword", "bool": "bool", "number": "float"}
# The engines address a field by a JSON path, and a name holding one of these cannot be written as one:
# such a field is stored and shown, but neither indexed nor filtered on.
UNADDRESSABLE = '"\\'


def addressable(name: str) -> bool:
    """Whether the engines can address the field `name` (a lone surrogate: no engine takes the point)."""
    return name == name.encode("utf-8", "replace").decode() and not any(c in name for c in UNADDRESSABLE)


# callers: other services over HTTP (and operators); operators: the CLI only; nobody: bookkeeping.
Audience = Literal["callers", "operators", "nobody"]


@dataclass(frozen=True)
class PayloadField:
    name: str
    index: IndexType | None  # a payload index, for fast, exact filtered queries
    seen_by: Audience
    computed: bool  # written by sync: a catalogue column of this name is refused
    from_photo: bool = False  # computed from the decoded photo: kept as it is by a metadata-only update


FIELDS = (
    # From the catalogue (its other columns are stored as they come and seen by callers). Every such
    # column gets an index of its values' kind when a write first carries it (`VectorIndex.upsert`):
    # filtering on any of them stays exact.
    # Server paths or URLs: never shown over HTTP (callers get a photo by its position, `matched_image`).
    PayloadField("image", None, "operators", computed=False),  # the first photo
    PayloadField("images", None, "operators", computed=False),  # every photo embedded, in vector order
    PayloadField("category", "keyword", "callers", computed=False),
    PayloadField("colour", "keyword", "callers", computed=False),  # the shop's own, else the extracted one
    PayloadField("price", "float", "callers", computed=False),
    # Sync bookkeeping (visrec.plan): what decided the vectors, what decided the rest, and how each local
    # photo looked when it was hashed (size, time, file identity: rsync's quick check).
    PayloadField("product_id", "keyword", "operators", computed=True),  # callers get it beside the payload
    PayloadField("vectors_hash", None, "nobody", computed=True),
    PayloadField("metadata_hash", None, "nobody", computed=True),
    PayloadField("photo_files", None, "nobody", computed=True),
    # Who owns the product: "catalogue" (a file sync, which may delete it) or "api" (the write routes).
    PayloadField("source", "keyword", "operators", computed=True),
    PayloadField("content_hash", None, "nobody", computed=True),  # both in one: points from before the split
    PayloadField("model_version", "keyword", "callers", computed=True),
    # The colour sync extracts from the photo (visrec.colour). Computed fields get the indexes declared
    # here and no other: an RGB triple is no filter, and each index costs the engine files of its own.
    PayloadField("colour_extracted", "keyword", "callers", computed=True, from_photo=True),
    PayloadField("colours", "keyword", "callers", computed=True, from_photo=True),
    PayloadField("colour_rgb", None, "callers", computed=True, from_photo=True),
    PayloadField("colour_lab", None, "operators", computed=True, from_photo=True),
    PayloadField("colour_histogram", None, "operators", computed=True, from_photo=True),
)

INDEXED: tuple[tuple[str, IndexType], ...] = tuple((f.name, f.index) for f in FIELDS if f.index)
KIND_OF_INDEX: dict[IndexType, Kind] = {index: kind for kind, index in INDEX_OF.items()}
RESERVED = frozenset(f.name for f in FIELDS if f.computed)
HIDDEN_FROM_CALLERS = frozenset(f.name for f in FIELDS if f.seen_by != "callers")
HIDDEN_FROM_OPERATORS = frozenset(f.name for f in FIELDS if f.seen_by == "nobody")
FROM_PHOTO = frozenset(f.name for f in FIELDS if f.from_photo)
# All a sync reads back of each point.
SYNC_FIELDS = (
    "product_id",
    "vectors_hash",
    "metadata_hash",
    "photo_files",
    "source",
    "content_hash",
    "model_version",
)
SOURCES = ("catalogue", "api")


@dataclass(frozen=True)
class Bookkeeping:
    """What a sync records on a point to decide, next time, what changed (`visrec.plan`)."""

    vectors_hash: str  # the photos as seen and the payload version: a change re-embeds
    metadata_hash: str  # the catalogue's other fields: a change rewrites the payload only
    photo_files: list[list[Any]]  # [ref, size, mtime_ns, inode, device, sha256] of each local photo
    model_version: str
    source: str = "catalogue"  # one of SOURCES: only a catalogue's own products may be deleted by its sync

    def fields(self) -> dict[str, Any]:
        return {
            "vectors_hash": self.vectors_hash,
            "metadata_hash": self.metadata_hash,
            "photo_files": self.photo_files,
            "model_version": self.model_version,
            "source": self.source,
        }


def build(
    product_id: str,
    metadata: Mapping[str, Any],
    images: Sequence[str],
    *,
    bookkeeping: Bookkeeping,
    extracted: Mapping[str, Any],
) -> dict[str, Any]:
    """A point's payload. The catalogue's own fields (its `colour` among them) win over what sync
    extracted from the photo (the extracted colour stays as `colour_extracted`); `images` are the photos
    sync embedded (resolved references, in the order of the product's vectors), `image` the first."""
    return {
        **extracted,
        **metadata,
        "image": images[0],
        "images": list(images),
        "product_id": product_id,
        **bookkeeping.fields(),
    }


def rebuild(old: Mapping[str, Any], metadata: Mapping[str, Any], bookkeeping: Bookkeeping) -> dict[str, Any]:
    """A point's payload after a change of its metadata alone: what came from its photos (the embedded
    photos, the extracted colour) stays, the catalogue's fields are replaced (a column the row dropped
    goes, and a shop colour dropped falls back to the extracted one)."""
    extracted = {k: old[k] for k in FROM_PHOTO if k in old}
    if "colour_extracted" in old:
        extracted["colour"] = old["colour_extracted"]
    return build(str(old["product_id"]), metadata, photos(old), bookkeeping=bookkeeping, extracted=extracted)


# The metadata hash of a point whose fields a PATCH wrote: no row hashes to it (a row's is bare hex), and
# two PATCHes that wrote different fields differ (a rollback compares versions by these hashes).
PATCHED = "patched:"


def patched(old: Mapping[str, Any], metadata: Mapping[str, Any]) -> dict[str, Any]:
    """`old` with its catalogue fields replaced by `metadata` over HTTP (a PATCH): its photos, vectors
    and model stay; the next sync of its row rewrites it (a catalogue's row wins for its products)."""
    files = old.get("photo_files")
    bookkeeping = Bookkeeping(
        vectors_hash=str(old.get("vectors_hash") or ""),
        metadata_hash=PATCHED + digest(metadata),
        photo_files=files if isinstance(files, list) else [],
        model_version=str(old.get("model_version") or ""),
        source=str(old.get("source") or "catalogue"),
    )
    return rebuild(old, metadata, bookkeeping)


def digest(fields: Mapping[str, Any]) -> str:
    """The hash of catalogue fields: a row's metadata hash (`plan`); a PATCH's, after its prefix."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def catalogue_fields(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The fields a catalogue row (or a PUT) gave this point, without its photos and the id: what a row
    that writes it again holds (the colour only when the shop gave one, not the extracted one)."""
    fields = {k: v for k, v in payload.items() if k not in RESERVED | {"image", "images"}}
    if "colour_extracted" in payload and payload.get("colour") == payload["colour_extracted"]:
        fields.pop("colour", None)
    return fields


def as_row(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The row that would write this point again: its id, its catalogue fields and its photos."""
    return {**catalogue_fields(payload), "id": str(payload["product_id"]), "images": photos(payload)}


def photos(payload: Mapping[str, Any]) -> list[str]:
    """A point's photos in the order of its vectors (points written before `images` have one)."""
    return list(payload.get("images") or [payload.get("image", "")])


def kinds_of(value: Any) -> list[Kind]:
    """The kinds of a stored value (a list's: its items'), in the order they appear; none for null, an
    object, or a number that is not finite."""
    if isinstance(value, bool):
        return ["bool"]
    if isinstance(value, str):
        return ["text"]
    if isinstance(value, int | float):
        return ["number"] if math.isfinite(value) else []
    if isinstance(value, list):
        return list(
            dict.fromkeys(kind for item in value if not isinstance(item, list) for kind in kinds_of(item))
        )
    return []


def for_operators(payload: Mapping[str, Any]) -> dict[str, Any]:
    """A payload as the CLI shows it: without sync bookkeeping."""
    return {k: v for k, v in payload.items() if k not in HIDDEN_FROM_OPERATORS}


def for_callers(payload: Mapping[str, Any], fields: Sequence[str] | None = None) -> dict[str, Any]:
    """A payload as other services see it (HTTP): `fields` if configured, else the catalogue's own columns
    and the public colour fields; never server paths or internal fields."""
    if fields is not None:
        return {k: payload[k] for k in fields if k in payload and k not in HIDDEN_FROM_CALLERS}
    return {k: v for k, v in payload.items() if k not in HIDDEN_FROM_CALLERS}
