"""A command's end of the owner channel (`visrec.owner`): find the running `visrec serve` that owns this
embedded store, hand it a job, take its answers (progress, heartbeats, the result or the error, as if run
here). A service that dies or stops answering meanwhile is told apart (`visrec.handover_end`)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visrec import handover_end
from visrec.config import QdrantSettings
from visrec.errors import IndexUnavailable, VisrecError
from visrec.jobs import PROTOCOL, Job, JobRequest, Progress, StoreId
from visrec.owner import marker, peer_uid, store_id

log = logging.getLogger(__name__)


class HandedOverError(VisrecError):
    """The service refused or failed a handed-over job: its message and exit code, as if run here."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Owner:
    """A live service that owns the store a command is for: its socket, and that store."""

    socket: Path
    store: StoreId


def _connect(path: Path, timeout_s: float) -> socket.socket:
    """A connection to the socket at `path`, once its listener is known to run as this user.
    Raises OSError where nobody listens, `IndexUnavailable` where something else does."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        _connect_within(conn, path, timeout_s)
        if (uid := peer_uid(conn)) != os.getuid():
            raise IndexUnavailable(
                f"the socket {path} named by the store's owner marker is served by another user (uid "
                f"{uid}), not you (uid {os.getuid()}): refused, nothing was sent"
            )
    except BaseException:
        conn.close()
        raise
    return conn


def _connect_within(conn: socket.socket, path: Path, timeout_s: float) -> None:
    """Connect, waiting at most `timeout_s` for a listener whose queue is full (a Unix socket says so at
    once, EAGAIN, where TCP would wait)."""
    deadline = time.monotonic() + timeout_s
    while True:
        conn.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            conn.connect(str(path))
            return
        except (TimeoutError, BlockingIOError):
            if time.monotonic() >= deadline:
                raise IndexUnavailable(
                    f"the service that owns the store (socket {path}) accepts no connection in {timeout_s:g} "
                    "s: nothing was sent; check the service (its log), restart it if it is stuck, then run "
                    "the command again"
                ) from None
            time.sleep(0.05)


def find_owner(settings: QdrantSettings) -> Owner | None:
    """The live service that owns this embedded store, or None: a server backend, no service, a marker
    a killed one left, or a marker copied with its store folder (it names another folder)."""
    if settings.url:
        return None
    try:
        claim = json.loads(marker(settings).read_text())
        path = Path(claim["socket"])
        theirs = StoreId.model_validate({k: claim.get(k) for k in StoreId.model_fields})
        here = store_id(settings)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # ValidationError is a ValueError
        return None
    if (theirs.device, theirs.inode, theirs.collection) != (here.device, here.inode, here.collection):
        log.info("%s was written for the store at %s, not this one: ignored", marker(settings), theirs.path)
        return None
    try:
        _connect(path, settings.owner_connect_timeout_s).close()
    except OSError:
        return None
    return Owner(path, here)


def hand_over(owner: Owner, job: Job, progress: Progress | None, settings: QdrantSettings) -> dict[str, Any]:
    """Run `job` in the service `owner`; returns its result, raises what it raised (same message, same
    exit code). A service that dies or hangs meanwhile: `IndexUnavailable`, saying which and what the
    job left (`visrec.handover_end`)."""
    was = handover_end.before(job, settings)
    try:
        conn = _connect(owner.socket, settings.owner_connect_timeout_s)
        peer = handover_end.Peer.of(conn)
    except OSError as exc:
        raise IndexUnavailable(f"the service that owns the store stopped answering ({exc})") from exc
    with conn:
        conn.settimeout(settings.owner_idle_timeout_s)
        request = JobRequest(protocol=PROTOCOL, store=owner.store, job=job)
        try:
            # The service may stop reading a request it refuses: its answer says why, read below.
            with contextlib.suppress(OSError):
                conn.sendall(request.model_dump_json().encode() + b"\n")
            for line in conn.makefile("rb"):
                if (result := _take(line, progress)) is not None:
                    return result
        except TimeoutError:
            if peer.state() != "gone":
                raise IndexUnavailable(
                    handover_end.silent(job, peer, settings.owner_idle_timeout_s)
                ) from None
        except OSError:
            pass  # the service went away: said below
    if peer.ended():
        raise IndexUnavailable(handover_end.ended(job, settings, was, peer))
    raise IndexUnavailable(handover_end.closed(job, _listening(owner, settings)))


def _take(line: bytes, progress: Progress | None) -> dict[str, Any] | None:
    """One answer line: the job's result, None for a line that is not the last; raises its error."""
    try:
        message = json.loads(line)
        if not isinstance(message, dict):
            raise TypeError
        if "result" in message:
            return dict(message["result"])
        if "error" in message:
            raise HandedOverError(str(message["error"]), int(message["exit_code"]))
        if "progress" in message and progress is not None:
            stage, done, total = message["progress"]
            progress(str(stage), int(done), int(total))
    except (ValueError, TypeError, KeyError):
        raise IndexUnavailable(
            "the service that owns the store answered something that is not the owner protocol: nothing "
            "done is lost; check that the service runs the same visrec version"
        ) from None
    return None  # a heartbeat, or progress


def _listening(owner: Owner, settings: QdrantSettings) -> bool:
    """Whether the service's socket still takes connections."""
    try:
        _connect(owner.socket, settings.owner_connect_timeout_s).close()
    except (OSError, VisrecError):
        return False
    return True
