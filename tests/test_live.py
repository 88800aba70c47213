"""The live pair's rules (visrec/live.py) under generated interleavings: a real `Service` and `Writer` on a
real embedded store, real threads, real optimized copies made by a child process. Hypothesis draws the
order of writes, optimized copies (with writes and request-side refreshes racing them from other
threads), readers that hold a version for long, reindexes, rollbacks and restarts; after every step:

- every acknowledged write is readable through the live pair, and every read is answered;
- the live pair holds the place its collection's pointer names (never a place a pointer left);
- every place held is a folder that exists, and no folder exists that nothing names and nothing holds.

Bounded for CI (`VISREC_LIVE_EXAMPLES`, default 6); e.g. `VISREC_LIVE_EXAMPLES=100` for a long run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from prometheus_client import CollectorRegistry

from tests.faults.served import synced_store
from visrec.artefact import Manifest
from visrec.config import Settings
from visrec.errors import NotFound, VisrecError, WritesWouldBeLost
from visrec.index import open_store
from visrec.index.edge import current_folder
from visrec.index.edge_copy import GENERATION
from visrec.jobs import ReindexJob, RollbackJob
from visrec.product_writes import ProductWrites
from visrec.service import Service
from visrec.writer import Writer

EXAMPLES = int(os.environ.get("VISREC_LIVE_EXAMPLES", "6"))
PRODUCTS = [f"p{i}" for i in range(6)]
prices = st.integers(1, 999).map(float)
products = st.sampled_from(PRODUCTS)
FILE: dict[str, tuple[float, str] | None] = {p: (10.0 + i, "file") for i, p in enumerate(PRODUCTS)}


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory, artefact: tuple[Path, Manifest]) -> Settings:
    """A synced store of six products, copied for each example."""
    return synced_store(tmp_path_factory.mktemp("live-template"), artefact[0], n=len(PRODUCTS))


class LivePair(RuleBasedStateMachine):
    template: Settings

    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="visrec-live-"))
        shutil.copytree(self.template.qdrant.path.parent, self.root, dirs_exist_ok=True)
        # A version a long reader holds is rebuilt through its handle; anything else held says so soon.
        qdrant = self.template.qdrant.model_copy(update={"path": self.root / "qdrant", "lock_wait_s": 0.2})
        api = self.template.api.model_copy(update={"alias_check_s": 0.0})
        ingest = self.template.ingest.model_copy(update={"failure_report": self.root / "failures.jsonl"})
        self.settings = self.template.model_copy(update={"qdrant": qdrant, "api": api, "ingest": ingest})
        # What each version holds: product → (price, "file" or "patched"), None when deleted.
        self.versions: dict[int, dict[str, tuple[float, str] | None]] = {1: FILE.copy()}
        self.live = 1
        self.readers = ExitStack()
        self._start()

    def _start(self) -> None:
        self.service = Service(self.settings, torch.device("cpu"))
        self.service.start()
        self.writer = Writer(self.service)
        self.writes = ProductWrites(self.writer, CollectorRegistry())

    def _write(self, product: str, price: float | None) -> None:
        """An acknowledged write: a PATCH of the price, or a DELETE (None)."""
        if price is None:
            self.writes.delete(product)
        else:
            try:
                self.writes.patch(product, {"price": price})
            except NotFound:
                assert self.versions[self.live][product] is None
                return
        self.versions[self.live][product] = None if price is None else (price, "patched")

    @rule(product=products, price=prices)
    def patch(self, product: str, price: float) -> None:
        self._write(product, price)

    @rule(product=products)
    def delete(self, product: str) -> None:
        self._write(product, None)

    @rule(
        during=st.lists(st.tuples(products, st.one_of(prices, st.none())), max_size=6),
        refreshes=st.booleans(),
    )
    def optimized_copy(self, during: list[tuple[str, float | None]], refreshes: bool) -> None:
        """An optimized copy in its own thread, with writes (and request-side refreshes, another thread)
        racing it: taken, optimized, caught up and swapped, whatever the order."""
        stop = threading.Event()
        errors: list[BaseException] = []

        def refresh() -> None:
            while not stop.is_set():
                try:
                    self.service.refresh()
                    with self.service.reading() as live:
                        live.index.count()
                except BaseException as exc:  # every read must be answered
                    errors.append(exc)
                    return

        def copy() -> None:
            try:
                self.writer._replace_by_optimized_copy()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=copy)] + ([threading.Thread(target=refresh)] if refreshes else [])
        for thread in threads:
            thread.start()
        for product, price in during:
            self._write(product, price)
        threads[0].join(120)
        stop.set()
        for thread in threads[1:]:
            thread.join(30)
        assert not errors, errors

    @rule()
    def hold_a_reader(self) -> None:
        """A long reader (a feed, a gate): holds the live version until released, across swaps."""
        live = self.readers.enter_context(self.service.reading())
        assert live.index.exists()

    @rule()
    def release_readers(self) -> None:
        self.readers.close()
        self.readers = ExitStack()

    @rule(force=st.booleans())
    def reindex(self, force: bool) -> None:
        catalogue, model = self.root / "catalogue.csv", self.settings.artefact
        job = ReindexJob(catalogue=catalogue, model=model, max_quality_drop=1, force=force)
        try:
            self.writer.run(job, lambda *_: None)
        except VisrecError as exc:  # the version above the live one held by a long reader: nothing changes
            assert "in use" in str(exc), exc
            return
        # The version above the live one (reused if there is one), as a sync of the file would leave it:
        # the catalogue's products as its rows say (PATCHed and DELETEd ones set back).
        self.live = max((g for g in self.versions if g > self.live), default=self.live + 1)
        self.versions[self.live] = FILE.copy()

    @rule()
    def rollback(self) -> None:
        older = max((g for g in self.versions if g < self.live), default=None)
        try:
            self.writer.run(RollbackJob(), lambda *_: None)
        except WritesWouldBeLost:  # refused exactly when the two versions differ
            assert older is not None and self.versions[older] != self.versions[self.live]
            return
        except VisrecError as exc:
            assert ("no version" in str(exc) and older is None) or "in use" in str(exc), exc
            return
        assert older is not None and self.versions[older] == self.versions[self.live]
        self.live = older

    @rule()
    def restart(self) -> None:
        """The service stops (its readers first) and starts again on the same store."""
        self.readers.close()
        self.readers = ExitStack()
        self.writer.close()
        self.service.close()
        self._start()

    @invariant()
    def every_acknowledged_write_is_readable(self) -> None:
        with self.service.reading() as live:
            held = live.index.payloads(PRODUCTS)
        assert {p: v["price"] for p, v in held.items()} == {
            p: held[0] for p, held in self.versions[self.live].items() if held is not None
        }

    @invariant()
    def the_live_pair_is_where_the_pointer_says(self) -> None:
        store = open_store(self.settings.qdrant)
        with self.service.reading() as live:
            assert live.index.place == store.place(store.live())

    @invariant()
    def no_folder_is_lost_or_left(self) -> None:
        held = set(self.service.state.places())
        store = self.settings.qdrant.path
        for place in held:
            assert Path(place).is_dir(), place
        for folder in store.iterdir():
            if folder.is_dir():
                named = current_folder(store, folder.name.split(GENERATION)[0]) == folder
                assert named or str(folder) in held, (folder.name, sorted(held))

    def teardown(self) -> None:
        self.readers.close()
        self.writer.close()
        self.service.close()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.mark.slow
def test_the_live_pair_under_generated_interleavings(template: Settings) -> None:
    LivePair.template = template
    run_state_machine_as_test(
        LivePair,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=10,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
