"""What every HTTP request passes before a route sees it: one pure ASGI layer, so that it sees the body
as it arrives and answers without a worker thread.

In order: a request id (the caller's `X-Request-ID` if it is a plain token, else a new one; echoed on
every answer and in every error body), the API key (compared as bytes, in constant time), the body limit
(the declared length first, then the bytes as they arrive, chunked or not: a 5 MB chunked upload against
a 1 MB limit is cut off at 1 MB, never spooled whole), a deadline for reading the body (slow uploads),
load shedding for the heavy routes (when their slots are taken and their queue is full: 503 with
Retry-After at once, before the body is read), a deadline for the whole request, and Prometheus metrics
whose labels come from fixed sets. Every answer leaves through here, a 500 included (a failure the app
did not handle is answered here, with its request id, counted and logged); one that starts before the
request's body was read closes the connection. Rate limits key on the client's address, never on what
the request says of itself; wrong keys are throttled per address.

Heavy work runs under `visrec.slots.Slots`, which count work from its start to its end, not waiting.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math
import re
import secrets
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from visrec.admission import Admission
from visrec.slots import BUSY, Slots

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger(__name__)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Routes whose work holds a thread for long: embedding, search, fetching a remote photo.
_HEAVY = re.compile(r"/search/image|/recommend|/products/.+/(similar|image|images/[^/]+)")
_CONVERTOR = re.compile(r"\{(\w+):\w+\}")  # "{product_id:path}" in a route's template


@dataclass(frozen=True)
class GuardSettings:
    api_key: bytes | None  # None: no key required (a deliberate, logged choice)
    write_key: bytes | None  # also admitted where the read key is; the write routes check it themselves
    open_paths: frozenset[str]  # answered without a key (probes, the gallery's page)
    upload_path: str  # the one route whose body may be an upload
    max_upload_bytes: int
    max_body_bytes: int  # every other route
    body_timeout_s: float  # reading the whole body
    request_timeout_s: float  # the whole request
    retry_after_s: int
    rate_per_s: float | None = None  # per client address; None: no rate limit
    rate_burst: int = 20
    auth_failure_per_s: float = 0.2  # failed authentications per client address (with a key)
    auth_failure_burst: int = 10
    # Whether (method, routing path) is a write route: it needs the write key, whichever keys are set.
    is_write: Callable[[str, str], bool] = lambda method, path: False


class _Refused(Exception):
    """The request is answered here: status and message (raised from inside `receive`)."""

    def __init__(self, status: int, detail: str, retry_after: int | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.retry_after = status, detail, retry_after


class RateLimiter:
    """A token bucket per caller: `per_s` requests a second on average, bursts of up to `burst`. Bounded
    in memory: past `MAX_CALLERS`, the callers seen least recently are forgotten."""

    MAX_CALLERS = 10_000

    def __init__(self, per_s: float, burst: int) -> None:
        self.per_s, self.burst = per_s, burst
        self._buckets: OrderedDict[bytes, tuple[float, float]] = OrderedDict()  # caller → (tokens, when)

    def wait_s(self, caller: bytes, now: float) -> float:
        """0 if `caller` may go now (a token is taken), else the seconds until it may."""
        tokens, last = self._buckets.pop(caller, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.per_s)
        wait = 0.0 if tokens >= 1 else (1 - tokens) / self.per_s
        self._buckets[caller] = (tokens - 1 if not wait else tokens, now)
        if len(self._buckets) > self.MAX_CALLERS:
            self._buckets.popitem(last=False)
        return wait


def _reader(slots: Slots, name: str) -> Callable[[], float]:
    return lambda: float(getattr(slots, name))


class Guard:
    """The ASGI middleware; `registry` holds its metrics (served by /metrics), `slots` the heavy slots
    (shared with the routes, which run their work through `Slots.run`)."""

    def __init__(
        self, app: ASGIApp, settings: GuardSettings, registry: CollectorRegistry, slots: Slots
    ) -> None:
        self.app, self.settings, self.slots = app, settings, slots
        rate = settings.rate_per_s
        self.limiter = RateLimiter(rate, settings.rate_burst) if rate else None
        self.failures = RateLimiter(settings.auth_failure_per_s, settings.auth_failure_burst)
        self.requests = Counter(
            "visrec_requests", "HTTP requests", ["method", "route", "status"], registry=registry
        )
        self.shed = Counter(
            "visrec_shed",
            "heavy requests answered 503 (slots taken, queue full or wait over)",
            registry=registry,
        )
        slots.on_refused = self.shed.inc
        for name, doc, read in (
            ("visrec_heavy_running", "heavy works running now (counted in their threads)", "running"),
            ("visrec_heavy_running_peak", "the most heavy works running at once since start", "peak"),
            ("visrec_heavy_slots_taken", "heavy slots taken (by requests or their running work)", "taken"),
            ("visrec_heavy_queued", "heavy requests waiting for a slot", "queued"),
        ):
            Gauge(name, doc, registry=registry).set_function(_reader(slots, read))
        self.latency = Histogram(
            "visrec_request_seconds",
            "HTTP request latency",
            ["route"],
            registry=registry,
            buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        scope["path"] = routing_path(scope)
        request_id = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        exchange = _Exchange(send, request_id, body_pending=_has_body(scope))
        admission = None
        if self.settings.is_write(scope["method"], scope["path"]):
            admission = scope["state"]["write_admission"] = Admission()  # taken by the write, if in time
        try:
            self._admit(scope)
            self._rate_limit(scope)
            if _HEAVY.fullmatch(scope["path"]) and self.slots.full():  # before reading any of the body
                self.shed.inc()
                raise _Refused(503, BUSY)
            limited = self._limited(scope, receive, exchange)
            left = self.settings.request_timeout_s - (time.perf_counter() - started)  # the queue counts
            await asyncio.wait_for(self.app(scope, limited, exchange.send), max(0.0, left))
        except _Refused as refused:
            exchange.refuse(refused)
        except TimeoutError:
            limit = self.settings.request_timeout_s
            late = f"the request took longer than {limit:g} s"
            if admission is not None and admission.give_up():
                late += "; nothing of the write was done: retry it"
            elif admission is not None:  # a write taken goes on to the end
                late += (
                    "; the write goes on and will be applied unless it fails (a photo that cannot be read) "
                    "or the service stops first: read the product to see it, or retry (writes are "
                    "idempotent; a retry says why it fails)"
                )
            exchange.refuse(_Refused(503, late))
        except Exception:  # a bug: answered here too, with the request id, counted, its cause logged
            log.exception("request %s failed", request_id)
            exchange.refuse(_Refused(500, "internal error; the request id is in the server's log"))
        await exchange.finish(self.settings.retry_after_s)
        route = _CONVERTOR.sub(r"{\1}", getattr(scope.get("route"), "path", "unmatched"))
        method = scope["method"] if scope["method"] in METHODS else "OTHER"
        self.requests.labels(method, route, str(exchange.status)).inc()
        self.latency.labels(route).observe(time.perf_counter() - started)

    def _admit(self, scope: Scope) -> None:
        """The keys and the declared body size, before anything is read. A missing or wrong key costs its
        client address a token of its failed-authentication bucket: key guessing is throttled (429),
        whatever the general rate limit, and the right key still works. The write key is guessed at the
        write routes whether or not a read key is set: those are throttled alike (the route itself then
        answers 403 to a key that is not the write key, and to the read key, which is no guess)."""
        s = self.settings
        if scope["path"] in s.open_paths:
            pass
        elif s.api_key is not None and not (_is(scope, s.api_key) or _is(scope, s.write_key)):
            self._failed_authentication(scope, 401, "missing or wrong X-API-Key")
        elif (
            s.write_key is not None
            and s.is_write(scope["method"], scope["path"])
            and not (_is(scope, s.write_key) or _is(scope, s.api_key))
        ):
            self._failed_authentication(scope, None, "")
        declared = _header(scope, b"content-length")
        if declared is not None:
            if not (declared.isdigit() and len(declared) < 19):
                raise _Refused(400, "Content-Length is not a number of bytes")
            if int(declared) > self._limit(scope):
                raise _Refused(413, self._too_large(scope))

    def _failed_authentication(self, scope: Scope, status: int | None, detail: str) -> None:
        """A token of the client's failed-authentication bucket: 429 when it has none left, else `status`
        (None: the route answers)."""
        wait = self.failures.wait_s(b"auth|" + _client(scope), time.monotonic())
        if wait:
            raise _Refused(429, "too many failed authentications; retry later", math.ceil(wait))
        if status is not None:
            raise _Refused(status, detail)

    def _rate_limit(self, scope: Scope) -> None:
        """429 with Retry-After for a client over the configured rate. The client is its address (an
        IPv6 one by its /64, what one host is given): never something the request says of itself, such
        as a header. With a key, only authenticated requests get here, and they all carry the one key."""
        if self.limiter is None or scope["path"] in self.settings.open_paths:
            return
        wait = self.limiter.wait_s(_client(scope), time.monotonic())
        if wait:
            detail = f"over {self.limiter.per_s:g} requests a second; retry shortly"
            raise _Refused(429, detail, math.ceil(wait))

    def _too_large(self, scope: Scope) -> str:
        setting = "MAX_UPLOAD_BYTES" if scope["path"] == self.settings.upload_path else "MAX_BODY_BYTES"
        return f"body larger than {self._limit(scope)} bytes (the service's VISREC_API__{setting})"

    def _limit(self, scope: Scope) -> int:
        s = self.settings
        return s.max_upload_bytes + 64 * 1024 if scope["path"] == s.upload_path else s.max_body_bytes

    def _limited(self, scope: Scope, receive: Receive, exchange: _Exchange) -> Receive:
        """`receive` counting the body's bytes as they arrive, within the body deadline."""
        limit, received, complete = self._limit(scope), 0, False
        deadline = time.monotonic() + self.settings.body_timeout_s

        async def limited() -> Message:
            nonlocal received, complete
            if complete:
                # The body is in. What an app still waits for (Starlette's file and streaming answers
                # wait for a disconnect while they send) is no body: the deadline cut a slow download
                # of a large photo at body_timeout_s. The request deadline still bounds it.
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                took = self.settings.body_timeout_s
                exchange.refusal = _Refused(408, f"the body took longer than {took:g} s")
                raise exchange.refusal from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exchange.refusal = _Refused(413, self._too_large(scope))
                    raise exchange.refusal
                complete = not message.get("more_body", False)
                exchange.body_pending = not complete
            return message

        return limited


class _Exchange:
    """The response side of one request: passes the app's answer through, unless the guard refused the
    request (then its own answer replaces whatever the app made of the refusal, e.g. a 400 for a body
    that stopped parsing), and adds the request id. An answer that starts while the request's body is
    still unread says `Connection: close`: the server then ends the connection after it instead of
    reading (and discarding) the rest of the body to reach a next request — a gigabyte after a 400."""

    def __init__(self, send: Send, request_id: str, body_pending: bool = False) -> None:
        self._send, self.request_id = send, request_id
        self.body_pending = body_pending  # the request has a body not yet read to its end
        self.refusal: _Refused | None = None
        self.started = False
        self.status = 500
        self._dropping = False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            if self.refusal is not None:  # the app answered a request the guard had already refused
                self._dropping = True
                return
            self.started, self.status = True, int(message["status"])
            headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
            headers.append((b"x-request-id", self.request_id.encode()))
            if self.body_pending and not any(k.lower() == b"connection" for k, _ in headers):
                headers.append((b"connection", b"close"))
            message = {**message, "headers": headers}
        elif self._dropping:
            return
        await self._send(message)

    def refuse(self, refusal: _Refused) -> None:
        self.refusal = refusal

    async def finish(self, retry_after_s: int) -> None:
        """Send the guard's own answer if the request was refused and nothing was sent yet."""
        if self.refusal is None or self.started:
            return
        self.started, self.status = True, self.refusal.status
        body = json.dumps({"detail": self.refusal.detail, "request_id": self.request_id}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", self.request_id.encode()),
        ]
        if self.refusal.status in (429, 503):
            wait = self.refusal.retry_after or retry_after_s
            headers.append((b"retry-after", str(wait).encode()))
        if self.body_pending or self.refusal.status in (408, 413):  # the rest of the body is not read
            headers.append((b"connection", b"close"))
        await self._send({"type": "http.response.start", "status": self.refusal.status, "headers": headers})
        await self._send({"type": "http.response.body", "body": body})


def _has_body(scope: Scope) -> bool:
    """Whether the request declares a body (a length above 0, or chunked)."""
    length = _header(scope, b"content-length")
    return _header(scope, b"transfer-encoding") is not None or (length is not None and length.strip() != b"0")


def routing_path(scope: Scope) -> str:
    """The path routes are matched on: the request's path as sent, each segment decoded but for an
    encoded '/', '%' or line feed, which stay encoded (%2F, %25, %0A). The server's own decoding (`path`)
    makes /products/a%2Fb/similar and /products/a/b/similar one path; this keeps a '/' inside an id apart
    from the path's own, and routes decode the id once (`api.deps.product_id_of`). A line feed stays
    encoded because route patterns are regular expressions whose `.` stops at it (an id holding one was
    a 404) and whose `$` matches before a final one (`/products/x/similar%0A` was similar-to "x")."""
    raw = scope.get("raw_path")
    if not raw:
        return str(scope["path"])
    return "/".join(
        unquote(segment, errors="replace").replace("%", "%25").replace("/", "%2F").replace("\n", "%0A")
        for segment in raw.decode("latin-1").split("/")
    )


def _client(scope: Scope) -> bytes:
    """Who a request comes from, for rate limits: its peer's address, an IPv6 one by its /64."""
    host = str((scope.get("client") or ("",))[0])
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host.encode()
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is None:
        return str(ipaddress.IPv6Network((address, 64), strict=False)).encode()
    return str(address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else address).encode()


def _is(scope: Scope, key: bytes | None) -> bool:
    """Whether the request's X-API-Key is `key` (compared in constant time; never a missing key)."""
    return key is not None and secrets.compare_digest(_header(scope, b"x-api-key") or b"", key)


def _header(scope: Scope, name: bytes) -> bytes | None:
    return next((value for key, value in scope["headers"] if key.lower() == name), None)


def _request_id(scope: Scope) -> str:
    given = (_header(scope, b"x-request-id") or b"").decode("latin-1")
    return given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
