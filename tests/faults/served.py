"""`visrec serve` as a real process on a loopback port, for the tests that act as hostile clients
(test_api_limits.py, test_api_outage.py, test_api_exposure.py, test_api_schema_fuzz.py): a real uvicorn,
the real guard, the real tiny model and a real embedded store, with nothing mocked. Also: raw-socket HTTP
(chunked and slow bodies, junk methods), which an HTTP client library would refuse to send or would hide,
and the leak check for answer bodies; and the settings of the `guarded` fixture's API (conftest.py), its
loopback image host, and the checks its tests share.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import select
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from tests.faults.helpers import Forked, settings_env, spawn_visrec
from tests.helpers import COLOURS, SHAPES, draw_product, run_sync, small_settings, write_csv
from visrec.config import Settings

REPO = Path(__file__).parents[2]
PRODUCTS = 27
START_TIMEOUT_S = 120.0  # Python + torch + the model on a loaded 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def synced_store(root: Path, artefact: Path, n: int = PRODUCTS) -> Settings:
    """Small settings on `root` whose embedded store holds `n` drawn products (3 shapes x 3 colours), ids
    p0…p{n-1}; their photos are under root/images."""
    rows = []
    for i in range(n):
        shape, colour = SHAPES[i % 3], list(COLOURS)[(i // 3) % 3]
        draw_product(root / "images" / f"p{i}.png", shape, colour, variant=i)
        rows.append(
            {"id": f"p{i}", "image": f"images/p{i}.png", "category": shape, "colour": colour, "price": 10 + i}
        )
    settings = small_settings(root, artefact=artefact)
    summary = run_sync(write_csv(root / "catalogue.csv", rows), settings)
    assert summary.added == n and not summary.failed, summary
    return settings


@dataclass
class Served:
    """A running `visrec serve`."""

    process: Forked
    port: int
    log: Path
    key: str | None = None
    host: str = "127.0.0.1"
    paths: list[str] = field(default_factory=list)  # server-side paths no answer may show

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"X-API-Key": self.key} if self.key else {}

    def status(self, name: str) -> int:
        """A `VmXXX` figure of /proc/PID/status, in KiB (VmRSS now, VmHWM the peak)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(f"{name}:"):
                return int(line.split()[1])
        raise KeyError(name)

    def reset_peak_rss(self) -> bool:
        """Reset VmHWM to the current RSS (Linux: `5` to clear_refs); False where that is not allowed."""
        try:
            Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def serve(
    settings: Settings,
    log: Path,
    *,
    ready: bool = True,
    key: str | None = None,
    env: dict[str, str] | None = None,
    **api: object,
) -> Iterator[Served]:
    """`python -m visrec serve` on a free loopback port with `settings`, `VISREC_API__<NAME>=value` for
    each of `api` and `env` on top; waits until /healthz answers (and /readyz says ready, with `ready`).
    Stopped on exit."""
    port = free_port()
    environ = settings_env(settings) | {"VISREC_API__HOST": "127.0.0.1", "VISREC_API__PORT": str(port)}
    environ |= {f"VISREC_API__{name.upper()}": str(value) for name, value in api.items()} | (env or {})
    if key:
        environ["VISREC_API__API_KEY"] = key
    # A real `visrec serve` process, forked from the fork server that has imported visrec and torch (the
    # Python and torch start saved: seconds). The working directory is the log's: no stray .env is read.
    process = spawn_visrec(environ, log, log.parent, "serve")
    served = Served(process, port, log, key, paths=_server_paths(settings))
    try:
        _wait_up(served, ready)
        yield served
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


def _wait_up(served: Served, ready: bool) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    path = "/readyz" if ready else "/healthz"
    with httpx.Client(base_url=served.url, timeout=2) as client:
        while time.monotonic() < deadline:
            assert served.process.poll() is None, f"visrec serve exited:\n{served.log_text()[-3000:]}"
            with contextlib.suppress(httpx.TransportError):
                if client.get(path).status_code == 200:
                    return
            time.sleep(0.1)
    raise AssertionError(f"visrec serve did not answer {path} in {START_TIMEOUT_S} s")


def _server_paths(settings: Settings) -> list[str]:
    """Server-side paths that no answer may contain. (A caller's own input echoed in a 404 or 422 may
    look like a path; these are the server's.)"""
    paths = {
        str(REPO),
        sys.prefix,
        sysconfig.get_paths()["purelib"],
        str(settings.qdrant.path.resolve()),
        str(settings.artefact.resolve()),
        str(settings.qdrant.path.resolve().parent),  # the test's temp folder
    }
    return sorted(p for p in paths if len(p) > 4)


def leaks(body: bytes | str, served: Served) -> list[str]:
    """What in an answer body gives the server away: its paths, a traceback."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    found = [p for p in served.paths if p in text]
    found += [sign for sign in ("Traceback", 'File "', "site-packages") if sign in text]
    return found


# --- raw HTTP over a socket -------------------------------------------------------------------------------


@dataclass
class RawAnswer:
    status: int | None  # None: no answer (the connection ended or timed out first)
    head: str  # status line and headers
    body: bytes
    sent: int  # body bytes (chunk payloads) written before the answer was seen or the connection failed
    seconds: float  # from the end of the request head to the answer (or the failure)
    error: str | None = None  # how sending ended early, if it did (e.g. ConnectionResetError)

    def header(self, name: str) -> str | None:
        for line in self.head.split("\r\n")[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None


def raw_request(
    served: Served,
    method: str,
    path: str,
    headers: dict[str, str] | list[tuple[str, bytes]] | None = None,
    chunks: Iterator[bytes] | None = None,
    pace_s: float = 0.0,
    timeout_s: float = 15.0,
    send_key: bool = True,
) -> RawAnswer:
    """One request on a fresh connection: `chunks` (if any) go as a chunked body, one chunk per item,
    `pace_s` apart. Before each chunk it looks whether the server has answered already and, if it has,
    stops sending: `sent` is then what the server took in before answering. Bounded by `timeout_s`."""
    given = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
    lines = [f"{method} {path} HTTP/1.1".encode(), f"Host: {served.host}:{served.port}".encode()]
    mine = list(served.headers.items()) if send_key else []
    for name, value in [*mine, *given]:
        lines.append(name.encode() + b": " + (value if isinstance(value, bytes) else value.encode()))
    if chunks is not None:
        lines.append(b"Transfer-Encoding: chunked")
    lines.append(b"Connection: close")
    deadline = time.monotonic() + timeout_s
    with socket.create_connection((served.host, served.port), timeout=timeout_s) as sock:
        # Small kernel buffers on our side, so that `sent` is close to what the server really read.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
        sock.sendall(b"\r\n".join(lines) + b"\r\n\r\n")
        started, sent, error = time.monotonic(), 0, None
        if chunks is not None:
            for chunk in chunks:
                if _readable(sock) or time.monotonic() > deadline:
                    break
                try:
                    sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                except OSError as exc:  # reset or closed by the server: it is not reading any more
                    error = type(exc).__name__
                    break
                sent += len(chunk)
                if pace_s:  # wait, but wake as soon as an answer arrives
                    select.select([sock], [], [], pace_s)
            else:
                with contextlib.suppress(OSError):
                    sock.sendall(b"0\r\n\r\n")
        data, answered = b"", None
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                piece = sock.recv(65536)
            except TimeoutError:
                break
            except OSError as exc:
                error = error or type(exc).__name__
                break
            if answered is None:
                answered = time.monotonic()
            if not piece:
                break
            data += piece
        seconds = (answered or time.monotonic()) - started
    head, _, body = data.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    status = int(status_line[1]) if len(status_line) > 1 and status_line[1].isdigit() else None
    return RawAnswer(status, head.decode("latin-1"), body, sent, seconds, error)


def _readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


def multipart_chunks(total: int, chunk: int = 16 * 1024, boundary: str = "visrecboundary") -> Iterator[bytes]:
    """A multipart upload of field `image` whose file is `total` bytes (a PNG signature, then zeros),
    in pieces of `chunk` bytes."""
    yield (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode() + b"\x89PNG\r\n\x1a\n"
    left = total - 8
    while left > 0:
        n = min(chunk, left)
        yield bytes(n)
        left -= n
    yield f"\r\n--{boundary}--\r\n".encode()


MULTIPART = {"Content-Type": "multipart/form-data; boundary=visrecboundary"}


# --- the guarded API of the hostile-client tests (the `guarded` fixture) ---------------------------------

KEY = "hostile-key"
MB = 1_000_000
UPLOAD_LIMIT = MB  # VISREC_API__MAX_UPLOAD_BYTES
UPLOAD_CUTOFF = UPLOAD_LIMIT + 64 * 1024  # the guard's limit for the upload route: the file and its form
BODY_TIMEOUT_S = 2.0
HEAVY = 4
QUEUE_WAIT_S = 0.25
BIG_IMAGE = 20 * MB  # a product photo that a slow client takes longer than the body deadline to read


class ImageHost(http.server.BaseHTTPRequestHandler):
    """A loopback image host: /ok.png a photo, /redirect a 302 to it, /away a 302 to a host that is not
    allowed (127.0.0.2: loopback too, so that nothing could ever leave the machine)."""

    def do_GET(self) -> None:  # noqa: N802 - the base's name
        address: Any = self.server.server_address
        port = address[1]
        if self.path == "/ok.png":
            photo = io.BytesIO()
            Image.new("RGB", (24, 24), "blue").save(photo, "PNG")
            self.send_response(200)
            self.send_header("content-type", "image/png")
            self.send_header("content-length", str(len(photo.getvalue())))
            self.end_headers()
            self.wfile.write(photo.getvalue())
            return
        target = {"/redirect": f"http://127.0.0.1:{port}/ok.png", "/away": f"http://127.0.0.2:{port}/ok.png"}
        self.send_response(302 if self.path in target else 404)
        if self.path in target:
            self.send_header("location", target[self.path])
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


def red_photo() -> bytes:
    """A 48x48 red PNG: a photo to search with."""
    image = io.BytesIO()
    Image.new("RGB", (48, 48), (220, 30, 30)).save(image, "PNG")
    return image.getvalue()


def client_for(served: Served, **kwargs: Any) -> httpx.Client:
    """An HTTP client of `served`, with its key."""
    return httpx.Client(base_url=served.url, headers=served.headers, timeout=15, **kwargs)


def error_body(response: httpx.Response | Any, served: Served) -> dict[str, Any]:
    """The JSON error body, checked: {detail (a sentence), error?, problems?, request_id} and nothing of the
    server's."""
    body = response.json() if isinstance(response, httpx.Response) else json.loads(response.body)
    assert set(body) <= {"detail", "error", "problems", "request_id"} and body["request_id"], body
    assert isinstance(body["detail"], str), body
    content = response.content if isinstance(response, httpx.Response) else response.body
    assert not leaks(content, served), (leaks(content, served), body)
    return body
