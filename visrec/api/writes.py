"""Writes from other services: add, change and remove products one at a time or in batches.

Every write needs the write key (`VISREC_API__WRITE_KEY`, distinct from the read key); without one
configured the routes answer 403 and say so. Rows pass the catalogue's checks and the one sync engine
(`visrec.writer.ProductWrites`); a 2xx means the write is in the store and the next query sees it. A
write is idempotent by product id: a client that timed out sends the same request again (a row that
was written answers `unchanged`). A write that has started runs to its end in the service's writer even
if its request times out: it is never left half done.

A path names the same product on every method: the write routes take exactly the paths that
`GET /products/{product_id}` takes, so the read routes' suffixes (`/similar`, `/image`, `/images/{n}`)
are never part of a written id (`PUT /products/x/similar` is a 405, not a write of "x/similar"), and
`/products/batch` is the product "batch" on every method but POST. An id with '/' is sent as %2F.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool
from starlette.convertors import PathConvertor, register_url_convertor

from visrec.admission import Admission
from visrec.api.deps import ProductId, ServiceDep, service_of
from visrec.api.errors import scrub
from visrec.api.models import BatchOut, Product, ProductPatch, ProductRow, WriteOut, errors, product_out
from visrec.catalogue import rows_from_service
from visrec.errors import InvalidQuery, WriteForbidden
from visrec.product_writes import ProductWrites, patch_problem

router = APIRouter()
WRITE_ERRORS = errors(400, 401, 403, 404, 413, 422, 503)
# The read routes' suffixes (api/products.py's routes, matched there before the plain product route).
READ_SUFFIX = r"/(?:similar|image|images/[^/]+)"
BATCH_PATH = "/products/batch"


class ProductPath(PathConvertor):
    """`{product_id:product}`: what `{product_id:path}` takes on `GET /products/…` but for a path ending
    in a read route's suffix, which the suffixed read routes take instead."""

    regex = rf"(?!.*{READ_SUFFIX}$).*"


register_url_convertor("product", ProductPath())
PRODUCT_PATH = "/products/{product_id:product}"
_PRODUCT = re.compile("/products/" + ProductPath.regex)


def is_write(method: str, path: str) -> bool:
    """Whether a request (its routing path, `guard.routing_path`) is for a write route: the guard
    throttles wrong write keys there whichever keys are set."""
    if method == "POST":
        return path == BATCH_PATH
    return method in ("PUT", "PATCH", "DELETE") and _PRODUCT.fullmatch(path) is not None


def writes_of(request: Request) -> ProductWrites:
    """The app's writes, after checking the caller holds the write key."""
    key = service_of(request).settings.api.write_key
    if key is None:
        raise WriteForbidden("writes are off on this service: it has no VISREC_API__WRITE_KEY")
    given = (request.headers.get("x-api-key") or "").encode()
    if not secrets.compare_digest(given, key.get_secret_value().encode()):
        raise WriteForbidden("this route needs the write key in X-API-Key")
    writes: ProductWrites = request.app.state.writes
    return writes


WritesDep = Annotated[ProductWrites, Depends(writes_of)]


def admission_of(request: Request) -> Admission | None:
    """The request's admission, which the guard's deadline shares (None outside the guard: tests)."""
    admission: Admission | None = getattr(request.state, "write_admission", None)
    return admission


AdmissionDep = Annotated[Admission | None, Depends(admission_of)]


def write_reason(request: Request, body: Any) -> str | None:
    """Why a PUT or PATCH body that its model refused is refused, in the words a batch row would get
    (the catalogue's checks, one place for each rule); None where those take it (the route's model is
    stricter: a price as text) or for other routes."""
    product_id = request.path_params.get("product_id")
    if not isinstance(body, dict) or not isinstance(product_id, str):
        return None
    if request.method == "PUT" and is_write("PUT", request.url.path):
        checked = rows_from_service([{**body, "id": product_id}], service_of(request).settings.ingest)
        return checked.errors[0].message if checked.errors else None
    if request.method == "PATCH" and is_write("PATCH", request.url.path):
        return patch_problem(body)
    return None


def _counted(writes: ProductWrites, route: str, outcome: str) -> str:
    writes.outcomes.labels(route, outcome.split(":")[0]).inc()
    return outcome


def _outcome(product_id: str, outcome: str) -> WriteOut:
    if outcome.startswith("error: "):
        raise InvalidQuery(outcome.removeprefix("error: "))
    return WriteOut(product_id=product_id, outcome=outcome)


@router.put(PRODUCT_PATH, response_model=WriteOut, responses=WRITE_ERRORS)
def put_product(
    product_id: ProductId, row: ProductRow, writes: WritesDep, admission: AdmissionDep
) -> WriteOut:
    """Create or replace a product, as a catalogue row says it; its photos are embedded only when they
    changed (the same PUT again answers `unchanged`)."""
    body = row.model_dump(exclude_none=True)
    if product_id != product_id.strip():  # a row's id is stripped: the path would name another product
        raise InvalidQuery("the id starts or ends with whitespace: write it without")
    if body.get("id", product_id) != product_id:
        raise InvalidQuery("the body's id differs from the path's")
    [outcome] = writes.rows([{**body, "id": product_id}], admission)
    return _outcome(product_id, _counted(writes, "put", outcome))


@router.patch(PRODUCT_PATH, response_model=Product, responses=WRITE_ERRORS)
def patch_product(
    product_id: ProductId,
    fields: ProductPatch,
    writes: WritesDep,
    service: ServiceDep,
    admission: AdmissionDep,
) -> Product:
    """Change a product's fields (never its photos): nothing is embedded. 404 for an unknown product."""
    patched = writes.patch(product_id, fields.model_dump(exclude_unset=True), admission)
    _counted(writes, "patch", "metadata_updated")
    return product_out(product_id, patched, service.settings)


@router.delete(PRODUCT_PATH, response_model=WriteOut, responses=WRITE_ERRORS)
def delete_product(product_id: ProductId, writes: WritesDep, admission: AdmissionDep) -> WriteOut:
    """Remove a product (`absent` if it was not indexed: a repeated DELETE is not an error)."""
    outcome = _counted(writes, "delete", "deleted" if writes.delete(product_id, admission) else "absent")
    return WriteOut(product_id=product_id, outcome=outcome)


@router.post(
    BATCH_PATH,
    response_model=BatchOut,
    responses=WRITE_ERRORS,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "array",
                        "items": {"description": "a row (a row that is not a product answers `error: why`)"},
                    }
                },
                "application/x-ndjson": {"schema": {"type": "string"}},
            },
        }
    },
)
async def batch(request: Request, writes: WritesDep) -> BatchOut:
    """Create or replace many products: a JSON array of rows, or JSON lines (`application/x-ndjson`),
    each with its `id`. Every row is answered (`error: why` for a bad one): one bad row never fails the
    others."""
    rows = _rows(await request.body(), request.headers.get("content-type", ""))
    limit = service_of(request).settings.api.max_batch_rows
    if len(rows) > limit:
        raise InvalidQuery(f"{len(rows)} rows: at most {limit} a batch")
    written = await run_in_threadpool(writes.rows, rows, admission_of(request))
    outcomes = [scrub(_counted(writes, "batch", o)) for o in written]  # a reason names no URL, no path
    ids = [str(row["id"]) if isinstance(row, dict) and row.get("id") is not None else "" for row in rows]
    return BatchOut(results=[WriteOut(product_id=i, outcome=o) for i, o in zip(ids, outcomes, strict=True)])


def _rows(body: bytes, content_type: str) -> list[Any]:
    """The rows of a batch body; a line that is not JSON becomes a row that fails on its own."""
    try:
        text = body.decode()
    except UnicodeDecodeError:
        raise InvalidQuery("the body is not UTF-8") from None
    if "ndjson" in content_type or "jsonl" in content_type:
        rows: list[Any] = []
        for line in json_lines(text):
            try:
                rows.append(json.loads(line))
            except (ValueError, RecursionError):
                rows.append(None)  # answered "not a JSON object"
        return rows
    try:
        parsed = json.loads(text)
    except (ValueError, RecursionError):
        raise InvalidQuery("the body is neither a JSON array of rows nor JSON lines") from None
    if not isinstance(parsed, list):
        raise InvalidQuery("the body must be a JSON array of rows")
    return parsed


def json_lines(text: str) -> list[str]:
    """The non-blank lines of a JSON-lines body. Split at LF only (a CR before it is dropped):
    `str.splitlines` also splits at U+2028, U+2029, U+0085, vertical tab, form feed and the file, group
    and record separators, which JSON allows unescaped inside a string: one row became several, and
    the answers no longer lined up with the rows. Blank means JSON's whitespace only."""
    return [line.removesuffix("\r") for line in text.split("\n") if line.strip(" \t\r")]
