"""A copy of a live embedded collection (`EdgeIndex.copy`, `EdgeCopy.settle`), its bytes read and written
in a process of its own (`visrec.fs_apart`): taken while a thread writes, then settled with the writes
stopped, it holds the live collection point by point; that process failing or killed raises one clear
error and leaves no copy behind. Real engine, real files, real processes. (Its pace beside threads that
hold the GIL is `benchmarks/copy_settle.py`'s to show: how long the old in-process match waited depends
on how the machine schedules those threads, 0.1-1.3 s here for the same work, too loose for a test.)"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from visrec.config import QdrantSettings
from visrec.errors import IndexUnavailable
from visrec.filters import Filters
from visrec.index import IndexPoint, open_index
from visrec.index.edge import EdgeIndex

DIM = 16
PRODUCTS = 2000


@pytest.fixture
def live(tmp_path: Path) -> Iterator[EdgeIndex]:
    with open_index(QdrantSettings(path=tmp_path / "qdrant")) as index:
        assert isinstance(index, EdgeIndex)
        index.create(DIM, {"model_version": "test"})
        rng = np.random.default_rng(0)
        index.upsert(
            [
                IndexPoint(
                    f"p{i}",
                    rng.standard_normal((1, DIM), np.float32),
                    {"product_id": f"p{i}", "price": float(i)},
                )
                for i in range(PRODUCTS)
            ]
        )
        yield index


def every_point(index: EdgeIndex) -> dict[str, tuple[bytes, dict[str, object]]]:
    ids = [str(p["product_id"]) for p in index.all_payloads(Filters(), ["product_id"])]
    return {p.product_id: (p.vectors.tobytes(), p.payload) for p in index.points(ids)}


@contextlib.contextmanager
def writing(index: EdgeIndex) -> Iterator[list[int]]:
    """A thread upserting new vectors and prices (and new products) until the block ends, as fast as it
    can; yields the count of its writes, which it fills in."""
    stop, count = threading.Event(), [0]

    def run() -> None:
        rng = np.random.default_rng(1)
        while not stop.is_set():
            ids = [f"p{i}" for i in rng.integers(0, PRODUCTS + 500, 20)]
            index.upsert(
                [
                    IndexPoint(
                        i,
                        rng.standard_normal((1, DIM), np.float32),
                        {"product_id": i, "price": float(count[0])},
                    )
                    for i in ids
                ]
            )
            count[0] += 1

    thread = threading.Thread(target=run)
    thread.start()
    try:
        yield count
    finally:
        stop.set()
        thread.join()


def test_a_copy_taken_while_a_thread_writes_holds_the_live_points_once_settled(live: EdgeIndex) -> None:
    with writing(live) as writes:
        while writes[0] < 5:  # under way before the copy begins
            time.sleep(0.01)
        copy = live.copy()
    try:
        assert writes[0] > 5  # some landed while it was copied
        copy.settle()  # with the writes stopped, as the writer's lock stops them
        with copy.open() as settled:
            assert isinstance(settled, EdgeIndex)
            assert every_point(settled) == every_point(live)
    finally:
        copy.discard()
    assert not copy.folder.exists()


def test_a_copy_that_cannot_be_read_raises_one_line_and_leaves_nothing(live: EdgeIndex) -> None:
    copy = live.copy()
    os.mkfifo(live.path / "a-pipe")  # no plain file: the process copying or matching refuses it
    try:
        with pytest.raises(IndexUnavailable, match=r"cannot copy it: .*a-pipe is not a plain file or folder"):
            copy.settle()
        assert not copy.folder.exists()
        with pytest.raises(IndexUnavailable, match=r"cannot copy it to optimize: .*a-pipe is not a plain"):
            live.copy()
    finally:
        (live.path / "a-pipe").unlink()
    assert sorted(p.name for p in live.root.iterdir() if p.is_dir()) == [live.path.name]


def children_running(module: bytes) -> list[int]:
    """This process's children whose command line names `module` (once they have exec'd)."""
    found = []
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):
            for pid in (task / "children").read_text().split():
                with contextlib.suppress(OSError):
                    if module in (Path("/proc") / pid / "cmdline").read_bytes():
                        found.append(int(pid))
    return found


def test_a_copy_whose_process_is_killed_raises_one_line_and_leaves_nothing(live: EdgeIndex) -> None:
    copy = live.copy()
    errors: list[BaseException] = []

    def settle() -> None:
        try:
            copy.settle()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=settle)
    thread.start()
    try:
        deadline, pids = time.monotonic() + 30, list[int]()
        while not pids:
            assert thread.is_alive(), "settled before its process could be killed"
            assert time.monotonic() < deadline, "no process settling the copy appeared"
            pids = children_running(b"visrec.fs_apart")
        os.kill(pids[0], signal.SIGKILL)  # started ~50 ms ago (Python's start): midway
    finally:
        thread.join(timeout=60)
    assert len(errors) == 1 and isinstance(errors[0], IndexUnavailable), errors
    assert "was killed (SIGKILL)" in str(errors[0]) and "\n" not in str(errors[0])
    assert not copy.folder.exists()


def _optimizing_store(root: Path) -> Path:
    """A collection folder whose optimize() takes seconds (an HNSW graph of 20,000 points to build)."""
    with open_index(QdrantSettings(path=root)) as index:
        assert isinstance(index, EdgeIndex)
        index.create(512, {"model_version": "test"})
        rng = np.random.default_rng(1)
        for start in range(0, 20_000, 2000):
            index.upsert(
                [
                    IndexPoint(f"p{i}", rng.standard_normal((1, 512), np.float32), {"product_id": f"p{i}"})
                    for i in range(start, start + 2000)
                ]
            )
        return index.path


def _gone(pid: int) -> bool:
    """Whether a process has ended (a zombie nobody reaped yet counts)."""
    try:
        return "\nState:\tZ" in (Path("/proc") / str(pid) / "status").read_text()
    except OSError:
        return True


def test_an_optimize_ends_with_the_process_that_started_it(tmp_path: Path) -> None:
    """The engine's optimize() holds its process's GIL, so the child that runs it cannot watch for its
    parent's end: killed (kill -9) mid-optimize, the service's process takes its optimizing child with
    it, which would otherwise build a graph for nobody (minutes at 1M)."""
    folder = _optimizing_store(tmp_path / "qdrant")
    code = f"import pathlib, visrec.index.edge_copy as e; e.optimize_in_child(pathlib.Path({str(folder)!r}))"
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline, child = time.monotonic() + 30, None
        while child is None:
            assert parent.poll() is None, "optimized before it could be killed"
            assert time.monotonic() < deadline, "no optimizing process appeared"
            found = [
                int(pid)
                for task in Path(f"/proc/{parent.pid}/task").iterdir()
                for pid in (task / "children").read_text().split()
            ]
            child = found[0] if found else None
            time.sleep(0.05)
        time.sleep(1.0)  # the child has loaded the store and optimizes
        assert not _gone(child)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 5
        while not _gone(child):
            assert time.monotonic() < deadline, "the optimizing process outlived the one that started it"
            time.sleep(0.05)
    finally:
        parent.kill()
        parent.wait()


def test_an_optimize_that_fails_raises_one_line(tmp_path: Path) -> None:
    from visrec.index.edge_copy import optimize_in_child

    (tmp_path / "not-a-store").mkdir()
    with pytest.raises(IndexUnavailable, match=r"optimize failed in its process: \w") as raised:
        optimize_in_child(tmp_path / "not-a-store")
    assert "\n" not in str(raised.value)
