"""Loopback HTTP servers for the image-fetch tests (test_fetch*.py), and how they check a fetch's failure.

Every server runs in this process on 127.0.0.1 or 127.0.0.2 and stops with its test; loopback is
non-public, so tests that should succeed allow it explicitly (LOOPBACK).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from visrec.errors import ImageError
from visrec.fetch import Fetcher

LOOPBACK = ("127.0.0.1",)
Respond = Callable[["Handler"], None]


class Server(ThreadingHTTPServer):
    """A loopback HTTP server whose GETs `respond` answers; it records every request in `hits`."""

    daemon_threads = True

    def __init__(self, host: str, respond: Respond) -> None:
        super().__init__((host, 0), Handler)
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


class Handler(BaseHTTPRequestHandler):
    server: Server

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
def serve(respond: Respond, host: str = "127.0.0.1") -> Iterator[Server]:
    """A `Server` on `host` in a thread, stopped (and its handlers told to stop) on exit."""
    server = Server(host, respond)
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


def fails(f: Fetcher, url: str, max_bytes: int = 1_000_000) -> str:
    """The message of the ImageError that fetching `url` raises."""
    with pytest.raises(ImageError) as info:
        f.fetch(url, max_bytes)
    return str(info.value)


def ok(body: bytes = b"image") -> Respond:
    """Answer 200 with `body`."""
    return lambda h: h.reply(200, body)
