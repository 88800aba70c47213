"""qdrant-edge's errors as visrec's: the engine raises bare `Exception`s with a message, and every call
into it goes through `engine_errors`, the one place they become visrec errors."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from visrec.errors import IndexUnavailable, PointRejected, VisrecError

# How the engine words a full disk (ENOSPC) or a file over RLIMIT_FSIZE (EFBIG), in its messages.
_DISK_FULL = (
    "No space left on device",
    "os error 28",
    "StorageFull",
    "File too large",
    "os error 27",
    "FileTooLarge",
)


class StoreBusy(IndexUnavailable):
    """Another process (or another index in this one) holds the store's WAL lock."""


@contextmanager
def engine_errors(
    store: Path,
    doing: str,
    *,
    rejecting: str | None = None,
    culprit: Callable[[], str] | None = None,
    rejected: type[VisrecError] = PointRejected,
) -> Iterator[None]:
    """Translate whatever qdrant-edge raises inside the block. The rule:

    - visrec errors pass unchanged; so do KeyboardInterrupt and SystemExit (not `Exception`s).
    - With `rejecting` (the block turns caller data, a "point" or a "filter", into the binding's types),
      a TypeError or ValueError is the data's fault, not the store's (NaN or ±inf in a payload, a string
      with lone surrogates, an int beyond 64 bits): `rejected`, "point rejected by the store: <culprit>:
      <reason>", so that the caller can isolate that one point. `culprit()` runs only on failure.
    - Anything else is a store problem: `IndexUnavailable` naming the store and the cause, on one line
      (`StoreBusy` when another process holds it; a full disk or the file size limit said as such).
    """
    try:
        yield
    except VisrecError:
        raise
    except Exception as exc:
        if rejecting is not None and isinstance(exc, TypeError | ValueError):
            who = f"{culprit()}: " if culprit else ""
            raise rejected(f"{rejecting} rejected by the store: {who}{_gist(exc)}") from exc
        message = str(exc)
        if "WouldBlock" in message:
            raise StoreBusy(
                f"embedded store {store} is in use by another process; wait for it to finish "
                "(or point VISREC_QDRANT__PATH elsewhere)"
            ) from exc
        cause = _gist(exc)
        if any(sign in message for sign in _DISK_FULL):
            cause = f"the disk is full or the file size limit was reached ({cause})"
        raise IndexUnavailable(f"embedded store {store}: {doing} failed: {cause}") from exc


def _gist(exc: BaseException) -> str:
    """An engine message on one line. The binding's conversion errors list every variant it tried, a line
    each, mostly type mismatches; a deeper reason (e.g. UnicodeEncodeError: surrogates not allowed) is
    the one worth showing."""
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    for line in lines[1:]:
        reason = line.rsplit("caused by ", 1)[-1]
        if "caused by " in line and "Error: " in reason and not reason.startswith("TypeError"):
            return reason
    return lines[0]
