"""A fork server for the kill test: imports visrec once, then runs each `visrec` command in a freshly
forked child process, kills it when told, and reports how it ended.

Forking saves the ~6 s Python + torch start per cycle (the kill test runs many), and the parent kills
its own child, so no pid can be recycled under it. The children are real processes running the real
CLI; the parent imports modules but runs nothing (torch is fork-safe before its first op).

Protocol, one JSON object a line: the test writes
  {"argv": [...], "env": {...}, "stdout": PATH, "stderr": PATH,
   "kill": null | {"after_upserts": N, "delay_s": D} | {"after_s": T}}
and reads back {"status": exit code or -signal, "killed": bool, "seconds": float}.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import visrec.cli
import visrec.index.edge_store  # noqa: F401 - imported before forking, as the CLI would on first use (with edge)
import visrec.index.server  # noqa: F401
import visrec.ingest  # noqa: F401


def run_child(request: dict[str, Any]) -> int:
    """In the forked child: redirect stdio to files, run `visrec ARGV`, return its exit code."""
    try:
        os.environ.clear()
        os.environ.update(request["env"])
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        try:
            visrec.cli.app(request["argv"], prog_name="visrec")
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        return 0
    except BaseException:
        traceback.print_exc()
        return 70
    finally:
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


def main() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            os._exit(run_child(request))
        print(json.dumps(supervise(pid, request)), flush=True)


if __name__ == "__main__":
    main()
