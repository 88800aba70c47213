"""A background writer: index writes overlap with embedding instead of stalling it."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class BackgroundWriter(Generic[T]):
    """Runs `write(item)` in one background thread, fed through a bounded queue, so index writes overlap
    with embedding instead of stalling it. An error on either side stops both and is re-raised in the
    caller's thread; the bounded queue caps the memory held by batches waiting to be written.
    """

    _DONE = object()

    def __init__(self, write: Callable[[T], None], max_pending: int = 4) -> None:
        self._write = write
        self._queue: queue.Queue[object] = queue.Queue(max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="index-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not self._DONE:
            if self._error is None:  # after a failure, drain without writing so the producer never blocks
                try:
                    self._write(item)  # type: ignore[arg-type]
                except BaseException as exc:  # re-raised in the caller's thread, whatever it is
                    self._error = exc

    def put(self, item: T) -> None:
        """Queue an item; blocks while the queue is full; raises the writer's error if it failed."""
        self._raise_if_failed()
        self._queue.put(item)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def __enter__(self) -> BackgroundWriter[T]:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        """Wait for every queued item to be written (or dropped after a failure); re-raise a write error."""
        self._queue.put(self._DONE)
        self._thread.join()
        if exc is None:
            self._raise_if_failed()
