"""Helpers of the fault suite (issue #7); its fixtures are in conftest.py.

The stores under test, the figures printed for the closing note, the environment of a `visrec` child
process, the loopback stand-ins for a broken Qdrant server (which cannot run on this machine), images
in unusual or hostile forms, and the check that an index holds exactly what a clean sync would make.
"""

from __future__ import annotations

import atexit
import contextlib
import http.server
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw

from tests.helpers import run_sync, stored
from visrec import plan
from visrec.catalogue import read_catalogue
from visrec.config import QdrantSettings, Settings
from visrec.index import open_index

SERVER_URL = os.environ.get("VISREC_QDRANT__URL") or None
SEED = int(os.environ.get("VISREC_FAULTS_SEED", "0"))


def figure(name: str, value: object) -> None:
    """Print one figure of the closing note (read them with `pytest -s tests/faults`)."""
    print(f"\nFIGURE {name}: {json.dumps(value, sort_keys=True, default=str)}")


REPO = Path(__file__).parents[2]


class ForkServer:
    """tests/faults/forkserver.py in a subprocess: runs `visrec` commands as forked, killable children."""

    def __init__(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("VISREC_")}  # each child gets its own
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.forkserver"],
            cwd=REPO,
            env={**env, "COLUMNS": "200"},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def run(
        self, argv: list[str], env: dict[str, str], logs: Path, kill: dict[str, float] | None, cwd: str = ""
    ) -> Any:
        """Run `visrec ARGV`, killed as `kill` says; returns how it ended (see forkserver.py)."""
        assert self.process.stdin and self.process.stdout
        request = {"argv": argv, "env": env, "stdout": f"{logs}.out", "stderr": f"{logs}.err", "kill": kill}
        self.process.stdin.write(json.dumps(request | ({"cwd": cwd} if cwd else {})) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        assert line, "the fork server died"
        return json.loads(line)

    def close(self) -> None:
        assert self.process.stdin
        self.process.stdin.close()
        self.process.wait(timeout=30)


_shared: list[ForkServer] = []  # the one `run_visrec` and `spawn_visrec` fork from, started on first use
_shared_lock = threading.Lock()


def _shared_server() -> ForkServer:
    """The shared fork server (the caller holds `_shared_lock`); a new one if it is not running."""
    if not _shared or _shared[0].process.poll() is not None:
        _shared[:] = [ForkServer()]
        atexit.register(_shared[0].close)
    return _shared[0]


def fork_run(argv: list[str], env: dict[str, str], logs: Path, kill: dict[str, float] | None) -> Any:
    """`visrec ARGV` forked from the shared fork server, stdout and stderr to `logs`.out and .err, killed
    as `kill` says (forkserver.py); returns how it ended."""
    with _shared_lock:
        return _shared_server().run(argv, env, logs, kill, os.getcwd())


def run_visrec(settings: Settings, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`visrec ARGS` in a process of its own, with exactly `settings`; its output captured as text.

    The process is forked from a shared fork server (forkserver.py) that has imported visrec and torch,
    which saves each command the interpreter's and torch's start (seconds) and changes nothing else:
    a real process running the real CLI. A call while another runs (from another thread) starts
    `python -m visrec` instead. Past `timeout` the command is killed and TimeoutExpired raised, as by
    subprocess.run."""
    argv = [sys.executable, "-m", "visrec", *args]
    if not _shared_lock.acquire(blocking=False):
        return subprocess.run(
            argv, env=settings_env(settings), capture_output=True, text=True, timeout=timeout
        )
    try:
        with tempfile.TemporaryDirectory(prefix="visrec-run-") as folder:
            logs = Path(folder) / "run"
            ended = _shared_server().run(
                list(args), settings_env(settings), logs, {"timeout_s": timeout}, os.getcwd()
            )
            stdout, stderr = (Path(f"{logs}.{end}").read_text(errors="replace") for end in ("out", "err"))
    finally:
        _shared_lock.release()
    if ended["killed"]:
        raise subprocess.TimeoutExpired(argv, timeout, stdout, stderr)
    return subprocess.CompletedProcess(argv, ended["status"], stdout, stderr)


class Forked:
    """A `visrec` process forked from the shared fork server and running beside it (`spawn_visrec`), with
    the part of subprocess.Popen's interface the tests use: pid, poll, wait, send_signal, terminate,
    kill, returncode. The fork server is its parent: it signals it only while it has not reaped it."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path, cwd: Path) -> None:
        self.args, self.returncode = args, None
        spawn = {"argv": args, "env": env, "stdout": str(log), "stderr": str(log), "cwd": str(cwd)}
        self.pid: int = self._ask({"spawn": spawn})["pid"]

    def _ask(self, request: dict[str, Any]) -> Any:
        with _shared_lock:
            server = _shared_server()
            assert server.process.stdin and server.process.stdout
            server.process.stdin.write(json.dumps(request) + "\n")
            server.process.stdin.flush()
            line = server.process.stdout.readline()
        assert line, "the fork server died"
        return json.loads(line)

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._ask({"wait": self.pid, "timeout_s": 0})["status"]
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            left = 60.0 if deadline is None else max(0.0, min(60.0, deadline - time.monotonic()))
            self.returncode = self._ask({"wait": self.pid, "timeout_s": left})["status"]
            if self.returncode is None and deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
        return self.returncode

    def send_signal(self, number: int) -> None:
        if self.returncode is None:
            self._ask({"signal": self.pid, "number": int(number)})

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def spawn_visrec(env: dict[str, str], log: Path, cwd: Path, *args: str) -> Forked:
    """`visrec ARGS` forked from the shared fork server, running beside the test (stdout and stderr to
    `log`, in `cwd`), as `subprocess.Popen([python, "-m", "visrec", *args])` would start it, seconds
    sooner."""
    return Forked(list(args), env, log, cwd)


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


# --- stand-ins for a broken Qdrant server -----------------------------------------------------------------


class CountingServer(http.server.ThreadingHTTPServer):
    """A loopback HTTP server whose handler counts the requests it answered in `hits`."""

    hits = 0


class Answer503(http.server.BaseHTTPRequestHandler):
    """Answers 503 to every request, counting them in its server's `hits` (a CountingServer): a Qdrant
    server that is up but failing. (A stand-in: no Qdrant server runs here.)"""

    def _fail(self) -> None:
        assert isinstance(self.server, CountingServer)
        self.server.hits += 1  # before answering: the client may check at once
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


# --- images -----------------------------------------------------------------------------------------------


def save(image: Image.Image, fmt: str, **options: Any) -> bytes:
    """`image` encoded as `fmt` (with Pillow's `options`)."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def drawn(mode: str = "RGB", size: tuple[int, int] = (48, 48)) -> Image.Image:
    """A red circle on white, in `mode`."""
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).ellipse((4, 4, size[0] - 4, size[1] - 4), fill=(220, 30, 30))
    return image.convert(mode)


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header declares width x height RGB pixels but whose data is a few bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = zlib.compress(b"\0" * (1 + 3 * width) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


# --- checks -----------------------------------------------------------------------------------------------


def check_index_matches_catalogue(store: Settings, catalogue: Path, tmp_path: Path) -> tuple[int, int]:
    """Compare the index with the catalogue and with a clean sync of it; returns (lost, duplicated)."""
    parsed = read_catalogue(catalogue)
    reference = store.model_copy(update={"qdrant": QdrantSettings(path=tmp_path / "reference")})
    run_sync(catalogue, reference)
    with open_index(store.qdrant) as index, open_index(reference.qdrant) as clean:
        records = index.sync_records()
        expected = {p.id: p for p in parsed.products}
        lost = len(set(expected) - set(records))
        duplicated = index.count() - len(records)
        assert set(records) <= set(expected)
        version = stored(clean, parsed.products[0].id)[1]["model_version"]
        for product_id, product in expected.items():
            got = index.get(product_id)
            if got is None:
                continue
            vector, payload = got
            refs = parsed.photo_refs(product)
            files, _ = plan.photo_files(refs, [])  # every photo hashed afresh
            record = plan.bookkeeping(product, refs, files, payload["model_version"])
            assert payload["vectors_hash"] == record.vectors_hash, product_id
            assert payload["metadata_hash"] == record.metadata_hash, product_id
            assert payload["model_version"] == version
            assert payload["images"] == list(parsed.photo_refs(product))
            for key, value in product.metadata().items():
                if key not in ("image", "images"):
                    assert payload[key] == value, (product_id, key)
            clean_vector, clean_payload = stored(clean, product_id)
            assert np.allclose(vector, clean_vector, atol=1e-3), product_id
            assert payload == clean_payload
    return lost, duplicated
