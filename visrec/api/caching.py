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
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Iterable

from fastapi import Request, Response

from visrec import __version__
from visrec.config import Settings
from visrec.live import Live
from visrec.rules import Rules
from visrec.scoring import bucket

NOT_MODIFIED = 304


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


def matches(request: Request, tag: str) -> bool:
    """Whether If-None-Match names `tag` (weak comparison, as RFC 9110 has it for GET). `*` names none:
    it would be true only if the answer exists, which only the search knows (a deleted product, a rule
    on an unknown field: a 304 there would pass a stale page off as current)."""
    given = request.headers.get("if-none-match")
    if not given:
        return False
    return tag in [part.strip().removeprefix("W/") for part in given.split(",")]


def cached(
    request: Request, settings: Settings, live: Live, rules: Rules | None = None
) -> tuple[str, Response | None]:
    """The answer's tag, and the 304 to send instead of it when the request names that tag (None:
    compute the answer, and send `headers` with it)."""
    tag = etag(request, settings, live, rules)
    if matches(request, tag):
        return tag, Response(status_code=NOT_MODIFIED, headers=headers(settings, tag))
    return tag, None
