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
    order = _Order()
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
    order = _Order()
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
