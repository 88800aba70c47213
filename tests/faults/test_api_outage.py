"""A real `visrec serve` (a process) started while another process holds its embedded store: it answers
503 fast, says nothing of where the store is, and recovers by itself once the store is free.

Figure (`pytest -s`): outage recovery.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.faults.helpers import figure
from tests.faults.served import client_for, error_body, leaks, red_photo, serve, synced_store
from visrec.artefact import Manifest
from visrec.index import open_index


def test_a_held_store_is_a_fast_503_and_the_service_recovers_by_itself(
    tmp_path_factory: pytest.TempPathFactory, artefact: tuple[Path, Manifest]
) -> None:
    """Fault: `visrec serve` starts while this process holds the embedded store (as a running sync
    would); later the store is released. visrec: the store is never waited for (one attempt per
    VISREC_API__ALIAS_CHECK_S, the others are told the last reason at once); 503 with Retry-After and a
    generic reason; then the next attempt after the release opens it. Checked: every route that needs
    the index answers 503 in under 0.5 s; /readyz 503 with a problem that names no path; no body shows the
    store's path; after the release, the first 200 comes within a few seconds without a restart;
    /healthz is 200 throughout."""
    root = tmp_path_factory.mktemp("outage")
    settings = synced_store(root, artefact[0], n=9)
    holder = open_index(settings.qdrant)
    health: list[int | str] = []
    stop = threading.Event()
    try:
        with serve(settings, root / "serve.log", ready=False) as server:

            def probe() -> None:
                with httpx.Client(base_url=server.url, timeout=5) as http:
                    for _ in range(3000):  # bounded: 60 s at most
                        if stop.is_set():
                            return
                        try:
                            health.append(http.get("/healthz").status_code)
                        except httpx.HTTPError as exc:
                            health.append(type(exc).__name__)
                        time.sleep(0.02)

            prober = threading.Thread(target=probe, daemon=True)
            prober.start()
            slowest = 0.0
            with client_for(server) as http:
                calls: list[tuple[str, str, dict[str, Any]]] = [
                    ("GET", "/products/p1", {}),
                    ("GET", "/products/p1/similar", {}),
                    ("GET", "/products", {}),
                    ("GET", "/products/p1/image", {}),
                    ("POST", "/recommend", {"json": {"positive": ["p1"]}}),
                    ("POST", "/search/image", {"files": {"image": ("q.png", red_photo(), "image/png")}}),
                ]
                for _ in range(4):  # across more than one alias_check_s: attempts and cached reasons
                    for method, path, kwargs in calls:
                        started = time.perf_counter()
                        response = http.request(method, path, **kwargs)
                        took = time.perf_counter() - started
                        slowest = max(slowest, took)
                        assert response.status_code == 503, (path, response.status_code, response.text)
                        assert response.headers.get("retry-after"), path
                        assert took < 0.5, (path, took)
                        body = error_body(response, server)
                        assert str(settings.qdrant.path) not in json.dumps(body)
                    ready = http.get("/readyz")
                    assert ready.status_code == 503 and not ready.json()["ready"], ready.text
                    assert ready.json()["problems"] and not leaks(ready.content, server), ready.text
                    assert not re.search(r"/[\w.-]+/", " ".join(ready.json()["problems"])), ready.text
                    time.sleep(0.4)
                holder.close()
                released = time.monotonic()
                recovered = None
                while time.monotonic() - released < 30:
                    response = http.get("/products/p1")
                    if response.status_code == 200:
                        recovered = time.monotonic() - released
                        break
                    assert response.status_code == 503, response.text
                    time.sleep(0.05)
                assert http.get("/readyz").status_code == 200
                assert http.get("/products/p1/similar").status_code == 200
            stop.set()
            prober.join(timeout=10)
            figure(
                "store_outage",
                {
                    "slowest_503_s": round(slowest, 3),
                    "recovered_after_release_s": None if recovered is None else round(recovered, 2),
                    "healthz_polls": len(health),
                    "healthz_not_200": sum(1 for h in health if h != 200),
                },
            )
            assert recovered is not None and recovered < 5, recovered
            assert health and all(h == 200 for h in health), Counter(map(str, health))
            assert "Traceback" not in server.log_text()
    finally:
        stop.set()
        holder.close()
