"""The owner channel: a running `visrec serve` owns its embedded store, and writing commands run on the
same machine hand their work to it instead of opening the store themselves (the engine admits one
process per collection).

The service listens on a Unix socket in a private folder (mode 0700, made by `mkdtemp`) and names it in a
marker beside the collection (`<store>/<collection>.owner.json`); it answers only peers of its own user
(SO_PEERCRED). No key travels on a command line and nothing is reachable from another machine. One
request a connection, one JSON line: `{"job": {...}}`; the answer is JSON lines, `{"progress": [stage,
done, total]}` while it runs, then `{"result": {...}}` or `{"error": message, "exit_code": n}`. A marker
left by a killed service names a socket nobody listens on: commands then open the store themselves.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import struct
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from visrec.config import QdrantSettings
from visrec.errors import IndexUnavailable, VisrecError
from visrec.fs import write_atomically
from visrec.jobs import Job, JobRequest, Progress

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 64 * 1024
Handler = Callable[[Job, Progress], dict[str, Any]]


class HandedOverError(VisrecError):
    """The service refused or failed a handed-over job: its message and exit code, as if run here."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def marker(settings: QdrantSettings) -> Path:
    return settings.path / f"{settings.collection}.owner.json"


class OwnerChannel:
    """The service's end: accepts jobs from this user's processes and runs them through `handle` (which
    runs one at a time, in the service's writer)."""

    def __init__(self, settings: QdrantSettings, handle: Handler) -> None:
        self.marker = marker(settings)
        self.handle = handle
        self._folder = Path(tempfile.mkdtemp(prefix="visrec-owner-"))  # 0700: this user alone
        self.path = self._folder / "socket"
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(self.path))
        os.chmod(self.path, 0o600)
        self._server.listen(8)
        self._thread = threading.Thread(target=self._serve, name="owner-channel", daemon=True)

    def start(self) -> None:
        self.marker.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.marker, json.dumps({"socket": str(self.path), "pid": os.getpid()}))
        self._thread.start()
        log.info("owner channel at %s (marker %s)", self.path, self.marker)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if json.loads(self.marker.read_text()).get("socket") == str(self.path):
                self.marker.unlink()
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()
        shutil.rmtree(self._folder, ignore_errors=True)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._answer, args=(conn,), name="owner-job", daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            if _peer_uid(conn) != os.getuid():
                log.warning("owner channel: refused a peer of another user")
                return
            stream = conn.makefile("rwb")

            def send(message: dict[str, Any]) -> None:
                try:
                    stream.write(json.dumps(message).encode() + b"\n")
                    stream.flush()
                except OSError:  # the command went away (Ctrl-C): the job carries on
                    pass

            try:
                line = stream.readline(MAX_REQUEST_BYTES)
                job = JobRequest.model_validate_json(line).job
            except (OSError, ValueError, ValidationError) as exc:
                send({"error": f"not a job this service takes: {exc}", "exit_code": 2})
                return
            try:
                result = self.handle(job, lambda stage, done, total: send({"progress": [stage, done, total]}))
            except VisrecError as exc:
                send({"error": str(exc), "exit_code": exc.exit_code})
            except Exception as exc:  # a bug: said to the command, logged here
                log.exception("handed-over %s failed", job.command)
                send({"error": f"the service failed: {type(exc).__name__}: {exc}", "exit_code": 1})
            else:
                send({"result": result})


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


def find_owner(settings: QdrantSettings) -> Path | None:
    """The socket of the live service that owns this embedded store, or None (a server backend, no
    service, or a marker a killed one left)."""
    if settings.url:
        return None
    try:
        path = Path(json.loads(marker(settings).read_text())["socket"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.connect(str(path))
    except OSError:
        return None
    return path


def hand_over(path: Path, job: Job, progress: Progress | None) -> dict[str, Any]:
    """Run `job` in the service listening at `path`; returns its result, raises what it raised (same
    message, same exit code). A service that dies meanwhile: `IndexUnavailable` (rerun the command:
    with no service, it opens the store and finishes the job)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        try:
            conn.connect(str(path))
        except OSError as exc:
            raise IndexUnavailable(f"the service that owns the store stopped answering ({exc})") from exc
        stream = conn.makefile("rwb")
        stream.write(JobRequest(job=job).model_dump_json().encode() + b"\n")
        stream.flush()
        for line in stream:
            message = json.loads(line)
            if "progress" in message and progress is not None:
                progress(*message["progress"])
            elif "result" in message:
                return dict(message["result"])
            elif "error" in message:
                raise HandedOverError(str(message["error"]), int(message["exit_code"]))
    raise IndexUnavailable(
        f"the service that owns the store stopped during the {job.command}: nothing done is lost; run "
        "the command again (with no service running, it opens the store itself and finishes the job)"
    )
