"""visrec.fetch against real loopback servers: SSRF refusals, limits, retries, the circuit breaker.

Every server runs in this process on 127.0.0.1 or 127.0.0.2 and stops with its test; loopback is
non-public, so tests that should succeed allow it explicitly.
"""

from __future__ import annotations

import ipaddress
import pickle
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpcore
import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from visrec import connect, urls
from visrec import fetch as fetch_module
from visrec.config import IngestSettings
from visrec.errors import ImageError
from visrec.fetch import Fetcher
from visrec.urls import FetchPolicy, check_url

LOOPBACK = ("127.0.0.1",)
Respond = Callable[["_Handler"], None]


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, respond: Respond) -> None:
        super().__init__((host, 0), _Handler)
        self.respond = respond
        self.hits: list[tuple[float, str]] = []  # (monotonic time, path) of every request
        self.stop = threading.Event()
        self.state: dict[str, Any] = {}

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def url(self, path: str = "/x.jpg") -> str:
        return f"http://{self.server_address[0]!s}:{self.port}{path}"

    @property
    def paths(self) -> list[str]:
        return [path for _, path in self.hits]


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        self.server.hits.append((time.monotonic(), self.path))
        self.server.respond(self)

    def reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # quiet test output
        pass


@contextmanager
def serve(respond: Respond, host: str = "127.0.0.1") -> Iterator[_Server]:
    server = _Server(host, respond)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


@contextmanager
def raw_server(payload: bytes) -> Iterator[tuple[str, list[int]]]:
    """A TCP server answering every connection with `payload` (after reading the request), then closing;
    yields its URL and a one-item list counting connections."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    count = [0]
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            count[0] += 1
            with conn:
                conn.settimeout(2)
                try:
                    data = b""
                    while b"\r\n\r\n" not in data and len(data) < 65536:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                    conn.sendall(payload)
                except OSError:
                    pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/x.jpg", count
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def closed_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@pytest.fixture
def fetcher() -> Iterator[Callable[..., Fetcher]]:
    made: list[Fetcher] = []

    def make(**policy: Any) -> Fetcher:
        made.append(Fetcher(FetchPolicy(**policy)))
        return made[-1]

    yield make
    for f in made:
        f.close()


def fails(f: Fetcher, url: str, max_bytes: int = 1_000_000) -> str:
    """The message of the ImageError that fetching `url` raises."""
    with pytest.raises(ImageError) as info:
        f.fetch(url, max_bytes)
    return str(info.value)


def ok(body: bytes = b"image") -> Respond:
    return lambda h: h.reply(200, body)


# --- refusals: nothing is sent to a non-public address ------------------------------------------------


def test_loopback_ip_is_refused_and_never_contacted(fetcher: Callable[..., Fetcher]) -> None:
    f = fetcher()
    with serve(ok()) as server:
        live = fails(f, server.url())
        dead_port = closed_port()
        dead = fails(f, f"http://127.0.0.1:{dead_port}/x.jpg")
        assert server.hits == []
    assert live == (
        f"{server.url()}: refused: 127.0.0.1 resolves to a non-public address "
        "(allow it with VISREC_INGEST__ALLOWED_HOSTS)"
    )
    # Nothing tells a listening port from a closed one.
    assert live.replace(str(server.port), "PORT") == dead.replace(str(dead_port), "PORT")


def test_a_name_resolving_to_loopback_is_refused_at_connect_time(fetcher: Callable[..., Fetcher]) -> None:
    with serve(ok()) as server:
        dead_port = closed_port()
        f = fetcher(allowed_ports=(server.port, dead_port))  # so that only the address is in question
        url = f"http://localhost:{server.port}/x.jpg"
        assert check_url(url, f.policy) is None  # a name: only the connection check can refuse it
        live = fails(f, url)
        dead = fails(f, f"http://localhost:{dead_port}/x.jpg")
        assert server.hits == []
    assert "refused: localhost resolves to a non-public address" in live
    assert live.replace(str(server.port), "PORT") == dead.replace(str(dead_port), "PORT")


@pytest.mark.parametrize("target", ["127.0.0.1", "localhost"])
def test_a_redirect_from_an_allowed_host_to_an_internal_one_is_refused(
    fetcher: Callable[..., Fetcher], target: str
) -> None:
    with serve(ok()) as internal:
        f = fetcher(allowed_hosts=("127.0.0.2",), allowed_ports=(internal.port,))
        location = f"http://{target}:{internal.port}/secret"
        with serve(lambda h: h.reply(302, headers={"Location": location}), host="127.0.0.2") as allowed:
            message = fails(f, allowed.url())
            assert len(allowed.hits) == 1
        assert internal.hits == []
    assert f"redirected to {location}): refused: {target} resolves to a non-public address" in message


def test_the_connection_guard_is_installed() -> None:
    """Fails loudly if httpx stops keeping its pool where `_GuardedTransport` replaces it."""
    assert type(httpx.HTTPTransport()._pool) is httpcore.ConnectionPool
    backend = connect.GuardedBackend(FetchPolicy())
    transport = connect.GuardedTransport(backend)
    assert transport._pool._network_backend is backend
    with pytest.raises(connect.Refused):
        backend.connect_tcp("127.0.0.1", closed_port())


def test_credentials_in_urls_are_refused_and_not_echoed(fetcher: Callable[..., Fetcher]) -> None:
    message = fails(fetcher(allowed_hosts=LOOPBACK), "http://shop:hunter2@127.0.0.1/x.jpg")
    assert "user:password@" in message and "hunter2" not in message and "***@127.0.0.1" in message


# --- check_url ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://[::1", "not a valid URL"),
        ("http://" + "a" * 64 + ".com/x.jpg", "is not valid"),
        ("http://exa\x00mple.com/x", "control character (U+0000)"),
        ("http://exa mple.com", "is not valid"),
        ("http://exa\tmple.com", "control character (U+0009)"),
        ("http://bü\u200bcher.de/", "not a valid URL"),
        ("ftp://x/y", "scheme 'ftp' is not http or https"),
        ("//example.com/x.jpg", "no http:// or https://"),
        ("http:///x.jpg", "no host name"),
        ("http://example.com:22/x", "port 22 is not allowed"),
        ("http://example.com:99999/x", "port 99999 is out of range"),
        ("http://169.254.169.254/latest/meta-data", "169.254.169.254 resolves to a non-public address"),
        ("http://[::ffff:127.0.0.1]/", "resolves to a non-public address"),
        ("http://[::1]/", "resolves to a non-public address"),
        ("http://[fe80::1%25eth0]/", "zone identifiers"),
        ("http://0x7f000001/", "resolves to a non-public address"),
        ("http://2130706433/", "resolves to a non-public address"),
        ("http://127.1/", "resolves to a non-public address"),
        ("http://10.0.0.1/", "resolves to a non-public address"),
        ("http://100.64.0.1/", "resolves to a non-public address"),
        ("http://[64:ff9b::a00:1]/", "resolves to a non-public address"),  # NAT64 of 10.0.0.1
        ("http://1.2.3.4.5/", "neither a valid name nor an IPv4 address"),
        ("http://u:p@example.com/", "user:password@"),
        ("http://example.com/" + "a" * 9000, "longer than 8192 characters"),
        ("HTTP://EXAMPLE.COM/a.jpg", None),
        ("https://images.example.com/a b.jpg?size=large", None),
        ("http://bücher.de/x.jpg", None),
        ("http://8.8.8.8/x.jpg", None),
        ("http://[64:ff9b::808:808]/x.jpg", None),  # NAT64 of 8.8.8.8
        ("http://example.com./x.jpg", None),
        ("https://example.com:443/x.jpg", None),
    ],
)
def test_check_url(url: str, reason: str | None) -> None:
    got = check_url(url, FetchPolicy())
    assert got is None if reason is None else got is not None and reason in got, got


def test_check_url_allowed_hosts() -> None:
    policy = FetchPolicy(allowed_hosts=("images.internal", "10.20.0.0/16", "bücher.de"))
    assert check_url("http://images.internal:8080/x.jpg", policy) is None  # any port for listed names
    assert check_url("http://10.20.3.4:9000/x.jpg", policy) is None
    assert check_url("http://[::ffff:10.20.3.4]/x.jpg", policy) is None
    assert check_url("http://xn--bcher-kva.de:8443/x.jpg", policy) is None
    assert "non-public" in (check_url("http://10.21.0.1/x.jpg", policy) or "")
    assert "port 8080" in (check_url("http://other.example:8080/x.jpg", policy) or "")


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_check_url_never_raises_on_any_text(text: str) -> None:
    assert isinstance(check_url(text, FetchPolicy()), str | None)


_HOSTS = st.one_of(
    st.sampled_from(
        [
            "example.com",
            "127.0.0.1",
            "[::1]",
            "[::ffff:10.0.0.1]",
            "0x7f000001",
            "2130706433",
            "0177.0.0.1",
            "169.254.169.254",
            "[fe80::1%25eth0]",
            "bücher.de",
            "[::1",
            "localhost",
            "",
        ]
    ),
    st.from_regex(r"[a-zA-Z0-9.\-_\[\]:%@x]{0,24}", fullmatch=True),
    st.text(max_size=24),
)
_URLS = st.builds(
    lambda scheme, userinfo, host, port, path: f"{scheme}{userinfo}{host}{port}{path}",
    st.sampled_from(["http://", "https://", "HTTP://", "ftp://", "file://", "//", "", "http:"]),
    st.sampled_from(["", "user@", "u:p@", "@"]),
    _HOSTS,
    st.one_of(st.just(""), st.integers(-5, 70_000).map(":{}".format), st.text(max_size=6).map(":".__add__)),
    st.one_of(st.just(""), st.text(max_size=30).map("/".__add__)),
)


@settings(max_examples=400, deadline=None)
@given(_URLS)
def test_check_url_on_url_like_strings(url: str) -> None:
    reason = check_url(url, FetchPolicy())
    assert reason is None or isinstance(reason, str)
    if reason is None:  # what passes is a plain http(s) URL on an allowed port, never a non-public literal
        parsed = httpx.URL(url)
        assert parsed.scheme in ("http", "https") and parsed.host and not parsed.userinfo
        assert (parsed.port or {"http": 80, "https": 443}[parsed.scheme]) in (80, 443)
        host = parsed.raw_host.decode().rstrip(".")
        literal = urls._numeric_ipv4(host) if ":" not in host else ipaddress.ip_address(host)
        assert literal is None or urls.is_public(literal)


# --- fetching from an allowed host --------------------------------------------------------------------


@pytest.mark.parametrize("allowed", [LOOPBACK, ("127.0.0.0/8",)])
def test_an_allowed_host_is_fetched(fetcher: Callable[..., Fetcher], allowed: tuple[str, ...]) -> None:
    f = fetcher(allowed_hosts=allowed)
    with serve(ok(b"\x89PNG bytes")) as server:
        assert f.fetch(server.url(), 100) == b"\x89PNG bytes"
        assert f.fetch(server.url(), 100) == b"\x89PNG bytes"  # the pooled client again
        assert server.paths == ["/x.jpg", "/x.jpg"]


def test_redirects_are_followed_up_to_the_limit(fetcher: Callable[..., Fetcher]) -> None:
    def chain(h: _Handler) -> None:
        left = int(h.path.rsplit("/", 1)[1])
        if left:
            h.reply(302, headers={"Location": f"../{left - 1}"})  # relative: resolved against this hop
        else:
            h.reply(200, b"end")

    f = fetcher(allowed_hosts=LOOPBACK, max_redirects=5)
    with serve(chain) as server:
        assert f.fetch(server.url("/hop/5"), 100) == b"end"
        assert server.paths == ["/hop/5", "/4", "/3", "/2", "/1", "/0"]
        server.hits.clear()
        assert "too many redirects (more than 5)" in fails(f, server.url("/hop/6"))
        assert len(server.hits) == 6


def test_bad_redirects(fetcher: Callable[..., Fetcher]) -> None:
    locations = {"/scheme": "file:///etc/passwd", "/bad": "http://[::1", "/none": ""}

    def respond(h: _Handler) -> None:
        h.reply(302, headers={"Location": locations[h.path]} if locations[h.path] else {})

    f = fetcher(allowed_hosts=LOOPBACK)
    with serve(respond) as server:
        assert "refused: scheme 'file' is not http or https" in fails(f, server.url("/scheme"))
        assert "redirect to an invalid Location 'http://[::1'" in fails(f, server.url("/bad"))
        assert fails(f, server.url("/none")).endswith(": HTTP 302")


def test_size_limit(fetcher: Callable[..., Fetcher]) -> None:
    def respond(h: _Handler) -> None:
        if h.path == "/declared":
            h.reply(200, b"x" * 200)
        else:  # no Content-Length: the body ends when the connection closes (HTTP/1.0)
            h.send_response(200)
            h.end_headers()
            h.wfile.write(b"x" * 200)

    f = fetcher(allowed_hosts=LOOPBACK)
    with serve(respond) as server:
        assert "larger than 100 bytes (Content-Length: 200)" in fails(f, server.url("/declared"), 100)
        assert "larger than 100 bytes" in fails(f, server.url("/streamed"), 100)
        assert f.fetch(server.url("/streamed"), 200) == b"x" * 200


def test_a_drip_feeding_server_is_cut_off_at_the_deadline(fetcher: Callable[..., Fetcher]) -> None:
    def drip(h: _Handler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", "1000000")
        h.end_headers()
        for _ in range(100):  # bounded: 20 s at most, and it stops when the test ends or the client leaves
            if h.server.stop.wait(0.2):
                return
            try:
                h.wfile.write(b"x")
                h.wfile.flush()
            except OSError:
                return

    f = fetcher(allowed_hosts=LOOPBACK, timeout_s=1.5)
    with serve(drip) as server:
        start = time.monotonic()
        message = fails(f, server.url())
        took = time.monotonic() - start
    assert message.endswith("took longer than 1.5 s")
    assert 1.4 < took < 3


def test_a_server_that_stalls_after_a_trickle_is_cut_off_at_the_deadline(
    fetcher: Callable[..., Fetcher],
) -> None:
    """A read that starts just before the deadline still ends at it (not a whole timeout later)."""

    def trickle_then_stall(h: _Handler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", "1000")
        h.end_headers()
        for _ in range(6):  # 1.2 s of bytes, then silence until the test ends
            if h.server.stop.wait(0.2):
                return
            h.wfile.write(b"x")
            h.wfile.flush()
        h.server.stop.wait(10)

    f = fetcher(allowed_hosts=LOOPBACK, timeout_s=1.5)
    with serve(trickle_then_stall) as server:
        start = time.monotonic()
        message = fails(f, server.url())
        took = time.monotonic() - start
    assert message.endswith("took longer than 1.5 s")
    assert took < 2.2


def test_a_server_that_never_answers_is_cut_off_at_the_deadline(fetcher: Callable[..., Fetcher]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:  # connections queue, nobody answers
        f = fetcher(allowed_hosts=LOOPBACK, timeout_s=1)
        start = time.monotonic()
        message = fails(f, f"http://127.0.0.1:{listener.getsockname()[1]}/x.jpg")
        assert message.endswith("took longer than 1 s") and time.monotonic() - start < 2


def test_retry_after_is_honoured(fetcher: Callable[..., Fetcher]) -> None:
    def respond(h: _Handler) -> None:
        if len(h.server.hits) == 1:
            h.reply(503, headers={"Retry-After": "1"})
        else:
            h.reply(200, b"later")

    f = fetcher(allowed_hosts=LOOPBACK, timeout_s=5)
    with serve(respond) as server:
        assert f.fetch(server.url(), 100) == b"later"
        (first, _), (second, _) = server.hits
    assert second - first >= 1.0


def test_retry_after_past_the_deadline_gives_up_at_once(fetcher: Callable[..., Fetcher]) -> None:
    f = fetcher(allowed_hosts=LOOPBACK, timeout_s=2)
    with serve(lambda h: h.reply(429, headers={"Retry-After": "3600"})) as server:
        start = time.monotonic()
        message = fails(f, server.url())
        assert time.monotonic() - start < 1 and len(server.hits) == 1
    assert "HTTP 429; no time left to retry within the 2 s deadline, the server asked for 3600 s" in message


def test_retry_after_values() -> None:
    assert fetch_module._retry_after("120") == 120
    assert fetch_module._retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0  # in the past: now
    assert (fetch_module._retry_after("Fri, 01 Jan 2100 00:00:00 GMT") or 0) > 1e9
    assert fetch_module._retry_after("soon") is None
    assert fetch_module._retry_after(None) is None


def test_client_errors_are_not_retried_server_errors_are(fetcher: Callable[..., Fetcher]) -> None:
    f = fetcher(allowed_hosts=LOOPBACK, retries=3)
    with serve(lambda h: h.reply(404 if h.path == "/missing" else 500)) as server:
        assert fails(f, server.url("/missing")) == f"{server.url('/missing')}: HTTP 404"
        assert len(server.hits) == 1
        assert fails(f, server.url("/broken")) == f"{server.url('/broken')}: HTTP 500 (3 attempts)"
        assert len(server.hits) == 4


@pytest.mark.parametrize(
    "payload",
    [
        b"garbage\r\n\r\n",
        b"",  # the connection closes without an answer
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nxx",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n",
        b"HTTP/1.1 302 Found\r\nLocation: http://[::1\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 302 Found\r\nLocation: \xff\xfe\x00\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 4\r\n\r\nnope",
    ],
)
def test_whatever_the_server_sends_only_image_errors_come_back(
    fetcher: Callable[..., Fetcher], payload: bytes
) -> None:
    f = fetcher(allowed_hosts=LOOPBACK, retries=2, timeout_s=5)
    with raw_server(payload) as (url, connections):
        message = fails(f, url)
        assert message.startswith(url) and 1 <= connections[0] <= 2


def test_circuit_breaker(fetcher: Callable[..., Fetcher]) -> None:
    f = fetcher(allowed_hosts=LOOPBACK, retries=3, host_failures=2, host_cooldown_s=0.5, timeout_s=5)
    with serve(lambda h: h.reply(h.server.state.get("status", 500), b"ok")) as server:
        host = f"127.0.0.1:{server.port}"
        for _ in range(2):
            assert "HTTP 500 (3 attempts)" in fails(f, server.url())
        assert len(server.hits) == 6  # retries x host_failures
        skipped = fails(f, server.url())
        assert f"skipped: host {host} failed 2 times in a row; retrying it after" in skipped
        assert len(server.hits) == 6
        time.sleep(0.6)
        assert fails(f, server.url()).endswith("HTTP 500")  # the half-open trial: one request, no retries
        assert len(server.hits) == 7
        assert "skipped: host" in fails(f, server.url())  # the trial failed: open again
        server.state["status"] = 200
        time.sleep(0.6)
        assert f.fetch(server.url(), 100) == b"ok"  # a successful trial closes the circuit
        assert f.fetch(server.url(), 100) == b"ok"
        assert len(server.hits) == 9


def test_answers_and_refusals_do_not_open_the_circuit(fetcher: Callable[..., Fetcher]) -> None:
    def respond(h: _Handler) -> None:
        if h.path == "/away":
            h.reply(302, headers={"Location": "http://localhost/x.jpg"})
        else:
            h.reply(404)

    f = fetcher(allowed_hosts=("127.0.0.2",), host_failures=1, host_cooldown_s=60)
    with serve(respond, host="127.0.0.2") as server:
        for _ in range(3):
            assert fails(f, server.url("/missing")).endswith("HTTP 404")
            assert "refused: localhost resolves" in fails(f, server.url("/away"))
        assert len(server.hits) == 6


def test_a_fetcher_pickles_without_its_client_and_works_after(fetcher: Callable[..., Fetcher]) -> None:
    f = fetcher(allowed_hosts=LOOPBACK, host_failures=1)
    with serve(lambda h: h.reply(200 if h.path == "/good" else 500, b"ok")) as server:
        assert f.fetch(server.url("/good"), 10) == b"ok"
        assert "HTTP 500" in fails(f, server.url("/bad"))  # opens the host's circuit here
        copy: Fetcher = pickle.loads(pickle.dumps(f))
        try:
            assert copy.policy == f.policy
            assert copy.fetch(server.url("/good"), 10) == b"ok"  # fresh breaker state, own client
        finally:
            copy.close()


def test_a_forked_process_gets_its_own_client(fetcher: Callable[..., Fetcher]) -> None:
    f = fetcher(allowed_hosts=LOOPBACK)
    with serve(ok()) as server:
        assert f.fetch(server.url(), 10) == b"image"
        parent_client = f._client()[0]
        f._pid = -1  # what a fork looks like from inside: os.getpid() changed
        assert f._client()[0] is not parent_client
        assert f.fetch(server.url(), 10) == b"image"


def test_concurrent_fetches_share_one_fetcher(fetcher: Callable[..., Fetcher]) -> None:
    f = fetcher(allowed_hosts=LOOPBACK)
    with serve(lambda h: h.reply(200, h.path.encode())) as server, ThreadPoolExecutor(8) as pool:
        bodies = list(pool.map(lambda i: f.fetch(server.url(f"/{i}"), 100), range(40)))
        assert bodies == [f"/{i}".encode() for i in range(40)]


def test_no_cookies_are_kept(fetcher: Callable[..., Fetcher]) -> None:
    f = fetcher(allowed_hosts=LOOPBACK)
    cookies: list[str | None] = []

    def respond(h: _Handler) -> None:
        cookies.append(h.headers.get("Cookie"))
        h.reply(200, b"ok", {"Set-Cookie": "session=abc; Path=/"})

    with serve(respond) as server:
        f.fetch(server.url(), 10)
        f.fetch(server.url(), 10)
    assert cookies == [None, None]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls_is_verified_against_the_url_host_name(fetcher: Callable[..., Fetcher], tmp_path: Path) -> None:
    """The connection goes to the checked IP literal, but TLS still sends (and verifies) the URL's name."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"]
        + ["-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    names: list[str | None] = []
    context.sni_callback = lambda sock, name, ctx: names.append(name)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(5)

        def handshake() -> None:
            try:
                conn, _ = listener.accept()
                with context.wrap_socket(conn, server_side=True):
                    pass
            except OSError:  # the client refuses our self-signed certificate mid-handshake
                pass

        thread = threading.Thread(target=handshake, daemon=True)
        thread.start()
        f = fetcher(allowed_hosts=("localhost",), retries=1, timeout_s=5)
        message = fails(f, f"https://localhost:{listener.getsockname()[1]}/x.jpg")
        thread.join(5)
    assert names == ["localhost"]
    assert "CERTIFICATE_VERIFY_FAILED" in message


def test_policy_from_settings() -> None:
    ingest = IngestSettings(
        allowed_hosts=["Images.Internal.", "10.0.0.0/8"],
        allowed_ports=[80, 443, 8443],
        fetch_timeout_s=4,
        fetch_retries=2,
        max_redirects=3,
        host_failures=7,
        host_cooldown_s=30,
    )
    policy = FetchPolicy.from_settings(ingest)
    assert policy == FetchPolicy(4, 2, ("images.internal", "10.0.0.0/8"), (80, 443, 8443), 3, 7, 30)
    assert check_url("http://images.internal:1234/x.jpg", policy) is None
