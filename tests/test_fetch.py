"""visrec.fetch against real loopback servers on allowed hosts: redirects, size limits, deadlines,
retries, the circuit breaker, one client across pickling, forking and threads, no cookies, and TLS.

Refusals of non-public addresses are in test_fetch_refusals.py, URL checks in test_urls.py; the servers
are in fetch_servers.py.
"""

from __future__ import annotations

import pickle
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.fetch_servers import LOOPBACK, Handler, fails, ok, raw_server, serve
from visrec import fetch as fetch_module
from visrec.fetch import Fetcher


@pytest.mark.parametrize("allowed", [LOOPBACK, ("127.0.0.0/8",)])
def test_an_allowed_host_is_fetched(fetcher: Callable[..., Fetcher], allowed: tuple[str, ...]) -> None:
    f = fetcher(allowed_hosts=allowed)
    with serve(ok(b"\x89PNG bytes")) as server:
        assert f.fetch(server.url(), 100) == b"\x89PNG bytes"
        assert f.fetch(server.url(), 100) == b"\x89PNG bytes"  # the pooled client again
        assert server.paths == ["/x.jpg", "/x.jpg"]


def test_redirects_are_followed_up_to_the_limit(fetcher: Callable[..., Fetcher]) -> None:
    def chain(h: Handler) -> None:
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

    def respond(h: Handler) -> None:
        h.reply(302, headers={"Location": locations[h.path]} if locations[h.path] else {})

    f = fetcher(allowed_hosts=LOOPBACK)
    with serve(respond) as server:
        assert "refused: scheme 'file' is not http or https" in fails(f, server.url("/scheme"))
        assert "redirect to an invalid Location 'http://[::1'" in fails(f, server.url("/bad"))
        assert fails(f, server.url("/none")).endswith(": HTTP 302")


def test_size_limit(fetcher: Callable[..., Fetcher]) -> None:
    def respond(h: Handler) -> None:
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
    def drip(h: Handler) -> None:
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

    def trickle_then_stall(h: Handler) -> None:
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
    def respond(h: Handler) -> None:
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
    def respond(h: Handler) -> None:
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

    def respond(h: Handler) -> None:
        cookies.append(h.headers.get("Cookie"))
        h.reply(200, b"ok", {"Set-Cookie": "session=abc; Path=/"})

    with serve(respond) as server:
        f.fetch(server.url(), 10)
        f.fetch(server.url(), 10)
    assert cookies == [None, None]


@pytest.mark.skipif(
    shutil.which("openssl") is None,
    reason="needs the openssl command to make a certificate (Debian's openssl: scripts/test.sh installs it "
    "when run as root)",
)
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
