"""A write request's admission, shared by the HTTP deadline (`visrec.guard`) and the write itself
(`visrec.product_writes`): a request answered 503 at its deadline says truly whether its write goes on."""

from __future__ import annotations

import threading


class Admission:
    """Whether a write request was taken, decided once: by the write (`take`, when it is about to go on)
    or by the HTTP deadline (`give_up`), whichever comes first. A write taken goes on to the end even if
    its request is answered 503 meanwhile; one given up is not done at all. So the deadline's answer can
    say which happened (`visrec.guard`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state: str | None = None

    def take(self) -> bool:
        with self._lock:
            self._state = self._state or "taken"
            return self._state == "taken"

    def give_up(self) -> bool:
        """Whether the write was given up (False: it was taken and goes on)."""
        with self._lock:
            self._state = self._state or "given up"
            return self._state == "given up"
