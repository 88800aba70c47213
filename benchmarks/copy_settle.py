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
3. the same with no writes during the copy (the settle's floor: reading both folders).

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
from pathlib import Path
from typing import Any

import numpy as np
from snapshot import write_store

from visrec.config import QdrantSettings
from visrec.filters import Filters
from visrec.fs import allocated_bytes, copy_tree_sparse
from visrec.index import IndexPoint, open_index
from visrec.index.edge import EdgeIndex
from visrec.index.edge_copy import EdgeCopy

from common import new_parser


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
        result = {
            "products": args.products,
            "live_du": live_du,
            "whole_copy_s": round(whole_s, 2),
            "settle_s_median_written": statistics.median(r["settle_s"] for r in busy),
            "settle_s_median_idle": statistics.median(r["settle_s"] for r in idle),
            "busy": busy,
            "idle": idle,
        }
        print(json.dumps(result))
        print(
            f"{args.products:,} products, live folder {live_du / 2**20:,.0f} MiB (du)\n"
            f"  writes held before (a whole sparse copy):      {whole_s:6.2f} s\n"
            f"  writes held now (settle), writes during copy: "
            f"{result['settle_s_median_written']:6.3f} s (median of {args.rounds}; "
            f"{statistics.median(r['written_meanwhile'] for r in busy):,.0f} points written in each copy)\n"
            f"  writes held now (settle), no writes meanwhile: {result['settle_s_median_idle']:6.3f} s\n"
            f"  copy taken beside writes: {statistics.median(r['copy_s'] for r in busy):.2f} s (median)"
        )
    finally:
        if not args.store:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
