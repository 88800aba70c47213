"""The heavy routes' slots: how much heavy work (embedding, search, fetching a remote photo) runs at once.

Slots count work, not waiting (`Slots`): a heavy route takes one when its work starts (after its body is
in: a slow upload holds none), waiting in a short queue when all are taken, and its work (`Slots.run`, in
a worker thread) gives it back when it ends. A request past its deadline is answered 503 at once, but its
thread cannot be stopped: its slot stays taken until the thread is done, so timed-out requests cannot
pile up more running work than there are slots.

The guard (`visrec.guard`) sheds a heavy request before reading its body when `Slots.full()`; the routes
run their work through `Slots.run` and answer `BUSY` when it gives None.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from typing import Literal, TypeVar

import anyio

T = TypeVar("T")
BUSY = "busy: too many photo and similarity searches at once; retry shortly"


class _Waiter:
    def __init__(self, future: asyncio.Future[None]) -> None:
        self.future, self.granted = future, False


class Slot:
    """One heavy slot: held by its request until a worker thread claims it for the work, then by the
    work until it ends. Given back once, by whichever holds it last."""

    def __init__(self, slots: Slots) -> None:
        self._slots = slots
        self._state: Literal["held", "claimed", "returned"] = "held"

    def claim(self) -> bool:
        """The work takes the slot over (in its thread); False if the request already gave it back."""
        with self._slots.lock:
            if self._state != "held":
                return False
            self._state = "claimed"
            return True

    def give_back(self, unless_claimed: bool = False) -> None:
        """Give the slot back (by the work when it ends; by the request, `unless_claimed`, at its end)."""
        with self._slots.lock:
            if self._state == "returned" or (unless_claimed and self._state == "claimed"):
                return
            self._state = "returned"
            self._slots.release_locked()


class Slots:
    """`size` slots for heavy work; a request that finds them taken waits, first come first served, at
    most `wait_s` in a queue of at most `depth` (then it is refused: `take` answers None). Thread-safe:
    work ends in worker threads. `running` counts the works running now, from inside their threads, and
    `peak` the most at once since start."""

    def __init__(self, size: int, depth: int, wait_s: float) -> None:
        self.size, self.depth, self.wait_s = size, depth, wait_s
        self.on_refused: Callable[[], None] = lambda: None  # the guard counts refusals in its metrics
        self.lock = threading.Lock()
        self.taken = 0
        self.running = self.peak = 0
        self._queue: deque[_Waiter] = deque()

    @property
    def queued(self) -> int:
        return len(self._queue)

    def full(self) -> bool:
        """Whether a request arriving now would be refused at once (every slot taken, the queue full)."""
        with self.lock:
            return self.taken >= self.size and (len(self._queue) >= self.depth or self.wait_s <= 0)

    async def take(self) -> Slot | None:
        """A slot, at once or after a wait in the queue; None if the queue is full or the wait ran out."""
        slot = await self._take()
        if slot is None:
            self.on_refused()
        return slot

    async def _take(self) -> Slot | None:
        with self.lock:
            if self.taken < self.size and not self._queue:
                self.taken += 1
                return Slot(self)
            if len(self._queue) >= self.depth or self.wait_s <= 0:
                return None
            waiter = _Waiter(asyncio.get_running_loop().create_future())
            self._queue.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), self.wait_s)
        except TimeoutError:
            pass
        except asyncio.CancelledError:  # the request ended while waiting (its deadline, a disconnect)
            with self.lock:
                if waiter.granted:
                    self.release_locked()
                else:
                    self._queue.remove(waiter)
            raise
        with self.lock:  # a slot may have been passed on just as the wait ran out: then it is ours
            if waiter.granted:
                return Slot(self)
            self._queue.remove(waiter)
            return None

    def release_locked(self) -> None:
        """A slot is free (called under `lock`, from any thread): to the first waiter, else free."""
        if self._queue:
            waiter = self._queue.popleft()
            waiter.granted = True  # the slot passes to it as it is: `taken` unchanged
            waiter.future.get_loop().call_soon_threadsafe(_wake, waiter.future)
        else:
            self.taken -= 1

    async def run(self, work: Callable[[], T]) -> T | None:
        """`work()` in a worker thread under a slot, which it holds until it returns — also when the
        request waiting for it is cancelled at its deadline (the thread cannot be stopped; its slot stays
        taken). None if no slot came (the queue full or the wait over: the caller answers busy)."""
        slot = await self.take()
        if slot is None:
            return None
        try:
            return await self._run(slot, work)
        finally:
            slot.give_back(unless_claimed=True)  # cancelled before a thread took it up

    async def _run(self, slot: Slot, work: Callable[[], T]) -> T:
        def holding() -> T:
            if not slot.claim():  # the request gave up before a thread was free: nothing to do
                raise asyncio.CancelledError
            with self.lock:
                self.running += 1
                self.peak = max(self.peak, self.running)
            try:
                return work()
            finally:
                with self.lock:
                    self.running -= 1
                slot.give_back()

        return await anyio.to_thread.run_sync(holding, abandon_on_cancel=True)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
