"""A fork server: imports visrec and torch once, then runs each `visrec` command in a freshly forked
child process, kills it when told, and reports how it ended. The kill test uses one to kill syncs;
`helpers.run_visrec` runs every command of the fault suite through a shared one.

Forking saves the Python + torch start of each command (~4 s on an idle 2-core machine, 10-15 s on a
loaded one), and the parent kills its own child, so no pid can be recycled under it. The children are
real processes running the real CLI, as `python -m visrec` does (stdin /dev/null, exit handlers run,
an uncaught exception exits 1 with its traceback); the parent imports modules but runs nothing (torch
is fork-safe before its first op).

Protocol, one JSON object a line: the test writes
  {"argv": [...], "env": {...}, "stdout": PATH, "stderr": PATH, "cwd": PATH (optional),
   "kill": null | {"after_upserts": N, "delay_s": D} | {"after_s": T} | {"timeout_s": T}}
and reads back {"status": exit code or -signal, "killed": bool, "seconds": float}. A child that runs
beside the loop (`visrec serve`): {"spawn": {"argv", "env", "stdout", "stderr", "cwd"}} answers {"pid": N}
at once; then {"signal": N, "number": SIG} sends it a signal and {"wait": N, "timeout_s": T} answers
{"status": exit code, -signal, or null while it runs} (tests/faults/helpers.py: `Forked`).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import select
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch  # noqa: F401 - imported, never run, before forking: each command would import it

import visrec.cli
import visrec.embed  # noqa: F401
import visrec.index.edge_store  # noqa: F401 - imported before forking, as the CLI would on first use (with edge)
import visrec.index.server  # noqa: F401
import visrec.ingest  # noqa: F401
import visrec.jobs  # noqa: F401
import visrec.owner  # noqa: F401
import visrec.reads  # noqa: F401


def run_child(request: dict[str, Any]) -> int:
    """In the forked child: stdin from /dev/null, stdout and stderr to files, run `visrec ARGV` as
    `python -m visrec` would (its exit handlers run), return its exit code."""
    try:
        os.environ.clear()
        os.environ.update(request["env"])
        if request.get("cwd"):
            os.chdir(request["cwd"])
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # not the request pipe
        os.dup2(os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 1)
        if request["stderr"] == request["stdout"]:  # one log for both, as one open file
            os.dup2(1, 2)
        else:
            os.dup2(os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
        try:
            visrec.cli.app(request["argv"], prog_name="visrec")
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                return exc.code or 0
            print(exc.code, file=sys.stderr)  # as the interpreter does with a message
            return 1
        return 0
    except BaseException:
        traceback.print_exc()
        return 1  # as the interpreter exits on an uncaught exception
    finally:  # as the interpreter ends: wait for the threads that are not daemons, then exit handlers
        threading._shutdown()  # type: ignore[attr-defined]
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()


def upserted(log: Path) -> int:
    """How many 'upserted N points' lines the child has logged so far."""
    try:
        return log.read_text(errors="replace").count("upserted")
    except FileNotFoundError:
        return 0


def supervise(pid: int, request: dict[str, Any]) -> dict[str, Any]:
    """Wait for the child, SIGKILLing it at the point the request names."""
    started, fire_at, sent = time.monotonic(), None, False
    kill = request.get("kill") or {}
    log = Path(request["stderr"])
    if set(kill) <= {"timeout_s"}:  # only a time limit: wait on a pidfd, without waking up
        killed = False
        with _pidfd(pid) as fd:
            if not select.select([fd], [], [], kill.get("timeout_s"))[0]:
                os.kill(pid, signal.SIGKILL)  # our own, not yet reaped, child
                killed = True
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        return {"status": code, "killed": killed, "seconds": round(time.monotonic() - started, 3)}
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        now = time.monotonic()
        if fire_at is None:
            if "after_s" in kill:
                fire_at = started + kill["after_s"]
            elif "after_upserts" in kill and upserted(log) >= kill["after_upserts"]:
                fire_at = now + kill["delay_s"]
        if fire_at is not None and now >= fire_at and not sent:
            os.kill(pid, signal.SIGKILL)  # our own, not yet reaped, child
            sent = True
        time.sleep(0.002)
    code = os.waitstatus_to_exitcode(status)
    seconds = round(time.monotonic() - started, 3)
    return {"status": code, "killed": code == -signal.SIGKILL, "seconds": seconds}


@contextlib.contextmanager
def _pidfd(pid: int) -> Iterator[int]:
    fd = os.pidfd_open(pid)
    try:
        yield fd
    finally:
        os.close(fd)


def fork(request: dict[str, Any]) -> int:
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        os._exit(run_child(request))
    return pid


def main() -> None:
    spawned: dict[int, int | None] = {}  # children running beside the loop: pid → exit status once reaped
    for line in sys.stdin:
        request = json.loads(line)
        if "spawn" in request:  # start it and answer at once; `signal` and `wait` act on it later
            pid = fork(request["spawn"])
            spawned[pid] = None
            answer: dict[str, Any] = {"pid": pid}
        elif "signal" in request:
            pid = request["signal"]
            if spawned[pid] is None:  # not yet reaped: still our child, whatever it is doing
                os.kill(pid, request["number"])
            answer = {}
        elif "wait" in request:  # {"wait": pid, "timeout_s": T}: its status, or null if it runs on
            pid = request["wait"]
            if spawned[pid] is None:
                with _pidfd(pid) as fd:
                    if select.select([fd], [], [], request["timeout_s"])[0]:
                        spawned[pid] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            answer = {"status": spawned[pid]}
        else:
            answer = supervise(fork(request), request)
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
