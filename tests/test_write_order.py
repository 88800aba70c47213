"""`product_writes._Order` with real threads and generated writes: per product, writes take effect in
the order they arrived, whatever each one's duration and whichever thread runs first; writes of other
products never wait for them; and no write waits for itself (no deadlock)."""

from __future__ import annotations

import random
import threading
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from visrec.product_writes import _Order

WRITES = st.lists(
    st.tuples(st.frozensets(st.sampled_from("abcd"), min_size=1, max_size=3), st.integers(0, 3)),
    min_size=1,
    max_size=12,
)


@settings(max_examples=40, deadline=None)
@given(writes=WRITES, seed=st.integers(0, 2**16))
def test_each_products_writes_take_effect_in_arrival_order(
    writes: list[tuple[frozenset[str], int]], seed: int
) -> None:
    order = _Order(threading.Condition())
    effects: dict[str, list[int]] = {}
    lock = threading.Lock()
    arrived = [order.arrive(ids) for ids, _ in writes]  # in this order, as requests come in
    jitter = random.Random(seed)
    delays = [jitter.random() * 0.004 for _ in writes]

    def write(n: int) -> None:
        ids, work = writes[n]
        time.sleep(delays[n])  # threads start in any order
        order.wait_turn(ids, arrived[n])
        try:
            with lock:
                for product_id in ids:
                    effects.setdefault(product_id, []).append(arrived[n])
            time.sleep(work / 1000)
        finally:
            order.leave(ids, arrived[n])

    threads = [threading.Thread(target=write, args=(n,)) for n in range(len(writes))]
    for thread in reversed(threads):  # the last to arrive starts first
        thread.start()
    for thread in threads:
        thread.join(10)
    assert not any(thread.is_alive() for thread in threads), "a write waited for ever"
    for product_id, numbers in effects.items():
        expected = [arrived[n] for n, (ids, _) in enumerate(writes) if product_id in ids]
        assert numbers == expected, product_id


def test_another_products_write_does_not_wait() -> None:
    order = _Order(threading.Condition())
    slow = order.arrive(["a"])
    other = order.arrive(["b"])
    later_a = order.arrive(["a"])
    done = threading.Event()

    def write_b() -> None:
        order.wait_turn(["b"], other)
        done.set()

    threading.Thread(target=write_b).start()
    assert done.wait(2)  # "a" is still being written
    waiting = threading.Thread(target=order.wait_turn, args=(["a"], later_a))
    waiting.start()
    waiting.join(0.2)
    assert waiting.is_alive()  # the later "a" waits for the slow one
    order.leave(["a"], slow)
    waiting.join(2)
    assert not waiting.is_alive()


def _busy(seconds: float) -> None:
    """Work that holds the GIL, as a unit's Python does (reading records, building payloads)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        sum(range(200))


def test_the_writer_lock_gives_a_waiting_write_the_next_turn() -> None:
    """A job taking the writer unit after unit (released and taken again at once) cannot starve a write
    waiting for it: Python's own locks let the releasing thread take them again first (a PATCH waited
    2-7 s through a sync's short units). Reentrant, as the writer's lock is."""
    from visrec.writer import FairLock

    lock = FairLock()
    stop = threading.Event()
    units = 0

    def job() -> None:
        nonlocal units
        while not stop.is_set():
            with lock, lock:  # reentrant
                units += 1
                _busy(0.002)  # a unit's work

    worker = threading.Thread(target=job)
    worker.start()
    try:
        while units < 5:
            time.sleep(0.001)
        waits = []
        for _ in range(20):
            started = time.monotonic()
            with lock:
                waits.append(time.monotonic() - started)
            time.sleep(0.002)
        assert max(waits) < 0.1, max(waits)  # a unit or two, not the job
    finally:
        stop.set()
        worker.join(5)


@settings(max_examples=20, deadline=None)
@given(holders=st.lists(st.integers(0, 3), min_size=2, max_size=8))
def test_the_writer_lock_is_granted_in_the_order_asked(holders: list[int]) -> None:
    from visrec.writer import FairLock

    lock = FairLock()
    granted: list[int] = []
    threads = []
    with lock:  # everyone queues behind this
        for n, work in enumerate(holders):

            def take(n: int = n, work: int = work) -> None:
                with lock:
                    granted.append(n)
                    time.sleep(work / 1000)

            threads.append(threading.Thread(target=take))
            threads[-1].start()
            deadline = time.monotonic() + 2
            while lock.asked <= n + 1 and time.monotonic() < deadline:  # it queued
                time.sleep(0.001)
    for thread in threads:
        thread.join(5)
    assert granted == list(range(len(holders)))
