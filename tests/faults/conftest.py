"""Fixtures of the fault suite (issue #7); its helpers are in helpers.py.

The store under test is the embedded engine on a temp folder, or the Qdrant server at
`VISREC_QDRANT__URL` when that is set (one throw-away collection per test): the same cases run on both.
The loopback servers here stand in for a broken Qdrant server, which cannot run on this machine.
`guarded` is a real `visrec serve` process for the hostile-client tests (test_api_limits.py,
test_api_exposure.py), one per module that uses it.
"""

from __future__ import annotations

import http.server
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from pydantic import SecretStr

from tests.faults.helpers import SERVER_URL, Answer503, CountingServer, TcpProxy
from tests.faults.served import (
    BIG_IMAGE,
    BODY_TIMEOUT_S,
    HEAVY,
    KEY,
    QUEUE_WAIT_S,
    UPLOAD_LIMIT,
    ImageHost,
    Served,
    red_photo,
    serve,
    synced_store,
)
from tests.helpers import small_settings
from visrec.artefact import Manifest
from visrec.config import QdrantSettings, Settings
from visrec.index import open_index
from visrec.index.points import IndexPoint


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
def answers_503() -> Iterator[CountingServer]:
    """A loopback HTTP server answering 503 to everything: a Qdrant server that is up but failing.
    (A stand-in: no Qdrant server runs here.) `.hits` counts the requests it answered."""
    server = CountingServer(("127.0.0.1", 0), Answer503)
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


@pytest.fixture(scope="module")
def image_host() -> Iterator[str]:
    """A loopback image host (ImageHost) for the remote photos of `guarded`; yields its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ImageHost)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def guarded(
    tmp_path_factory: pytest.TempPathFactory, artefact: tuple[Path, Manifest], image_host: str
) -> Iterator[Served]:
    """The API with a key, a 1 MB upload limit, a 2 s body deadline and 4 heavy slots (a queue of 4 for
    0.25 s), on 27 products and
    three more whose photos are remote (on the loopback image host): one plain, one behind a redirect,
    one redirected to a host that is not allowed."""
    root = tmp_path_factory.mktemp("hostile")
    settings = synced_store(root, artefact[0])
    with open_index(settings.qdrant) as index:
        found = index.get("p0")
        assert found is not None
        vector = np.asarray(found[0], np.float32)
        index.upsert(
            [
                IndexPoint(
                    f"remote-{name}",
                    vector,
                    {"product_id": f"remote-{name}", "image": f"{image_host}/{path}"},
                )
                for name, path in (("ok", "ok.png"), ("redirect", "redirect"), ("away", "away"))
            ]
        )
        big = root / "big.png"  # a large photo: a PNG, then padding (only its header is checked)
        big.write_bytes(red_photo() + bytes(BIG_IMAGE - len(red_photo())))
        index.upsert([IndexPoint("big", vector, {"product_id": "big", "image": str(big)})])
    api: dict[str, Any] = {
        "max_upload_bytes": UPLOAD_LIMIT,
        "body_timeout_s": BODY_TIMEOUT_S,
        "max_heavy_requests": HEAVY,
        "queue_depth": HEAVY,
        "queue_wait_s": QUEUE_WAIT_S,
        "auth_failure_burst": 1000,  # its tests send wrong keys on purpose, many of them
    }
    env = {"VISREC_INGEST__ALLOWED_HOSTS": '["127.0.0.1"]'}
    with serve(settings, root / "serve.log", key=KEY, env=env, **api) as server:
        yield server
