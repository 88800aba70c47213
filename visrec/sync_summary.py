"""What a sync did: its summary (counts, each product's outcome, the first failures) and the failure report
(one JSON line per skipped row, photo or product)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from visrec.catalogue import Catalogue, RowError
from visrec.errors import VisrecError
from visrec.fs import write_atomically
from visrec.handle import ModelHandle
from visrec.plan import Shard, SyncPlan

log = logging.getLogger(__name__)


FIRST_FAILURES = 5  # failures a summary shows (all of them are in the failure report)


@dataclass
class SyncSummary:
    added: int = 0
    updated: int = 0  # products whose photos (or model) changed: embedded again
    metadata_updated: int = 0  # products whose other fields alone changed: payload rewritten, no embedding
    deleted: int = 0
    unchanged: int = 0
    failed: int = 0  # products none of whose photos could be read or decoded, or the store refused
    photos_skipped: int = 0  # photos refused or unreadable, of products indexed with their other photos
    invalid_rows: int = 0  # catalogue rows skipped
    deletes_held_back: int = 0  # products absent from the catalogue, kept because some row was unreadable
    seconds: float = 0.0  # the whole sync, the closing optimize() included
    optimize_seconds: float = 0.0  # of which the closing optimize(): an index cost, not an embedding one
    images_per_second: float = 0.0
    photo_bytes_read: int = 0  # local photo bytes read to hash them (those whose size or time changed)
    model_version: str = ""
    shard: str = "0/1"
    failure_report: str = ""
    delimiter: str | None = None  # a CSV catalogue's (comma, semicolon, tab), as detected
    first_failures: list[dict[str, Any]] = field(default_factory=list)  # the report's first lines
    # product id → "added", "updated", "metadata_updated", "unchanged" or why it failed (rows written over
    # HTTP answer per row); not part of the printed summary
    outcomes: dict[str, str] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            k: v for k, v in asdict(self).items() if k != "outcomes" and not (k == "delimiter" and v is None)
        }


def summarize(
    catalogue: Catalogue,
    plan: SyncPlan,
    embedded: set[int],
    failures: list[dict[str, Any]],
    rejected: dict[str, str],
    shard: Shard,
    failure_report: Path,
    started: float,
    optimize_seconds: float,
    model: ModelHandle,
) -> SyncSummary:
    """What a sync did, per product and in all; writes the failure report."""
    manifest = model.manifest
    failures += [failure("store", catalogue, product_id, error) for product_id, error in rejected.items()]
    embedded = {i for i in embedded if plan.to_embed[i].product.id not in rejected}
    write_report(failure_report, failures)
    if plan.held_back:
        log.warning(
            "%d deletes held back: %d rows could not be read or had no id (see %s)",
            len(plan.held_back),
            len(catalogue.unidentified),
            failure_report,
        )
    seconds = time.perf_counter() - started
    added = sum(i < len(plan.added) for i in embedded)  # `to_embed` lists the new products first
    outcomes = {d.product.id: "unchanged" for d in plan.refresh}
    outcomes |= {d.product.id: "metadata_updated" for d in plan.repayload}
    outcomes |= {
        d.product.id: "added" if i < len(plan.added) else "updated" for i, d in enumerate(plan.to_embed)
    }
    for f in failures:
        # (a duplicate id's later row fails alone: the product is its first row's)
        if (
            f["product_id"] is not None
            and f["kind"] != "photo"
            and f["line"] == catalogue.lines.get(f["product_id"], f["line"])
        ):
            why = f"no photo could be read: {f['error']}" if f["kind"] == "image" else f["error"]
            outcomes[f["product_id"]] = f"error: {why}"
    outcomes |= {product_id: f"error: {error}" for product_id, error in rejected.items()}
    return SyncSummary(
        added=added,
        updated=len(embedded) - added,
        metadata_updated=sum(d.product.id not in rejected for d in plan.repayload),
        deleted=len(plan.removed),
        unchanged=plan.unchanged + sum(d.product.id not in rejected for d in plan.refresh),
        failed=len(plan.to_embed) - len(embedded),
        photos_skipped=sum(f["kind"] == "photo" for f in failures),
        invalid_rows=len(catalogue.errors),
        deletes_held_back=len(plan.held_back),
        seconds=round(seconds, 3),
        optimize_seconds=round(optimize_seconds, 3),
        images_per_second=round(len(embedded) / seconds, 1) if seconds else 0.0,
        photo_bytes_read=plan.photo_bytes_hashed,
        model_version=manifest.model_version,
        shard=str(shard),
        failure_report=str(failure_report.absolute()),  # a service writes it from its own folder
        delimiter=catalogue.delimiter,
        first_failures=failures[:FIRST_FAILURES],
        outcomes=outcomes,
    )


def reported(kind: str, errors: list[RowError]) -> list[dict[str, Any]]:
    """Lines of the failure report for what reading the catalogue skipped (rows, or photos of kept rows)."""
    return [{"kind": kind, "line": e.line, "product_id": e.product_id, "error": e.message} for e in errors]


def failure(kind: str, catalogue: Catalogue, product_id: str, error: str) -> dict[str, Any]:
    """A line of the failure report for one product."""
    return {"kind": kind, "line": catalogue.lines.get(product_id), "product_id": product_id, "error": error}


def write_report(path: Path, failures: list[dict[str, Any]]) -> None:
    """The run's failures, one JSON object a line; replaced atomically each run (empty when none)."""
    try:
        write_atomically(path, "".join(json.dumps(f) + "\n" for f in failures))
    except OSError as exc:
        raise VisrecError(f"cannot write the failure report {path}: {exc.strerror or exc}") from exc
