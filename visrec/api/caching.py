"""Answers a storefront's cache can keep: every GET answer of a product route carries an ETag, a request
whose If-None-Match names it is answered 304 without a search, and Cache-Control comes from a setting.

The tag is a hash of everything the answer depends on, each read *before* the search (an answer
computed after a write it may or may not include is then tagged as before the write, and the next
request, seeing the write's stamp, gets a new tag; read after, a stale answer could carry a fresh tag):

- the collection: the live version, the place it is served from, and its write state (`VectorIndex.state`:
  on a server the stamp every writer leaves, another process's ingest job included);
- the model that built it (a reindex or a rollback switches both);
- visrec's version and the service's settings (a restart with other settings or code);
- the request: its path and query, and which key it came with (read, write or none: a cached answer
  is never good for another key);
- for a decayed ranking, the time bucket its ages are measured from (`scoring.bucket`).

A revalidation is answered before routing (`Revalidation`, a pure ASGI layer inside the guard, so keys,
rate limits and body limits apply as to any request): FastAPI's routing, validation and dependencies
cost a 304 more than the tag does. It answers 304 only for a tag this process sent with a 200 and that
the request, tagged now, still has: the tag covers everything the answer depends on, so the same request
would be that 200 again. Anything else (a tag sent before a restart, `*`, a request that cannot be
tagged) goes to the route, which answers as it always has.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from fastapi import Request, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from visrec import __version__
from visrec.config import Settings
from visrec.live import Live
from visrec.rules import Rules
from visrec.scoring import bucket

NOT_MODIFIED = 304
# Tags of 200 answers `Revalidation` remembers (about 160 bytes each, 10 MB in all): past that, the least
# recently revalidated go to the route again.
REMEMBERED = 65_536


def settings_tag(settings: Settings) -> str:
    """What the service's settings and code add to every tag (keys are masked in the dump: the key a
    request came with is its own part)."""
    return hashlib.sha256(f"{__version__}\n{settings.model_dump_json()}".encode()).hexdigest()


def _key_kind(request: Request, settings: Settings) -> str:
    given = request.headers.get("x-api-key", "").encode()
    for kind, key in (("read", settings.api.api_key), ("write", settings.api.write_key)):
        if key is not None and hmac.compare_digest(given, key.get_secret_value().encode()):
            return kind
    return "none"


def etag(request: Request, settings: Settings, live: Live, rules: Rules | None = None) -> str:
    """The answer's tag (strong: the same tag, the same bytes); read before the answer is computed."""
    model = live.embedder.manifest.model_version if live.embedder is not None else "-"
    now = time.time()
    buckets = [f"{field}@{bucket(now, scale)}" for field, scale in (rules.decays if rules else {}).items()]
    parts: Iterable[str] = (
        request.app.state.settings_tag,
        live.collection,
        live.index.place,
        live.index.state(),
        model,
        request.url.path,
        request.url.query,
        _key_kind(request, settings),
        *buckets,
    )
    return '"' + hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32] + '"'


def headers(settings: Settings, tag: str) -> dict[str, str]:
    """ETag, Cache-Control and Vary of an answer (200 or 304). With a read key the answer is private
    unless `api.cache_holds_key` says the shared cache keys on the key."""
    api = settings.api
    found = {"ETag": tag, "Cache-Control": api.cache_control}
    if api.api_key is not None:
        found["Vary"] = "X-API-Key"
        if not api.cache_holds_key and "private" not in api.cache_control:
            found["Cache-Control"] = f"private, {api.cache_control}"
    return found


def named(request: Request) -> list[str]:
    """The tags If-None-Match names (weak comparison, as RFC 9110 has it for GET: `W/` dropped). `*`
    names none: it would hold only if the answer exists, which only the search knows (a deleted product,
    a rule on an unknown field: a 304 there would pass a stale page off as current)."""
    given = request.headers.get("if-none-match")
    if not given:
        return []
    return [part.strip().removeprefix("W/") for part in given.split(",")]


def matches(request: Request, tag: str) -> bool:
    """Whether If-None-Match names `tag` (`named`)."""
    return tag in named(request)


def not_modified(settings: Settings, tag: str) -> Response:
    """The 304 for `tag`: no body, the headers its 200 had."""
    return Response(status_code=NOT_MODIFIED, headers=headers(settings, tag))


def cached(
    request: Request, settings: Settings, live: Live, rules: Rules | None = None
) -> tuple[str, Response | None]:
    """The answer's tag, and the 304 to send instead of it when the request names that tag (None:
    compute the answer, and send `headers` with it)."""
    tag = etag(request, settings, live, rules)
    if matches(request, tag):
        return tag, not_modified(settings, tag)
    return tag, None


class Revalidation:
    """The pure ASGI layer that answers a GET's If-None-Match before routing (the module's docstring
    says when). It remembers the tag of every 200 a cacheable route (one whose schema lists a 304) sends
    through it, with that route (the guard's metrics label the 304 by it, as if routed)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.sent: OrderedDict[str, Any] = OrderedDict()  # tag → route; touched on the event loop only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "GET":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        if any(tag in self.sent for tag in named(request)):  # else no tag to compute: the route's
            # The loop's executor, not anyio's pool the routes' work runs in: it never waits behind searches.
            tag = await asyncio.get_running_loop().run_in_executor(None, _tag_now, request)
            if tag is not None and tag in self.sent and matches(request, tag):
                self.sent.move_to_end(tag)
                scope["route"] = self.sent[tag]
                await not_modified(request.app.state.service.settings, tag)(scope, receive, send)
                return
        await self.app(scope, receive, self._noting(scope, send))

    def _noting(self, scope: Scope, send: Send) -> Send:
        """`send`, remembering the tag of a cacheable route's 200."""

        async def noting(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 200:
                route = scope.get("route")
                tag = next((v for k, v in message.get("headers", []) if k.lower() == b"etag"), None)
                if tag is not None and NOT_MODIFIED in getattr(route, "responses", {}):
                    self.sent[tag.decode("latin-1")] = route
                    self.sent.move_to_end(tag.decode("latin-1"))  # sent again: the newest
                    if len(self.sent) > REMEMBERED:
                        self.sent.popitem(last=False)
            await send(message)

        return noting


def _tag_now(request: Request) -> str | None:
    """The tag the route would give `request` now (in a worker thread: opening the live version, or a
    server's write stamp, may wait on the store), or None when it cannot be told here: the route then
    answers (a 503, a 422, ...) as it would without this layer. Only a decay adds to what the tag reads
    of the query (its bucket), so only the decays are parsed, as the route parses them."""
    service = request.app.state.service
    try:
        decays = request.query_params.getlist("decay")
        rules = Rules(decay=decays) if decays else None
        with service.reading() as live:
            return etag(request, service.settings, live, rules)
    except Exception:  # whatever it is, the route meets it too and answers it
        return None
