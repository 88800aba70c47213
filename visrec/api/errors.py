"""How failures reach callers, in one place: visrec's errors map to status codes (unknown product 404,
bad query or uploaded image 422, index or model unavailable 503 with Retry-After, anything else of
visrec's 400), and every error body carries the request id.

The one rule for what an answer may say: **the caller's own input and fixed texts, never a URL, a
server path or an engine's words.** Only errors whose message is built from the request alone
(`InvalidQuery` and its kinds: the parameters, the ids, the filters; `UploadRejected`: the caller's own
bytes) are shown as they are; every other error (a catalogue photo that failed, a store or model
problem, anything unexpected) is answered with a fixed text for its kind, and its cause goes to the log
under the request id. Whatever is shown passes `scrub` last, which blanks anything shaped like a URL or
an absolute path: a message written later cannot carry a catalogue URL (and its signed query string) out.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import iter_route_contexts
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from visrec.api.deps import service_of
from visrec.errors import (
    CollectionMissing,
    DiskFull,
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


class UploadRejected(ImageError):
    """The caller's uploaded photo cannot be used: its message speaks of the caller's own bytes only."""


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
    (WritesBusy, "too many writes are waiting: this one was not written; retry later"),
    (DiskFull, "the store's disk is nearly full: writes are refused until there is room; retry later"),
    (CollectionMissing, "no products are indexed yet (run `visrec sync`); retry later"),
    (ModelError, "photo search is unavailable: the model is not loaded; retry later"),
    (IndexUnavailable, "the index is unavailable (a write may not have been made); retry later"),
]


# Messages built from the request alone: shown to the caller (after `scrub`).
SHOWN: tuple[type[VisrecError], ...] = (InvalidQuery, UploadRejected, WriteForbidden)
# What the caller is told of every other error of visrec's, by kind (first match).
FIXED: list[tuple[type[VisrecError], str]] = [
    (ImageError, "the image cannot be used"),
    (VisrecError, "the request cannot be completed; the request id is in the server's log"),
]
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S*")
_PATH = re.compile(r"(?<![\w.~-])(?:[A-Za-z]:)?[/\\](?:[^\s/\\'\"]+[/\\])+[^\s'\"]*")


def scrub(value: Any) -> Any:
    """`value` (a text, or the lists and dicts of a validation error) with anything shaped like a URL or
    an absolute path of two or more parts replaced by `…`: the last word on what leaves the service."""
    if isinstance(value, str):
        return _PATH.sub("…", _URL.sub("…", value))
    if isinstance(value, dict):
        return {key: scrub(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [scrub(item) for item in value]
    return value


def hidden(request: Request, exc: BaseException, status: int, text: str) -> HTTPException:
    """An answer of `status` saying `text`, for a failure whose cause the caller must not see (a URL, a
    path, an engine's words): the cause goes to the log under the request id."""
    log.warning("request %s: %s", getattr(request.state, "request_id", "-"), exc)
    return HTTPException(status, text)


def unavailable(exc: VisrecError) -> str:
    """What a caller may be told of `exc` when it makes the service unavailable."""
    return next((text for kind, text in UNAVAILABLE if isinstance(exc, kind)), "unavailable; retry later")


def answer(
    request: Request, status: int, detail: Any, headers: Mapping[str, str] | None = None, **extra: Any
) -> JSONResponse:
    """An error body (`ErrorOut`) with the request id, `detail` scrubbed; a 503 says when to retry."""
    request_id = getattr(request.state, "request_id", None)
    headers = dict(headers or {})
    if status == 503:
        headers["Retry-After"] = str(service_of(request).settings.api.retry_after_s)
    body = {"detail": scrub(detail), **extra, "request_id": request_id}
    return JSONResponse(body, status, headers=headers or None)


# Why a write's body is refused, in the words a batch row gets (`visrec.api.writes.write_reason`);
# None where the catalogue's checks take the body and only the route's stricter model refuses it.
WriteReason = Callable[[Request, Any], str | None]


def invalid_request_with(write_reason: WriteReason) -> Callable[..., Awaitable[JSONResponse]]:
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        reason = write_reason(request, exc.body)
        if reason is not None:  # as the same mistake in a batch row, or raised by visrec, is answered
            return answer(request, 422, reason, error=InvalidQuery.__name__)
        # FastAPI's own handler echoes the bad input, and a NaN from a JSON body cannot be written back
        # as JSON: the 422 became a 500.
        problems = scrub(_finite_json(jsonable_encoder(exc.errors())))
        return answer(request, 422, _sentence(problems), problems=problems)

    return invalid_request


_PLACES = {"query": "query parameter", "path": "path parameter", "header": "header", "body": "body"}


def _sentence(problems: list[dict[str, Any]]) -> str:
    """Validation problems as one sentence: every error body's `detail` is text (a caller shows it as it
    is); the list, each problem with its `loc`, stays beside it as `problems`."""
    said = []
    for problem in problems:
        loc = [str(part) for part in problem.get("loc", [])]
        place = _PLACES.get(loc[0], loc[0]) if loc else "request"
        where = f"{place} {'.'.join(loc[1:])!r}" if len(loc) > 1 else place
        said.append(f"{where}: {problem.get('msg', 'invalid')}")
    return "; ".join(said) or "the request does not match the API's schema"


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Its headers too: a 405 says which methods the path takes (`Allow`, RFC 9110).
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = ", ".join(allowed_methods(request))
    return answer(request, exc.status_code, exc.detail, headers=headers)


def allowed_methods(request: Request) -> list[str]:
    """Every method some route of the app takes at the request's path. Starlette's 405 names the
    methods of the first route whose path matched only: `OPTIONS /products/batch` said `Allow: PUT`."""
    methods: set[str] = set()
    for route in iter_route_contexts(request.app.routes):  # included routers' routes too
        if route.methods:
            match, _ = route.matches({**request.scope, "method": next(iter(route.methods))})
            if match is Match.FULL:
                methods |= route.methods
    return sorted(methods)


async def visrec_error(request: Request, exc: VisrecError) -> JSONResponse:
    status = next((code for kind, code in STATUS_OF if isinstance(exc, kind)), 400)
    if isinstance(exc, SHOWN) and status < 500:
        detail = str(exc)
    else:
        log.warning("request %s: %s", getattr(request.state, "request_id", "-"), exc)
        detail = unavailable(exc) if status >= 500 else next(t for kind, t in FIXED if isinstance(exc, kind))
    kind = ImageError if isinstance(exc, UploadRejected) else type(exc)
    return answer(request, status, detail, error=kind.__name__)


def add_handlers(app: FastAPI, write_reason: WriteReason) -> None:
    """Answer every failure of `app` as above (FastAPI's own handlers would echo input and internals)."""
    app.exception_handler(RequestValidationError)(invalid_request_with(write_reason))
    app.exception_handler(StarletteHTTPException)(http_error)
    app.exception_handler(VisrecError)(visrec_error)
    # Anything else is a bug: `visrec.guard` answers it (500, with the request id) and logs it.


def _finite_json(value: Any) -> Any:
    """`value` with NaN and infinities as strings (JSON has no such numbers) and lone surrogates escaped
    (UTF-8 has none: echoing one in a 422 was a 500)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode()
    if isinstance(value, dict):
        return {key: _finite_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_json(item) for item in value]
    return value
