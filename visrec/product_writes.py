"""Products written by other services (the HTTP write routes): rows, PATCHes and DELETEs through the
service's writer (`visrec.writer`), each product's writes taking effect in the order they arrived."""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from pydantic import ValidationError

from visrec import payload
from visrec.admission import Admission
from visrec.ahead import Ahead
from visrec.catalogue import (
    Catalogue,
    Product,
    explain,
    reserved_field,
    rows_from_service,
    written_fields_problem,
)
from visrec.errors import CollectionMissing, InvalidQuery, NotFound, VisrecError, WritesBusy
from visrec.handle import ModelHandle
from visrec.ingest import SyncOptions, SyncSummary, embed_ahead, sync
from visrec.values import value_problem
from visrec.writer import Writer

log = logging.getLogger(__name__)


class TooLate(WritesBusy):
    """The request's deadline passed before its write was taken: nothing of it was done."""


class _Order:
    """Per product, writes take effect in the order they arrived: a PATCH or DELETE sent after a PUT of
    the same product (even one whose request timed out with "will be applied", still fetching its
    photos) waits for it, and a PUT waits for an earlier PATCH or DELETE; writes of other products do
    not wait. Every write waits only for writes that arrived before it, so none waits for itself. Shares
    its condition with `ProductWrites`, whose round thread waits for the next write whose turn it is."""

    def __init__(self, changed: threading.Condition) -> None:
        self._changed = changed
        self._numbers = itertools.count()
        self._unwritten: dict[str, set[int]] = {}  # product id → arrival numbers of writes not done

    def arrive(self, ids: Iterable[str]) -> int:
        with self._changed:
            number = next(self._numbers)
            for product_id in ids:
                self._unwritten.setdefault(product_id, set()).add(number)
            return number

    def is_turn(self, ids: Iterable[str], number: int) -> bool:
        """Whether every write of `ids` that arrived before `number` is done (call holding the condition)."""
        return all(min(self._unwritten.get(i, {number})) >= number for i in ids)

    def wait_turn(self, ids: Iterable[str], number: int) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self.is_turn(ids, number))

    def leave(self, ids: Iterable[str], number: int) -> None:
        with self._changed:
            for product_id in ids:
                numbers = self._unwritten.get(product_id, set())
                numbers.discard(number)
                if not numbers:
                    self._unwritten.pop(product_id, None)
            self._changed.notify_all()


@dataclass
class _Ticket:
    """A write taken: its number in `_Order`, and whether it still counts as waiting for the writer."""

    arrived: int
    kind: str  # "rows" (PUT, batch) or "turns" (PATCH, DELETE): each has max_pending_writes waiting
    waiting: bool = True


@dataclass
class _Rows:
    """One request's rows, their photos embedded, waiting for the writer, and what became of them."""

    rows: list[Any]
    ids: set[str]
    ticket: _Ticket
    ahead: Ahead | None = None
    done: threading.Event = field(default_factory=threading.Event)
    outcomes: list[str] = field(default_factory=list)
    error: BaseException | None = None


class ProductWrites:
    """Products written by other services (the HTTP write routes), through the service's writer: rows
    pass the catalogue's checks (`catalogue.rows_from_service`: photos as URLs only) and the one sync
    engine (`ingest.sync` with `source="api"`, no deletes), so a photo is embedded only when it changed,
    and a 2xx means the write is in the store and the next query sees it.

    Each request, once the earlier writes of its products are done (`_Order`), fetches and embeds its
    rows' new photos in its own thread (`ingest.embed_ahead`), beside other requests: a slow photo host
    delays only the writes that wait for it. Then it queues its rows, and one thread takes every request
    waiting (at most `api.max_batch_rows` rows) into one sync under the writer, which then decides and
    writes (it fetches only what changed since, e.g. the model): a PATCH never waits for a PUT's photo.
    At most `api.max_pending_writes` writes are in progress (fetching photos or waiting for the writer);
    more raise `WritesBusy` (503), nothing of them done. A write once taken (`Admission`)
    goes on even if its request gives up (its deadline): never half done, and a retry is idempotent."""

    def __init__(self, writer: Writer, registry: CollectorRegistry) -> None:
        self.writer = writer
        self.service = writer.service
        self.outcomes = Counter(
            "visrec_writes",
            "products written over HTTP, by route and outcome",
            ["route", "outcome"],
            registry=registry,
        )
        self.rounds = Counter(
            "visrec_write_rounds", "syncs that wrote the rows of waiting requests", registry=registry
        )
        self._changed = threading.Condition()  # of `_waiting_for`, `_waiting` and `_order`
        self._waiting_for = {"rows": 0, "turns": 0}
        self._order = _Order(self._changed)
        self._waiting: list[_Rows] = []
        self._thread: threading.Thread | None = None

    @contextmanager
    def _arrival(self, ids: set[str], admission: Admission | None, kind: str) -> Iterator[_Ticket]:
        """A write taken, numbered in arrival order and counted as waiting for the writer (until it is
        done, or taken into a round: `_count_out`); raises `WritesBusy` when too many of its kind wait,
        `TooLate` when its request gave up before the write was taken. Nothing of either was done."""
        with self._changed:
            if self._waiting_for[kind] >= self.service.settings.api.max_pending_writes:
                raise WritesBusy("too many writes are waiting for the writer; nothing of this one was done")
            if admission is not None and not admission.take():
                raise TooLate("the request gave up before its write began; nothing of it was done")
            self._waiting_for[kind] += 1
            ticket = _Ticket(self._order.arrive(ids), kind)
        try:
            yield ticket
        finally:
            self._order.leave(ids, ticket.arrived)
            with self._changed:
                self._count_out(ticket)

    def _count_out(self, ticket: _Ticket) -> None:
        """No longer waiting for the writer (call holding `_changed`); once."""
        if ticket.waiting:
            ticket.waiting = False
            self._waiting_for[ticket.kind] -= 1

    @contextmanager
    def _turn(self, product_id: str, admission: Admission | None) -> Iterator[None]:
        """The writer, for one product's PATCH or DELETE, after that product's earlier writes."""
        with self._arrival({product_id}, admission, "turns") as ticket:
            self._order.wait_turn([product_id], ticket.arrived)
            with self.writer.lock:
                yield

    def rows(self, rows: list[Any], admission: Admission | None = None) -> list[str]:
        """Create or replace products from rows; one outcome per row, in order: "added", "updated"
        (photos changed: embedded), "metadata_updated", "unchanged", or "error: why"."""
        catalogue = rows_from_service(rows, self.service.settings.ingest)
        ids = {product.id for product in catalogue.products}  # as the catalogue reads them (stripped)
        with self._arrival(ids, admission, "rows") as ticket:
            request = _Rows(rows, ids, ticket)
            if catalogue.products:
                # After the earlier writes of its products (their photos are then what this one
                # replaces: none is left for the round to fetch under the writer), in this thread,
                # beside other products' writes.
                self._order.wait_turn(ids, ticket.arrived)
                request.ahead = self._embedded_ahead(catalogue)
            with self._changed:
                self._waiting.append(request)
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._write_rounds, name="product-writes", daemon=True
                    )
                    self._thread.start()
                self._changed.notify_all()
            request.done.wait()
        if request.error is not None:
            raise request.error
        return request.outcomes

    def _next_round(self) -> list[_Rows]:
        """The waiting requests whose turn it is, in arrival order, up to `max_batch_rows` rows (call
        holding `_changed`); none when no waiting request's turn has come."""
        taken: list[_Rows] = []
        rows = 0
        for request in self._waiting:
            if not self._order.is_turn(request.ids, request.ticket.arrived):
                continue  # an earlier write of its products is not done (fetching, or in this round)
            if taken and rows + len(request.rows) > self.service.settings.api.max_batch_rows:
                break
            taken.append(request)
            rows += len(request.rows)
        for request in taken:
            self._waiting.remove(request)
            self._count_out(request.ticket)  # written now: room for another to wait
        return taken

    def _write_rounds(self) -> None:
        while True:
            with self._changed:
                while not (taken := self._next_round()):
                    self._changed.wait()
            try:
                self.rounds.inc()
                outcomes = self._write(taken)
                for request in taken:
                    request.outcomes, outcomes = outcomes[: len(request.rows)], outcomes[len(request.rows) :]
            except BaseException as exc:  # every request of the round is told
                for request in taken:
                    request.error = exc
            finally:
                for request in taken:
                    request.done.set()

    def _write(self, taken: list[_Rows]) -> list[str]:
        rows = [row for request in taken for row in request.rows]
        catalogue = rows_from_service(rows, self.service.settings.ingest)
        outcomes = {e.line: f"error: {e.message}" for e in catalogue.errors}
        if catalogue.products:
            ahead: Ahead | None = None
            for embedded in (r.ahead for r in taken if r.ahead is not None):
                if ahead is None:
                    ahead = Ahead(embedded.model_version)
                ahead.merge(embedded)
            with self.writer.lock:
                summary = self._sync(catalogue, ahead)
            for product in catalogue.products:
                outcomes[catalogue.lines[product.id]] = summary.outcomes.get(product.id, "unchanged")
        return [outcomes[n] for n in range(1, len(rows) + 1)]

    def _options(self) -> SyncOptions:
        settings = self.service.settings
        report = settings.ingest.failure_report
        return SyncOptions(
            settings.ingest,
            report.with_name(f"{report.stem}.api{report.suffix}"),  # the file syncs' report stays theirs
            max_delete=1.0,
            optimize=False,
            source="api",
            deletes=False,
        )

    def _embedded_ahead(self, catalogue: Catalogue) -> Ahead | None:
        """The rows' new photos, embedded by the live model; None where that cannot be done now (the
        sync under the writer then does it, and reports why it failed)."""
        try:
            if building := self.writer.building:  # the version a reindex builds needs them too
                new_model, new_vectors = building
                refs = [ref for p in catalogue.products for ref in catalogue.photo_refs(p)]
                new_vectors.add(catalogue, new_model, self._options().limits, refs)
            with self.service.reading() as live:
                model = ModelHandle(
                    live.model().artefact_dir, self.service.settings.embed, loaded=live.model()
                )
                return embed_ahead(catalogue, live.index, model, self._options())
        except VisrecError as exc:
            log.debug("photos not embedded ahead of the writer: %s", exc)
            return None
        except Exception:  # a bug here must not fail the write: the sync under the writer does it all
            log.warning("photos not embedded ahead of the writer", exc_info=True)
            return None

    def _sync(self, catalogue: Catalogue, ahead: Ahead | None) -> SyncSummary:
        settings = self.service.settings
        options = self._options()
        try:
            with self.service.reading() as live:
                model = ModelHandle(live.model().artefact_dir, settings.embed, loaded=live.model())
                summary = sync(catalogue, live.index, model, options, ahead=ahead)
        except CollectionMissing:  # the first products of an empty store: create it with the model
            with self.writer.first_version() as index:
                return sync(catalogue, index, ModelHandle(settings.artefact, settings.embed), options)
        self.writer.changed(summary.added + summary.updated + summary.metadata_updated)
        return summary

    def patch(
        self, product_id: str, fields: dict[str, Any], admission: Admission | None = None
    ) -> dict[str, Any]:
        """Merge `fields` into a product's catalogue fields (JSON merge patch: null removes a field);
        never embeds. Raises `NotFound`, `InvalidQuery` for a field it may not write."""
        problem = patch_problem(fields)
        if problem:
            raise InvalidQuery(problem)
        with self._turn(product_id, admission), self.service.reading() as live:
            index = live.index
            old = index.payloads([product_id]).get(product_id)
            if old is None:
                raise NotFound(f"no product {product_id!r}")
            metadata = payload.catalogue_fields(old)
            for key, value in fields.items():
                if value is None:
                    metadata.pop(key, None)
                else:
                    metadata[key] = value
            try:  # as a catalogue row would be: blanks are missing, text is stripped
                patched = Product.model_validate(
                    {**metadata, "id": product_id, "images": payload.photos(old)}
                )
            except ValidationError as exc:
                raise InvalidQuery(f"the patched product is not valid: {explain(exc)}") from None
            metadata = {k: v for k, v in patched.metadata().items() if k not in ("image", "images")}
            new = payload.patched(old, metadata)
            index.overwrite_payloads({product_id: new})
            self.writer.changed(1)
            return new

    def delete(self, product_id: str, admission: Admission | None = None) -> bool:
        """Delete a product; whether it was indexed (a repeated DELETE is not an error)."""
        with self._turn(product_id, admission), self.service.reading() as live:
            existed = bool(live.index.payloads([product_id]))
            live.index.delete([product_id])
            self.writer.changed(1)
            return existed


def patch_problem(fields: dict[str, Any]) -> str | None:
    """Why a PATCH may not write `fields` (None: it may): photos, the id and computed fields are not its
    to change, and values must fit the index, and read, as a catalogue row's must (a price as a price)."""
    problem = _key_problem(fields) or written_fields_problem(fields) or value_problem(fields)
    if problem:
        return problem
    try:  # the values set, as a row's would be read (any photo: a PATCH keeps the product's own)
        Product.model_validate(
            {**{k: v for k, v in fields.items() if v is not None}, "id": "p", "images": [_ANY_PHOTO]}
        )
    except ValidationError as exc:  # in a PUT's or a batch row's words
        return explain(exc)
    return None


_ANY_PHOTO = "https://photo.invalid/p.png"


def _key_problem(fields: dict[str, Any]) -> str | None:
    for key in fields:
        if key == "id":
            return "'id' cannot be patched: a product's id is its path's (PUT it under the new id)"
        if key in ("image", "images"):
            return f"{key!r} cannot be patched: PUT the whole product to change its photos"
        if not key.strip():
            return "a field needs a name"
        if key in payload.RESERVED:
            return reserved_field(key)
    return None
