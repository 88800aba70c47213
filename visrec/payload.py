"""The payload schema: every field a point carries besides the catalogue's own columns, declared once.

Each field says whether the store indexes it (filtered queries), who sees it and whether sync computes
it. Everything else derives from this table: the payload indexes both backends create, the catalogue
columns refused as reserved, what the CLI (operators) and the HTTP API (other services) show, and the
fields a sync reads back. A new filterable or computed field is one line here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

IndexType = Literal["keyword", "float"]
# callers: other services over HTTP (and operators); operators: the CLI only; nobody: bookkeeping.
Audience = Literal["callers", "operators", "nobody"]


@dataclass(frozen=True)
class PayloadField:
    name: str
    index: IndexType | None  # a payload index, for fast, exact filtered queries
    seen_by: Audience
    computed: bool  # written by sync: a catalogue column of this name is refused


FIELDS = (
    # From the catalogue (its other columns are stored as they come, seen by callers, not indexed).
    # Server paths or URLs: never shown over HTTP (callers get a photo by its position, `matched_image`).
    PayloadField("image", None, "operators", computed=False),  # the first photo
    PayloadField("images", None, "operators", computed=False),  # every photo embedded, in vector order
    PayloadField("category", "keyword", "callers", computed=False),
    PayloadField("colour", "keyword", "callers", computed=False),  # the shop's own, else the extracted one
    PayloadField("price", "float", "callers", computed=False),
    # Sync bookkeeping.
    PayloadField("product_id", "keyword", "operators", computed=True),  # callers get it beside the payload
    PayloadField("content_hash", None, "nobody", computed=True),
    PayloadField("model_version", "keyword", "callers", computed=True),
    # The colour sync extracts from the photo (visrec.colour).
    PayloadField("colour_extracted", None, "callers", computed=True),
    PayloadField("colours", None, "callers", computed=True),
    PayloadField("colour_rgb", None, "callers", computed=True),
    PayloadField("colour_lab", None, "operators", computed=True),
    PayloadField("colour_histogram", None, "operators", computed=True),
)

INDEXED: tuple[tuple[str, IndexType], ...] = tuple((f.name, f.index) for f in FIELDS if f.index)
RESERVED = frozenset(f.name for f in FIELDS if f.computed)
HIDDEN_FROM_CALLERS = frozenset(f.name for f in FIELDS if f.seen_by != "callers")
HIDDEN_FROM_OPERATORS = frozenset(f.name for f in FIELDS if f.seen_by == "nobody")
SYNC_FIELDS = ("product_id", "content_hash", "model_version")  # all a sync reads back of each point


def build(
    product_id: str,
    metadata: Mapping[str, Any],
    images: Sequence[str],
    *,
    content_hash: str,
    model_version: str,
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
        "content_hash": content_hash,
        "model_version": model_version,
    }


def photos(payload: Mapping[str, Any]) -> list[str]:
    """A point's photos in the order of its vectors (points written before `images` have one)."""
    return list(payload.get("images") or [payload.get("image", "")])


def for_operators(payload: Mapping[str, Any]) -> dict[str, Any]:
    """A payload as the CLI shows it: without sync bookkeeping."""
    return {k: v for k, v in payload.items() if k not in HIDDEN_FROM_OPERATORS}


def for_callers(payload: Mapping[str, Any], fields: Sequence[str] | None = None) -> dict[str, Any]:
    """A payload as other services see it (HTTP): `fields` if configured, else the catalogue's own columns
    and the public colour fields; never server paths or internal fields."""
    if fields is not None:
        return {k: payload[k] for k in fields if k in payload and k not in HIDDEN_FROM_CALLERS}
    return {k: v for k, v in payload.items() if k not in HIDDEN_FROM_CALLERS}
