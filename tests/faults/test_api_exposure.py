"""What a hostile client can reach or learn from a real `visrec serve` (a process: real uvicorn, the guard,
the tiny real model, a real embedded store), all on loopback: non-ASCII keys, server paths or tracebacks
in bodies, redirects from the image route, junk methods in the metrics' labels; and `visrec serve`
refusing to listen beyond loopback without a key.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from typer.testing import CliRunner

from tests.faults.served import Served, client_for, error_body, leaks, raw_request
from visrec.api import check_exposure
from visrec.cli import app as cli
from visrec.config import ApiSettings
from visrec.errors import VisrecError
from visrec.guard import METHODS

# --- auth, leaks, redirects, metrics ----------------------------------------------------------------------


@pytest.mark.parametrize("key", ["ключ".encode(), b"\xff\xfe", b"hostile-key\xff", "héllo".encode("latin-1")])
def test_a_non_ascii_api_key_is_401_never_500(guarded: Served, key: bytes) -> None:
    """Fault: X-API-Key values that are not ASCII (UTF-8 Cyrillic, raw 0xff bytes, the right key plus a
    byte), sent on a raw socket. visrec: the key is compared as bytes. Checked: 401 with a JSON body."""
    for path in ("/products/p1", "/search/image", "/metrics"):
        answer = raw_request(guarded, "GET", path, [("X-API-Key", key)], send_key=False)
        assert answer.status == 401, (path, key, answer)
        error_body(answer, guarded)


def test_no_answer_shows_a_server_path_or_a_traceback(guarded: Served) -> None:
    """Fault: a round of awkward requests to every route: unknown and path-like ids, broken uploads, bad
    JSON, NaN filters, a wrong key, unknown paths and methods. Checked: no body contains the server's
    paths (the repository, the virtual environment, the store, the model) or a traceback; every error
    body is {detail, error?, request_id}."""
    bodies = 0
    with client_for(guarded) as http, httpx.Client(base_url=guarded.url, timeout=15) as anonymous:
        requests: list[tuple[httpx.Client, str, str, dict[str, Any]]] = [
            (http, "GET", "/products/nope", {}),
            (http, "GET", "/products/..%2F..%2Fetc%2Fpasswd", {}),
            (http, "GET", "/products/p1/similar", {"params": {"price_min": "nan"}}),
            (http, "GET", "/products/p1/similar", {"params": {"k": 10_000}}),
            (http, "GET", "/products", {"params": {"after": "not-a-uuid"}}),
            (http, "GET", "/products/nope/image", {}),
            (http, "GET", "/products/remote-away/image", {}),
            (
                http,
                "POST",
                "/search/image",
                {"files": {"image": ("x.png", b"\x89PNG\r\n\x1a\n" + bytes(100), "image/png")}},
            ),
            (
                http,
                "POST",
                "/search/image",
                {"content": b"--zzz\r\n", "headers": {"content-type": "multipart/form-data; boundary=zzz"}},
            ),
            (
                http,
                "POST",
                "/recommend",
                {"content": b"{not json", "headers": {"content-type": "application/json"}},
            ),
            (http, "POST", "/recommend", {"json": {"positive": ["nope"]}}),
            (http, "DELETE", "/products/p1", {}),
            (http, "GET", "/nowhere", {}),
            (anonymous, "GET", "/products/p1", {}),
            (anonymous, "GET", "/openapi.json", {}),
            (anonymous, "GET", "/readyz", {}),
            (http, "GET", "/metrics", {}),
            (http, "GET", "/openapi.json", {}),
        ]
        for client, method, path, kwargs in requests:
            response = client.request(method, path, **kwargs)
            bodies += 1
            # 502: a remote photo its host did not deliver (here: a redirect to a host not allowed).
            expected = 502 if path == "/products/remote-away/image" else None
            assert response.status_code < 500 or response.status_code == expected, (path, response.text)
            assert not leaks(response.content, guarded), (path, leaks(response.content, guarded))
            if response.status_code >= 400:
                error_body(response, guarded)


def test_the_image_route_never_answers_a_redirect(guarded: Served) -> None:
    """Fault: products whose photo is remote: served plainly, behind a 302 to the same allowed host, and
    behind a 302 to a host that is not allowed. visrec: the image is fetched through the sync's guarded
    fetcher, which follows redirects itself, each hop checked; the caller never gets a redirect (it would
    carry the caller's key elsewhere). Checked: 200 with the image for the first two, 502 (no URL) for
    the third, and never a 3xx, on every product."""
    with client_for(guarded, follow_redirects=False) as http:
        ok = http.get("/products/remote-ok/image")
        assert ok.status_code == 200 and ok.headers["content-type"] == "image/png", ok.text
        hop = http.get("/products/remote-redirect/image")
        assert hop.status_code == 200 and hop.content == ok.content, hop.text
        away = http.get("/products/remote-away/image")
        assert away.status_code == 502 and "127.0.0" not in away.text, (away.status_code, away.text)
        error_body(away, guarded)
        for i in range(27):
            assert not 300 <= http.get(f"/products/p{i}/image").status_code < 400


def test_junk_methods_do_not_reach_the_metrics_labels(guarded: Served) -> None:
    """Fault: requests with made-up methods (FOOBAR, a long one, lower case) on a raw socket, and to
    unknown paths. visrec: the method label comes from a fixed set ("OTHER" for the rest), the route
    label is the route's template or "unmatched". Checked: /metrics lists no other method or route."""
    for method in ("FOOBAR", "X" * 200, "get", "PROPFIND"):
        answer = raw_request(guarded, method, "/products/p1")
        assert answer.status is not None and answer.status < 500, (method, answer)
    raw_request(guarded, "GET", "/no/such/" + "z" * 300)
    with client_for(guarded) as http:
        text = http.get("/metrics").text
        templates = {route for route in http.get("/openapi.json").json()["paths"]}
    methods = set(re.findall(r'visrec_requests_total\{[^}]*method="([^"]*)"', text))
    routes = set(re.findall(r'route="([^"]*)"', text))
    assert methods and methods <= METHODS | {"OTHER"}, methods
    assert "OTHER" in methods
    assert routes <= templates | {"unmatched", "/", "/openapi.json", "/docs", "/redoc"}, routes - templates


# --- exposure ---------------------------------------------------------------------------------------------


def test_serve_refuses_a_public_interface_without_a_key(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Fault: `visrec serve --host 0.0.0.0` with no API key. visrec: refuses before loading anything,
    one line, exit 2 (a configuration error). Checked: that, and that a key, --insecure or a loopback
    host lets it through (checked on check_exposure: nothing is bound beyond loopback here). While the
    command runs, the port it would use is held on 127.0.0.1, so that a failure to refuse could not
    listen on the network: it would fail to bind instead."""
    for name in ("VISREC_API__API_KEY", "VISREC_API__INSECURE", "VISREC_API__HOST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VISREC_QDRANT__PATH", str(tmp_path / "qdrant"))
    with socket.create_server(("127.0.0.1", 0)) as held:
        port = held.getsockname()[1]
        result = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0", "--port", str(port)])
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "without an API key" in lines[0], result.stderr
    for host in ("0.0.0.0", "::", "192.0.2.1", "example.com"):
        with pytest.raises(VisrecError):
            check_exposure(ApiSettings(host=host))
    for api in (
        ApiSettings(host="0.0.0.0", insecure=True),
        ApiSettings(host="0.0.0.0", api_key=SecretStr("k")),
        ApiSettings(host="127.0.0.1"),
        ApiSettings(host="::1"),
        ApiSettings(host="localhost"),
    ):
        check_exposure(api)  # no exception
