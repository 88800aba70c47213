"""How long writes wait while the service copies its live embedded collection (an optimized copy, a
snapshot), at N products: the copy is taken beside writes and settled with them held (`EdgeIndex.copy`,
`EdgeCopy.settle`: the last flush, then rewriting only what differs, `fs.match_tree`); before, the whole
sparse copy was made with writes held.

A store of `--products` products written directly (random 1000-d vectors, the payload a sync writes, as
snapshot.py writes them; not optimized: the copy reads bytes, whatever they hold), then, on one open
handle, as the service does:

1. a whole sparse copy of the folder timed alone (what writes waited for before);
2. `--rounds` copies taken while a thread writes into the collection (upserts of new vectors and payload
   rewrites of random products, as fast as it can: more than a service's writers would), the writer then
   stopped (as the writer lock stops it) and the copy settled: the settle is what writes wait for now.
   Each copy is checked against the live collection (every point's vector and payload) and discarded;
3. the same with no writes during the copy (the settle's floor: reading both folders);
4. `--rounds` copies more for each of four settles, each copy taken while the thread writes: the settle
   in the service's own process (as before: `fs.match_tree` on a thread, in 256 KiB reads) or in a
   process of its own (now: `fs_apart`), each alone and beside `--readers` threads searching the open
   handle as the service's request threads do. No engine call gives the GIL back, so a thread reading
   files in the service waits behind those searches on every read: that stalled a 1M settle for 90 s.
   Plus the cost of starting that process (a settle of an empty folder), paid with writes held.

Prints one JSON line, then a table. Run one at a time on a quiet machine:

    .venv/bin/python benchmarks/copy_settle.py                           # 20,000 products
    .venv/bin/python benchmarks/copy_settle.py --products 100000 --store /tmp/settle-100k
    .venv/bin/python benchmarks/copy_settle.py --products 300000 --store /tmp/settle-300k
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from snapshot import write_store

from visrec.config import QdrantSettings
from visrec.filters import Filters
from visrec.fs import allocated_bytes, copy_tree_sparse, match_tree
from visrec.fs_apart import match_apart
from visrec.index import IndexPoint, open_index
from visrec.index.edge import EdgeIndex
from visrec.index.edge_copy import EdgeCopy

from common import new_parser

BEFORE_CHUNK = 1 << 18  # the in-process settle's reads, before it moved to a process of its own


class Writes:
    """A thread writing into `index` until stopped: new vectors for random products, and price rewrites."""

    def __init__(self, index: EdgeIndex, n: int) -> None:
        self.index, self.n, self.count = index, n, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        rng = np.random.default_rng(self.count)
        while not self.stop.is_set():
            ids = [f"s{i}" for i in rng.integers(0, self.n, 20)]
            points = self.index.points(ids)
            if self.count % 2:
                self.index.upsert(
                    [
                        IndexPoint(p.product_id, rng.standard_normal((1, 1000), np.float32), p.payload)
                        for p in points
                    ]
                )
            else:
                self.index.overwrite_payloads(
                    {p.product_id: p.payload | {"price": float(rng.integers(1, 99))} for p in points}
                )
            self.count += len(ids)
            time.sleep(0.001)  # a writer that gives the GIL back, as the service's do between requests

    def __enter__(self) -> Writes:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


class Reads:
    """`n` threads searching `index` until stopped (the nearest 10 to a random vector, no filter), as the
    service's request threads do: each search holds the GIL throughout."""

    def __init__(self, index: EdgeIndex, n: int) -> None:
        self.index, self.count = index, 0
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(seed,)) for seed in range(n)]

    def _run(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not self.stop.is_set():
            self.index.search(rng.standard_normal(1000).astype(np.float32), 10, Filters())
            self.count += 1

    def __enter__(self) -> Reads:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()


def settle_before(index: EdgeIndex, copy: EdgeCopy) -> None:
    """The settle as it was: the last flush, then `fs.match_tree` on this thread, in 256 KiB reads."""
    index.flush()
    match_tree(copy.source, copy.folder, BEFORE_CHUNK)


def settle_now(index: EdgeIndex, copy: EdgeCopy) -> None:
    copy.settle()


SETTLES: dict[str, Callable[[EdgeIndex, EdgeCopy], None]] = {"in-process": settle_before, "child": settle_now}


def settle_beside_reads(index: EdgeIndex, n: int, settle: str, readers: int) -> float:
    """A copy taken while a thread writes, then settled (`settle`) beside `readers` searching threads."""
    with Writes(index, n):
        copy = index.copy()
    try:
        with Reads(index, readers):
            time.sleep(0.2 if readers else 0)  # the searches under way when writes are held
            settling = time.perf_counter()
            SETTLES[settle](index, copy)
            return time.perf_counter() - settling
    finally:
        copy.discard()


def child_start_s(root: Path) -> float:
    """A settle in a process of its own of an empty folder: what starting that process costs."""
    source, target = root / ".empty-source", root / ".empty-target"
    source.mkdir(exist_ok=True)
    target.mkdir(exist_ok=True)
    try:
        started = time.perf_counter()
        match_apart(source, target)
        return time.perf_counter() - started
    finally:
        source.rmdir()
        target.rmdir()


def check(live: EdgeIndex, copy: EdgeCopy) -> None:
    """The settled copy holds exactly the live collection's points."""
    with copy.open() as index:
        ids = sorted(str(p["product_id"]) for p in live.all_payloads(Filters(), ["product_id"]))
        assert ids == sorted(str(p["product_id"]) for p in index.all_payloads(Filters(), ["product_id"]))
        for start in range(0, len(ids), 1000):
            page = ids[start : start + 1000]
            want = {p.product_id: p for p in live.points(page)}
            for got in index.points(page):
                assert np.array_equal(got.vectors, want[got.product_id].vectors), got.product_id
                assert got.payload == want[got.product_id].payload, got.product_id


def round_(index: EdgeIndex, n: int, written: bool, verify: bool) -> dict[str, Any]:
    started = time.perf_counter()
    if written:
        with Writes(index, n) as writes:
            copy = index.copy()
            copy_s = time.perf_counter() - started
        meanwhile = writes.count
    else:
        copy, meanwhile = index.copy(), 0
        copy_s = time.perf_counter() - started
    settling = time.perf_counter()
    copy.settle()
    settle_s = time.perf_counter() - settling
    try:
        if verify:
            check(index, copy)
        return {
            "copy_s": round(copy_s, 2),
            "settle_s": round(settle_s, 3),
            "written_meanwhile": meanwhile,
            "copy_du": allocated_bytes(copy.folder),
        }
    finally:
        copy.discard()


def main() -> None:
    p = new_parser(__doc__)
    p.add_argument("--products", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--store", type=Path, help="keep the store here and reuse it (default: a temporary one)")
    p.add_argument("--no-verify", action="store_true", help="skip comparing each copy with the live points")
    p.add_argument("--readers", type=int, default=2, help="threads searching while a copy is settled")
    args = p.parse_args()
    root = args.store or Path(tempfile.mkdtemp(prefix="copy-settle-"))
    try:
        if not (root / "qdrant").exists():
            write_store(root, args.products)
        with open_index(QdrantSettings(path=root / "qdrant")) as index:
            assert isinstance(index, EdgeIndex)
            index.flush()
            whole = Path(tempfile.mkdtemp(dir=index.root, prefix=".whole-"))
            started = time.perf_counter()
            copy_tree_sparse(index.path, whole)
            whole_s = time.perf_counter() - started
            shutil.rmtree(whole)
            live_du = allocated_bytes(index.path)
            busy = [round_(index, args.products, True, not args.no_verify) for _ in range(args.rounds)]
            idle = [round_(index, args.products, False, False) for _ in range(args.rounds)]
            beside = {
                f"{settle}, {readers} readers": [
                    settle_beside_reads(index, args.products, settle, readers) for _ in range(args.rounds)
                ]
                for settle in SETTLES
                for readers in (0, args.readers)
            }
            start_s = statistics.median(child_start_s(index.root) for _ in range(5))
        result = {
            "products": args.products,
            "live_du": live_du,
            "whole_copy_s": round(whole_s, 2),
            "settle_s_median_written": statistics.median(r["settle_s"] for r in busy),
            "settle_s_median_idle": statistics.median(r["settle_s"] for r in idle),
            "busy": busy,
            "idle": idle,
            "settle_s": {way: [round(t, 3) for t in times] for way, times in beside.items()},
            "child_start_s_median": round(start_s, 3),
        }
        print(json.dumps(result))
        print(
            f"{args.products:,} products, live folder {live_du / 2**20:,.0f} MiB (du)\n"
            f"  writes held before (a whole sparse copy):      {whole_s:6.2f} s\n"
            f"  writes held now (settle), writes during copy: "
            f"{result['settle_s_median_written']:6.3f} s (median of {args.rounds}; "
            f"{statistics.median(r['written_meanwhile'] for r in busy):,.0f} points written in each copy)\n"
            f"  writes held now (settle), no writes meanwhile: {result['settle_s_median_idle']:6.3f} s\n"
            f"  copy taken beside writes: {statistics.median(r['copy_s'] for r in busy):.2f} s (median)\n"
            f"  settle (median of {args.rounds}), copy taken beside writes:\n"
            + "".join(
                f"    {way:<24} {statistics.median(times):6.3f} s ({min(times):.3f}-{max(times):.3f})\n"
                for way, times in beside.items()
            )
            + f"  a process of its own starts in {start_s:.3f} s (median of 5)"
        )
    finally:
        if not args.store:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
