"""The payload fields of a collection: its payload indexes, and the kinds of value written to each field
(recorded in the collection's metadata), which decide how a `where` value reads and what a facet counts."""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

from visrec.filters import Filters
from visrec.index.points import field_of
from visrec.payload import (
    HIDDEN_FROM_CALLERS,
    INDEX_OF,
    INDEXED,
    KIND_OF_INDEX,
    RESERVED,
    IndexType,
    Kind,
    addressable,
    kinds_of,
)

# The collection's metadata key recording, for each field callers may see, the kinds of value written to
# it (JSON: field → ["text", "bool", …]): which readings of a `where` value can match, and which fields
# hold values of several kinds (filtered by a full scan: one payload index serves one kind).
FIELD_KINDS = "field_kinds"

log = logging.getLogger(__name__)


class PayloadFields(ABC):
    """What a collection (`VectorIndex`) does with its payload fields, whatever the engine: the payload
    indexes it creates and repairs, and the kinds of value each field holds."""

    collection: str  # the physical collection's name
    # What this handle's writes know is indexed and recorded (loaded at the first write), so that a write
    # of fields seen before costs no store call.
    _indexed: dict[str, IndexType] | None = None
    _recorded: dict[str, set[Kind]] | None = None
    SCHEMA_TYPES: ClassVar[Mapping[IndexType, object]]  # visrec's payload index types, in the engine's terms

    @abstractmethod
    def exists(self) -> bool:
        """Whether the collection exists."""

    @abstractmethod
    def metadata(self) -> dict[str, str]:
        """What `create` recorded: `model_version` and `artefact` of the model that made the vectors."""

    @abstractmethod
    def _write_metadata(self, metadata: dict[str, str]) -> None: ...

    def _ensure_payload_indexes(self) -> list[str]:
        """Create whichever payload index the collection lacks: `visrec.payload.INDEXED`'s, and one for
        each field of one kind that writes recorded (a folder copied before that field's first write
        lacks it); returns the fields indexed now (one schema read when none is missing)."""
        have = {field_of(key): engine for key, engine in self._payload_schema().items()}
        missing = [(name, kind) for name, kind in INDEXED if have.get(name) != self.SCHEMA_TYPES[kind]]
        recorded = _decoded(self.metadata().get(FIELD_KINDS)) if self.exists() else {}
        missing += [
            (name, INDEX_OF[next(iter(kinds))])
            for name, kinds in recorded.items()
            if len(kinds) == 1 and name not in have and addressable(name)
        ]
        for name, kind in missing:
            self._create_payload_index(name, kind)
        return [name for name, _ in missing]

    def _repair_payload_indexes(self) -> None:
        """On opening: a crash between creating the collection and its payload indexes would otherwise
        leave filtered queries slow (and, on the embedded engine, inexact after optimize()) for good."""
        if created := self._ensure_payload_indexes():
            log.warning("%s lacked payload indexes (a sync cut short?): created %s", self.collection, created)

    @abstractmethod
    def _payload_schema(self) -> dict[str, object]:
        """The collection's payload indexes: key (`payload_key`, or a plain name bare) → the engine's
        type."""

    @abstractmethod
    def _create_payload_index(self, name: str, kind: IndexType) -> None: ...

    def field_kinds(self) -> dict[str, frozenset[Kind]]:
        """field → the kinds of value written to it: the declared indexes' and what writes recorded
        (read from the store each time: another process may have written since)."""
        kinds = {name: {KIND_OF_INDEX[index]} for name, index in INDEXED}
        for name, recorded in _decoded(self.metadata().get(FIELD_KINDS)).items():
            kinds.setdefault(name, set()).update(recorded)
        return {name: frozenset(found) for name, found in kinds.items()}

    def _index_new_fields(self, payloads: Iterable[Mapping[str, Any]]) -> None:
        """Before a write: a payload index for each catalogue field callers may see that this folder has
        none for (of its first value's kind), and the kinds of value each field holds recorded in the
        collection's metadata. The metadata is the collection's, shared by its optimized copies; the
        indexes are the folder's: a copy taken before a field's first write gets its index when the
        catch-up writes that field into it."""
        seen: dict[str, dict[Kind, None]] = {}
        for payload in payloads:
            for name, value in payload.items():
                if name not in HIDDEN_FROM_CALLERS and name not in RESERVED and addressable(name):
                    seen.setdefault(name, {}).update(dict.fromkeys(kinds_of(value)))
        if self._indexed is None:
            by_type = {engine: kind for kind, engine in self.SCHEMA_TYPES.items()}
            schema = self._payload_schema().items()
            self._indexed = {field_of(key): by_type[t] for key, t in schema if t in by_type}
        for name, found in seen.items():
            if name not in self._indexed and found:
                first = next(iter(found))
                self._create_payload_index(name, INDEX_OF[first])
                self._indexed[name] = INDEX_OF[first]
                log.info("%s: payload index on %s (%s)", self.collection, name, INDEX_OF[first])
        if self._recorded is None:
            self._recorded = {name: set(kinds) for name, kinds in self.field_kinds().items()}
        unrecorded = {
            name: [k for k in kinds if k not in self._recorded.get(name, ())] for name, kinds in seen.items()
        }
        new = {name: kinds for name, kinds in unrecorded.items() if kinds}
        if not new:
            return
        metadata = self.metadata()  # as it is now: merged, not replaced
        recorded = _decoded(metadata.get(FIELD_KINDS))
        for name, kinds in new.items():
            recorded.setdefault(name, set()).update(kinds)
            self._recorded.setdefault(name, set()).update(kinds)
        encoded = {name: sorted(kinds) for name, kinds in sorted(recorded.items())}
        self._write_metadata({**metadata, FIELD_KINDS: json.dumps(encoded)})

    def _resolved(self, filters: Filters) -> Filters:
        """`filters` with the kinds each `where` field holds (`Filters.where_kinds`)."""
        if not filters.where:
            return filters
        kinds = self.field_kinds()
        fields = {where.field for where in filters.clauses}
        return filters.model_copy(update={"where_kinds": {f: kinds[f] for f in fields if f in kinds}})

    def filtered_by_index(self, field: str) -> bool:
        """Whether the engine filters `field` through a payload index: one kind of value written to it
        (one index serves one kind) and its index made. A scroll of one of its values then costs what it
        finds, not a scan of the store."""
        kinds = self.field_kinds().get(field, frozenset())
        if len(kinds) != 1:
            return False
        have = {field_of(key): engine for key, engine in self._payload_schema().items()}
        return have.get(field) == self.SCHEMA_TYPES[INDEX_OF[next(iter(kinds))]]

    def facet(self, field: str, limit: int) -> list[tuple[str | bool, int]] | None:
        """The `limit` most frequent values of a text or boolean field and how many products hold each,
        as the engine counts them from its payload index; None for a field of numbers, of several
        kinds, or none recorded (no index to count from)."""
        kinds = self.field_kinds().get(field, frozenset())
        if len(kinds) != 1 or "number" in kinds:
            return None
        return self._facet(field, limit)

    @abstractmethod
    def _facet(self, field: str, limit: int) -> list[tuple[str | bool, int]]: ...


def _decoded(recorded: str | None) -> dict[str, set[Kind]]:
    """The field kinds recorded in a collection's metadata (`FIELD_KINDS`); {} where none are."""
    try:
        found = json.loads(recorded or "{}")
    except ValueError:
        return {}
    if not isinstance(found, dict):
        return {}
    kinds: set[Kind] = {"text", "bool", "number"}
    return {
        str(name): {k for k in listed if k in kinds}
        for name, listed in found.items()
        if isinstance(listed, list)
    }
