"""Fixtures of the fault suite (issue #7).

The store under test is the embedded engine on a temp folder, or the Qdrant server at
`VISREC_QDRANT__URL` when that is set (one throw-away collection per test): the same cases run on both.
The loopback servers here stand in for a broken Qdrant server, which cannot run on this machine.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import httpx
import pytest
import torch
from pydantic import SecretStr

from tests.conftest import small_settings
from visrec.artefact import Manifest
from visrec.catalogue import read_catalogue
from visrec.config import QdrantSettings, Settings
from visrec.embed import Embedder
from visrec.images import ImageLimits
from visrec.index import open_index
from visrec.ingest import SyncSummary, sync

SERVER_URL = os.environ.get("VISREC_QDRANT__URL") or None
SEED = int(os.environ.get("VISREC_FAULTS_SEED", "0"))


def figure(name: str, value: object) -> None:
    """Print one figure of the closing note (read them with `pytest -s tests/faults`)."""
    print(f"\nFIGURE {name}: {json.dumps(value, sort_keys=True, default=str)}")


def sync_in_process(catalogue: Path, settings: Settings) -> SyncSummary:
    """One `visrec sync`, in this process, with the settings' own limits and batch size."""
    with open_index(settings.qdrant) as index:
        return sync(
            read_catalogue(catalogue, settings.ingest),
            index,
            Embedder(settings.artefact, torch.device("cpu")),
            limits=ImageLimits.from_settings(settings.ingest),
            batch_size=settings.embed.batch_size,
            workers=settings.embed.workers,
            failure_report=settings.ingest.failure_report,
            max_delete=settings.ingest.max_delete,
        )


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a `visrec` process use exactly these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VISREC_")}
    q = settings.qdrant
    env |= {
        "VISREC_ARTEFACT": str(settings.artefact),
        "VISREC_QDRANT__PATH": str(q.path),
        "VISREC_QDRANT__COLLECTION": q.collection,
        "VISREC_QDRANT__RETRIES": str(q.retries),
        "VISREC_QDRANT__TIMEOUT_S": str(q.timeout_s),
        "VISREC_QDRANT__LOCK_WAIT_S": str(q.lock_wait_s),
        "VISREC_EMBED__DEVICE": "cpu",
        "VISREC_EMBED__WORKERS": str(settings.embed.workers),
        "VISREC_EMBED__BATCH_SIZE": str(settings.embed.batch_size),
        "VISREC_INGEST__FAILURE_REPORT": str(settings.ingest.failure_report),
        "COLUMNS": "200",  # rich wraps log lines at the terminal width
    }
    if q.url:
        env["VISREC_QDRANT__URL"] = q.url
    if q.api_key:
        env["VISREC_QDRANT__API_KEY"] = q.api_key.get_secret_value()
    return env


@pytest.fixture
def store(tmp_path: Path, artefact: tuple[Path, Manifest]) -> Iterator[Settings]:
    """Small settings on a fresh store: the embedded engine, or a new collection on the server at
    VISREC_QDRANT__URL (dropped afterwards)."""
    settings = small_settings(tmp_path, artefact=artefact[0])
    if not SERVER_URL:
        yield settings
        return
    if not SERVER_URL.startswith(("http://", "https://")):
        pytest.skip("the fault suite needs a store shared between processes: an http(s) VISREC_QDRANT__URL")
    qdrant = QdrantSettings(
        url=SERVER_URL,
        api_key=SecretStr(key) if (key := os.environ.get("VISREC_QDRANT__API_KEY")) else None,
        collection=f"faults_{uuid.uuid4().hex[:12]}",
        retries=3,
    )
    yield settings.model_copy(update={"qdrant": qdrant})
    key = qdrant.api_key.get_secret_value() if qdrant.api_key else ""
    headers = {"api-key": key}
    listed = httpx.get(f"{SERVER_URL}/collections", headers=headers, timeout=30).json()["result"]
    for collection in listed["collections"]:  # the versions behind the alias: `<name>__v<n>`
        if collection["name"].startswith(qdrant.collection):
            httpx.delete(f"{SERVER_URL}/collections/{collection['name']}", headers=headers, timeout=30)


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Answer503(http.server.BaseHTTPRequestHandler):
    def _fail(self) -> None:
        self.server.hits += 1  # type: ignore[attr-defined]  # before answering: the client may check at once
        length = int(self.headers.get("content-length") or 0)
        self.rfile.read(length)
        body = b'{"status":{"error":"Service Unavailable"}}'
        self.send_response(503)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _fail

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base's name
        pass


@pytest.fixture
def answers_503() -> Iterator[http.server.ThreadingHTTPServer]:
    """A loopback HTTP server answering 503 to everything: a Qdrant server that is up but failing.
    (A stand-in: no Qdrant server runs here.) `.hits` counts the requests it answered."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answer503)
    server.hits = 0  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


Mode = Literal["pass", "drop", "stall"]


class TcpProxy:
    """A loopback TCP proxy in front of `target` (host, port) that can be switched, at any moment, to
    drop every connection (accept, then close) or stall it (accept, never answer). Switching cuts the
    connections already open, so a client's keep-alive pool cannot bypass the fault."""

    def __init__(self, target: tuple[str, int] | None, mode: Mode = "pass") -> None:
        self.target, self.mode = target, mode
        self.accepted = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def switch(self, mode: Mode) -> None:
        with self._lock:
            self.mode = mode
            for conn in self._open:
                _shut(conn)
            self._open.clear()

    def close(self) -> None:
        self._closed = True
        self.switch("drop")
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            with self._lock:
                mode = self.mode
                if mode == "drop":
                    _shut(client)
                    continue
                self._open.add(client)
            if mode == "pass":
                threading.Thread(target=self._forward, args=(client,), daemon=True).start()
            # "stall": kept open and never answered, until a switch or close cuts it

    def _forward(self, client: socket.socket) -> None:
        assert self.target is not None, "pass mode needs a target"
        try:
            upstream = socket.create_connection(self.target, timeout=10)
        except OSError:
            _shut(client)
            return
        with self._lock:
            self._open.add(upstream)
        threading.Thread(target=_pump, args=(upstream, client), daemon=True).start()
        _pump(client, upstream)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        _shut(src)
        _shut(dst)


def _shut(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed by the other side
        conn.shutdown(socket.SHUT_RDWR)
    conn.close()


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    """A TcpProxy in front of the Qdrant server at VISREC_QDRANT__URL (no target without one)."""
    target = httpx.URL(SERVER_URL) if SERVER_URL and SERVER_URL.startswith("http") else None
    tcp = TcpProxy((target.host, target.port or 80) if target else None)
    yield tcp
    tcp.close()


def wait_until(condition: Callable[[], object], timeout_s: float = 30) -> None:
    """Poll `condition()` until it is true; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)
