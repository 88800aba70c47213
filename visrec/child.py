"""visrec's own child processes (a snapshot's archive, a copy's byte work): `python -m MODULE`, handed
its request as one JSON line on stdin, answering in JSON lines on stdout, and ending with the process
that started it, however that one ends: its stdin stays open while it runs, and the end of file there
says the parent is gone (killed, too), so it never works on for nobody.

Both sides are here, one place for each rule; imports stay within the standard library, as a child's
start-up may be paid with the service's writes held (`visrec.fs_apart`)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from subprocess import Popen

PARENT_GONE = 3  # a child's exit code when its parent ended first


class ChildProcess:
    """`python -m module`, sent `request`. Used as a context manager: on leaving it, a child still running
    (the caller failed meanwhile) is killed and reaped, and the pipes are closed."""

    def __init__(self, module: str, request: dict[str, Any]) -> None:
        import subprocess  # here, not above: a child never starts one, and it costs a child 10 ms

        self.process: Popen[bytes] = subprocess.Popen(
            [sys.executable, "-m", module], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(json.dumps(request).encode() + b"\n")
            self.process.stdin.flush()
        except OSError:  # it died at once: `wait` says how
            pass

    @property
    def pid(self) -> int:
        return self.process.pid

    def messages(self) -> Iterator[dict[str, Any]]:
        """Its answers, as it sends them, until it ends (a line that is not JSON is skipped)."""
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                yield json.loads(line)
            except ValueError:
                continue

    def wait(self) -> int:
        return self.process.wait()

    def __enter__(self) -> ChildProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                # A request it never read (it died first) is flushed again here and fails: closed anyway.
                with contextlib.suppress(OSError):
                    pipe.close()


def how_it_ended(code: int) -> str:
    """How a child ended, for a message: "was killed (SIGKILL)", "exited with 1"."""
    return f"was killed ({signal.Signals(-code).name})" if code < 0 else f"exited with {code}"


def answer_channel() -> TextIO:
    """In the child: where its answers go (the stdout it was started with). Anything else printed from
    now on (a library's own output) goes to stderr, not into the answers."""
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    return answers


def read_request() -> dict[str, Any] | None:
    """In the child: its request; None if its parent ended before sending it. From then on the child
    exits (`PARENT_GONE`) as soon as its parent ends."""
    line = b""
    while not line.endswith(b"\n"):  # unbuffered, as the watch reads the same pipe: nothing read ahead
        block = os.read(0, 1)
        if not block:
            return None
        line += block
    request: dict[str, Any] = json.loads(line)
    threading.Thread(target=_stop_when_parent_ends, daemon=True).start()
    return request


def die_with_parent(parent: int) -> None:
    """In a child whose work holds the GIL (the engine's optimize(): the watch of stdin cannot run
    meanwhile): on Linux, the kernel kills it when the thread that started it ends (that thread waits
    for it), and at once if its parent (pid `parent`) already has. Elsewhere only the watch remains."""
    import ctypes  # here: only such a child pays for it

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
            return
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() != parent:  # it ended before the prctl: nobody would kill this one
        os._exit(PARENT_GONE)


_PR_SET_PDEATHSIG = 1


def _stop_when_parent_ends() -> None:
    """The parent never writes after the request: end of file means it ended (killed, too). (A raw read:
    a thread blocked in `sys.stdin`'s buffered one stops the interpreter's exit with a fatal error.)"""
    while os.read(0, 65536):
        pass
    os._exit(PARENT_GONE)
