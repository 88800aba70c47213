"""Fixtures of the fault suite (issue #7); its helpers are in helpers.py.

The store under test is the embedded engine on a temp folder, or the Qdrant server at
`VISREC_QDRANT__URL` when that is set (one throw-away collection per test): the same cases run on both.
The loopback servers here stand in for a broken Qdrant server, which cannot run on this machine.
"""

from __future__ import annotations

import http.server
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from tests.faults.helpers import SERVER_URL, Answer503, TcpProxy
from tests.helpers import small_settings
from visrec.artefact import Manifest
from visrec.config import QdrantSettings, Settings


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


@pytest.fixture
def answers_503() -> Iterator[http.server.ThreadingHTTPServer]:
    """A loopback HTTP server answering 503 to everything: a Qdrant server that is up but failing.
    (A stand-in: no Qdrant server runs here.) `.hits` counts the requests it answered."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer503)
    server.hits = 0  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    """A TcpProxy in front of the Qdrant server at VISREC_QDRANT__URL (no target without one)."""
    target = httpx.URL(SERVER_URL) if SERVER_URL and SERVER_URL.startswith("http") else None
    tcp = TcpProxy((target.host, target.port or 80) if target else None)
    yield tcp
    tcp.close()
