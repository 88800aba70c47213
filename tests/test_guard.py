"""The guard (visrec/guard.py) alone, in front of a tiny ASGI app: no model, no store, milliseconds a
test. The API's own tests (test_api.py, test_api_write_routes.py, tests/faults/) drive it through the
real app and a real server; these pin each of its checks to its edge (the key, the write key, the
failed-authentication throttle, the rate limit, the body limits and deadlines, load shedding, the
routing path), fast enough for the mutation run (scripts/mutation.sh) to run them for every mutant."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from visrec.guard import (
    Guard,
    GuardSettings,
    Message,
    RateLimiter,
    Receive,
    Scope,
    Send,
    _client,
    _has_body,
    _header,
    _is,
    _request_id,
    routing_path,
)
from visrec.slots import BUSY, Slots

READ, WRITE = b"read-key", b"write-key"
SETTINGS = GuardSettings(
    api_key=None,
    write_key=None,
    open_paths=frozenset({"/healthz"}),
    upload_path="/search/image",
    max_upload_bytes=1000,
    max_body_bytes=100,
    body_timeout_s=5.0,
    request_timeout_s=5.0,
    retry_after_s=7,
    auth_failure_per_s=0.001,  # no token comes back within a test
    auth_failure_burst=2,
    is_write=lambda method, path: method == "PUT" and path.startswith("/products/"),
)


@dataclass
class Answer:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    seen: dict[str, Any] = field(default_factory=dict)  # what the app saw: its path, the body it read

    @property
    def detail(self) -> str:
        return str(json.loads(self.body)["detail"])


async def echo(scope: Scope, receive: Receive, send: Send) -> None:
    """An app that reads the whole body, then answers 200 with what it saw."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body", False):
            break
    seen = json.dumps({"path": scope["path"], "body": len(body)}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"x-request-id", b"app's")]})
    await send({"type": "http.response.body", "body": seen})


def call(
    guard: Guard,
    path: str = "/products/p1",
    *,
    method: str = "GET",
    key: bytes | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
    chunks: list[bytes] | None = None,
    client: str = "203.0.113.7",
    raw_path: bytes | None = None,
    stall: float = 0.0,
) -> Answer:
    """One request through `guard`: its body sent as `chunks` (more_body on all but the last), after
    `stall` seconds before the last one."""
    sent: list[Message] = []
    pending = list(chunks or [b""])
    heads = list(headers or []) + ([(b"x-api-key", key)] if key is not None else [])
    scope: Scope = {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": raw_path if raw_path is not None else path.encode(),
        "headers": heads,
        "client": (client, 5000),
    }

    async def receive() -> Message:
        if not pending:
            await asyncio.sleep(3600)  # a client that sent everything and waits
        if len(pending) == 1 and stall:
            await asyncio.sleep(stall)
        chunk = pending.pop(0)
        if not pending:  # the last: `more_body` left out, as ASGI allows (it defaults to False)
            return {"type": "http.request", "body": chunk}
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(guard(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    answer = Answer(int(start["status"]), dict(start.get("headers", [])), body)
    if answer.status == 200:
        answer.seen = json.loads(body)
    return answer


def guard(
    app: Callable[[Scope, Receive, Send], Any] = echo, slots: Slots | None = None, **changes: Any
) -> Guard:
    return Guard(app, replace(SETTINGS, **changes), CollectorRegistry(), slots or Slots(2, 2, 1.0))


def test_no_key_configured_lets_everything_in() -> None:
    g = guard()
    assert call(g).status == 200
    assert call(g, key=b"anything").status == 200


def test_the_read_key_is_checked_everywhere_but_the_open_paths() -> None:
    g = guard(api_key=READ, auth_failure_burst=100)
    assert call(g).status == 401 and call(g).detail == "missing or wrong X-API-Key"
    assert call(g, key=b"read-kex").status == 401
    assert call(g, key=b"read-key ").status == 401  # compared as bytes, whole
    assert call(g, key=b"").status == 401
    assert call(g, key=READ).status == 200
    assert call(g, "/healthz").status == 200  # an open path needs no key


def test_the_write_key_is_admitted_where_the_read_key_is() -> None:
    g = guard(api_key=READ, write_key=WRITE, auth_failure_burst=100)
    assert call(g, key=WRITE).status == 200
    assert call(g, key=READ).status == 200
    assert call(g, key=b"other").status == 401
    only_write = guard(write_key=WRITE, auth_failure_burst=100)  # no read key: reads are open
    assert call(only_write).status == 200 and call(only_write, key=b"other").status == 200


def test_wrong_keys_are_throttled_per_client_then_429_with_retry_after() -> None:
    g = guard(api_key=READ)  # a burst of 2 failed authentications
    assert [call(g, key=b"guess").status for _ in range(3)] == [401, 401, 429]
    limited = call(g, key=b"guess")
    assert limited.status == 429 and limited.detail == "too many failed authentications; retry later"
    assert limited.headers[b"retry-after"] == b"1000"  # a token back in 1/0.001 s, not the default 7
    assert call(g, key=READ).status == 200  # the right key still passes
    assert call(g, key=b"guess", client="198.51.100.1").status == 401  # another client: its own bucket
    assert call(g, "/healthz", key=b"guess").status == 200  # the probes are never throttled


def test_wrong_write_keys_are_throttled_on_write_routes_whichever_keys_are_set() -> None:
    """With only a write key, a PUT with a wrong key reaches the route (which answers 403) until its
    client has no failed-authentication token left: then 429 here. Reads and the right key are never
    throttled; nor is a write route where no write key is set (the route refuses every write)."""
    g = guard(write_key=WRITE)

    def put(g: Guard, key: bytes) -> int:
        return call(g, "/products/p1", method="PUT", key=key).status

    assert [put(g, b"guess") for _ in range(3)] == [200, 200, 429]
    assert call(g, key=b"guess").status == 200  # a read: no write key needed
    assert put(g, WRITE) == 200
    both = guard(api_key=READ, write_key=WRITE)
    assert [put(both, READ) for _ in range(4)] == [200] * 4  # the read key is no guess
    none = guard()
    assert [put(none, b"guess") for _ in range(4)] == [200] * 4


def test_a_declared_length_is_checked_before_the_body_is_read() -> None:
    g = guard()
    ok = call(g, method="POST", headers=[(b"content-length", b"100")], chunks=[b"x" * 100])
    assert ok.status == 200 and ok.seen["body"] == 100
    big = call(g, method="POST", headers=[(b"content-length", b"101")], chunks=[b"x" * 101])
    assert big.status == 413 and big.detail.startswith("body larger than 100 bytes (")
    assert big.headers[b"connection"] == b"close"
    for junk in (b"ten", b"-1", b"1e3", b" 5", b"9" * 19):
        answer = call(g, method="POST", headers=[(b"content-length", junk)])
        assert answer.status == 400, junk
        assert answer.detail == "Content-Length is not a number of bytes"
    assert call(g, method="POST", headers=[(b"content-length", b"0" * 18)]).status == 200  # 18 digits: 0


def test_the_upload_route_has_its_own_limit() -> None:
    """The upload's limit is the photo's plus 64 KiB of multipart framing; every other route has the
    body limit, whatever its length."""
    limit = 1000 + 64 * 1024
    fits = call(guard(), "/search/image", method="POST", headers=[(b"content-length", str(limit).encode())])
    assert fits.status == 200
    over = call(
        guard(), "/search/image", method="POST", headers=[(b"content-length", str(limit + 1).encode())]
    )
    assert over.status == 413 and over.detail.startswith(f"body larger than {limit} bytes (")
    assert call(guard(), method="POST", chunks=[b"x" * 101]).status == 413


def test_a_body_is_counted_as_it_arrives() -> None:
    """No length declared (chunked): cut off at the first byte past the limit, whatever the chunks."""
    chunked = [(b"transfer-encoding", b"chunked")]
    fits = call(guard(), method="POST", headers=chunked, chunks=[b"x" * 50, b"x" * 50])
    assert fits.status == 200 and fits.seen["body"] == 100
    assert b"connection" not in fits.headers  # the body was read to its end: the connection may go on
    over = call(guard(), method="POST", headers=chunked, chunks=[b"x" * 50, b"x" * 50, b"x"])
    assert over.status == 413 and over.detail.startswith("body larger than 100 bytes (")
    assert over.headers[b"connection"] == b"close"


def test_a_slow_body_is_cut_at_its_deadline() -> None:
    slow = call(guard(body_timeout_s=0.2), method="POST", chunks=[b"x", b"y"], stall=0.6)
    assert slow.status == 408 and slow.detail == "the body took longer than 0.2 s"
    assert slow.headers[b"connection"] == b"close"
    assert call(guard(body_timeout_s=2.0), method="POST", chunks=[b"x", b"y"], stall=0.1).status == 200


def test_the_rate_limit_keys_on_the_client_and_spares_the_probes() -> None:
    g = guard(rate_per_s=0.001, rate_burst=2)
    assert [call(g).status for _ in range(3)] == [200, 200, 429]
    limited = call(g)
    assert limited.detail == "over 0.001 requests a second; retry shortly"
    assert limited.headers[b"retry-after"] == b"1000"
    assert call(g, client="198.51.100.1").status == 200
    assert call(g, "/healthz").status == 200
    assert [call(guard()).status for _ in range(30)] == [200] * 30  # no rate limit set: none applies


def test_heavy_routes_are_shed_when_their_slots_are_full() -> None:
    full = Slots(1, 0, 0.0)
    full.taken = 1  # the one slot is taken and nobody may wait
    g = guard(slots=full)
    for path in ("/search/image", "/recommend", "/products/p1/similar", "/products/a/images/2"):
        shed = call(g, path, method="POST" if "/products/" not in path else "GET")
        assert shed.status == 503 and shed.detail == BUSY, path
        assert shed.headers[b"retry-after"] == b"7"
    assert call(g, "/products/p1").status == 200  # not heavy
    assert call(guard(), "/products/p1/similar").status == 200  # slots free


def test_a_request_past_its_deadline_is_answered_503() -> None:
    async def slow(scope: Scope, receive: Receive, send: Send) -> None:
        await asyncio.sleep(5)

    late = call(guard(slow, request_timeout_s=0.1))
    assert late.status == 503 and late.detail == "the request took longer than 0.1 s"
    # A write whose route never took it (its body still coming, say): nothing of it was done.
    write = call(guard(slow, request_timeout_s=0.1), "/products/p1", method="PUT")
    assert write.status == 503 and write.detail.endswith("nothing of the write was done: retry it")

    async def taken(scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["state"]["write_admission"].take()  # as the write routes do before writing
        await asyncio.sleep(5)

    write = call(guard(taken, request_timeout_s=0.1), "/products/p1", method="PUT")
    assert write.status == 503 and "the write goes on and will be applied unless it fails" in write.detail


def test_an_app_failure_is_a_500_with_the_request_id() -> None:
    async def broken(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("a bug")

    answer = call(guard(broken), headers=[(b"x-request-id", b"abc-1")])
    assert answer.status == 500 and json.loads(answer.body)["request_id"] == "abc-1"
    assert answer.headers[b"x-request-id"] == b"abc-1"


def test_every_answer_carries_the_request_id() -> None:
    ok = call(guard(), headers=[(b"x-request-id", b"abc-1")])
    assert ok.headers[b"x-request-id"] == b"abc-1"  # the app's own is replaced
    refused = call(guard(api_key=READ), headers=[(b"x-request-id", b"abc-2")])
    assert refused.headers[b"x-request-id"] == b"abc-2" and json.loads(refused.body)["request_id"] == "abc-2"


def test_the_routing_path_keeps_encoded_slashes_apart() -> None:
    answer = call(guard(), "/products/a/b/similar", raw_path=b"/products/a%2Fb/similar")
    assert answer.seen["path"] == "/products/a%2Fb/similar"

    def path(raw: bytes) -> str:
        return routing_path({"path": "from-server", "raw_path": raw})

    assert path(b"/products/a%2Fb") == "/products/a%2Fb"
    assert path(b"/products/a%2fb") == "/products/a%2Fb"
    assert path(b"/products/50%25") == "/products/50%25"
    assert path(b"/products/x/similar%0A") == "/products/x/similar%0A"
    assert path(b"/products/caf%C3%A9") == "/products/café"
    assert path(b"/products/a%20b") == "/products/a b"
    assert path(b"/products/%E9") == "/products/\ufffd"  # not UTF-8: replaced, never an error
    assert routing_path({"path": "/plain", "raw_path": b""}) == "/plain"
    assert routing_path({"path": "/plain"}) == "/plain"


def test_has_body() -> None:
    def scope(*headers: tuple[bytes, bytes]) -> Scope:
        return {"headers": list(headers)}

    assert not _has_body(scope())
    assert not _has_body(scope((b"content-length", b"0")))
    assert not _has_body(scope((b"content-length", b" 0 ")))
    assert _has_body(scope((b"content-length", b"1")))
    assert _has_body(scope((b"transfer-encoding", b"chunked")))
    assert _has_body(scope((b"Transfer-Encoding", b"chunked")))


def test_the_key_comparison() -> None:
    def scope(key: bytes | None) -> Scope:
        return {"headers": [] if key is None else [(b"X-Api-Key", key)]}

    assert _is(scope(READ), READ)
    assert not _is(scope(READ), None)  # no key configured matches nothing
    assert not _is(scope(None), READ)
    assert not _is(scope(b""), READ)
    assert not _is(scope(READ + b"x"), READ)
    assert _header({"headers": [(b"a", b"1"), (b"A", b"2")]}, b"a") == b"1"  # the first one
    assert _header({"headers": [(b"a", b"1")]}, b"b") is None


def test_the_request_id() -> None:
    def request_id(given: bytes) -> str:
        return _request_id({"headers": [(b"x-request-id", given)]})

    assert request_id(b"abc-1.x_Y") == "abc-1.x_Y"
    assert request_id(b"a" * 64) == "a" * 64
    for junk in (b"a" * 65, b"a b", b"a\nb", b""):
        made = request_id(junk)
        assert made != junk.decode("latin-1") and len(made) == 32, junk
    assert _request_id({"headers": []}) != _request_id({"headers": []})


def test_clients_by_address() -> None:
    assert _client({"client": ("203.0.113.7", 1)}) == b"203.0.113.7"
    assert _client({"client": ("::ffff:203.0.113.7", 1)}) == b"203.0.113.7"
    assert _client({"client": ("2001:db8:1:2::1", 1)}) == b"2001:db8:1:2::/64"
    assert _client({"client": ("testclient", 1)}) == b"testclient"  # no address: the name, as given
    assert _client({}) == b"" and _client({"client": None}) == b""


def test_the_token_bucket() -> None:
    limiter = RateLimiter(per_s=2, burst=3)
    assert [limiter.wait_s(b"a", 0.0) for _ in range(4)] == [0.0, 0.0, 0.0, 0.5]
    assert limiter.wait_s(b"a", 0.25) == 0.25  # half a token back: the other half in 0.25 s
    assert limiter.wait_s(b"a", 0.5) == 0.0  # a whole one: taken
    assert limiter.wait_s(b"a", 0.5) == 0.5
    assert limiter.wait_s(b"a", 100.0) == 0.0  # refilled, but never past the burst
    assert [limiter.wait_s(b"a", 100.0) for _ in range(3)] == [0.0, 0.0, 0.5]
    assert limiter.wait_s(b"b", 0.0) == 0.0  # each caller its own bucket


def test_the_token_bucket_forgets_the_least_recent_caller() -> None:
    limiter = RateLimiter(per_s=0.001, burst=1)
    limiter.MAX_CALLERS = 2
    assert limiter.wait_s(b"a", 0.0) == 0.0
    assert limiter.wait_s(b"b", 0.0) == 0.0
    assert limiter.wait_s(b"a", 0.0) > 0  # a used again: b is now the least recent
    assert limiter.wait_s(b"c", 0.0) == 0.0  # b forgotten
    assert list(limiter._buckets) == [b"a", b"c"]
    assert limiter.wait_s(b"a", 0.0) > 0  # a remembered, still without a token


@pytest.mark.parametrize("method", ["GET", "BREW"])
def test_metrics_label_methods_from_a_fixed_set(method: str) -> None:
    registry = CollectorRegistry()
    g = Guard(echo, SETTINGS, registry, Slots(2, 2, 1.0))
    call(g, method=method)
    label = method if method == "GET" else "OTHER"
    assert (
        registry.get_sample_value(
            "visrec_requests_total", {"method": label, "route": "unmatched", "status": "200"}
        )
        == 1.0
    )


def test_an_answer_before_the_whole_body_closes_the_connection() -> None:
    """An app that answers after the first chunk of a longer body: the rest is never read, so the answer
    says `Connection: close` (the server would otherwise read, and drop, the rest to reach a next one)."""

    async def early(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    chunked = [(b"transfer-encoding", b"chunked")]
    answer = call(guard(early), method="POST", headers=chunked, chunks=[b"x", b"y"])
    assert answer.status == 200 and answer.headers[b"connection"] == b"close"
    whole = call(guard(early), method="POST", headers=[(b"content-length", b"1")], chunks=[b"x"])
    assert whole.status == 200 and b"connection" not in whole.headers


def test_once_the_body_is_in_the_body_deadline_no_longer_applies() -> None:
    """What an app waits for after the body (a disconnect, while it streams an answer) is no body: only
    the request's deadline bounds it, not the body's."""

    async def waits(scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body"):
            pass
        await receive()  # the client sent everything: this waits for a disconnect

    answer = call(guard(waits, body_timeout_s=0.1, request_timeout_s=0.6), method="POST", chunks=[b"x"])
    assert answer.status == 503 and answer.detail == "the request took longer than 0.6 s"


def test_a_missing_key_is_never_a_key() -> None:
    """No X-API-Key header is no key at all, whatever the keys are (not some stand-in value)."""
    assert not _is({"headers": []}, b"XXXX")
    assert call(guard(api_key=b"XXXX")).status == 401
