"""How failures reach callers, in one place: visrec's errors map to status codes (unknown product 404,
bad query or image 422, index or model unavailable 503 with Retry-After, anything else of visrec's 400),
every error body carries the request id, and a 5xx says what the caller can do while its cause (store
paths, server URLs, engine errors) goes to the log under that id."""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from visrec.api.deps import service_of
from visrec.errors import (
    CollectionMissing,
    ImageError,
    IndexUnavailable,
    InvalidQuery,
    ModelError,
    NotFound,
    VisrecError,
    WriteForbidden,
    WritesBusy,
)

log = logging.getLogger(__name__)
STATUS_OF: list[tuple[type[VisrecError], int]] = [
    (WriteForbidden, 403),
    (NotFound, 404),
    (InvalidQuery, 422),
    (ImageError, 422),
    (IndexUnavailable, 503),
    (CollectionMissing, 503),
    (ModelError, 503),
]
# What a caller is told of a 5xx: what it can do. The cause goes to the log under the request id.
UNAVAILABLE: list[tuple[type[VisrecError], str]] = [
    (WritesBusy, "too many writes are waiting; retry later (writes are idempotent by product id)"),
    (CollectionMissing, "no products are indexed yet (run `visrec sync`); retry later"),
    (ModelError, "photo search is unavailable: the model is not loaded; retry later"),
    (IndexUnavailable, "the index is unavailable; retry later"),
]


def unavailable(exc: VisrecError) -> str:
    """What a caller may be told of `exc` when it makes the service unavailable."""
    return next((text for kind, text in UNAVAILABLE if isinstance(exc, kind)), "unavailable; retry later")


def answer(request: Request, status: int, detail: Any, **extra: Any) -> JSONResponse:
    """An error body (`ErrorOut`) with the request id; a 503 says when to retry."""
    request_id = getattr(request.state, "request_id", None)
    headers = {"Retry-After": str(service_of(request).settings.api.retry_after_s)} if status == 503 else None
    return JSONResponse({"detail": detail, **extra, "request_id": request_id}, status, headers=headers)


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI's own handler echoes the bad input, and a NaN from a JSON body cannot be written back
    # as JSON: the 422 became a 500.
    return answer(request, 422, _finite_json(jsonable_encoder(exc.errors())))


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return answer(request, exc.status_code, exc.detail)


async def visrec_error(request: Request, exc: VisrecError) -> JSONResponse:
    status = next((code for kind, code in STATUS_OF if isinstance(exc, kind)), 400)
    detail = str(exc)
    if status >= 500:
        log.warning("request %s: %s", getattr(request.state, "request_id", "-"), exc)
        detail = unavailable(exc)
    return answer(request, status, detail, error=type(exc).__name__)


async def unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("request %s failed", getattr(request.state, "request_id", "-"))
    return answer(request, 500, "internal error; the request id is in the server's log")


def add_handlers(app: FastAPI) -> None:
    """Answer every failure of `app` as above (FastAPI's own handlers would echo input and internals)."""
    app.exception_handler(RequestValidationError)(invalid_request)
    app.exception_handler(StarletteHTTPException)(http_error)
    app.exception_handler(VisrecError)(visrec_error)
    app.exception_handler(Exception)(unexpected)


def _finite_json(value: Any) -> Any:
    """`value` with NaN and infinities as strings: JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _finite_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_json(item) for item in value]
    return value
