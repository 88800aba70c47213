"""The owner channel: a running `visrec serve` owns its embedded store, and writing commands run on the
same machine hand their work to it instead of opening the store themselves (the engine admits one
process per collection). This is the service's end, and the store's marker and claim; the command's end
is `visrec.handover`.

The service listens on a Unix socket in a private folder (mode 0700, made by `mkdtemp`) and names it in a
marker beside the collection (`<store>/<collection>.owner.json`), with the store folder it owns: its
resolved path, device and inode, and the collection. A store folder copied while live carries the marker,
but not the folder's identity: a command on the copy sees another device/inode and runs the job itself.
Both ends check the other's uid (SO_PEERCRED): nothing is sent to, or taken from, another user. No key
travels on a command line and nothing is reachable from another machine.

One request a connection, one JSON line: `{"protocol": n, "store": {...}, "job": {...}}`; the service
runs it only if the protocol is its own and the store is the one it owns (it holds the folder open, so
its inode cannot be reused while it runs). The answer is JSON lines: `{"progress": [stage, done,
total]}`, `{"heartbeat": true}` when nothing else was said for `HEARTBEAT_S`, then `{"result": {...}}`
or `{"error": message, "exit_code": n}`. Answers are written by a thread of their own: a paused or slow
command loses progress lines, never the writer's time. A marker left by a killed service names a socket
nobody listens on: commands then open the store themselves.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import struct
import tempfile
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from visrec.catalogue import explain
from visrec.config import QdrantSettings
from visrec.errors import IndexUnavailable, VisrecError
from visrec.fs import write_atomically
from visrec.jobs import PROTOCOL, Job, JobRequest, Progress, StoreId

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 64 * 1024  # and a query photo's base64 (`OwnerChannel`)
# The command's idle timeout (`qdrant.owner_idle_timeout_s`, at least 5 s) is many of these: a job in a
# silent stage (a model loading, a quality gate, waiting for the writer) is never taken for a hung one.
HEARTBEAT_S = 2.0
# A connection that sends no request in this long is closed (it must not hold a thread for ever).
REQUEST_TIMEOUT_S = 10.0
# One answer line that the command does not take in this long (stopped with Ctrl-Z while its socket
# buffer, ~200 kB of progress lines, is full) ends the connection; the job goes on, its result is logged.
SEND_TIMEOUT_S = 60.0
# Progress lines waiting for a slow command; more are dropped (the next one tells the same story).
QUEUE_LINES = 32

Handler = Callable[[Job, Progress], dict[str, Any]]
Message = dict[str, Any]


class _Refused(Exception):
    """A request the service does not run: why, and the exit code the command ends with."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def marker(settings: QdrantSettings) -> Path:
    return settings.path / f"{settings.collection}.owner.json"


class StoreClaim:
    """This process's claim to be the one service of an embedded store: an exclusive lock on
    `<store>/<collection>.owner.lock`, held while it runs and let go by the kernel however it ends (a
    kill -9 included). Taken before anything else starts, so a second `visrec serve` on the same store
    stops at once (exit 4) and never writes, or later removes, the first one's marker. The lock is on
    the file's inode: a copied store folder is not claimed by its original's service."""

    def __init__(self, settings: QdrantSettings) -> None:
        settings.path.mkdir(parents=True, exist_ok=True)
        path = settings.path / f"{settings.collection}.owner.lock"
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise IndexUnavailable(
                f"the store {settings.path.absolute()} is owned by another running `visrec serve`"
                f"{_pid_of(settings)}: stop that one first, or give this one another store "
                "(VISREC_QDRANT__PATH)"
            ) from None

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


def _pid_of(settings: QdrantSettings) -> str:
    """' (pid N)' from the store's owner marker, when it says."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        pid = json.loads(marker(settings).read_text()).get("pid")
        if isinstance(pid, int):
            return f" (pid {pid})"
    return ""


def store_id(settings: QdrantSettings) -> StoreId:
    """The store folder as this process sees it now (raises OSError if it does not exist)."""
    path = settings.path.resolve()
    stat = os.stat(path)
    return StoreId(path=path, device=stat.st_dev, inode=stat.st_ino, collection=settings.collection)


class OwnerChannel:
    """The service's end: accepts jobs from this user's processes for the store it owns and runs them
    through `handle` (which runs one at a time, in the service's writer)."""

    def __init__(
        self, settings: QdrantSettings, claim: StoreClaim, handle: Handler, max_photo_bytes: int = 0
    ) -> None:
        self.claim = claim  # released when the channel closes
        self.marker = marker(settings)
        self.handle = handle
        # A request is one line: a `similar --image` carries its photo, base64.
        self.max_photo_bytes = max_photo_bytes
        self.max_request_bytes = MAX_REQUEST_BYTES + -(-max_photo_bytes // 3) * 4
        settings.path.mkdir(parents=True, exist_ok=True)
        # Held open while the service runs: the folder's inode cannot be reused by another folder, and a
        # folder removed under the service is seen (no links left).
        self._store_fd = os.open(settings.path, os.O_RDONLY | os.O_DIRECTORY)
        stat = os.fstat(self._store_fd)
        self.store = StoreId(
            path=settings.path.resolve(),
            device=stat.st_dev,
            inode=stat.st_ino,
            collection=settings.collection,
        )
        self._folder = Path(tempfile.mkdtemp(prefix="visrec-owner-"))  # 0700: this user alone
        self.path = self._folder / "socket"
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(self.path))
        os.chmod(self.path, 0o600)
        self._server.listen(8)
        self._thread = threading.Thread(target=self._serve, name="owner-channel", daemon=True)

    def start(self) -> None:
        claim = {"socket": str(self.path), "pid": os.getpid(), "protocol": PROTOCOL}
        write_atomically(self.marker, json.dumps(claim | self.store.model_dump(mode="json")))
        self._thread.start()
        log.info("owner channel at %s (marker %s)", self.path, self.marker)

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(self.marker.read_text()).get("socket") == str(self.path):
                self.marker.unlink()
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()
        shutil.rmtree(self._folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.close(self._store_fd)
        self.claim.release()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._answer, args=(conn,), name="owner-job", daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        try:
            if peer_uid(conn) != os.getuid():
                log.warning("owner channel: refused a peer of another user")
                conn.close()
                return
            conn.settimeout(REQUEST_TIMEOUT_S)
            reader = conn.makefile("rb")
            line = reader.readline(self.max_request_bytes)
            if len(line) >= self.max_request_bytes and not line.endswith(b"\n"):
                _discard_line(reader)  # the command is still sending: it reads the refusal once it is done
        except OSError:
            conn.close()
            return
        if not line:  # a command looking whether the service lives (`find_owner`)
            conn.close()
            return
        conn.settimeout(SEND_TIMEOUT_S)
        sender = _Sender(conn)
        sender.start()
        sender.finish(self._run(line, sender.progress))

    def _run(self, line: bytes, progress: Progress) -> Message:
        """The job's final answer: its result, or why it failed or was not run."""
        try:
            job = self._request(line).job
        except _Refused as exc:
            log.warning("owner channel: refused a request: %s", exc)
            return {"error": str(exc), "exit_code": exc.exit_code}
        try:
            return {"result": self.handle(job, progress)}
        except VisrecError as exc:
            return {"error": str(exc), "exit_code": exc.exit_code}
        except Exception as exc:  # a bug: said to the command, logged here
            log.exception("handed-over %s failed", job.command)
            return {"error": f"the service failed: {type(exc).__name__}: {exc}", "exit_code": 1}

    def _request(self, line: bytes) -> JobRequest:
        """The request in `line`, if this service runs it: its protocol, for the store it owns."""
        if len(line) >= self.max_request_bytes and not line.endswith(b"\n"):
            raise _Refused(
                f"refused by the service: the request is over {self.max_request_bytes} bytes (a query photo "
                f"may have {self.max_photo_bytes} bytes: the service's VISREC_INGEST__MAX_IMAGE_BYTES)",
                2,
            )
        try:
            raw = json.loads(line)
        except ValueError:
            raise _Refused("not a job this service takes: not a JSON line", 2) from None
        if not isinstance(raw, dict):
            raise _Refused("not a job this service takes: not a JSON object", 2)
        if raw.get("protocol") != PROTOCOL:
            raise _Refused(
                f"the service speaks owner protocol {PROTOCOL}, this command {raw.get('protocol')!r}: "
                "nothing was run; use the same visrec version as the service (or stop it and run the "
                "command alone)",
                4,
            )
        try:
            request = JobRequest.model_validate_json(line)  # JSON's own rules: bytes as base64
        except ValidationError as exc:
            raise _Refused(f"not a job this service takes: {explain(exc)}", 2) from None
        self._check_store(request.store)
        return request

    def _check_store(self, theirs: StoreId) -> None:
        mine = self.store
        if os.fstat(self._store_fd).st_nlink == 0:
            raise _Refused(
                f"the store folder this service owned ({mine.path}) was removed: nothing was run; restart "
                "the service",
                4,
            )
        if (theirs.device, theirs.inode, theirs.collection) != (mine.device, mine.inode, mine.collection):
            raise _Refused(
                f"the service that answered owns collection {mine.collection!r} at {mine.path}, not "
                f"{theirs.collection!r} at {theirs.path}: nothing was run (was {theirs.path} copied from "
                f"{mine.path}? then remove its {theirs.collection}.owner.json)",
                4,
            )


class _Sender:
    """One connection's answers, written by a thread of its own, so the job's thread (which may hold the
    writer's lock) never waits on a socket: progress lines wait in a short queue and are dropped when it
    is full; a heartbeat goes when nothing was said for `HEARTBEAT_S`; the final line is never dropped.
    A line the command does not take in `SEND_TIMEOUT_S` ends the connection; the final answer is then
    logged."""

    def __init__(self, conn: socket.socket) -> None:
        self._conn = conn
        self._lines: deque[Message] = deque()
        self._final: Message | None = None
        self._gone = False
        self._ready = threading.Condition()
        self._thread = threading.Thread(target=self._send_all, name="owner-send", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def progress(self, stage: str, done: int, total: int) -> None:
        with self._ready:
            if not self._gone and len(self._lines) < QUEUE_LINES:
                self._lines.append({"progress": [stage, done, total]})
                self._ready.notify()

    def finish(self, message: Message) -> None:
        with self._ready:
            if self._gone:
                _log_undelivered(message)
                return
            self._final = message
            self._ready.notify()

    def _next(self) -> tuple[Message, bool]:
        """The next line to send, and whether it is the last."""
        with self._ready:
            if not self._lines and self._final is None:
                self._ready.wait(HEARTBEAT_S)
            if self._lines:
                return self._lines.popleft(), False
            if self._final is not None:
                return self._final, True
            return {"heartbeat": True}, False

    def _send_all(self) -> None:
        try:
            while True:
                message, last = self._next()
                self._conn.sendall(json.dumps(message).encode() + b"\n")
                if last:
                    _drain(self._conn)
                    return
        except OSError as exc:  # the command went away (Ctrl-C) or stopped reading: the job carries on
            log.info("owner channel: the command stopped taking answers (%s)", type(exc).__name__)
            with self._ready:
                self._gone = True
                self._lines.clear()
                if self._final is not None:
                    _log_undelivered(self._final)
        finally:
            self._conn.close()


def _drain(conn: socket.socket) -> None:
    """Read what the command sent beyond its request (briefly, boundedly) before closing: a Unix socket
    closed with unread data resets the connection, and the command would lose the answer."""
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(1.0)
        for _ in range(64):
            if not conn.recv(65536):
                return


def _log_undelivered(message: Message) -> None:
    log.warning("a handed-over job ended after its command went away: %s", json.dumps(message))


def peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


def _discard_line(reader: Any, most: int = 256 * 2**20) -> None:
    """Read and drop the rest of a request line too long to take (at most `most` bytes, within the
    connection's timeout), so that the command gets to read the answer that says so."""
    while most > 0:
        chunk = reader.readline(min(most, 2**20))
        if not chunk or chunk.endswith(b"\n"):
            return
        most -= len(chunk)
