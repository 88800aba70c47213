"""What a command says when the service it handed a job to (`visrec.handover.hand_over`) stops answering
before the result. A service that ended (killed, crashed) is told from one that is alive and closed the
connection or fell silent: by the process that answered the connection (its pid and start time, from
SO_PEERCRED and /proc), not by whether something answers on the socket now, which a supervisor's
restart would. What the job left is looked at, not guessed: the live version before and after a job
that switches it, the snapshots in a snapshot's folder before and after."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from visrec.config import QdrantSettings
from visrec.jobs import Job

SWITCHING = ("reindex", "rollback", "restore")  # jobs whose end is a switch of the live version
READING = ("status", "similar", "report", "duplicates", "neighbours")


@dataclass(frozen=True)
class Peer:
    """The service process that accepted the command's connection."""

    pid: int
    started: str | None  # its start time (/proc/PID/stat), None where there is no /proc

    @classmethod
    def of(cls, conn: socket.socket) -> Peer:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid = int(struct.unpack("3i", creds)[0])
        stat = _stat(pid)
        return cls(pid, stat[19] if stat else None)

    def state(self) -> str:
        """'gone' (ended: no such process, a zombie, or another process since with its pid), 'stopped'
        (SIGSTOP, Ctrl-Z, a debugger) or 'running'."""
        stat = _stat(self.pid)
        if stat is None:
            if self.started is not None:
                return "gone"
            try:  # no /proc here: whether the pid exists is all that can be told
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return "gone"
            except OSError:
                pass
            return "running"
        if stat[0] in ("Z", "X") or stat[19] != self.started:
            return "gone"
        return "stopped" if stat[0] in ("T", "t") else "running"

    def ended(self, within_s: float = 2.0) -> bool:
        """Whether it ended, given time to: a killed process's connections close while it exits, a
        moment before it shows as a zombie, and its socket may take a connection meanwhile."""
        deadline = time.monotonic() + within_s
        while (state := self.state()) != "gone" and time.monotonic() < deadline:
            time.sleep(0.05)
        return state == "gone"


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state first, start time at 19), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()
    return fields if len(fields) > 19 else None


@dataclass(frozen=True)
class Before:
    """What the command saw before handing the job over, to tell afterwards what the job did."""

    live: str | None  # the live version, for a job that switches it
    snapshots: frozenset[str]  # the snapshot files in a snapshot job's folder


def before(job: Job, settings: QdrantSettings) -> Before:
    return Before(_live(settings) if job.command in SWITCHING else None, _snapshots(job))


def _live(settings: QdrantSettings) -> str | None:
    """The live version as the store's alias names it now (no collection is opened)."""
    from visrec.index import open_store  # the engine's binding loads only where a job ended this way

    with contextlib.suppress(Exception), open_store(settings) as store:
        return store.live()
    return None


def _snapshots(job: Job) -> frozenset[str]:
    from visrec.archive import SUFFIX

    out = getattr(job, "out", None) if job.command == "snapshot" else None
    if out is None:
        return frozenset()
    with contextlib.suppress(OSError):
        return frozenset(p.name for p in Path(out).glob(f"*{SUFFIX}"))
    return frozenset()


def ended(job: Job, settings: QdrantSettings, was: Before, peer: Peer) -> str:
    """Why the answers ended before the job's result, and what the job left, as far as can be told."""
    command = job.command
    head = f"the service that owns the store (pid {peer.pid}) ended during the {command}"
    if command in SWITCHING:
        now = _live(settings)
        if now is not None and now != was.live:
            left = f"it had switched: {now} is live now (it was {was.live})"
        else:
            left = (
                f"the live version is still {was.live}, as before (a version it left half-built is rebuilt "
                f"by the next {command if command != 'rollback' else 'reindex'})"
            )
        return (
            f"{head}: {left}; check with `visrec status`, then run the {command} again if it is still wanted"
        )
    if command == "snapshot":
        written = sorted(_snapshots(job) - was.snapshots)
        left = (
            f"it had written {written[-1]}"
            if written
            else "no snapshot was written (the partial it left is removed by the next snapshot into "
            "that folder; the copy it read, at the service's next start)"
        )
        return f"{head}: {left}; the store is unchanged"
    if command in READING:
        return f"{head}: nothing was changed; run the command again"
    return (
        f"{head}: what it wrote before is in the store (each write is durable); run the {command} again to "
        "finish it (it does only what is left; with no service running it opens the store itself)"
    )


def silent(job: Job, peer: Peer, idle_s: float) -> str:
    """The service is alive and sent nothing for `idle_s`."""
    if peer.state() == "stopped":
        return (
            f"the service that owns the store (pid {peer.pid}) is stopped (SIGSTOP, Ctrl-Z or a debugger) "
            f"and sent nothing for {idle_s:g} s: the {job.command} was given up here and waits in the "
            f"service, which goes on with it once continued (`kill -CONT {peer.pid}`); check with "
            "`visrec status` before running it again"
        )
    return (
        f"the service that owns the store sent nothing for {idle_s:g} s: the {job.command} was given up "
        "here; nothing done is lost (what the service wrote is in the store); check the service (its "
        "log), restart it if it is stuck, then run the command again"
    )


def closed(job: Job, listening: bool) -> str:
    """The service, still running, ended the answers before the result: it is stopping (its socket is
    closed), or it gave up on this command (which did not read its answers in `owner.SEND_TIMEOUT_S`)."""
    if not listening:
        return (
            f"the service that owns the store is stopping and ended the {job.command} before its result: "
            "nothing done is lost; run the command again (with no service running, it opens the store "
            "itself and finishes the job)"
        )
    return (
        f"the service closed the connection before the {job.command}'s result (this command did not read "
        "its answers for a while: paused?); the job goes on in the service (its log has the result); "
        "nothing done is lost; run the command again to be sure (it does only what is left)"
    )
