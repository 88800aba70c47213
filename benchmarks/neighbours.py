"""`visrec neighbours` at --size products (default 100,000), k=20, `--same category`, on the embedded store.

The store is made as the other scale benchmarks make theirs: points written directly, here clustered
random 1000-d vectors (--categories categories, each a few looks around its centre, each product a look
plus noise), with a category, a price and a vectors hash as sync records them; then `optimize()`, as
a sync ends (`--no-optimize` leaves it out: it builds the HNSW graph, far too slow at 1M; the feed with
`--same` reads each class whole into memory and searches it by matrix products, `visrec.class_matrix`,
which needs no graph; a class the feed leaves to the engine, over `MATRIX_BYTES` or past the
`CLASSES_READ` largest, is then searched without one). `--layout int8-disk` makes the store as
snapshot.py and docs/scale.md's 1M runs do: int8 codes in RAM, the original vectors on disk. The store
is kept in --store and reused by the next run with the same size, seed, categories, layout and
optimize (its making is timed once). Then, through `visrec.feed_run.make_feed`:

1. a full feed (timed), and its recall@k against exact brute force (numpy, within each category) on
   --sample products;
2. 1 % of the products get new photos (new vectors, a new vectors hash), then a delta on the full feed:
   its time as a share of the full feed's;
3. every price changes (no rule reads price), then a delta on the last: its time and its size (empty).

`--full-only` stops after 1 (the full feed and its recall), and then reads the made store itself rather
than a copy (nothing is written to it). Besides the seconds, the results give the feed's and its state
file's sizes and the process's peak RSS.

`--one-class N` instead times what dominates a full feed at scale, without a store: one class of N
clustered products held in memory (`class_matrix.ClassMatrix`) and --rows of them searched as a full
feed searches them (256 a call, k's pool deep), in ms a row; a feed of 1M products in 10 classes
searches 1M rows of classes of 100,000.

    nice -n 10 .venv/bin/python benchmarks/neighbours.py --store /tmp/nbbench
    nice -n 10 .venv/bin/python benchmarks/neighbours.py --one-class 100000 --rows 5120
    nice -n 10 .venv/bin/python benchmarks/neighbours.py --size 1000000 --categories 100 \
        --layout int8-disk --no-optimize --full-only --store /tmp/nb1m-store --out /tmp/nb1m-out
"""

from __future__ import annotations

import cProfile
import json
import pstats
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from visrec import query
from visrec.class_matrix import ClassMatrix
from visrec.config import QdrantSettings
from visrec.feed_run import make_feed
from visrec.filters import Filters
from visrec.fs import copy_tree_sparse
from visrec.index import IndexPoint, SearchRequest, VectorIndex
from visrec.index.edge import EdgeIndex
from visrec.neighbours import BATCH, RESERVE, FeedRules

from common import new_parser, write_results

DIM = 1000
# The store's layouts, as benchmarks/snapshot.py's LAYOUTS (its imports are heavier: not imported here).
LAYOUTS: dict[str, dict[str, Any]] = {
    "float32": {},
    "int8-disk": {"quantization": "int8", "vectors_on_disk": True},
}


def clustered(n: int, categories: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(vectors, category of each): each category a centre, 20 looks around it, each product a look
    plus noise, at the spread of a trained model's embeddings (norms ~ 30). The noise is drawn
    10,000 rows at a time (the same numbers as one draw: the generator's stream is sequential), so 1M
    products hold 4 GB, not the 20 GB of float64 temporaries of a single draw."""
    centres = rng.standard_normal((categories, DIM)).astype(np.float32) * 0.6
    looks = centres[:, None, :] + rng.standard_normal((categories, 20, DIM)).astype(np.float32) * 0.35
    labels = rng.integers(0, categories, n)
    look = rng.integers(0, 20, n)
    vectors = np.empty((n, DIM), np.float32)
    for start in range(0, n, 10_000):
        end = min(start + 10_000, n)
        noise = rng.standard_normal((end - start, DIM)).astype(np.float32) * 0.25
        vectors[start:end] = looks[labels[start:end], look[start:end]] + noise
    return vectors, labels


def point(i: int, vector: np.ndarray, label: int, price: float, version: int = 0) -> IndexPoint:
    payload = {
        "product_id": f"b{i:06d}",
        "category": f"cat-{label}",
        "price": price,
        "vectors_hash": f"photo-{i}-{version}",
        "model_version": "bench",
    }
    return IndexPoint(f"b{i:06d}", vector, payload)


def made_store(args: Any) -> tuple[EdgeIndex, np.ndarray, np.ndarray, dict[str, float]]:
    """The store, made (and optimized, unless --no-optimize) once in `--store/made`; each run changes a
    sparse copy of it (`--store/run`: a payload rewrite moves a point out of the optimized segments, so
    a store a run changed is no longer the one a sync leaves); --full-only writes nothing and reads the
    made store itself. A store made with other options (`made.json` says which) is made anew."""
    rng = np.random.default_rng(args.seed)
    vectors, labels = clustered(args.size, args.categories, rng)
    made, run = args.store / "made", args.store / "run"
    marker = args.store / "made.json"
    made_as = {
        "size": args.size,
        "seed": args.seed,
        "categories": args.categories,
        "layout": args.layout,
        "optimized": not args.no_optimize,
    }
    settings = LAYOUTS[args.layout]
    timing: dict[str, float] = {}
    if not (marker.is_file() and json.loads(marker.read_text()).get("made_as") == made_as):
        shutil.rmtree(args.store, ignore_errors=True)
        index = EdgeIndex(made, "bench", QdrantSettings(path=made, **settings))
        index.create(DIM, {"model_version": "bench"})
        started = time.perf_counter()
        for start in range(0, args.size, 1000):
            end = min(start + 1000, args.size)
            index.upsert([point(i, vectors[i], int(labels[i]), 10.0 + i % 90) for i in range(start, end)])
        timing["upsert_s"] = round(time.perf_counter() - started, 1)
        if not args.no_optimize:
            started = time.perf_counter()
            index.optimize()
            timing["optimize_s"] = round(time.perf_counter() - started, 1)
        index.close()
        marker.write_text(json.dumps({"size": args.size, "made_as": made_as, "timing": timing}))
        print(f"store made: {timing}", file=sys.stderr)
    shutil.rmtree(run, ignore_errors=True)
    if not args.full_only:
        copy_tree_sparse(made, run)
    used = made if args.full_only else run
    index = EdgeIndex(used, "bench", QdrantSettings(path=used, **settings))
    return index, vectors, labels, json.loads(marker.read_text())["timing"]


def recall(feed: Path, vectors: np.ndarray, labels: np.ndarray, sample: int, k: int, seed: int) -> float:
    """recall@k of the feed's lists against exact brute force within each product's category."""
    rng = np.random.default_rng(seed + 1)
    chosen = set(rng.choice(len(vectors), sample, replace=False).tolist())
    lists: dict[int, list[str]] = {}
    with feed.open() as f:
        for line in f:
            entry = json.loads(line)
            i = int(entry["product_id"][1:])
            if i in chosen:
                lists[i] = [n["product_id"] for n in entry["neighbours"]]
    squared = np.concatenate(
        [(vectors[s : s + 10_000].astype(np.float64) ** 2).sum(1) for s in range(0, len(vectors), 10_000)]
    )
    found = 0
    for label in sorted({int(labels[i]) for i in lists}):  # a class's rows made float64 once
        members = np.flatnonzero(labels == label)
        rows = vectors[members].astype(np.float64)
        for i, got in lists.items():
            if labels[i] != label:
                continue
            keep = members != i
            same = members[keep]
            d = squared[same] - 2 * rows[keep] @ vectors[i].astype(np.float64)
            truth = {f"b{j:06d}" for j in same[np.argsort(d, kind="stable")[:k]]}
            found += len(truth & set(got))
    return found / (k * len(lists))


def change_photos(index: VectorIndex, vectors: np.ndarray, labels: np.ndarray, seed: int) -> int:
    """New photos for 1 % of the products: each moves near another product of its category (or stays
    near its own place, moved by noise)."""
    rng = np.random.default_rng(seed + 3)
    chosen = rng.choice(len(vectors), len(vectors) // 100, replace=False)
    others = rng.choice(len(vectors), len(chosen))
    for start in range(0, len(chosen), 1000):
        batch = []
        for i, j in zip(chosen[start : start + 1000], others[start : start + 1000], strict=True):
            same = labels[j] == labels[i]
            moved = (vectors[j] if same else vectors[i]) + rng.standard_normal(DIM).astype(np.float32) * 0.25
            batch.append(point(int(i), moved.astype(np.float32), int(labels[i]), 10.0 + i % 90, version=1))
        index.upsert(batch)
    return len(chosen)


def change_prices(index: VectorIndex, size: int) -> None:
    """Every product's price changes (a payload rewrite, vectors untouched, as a sync of prices does)."""
    for start in range(0, size, 1000):
        ids = [f"b{i:06d}" for i in range(start, min(start + 1000, size))]
        payloads = index.payloads(ids)
        index.overwrite_payloads({p: {**payloads[p], "price": payloads[p]["price"] + 1} for p in ids})


def one_class(size: int, rows: int, k: int, seed: int) -> None:
    """Time `rows` rows of one class of `size` products searched in memory (see the module's doc)."""
    vectors, _ = clustered(size, 1, np.random.default_rng(seed))
    ids = [f"b{i:07d}" for i in range(size)]
    started = time.perf_counter()
    matrix = ClassMatrix(Filters(), None, ids, [{"product_id": p} for p in ids], vectors, np.arange(size + 1))  # type: ignore[arg-type]
    held_s = time.perf_counter() - started
    depth = query.fetch_depth(RESERVE * k)
    started = time.perf_counter()
    for begin in range(0, rows, BATCH):
        chosen = range(begin, min(begin + BATCH, rows))
        matrix.search_batch(
            [SearchRequest(vectors[i], depth, Filters(), [ids[i]], ["product_id"]) for i in chosen]
        )
    per_row = (time.perf_counter() - started) / rows
    print(
        f"one class of {size} products in memory ({held_s:.1f} s to centre), {rows} rows searched "
        f"{depth} deep: {per_row * 1e3:.3f} ms a row (1M rows: {per_row * 1e6 / 60:.1f} min)"
    )


def main() -> None:
    p = new_parser(__doc__)
    p.add_argument("--store", type=Path, default=Path("/tmp/visrec-neighbours-bench"))
    p.add_argument("--out", type=Path, default=Path(".visrec/neighbours"))
    p.add_argument("--size", type=int, default=100_000)
    p.add_argument("--categories", type=int, default=10)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--sample", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--one-class", type=int, default=0, help="time one class of this many in memory")
    p.add_argument("--rows", type=int, default=5120, help="with --one-class: the rows searched")
    p.add_argument(
        "--layout",
        choices=sorted(LAYOUTS),
        default="float32",
        help="the store's layout: float32 in RAM, or int8-disk (int8 codes in RAM, originals on disk, "
        "as snapshot.py and docs/scale.md's 1M runs)",
    )
    p.add_argument(
        "--no-optimize",
        action="store_true",
        help="skip optimize() (the HNSW graph: far too slow at 1M); the feed's classes read into memory "
        "(class_matrix) need no graph, only a class left to the engine is then searched without one",
    )
    p.add_argument(
        "--full-only",
        action="store_true",
        help="the full feed and its recall only (no deltas); reads the made store, not a copy",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="run each delta under cProfile: its 25 costliest calls printed, the stats kept beside the "
        "feeds (DELTA.prof); its seconds then include the profiler's cost",
    )
    args = p.parse_args()
    if args.one_class:
        one_class(args.one_class, min(args.rows, args.one_class), args.k, args.seed)
        return

    index, vectors, labels, timing = made_store(args)
    rules = FeedRules(k=args.k, same=("category",))
    feeds = args.out / "feeds"
    feeds.mkdir(parents=True, exist_ok=True)
    row: dict[str, Any] = {
        "n": args.size,
        "categories": args.categories,
        "layout": args.layout,
        "optimized": not args.no_optimize,
        "k": args.k,
        "same": "category",
        **timing,
    }
    full = make_feed(index, rules, feeds / "full.jsonl", "jsonl")
    row["full_s"] = full["seconds"]
    row["full_queried"] = full["queried"]
    row["feed_bytes"] = Path(full["feed"]).stat().st_size
    row["state_bytes"] = Path(full["state"]).stat().st_size
    print(f"full feed: {full}", file=sys.stderr)
    row["recall"] = round(recall(feeds / "full.jsonl", vectors, labels, args.sample, args.k, args.seed), 4)
    if args.full_only:
        index.close()
        full_only(args, row, full, timing)
        return
    row["photos_changed"] = change_photos(index, vectors, labels, args.seed)
    delta = _delta(args, index, rules, feeds / "delta-photos.jsonl", feeds / "full.jsonl")
    print(f"delta after 1 % photos: {delta}", file=sys.stderr)
    row["photos_delta"] = {k: delta[k] for k in ("seconds", "moved", "queried", "lists_written", "deleted")}
    started = time.perf_counter()
    change_prices(index, args.size)
    row["price_rewrite_s"] = round(time.perf_counter() - started, 1)
    prices = _delta(args, index, rules, feeds / "delta-prices.jsonl", feeds / "delta-photos.jsonl")
    print(f"delta after every price: {prices}", file=sys.stderr)
    row["prices_delta"] = {k: prices[k] for k in ("seconds", "moved", "queried", "lists_written", "deleted")}
    index.close()
    share = row["photos_delta"]["seconds"] / row["full_s"]
    price_share = row["prices_delta"]["seconds"] / row["full_s"]
    lines = [
        f"{args.size} products, {args.categories} categories, k={args.k}, --same category; "
        f"store: upsert {timing.get('upsert_s')} s, optimize {timing.get('optimize_s')} s",
        "",
        "| run | seconds | share of the full feed | queried | lists written | target |",
        "|---|---|---|---|---|---|",
        f"| full feed | {row['full_s']} | 1 | {full['queried']} | {full['lists_written']} | ≤ 120 s |",
        f"| delta, 1 % photos changed | {row['photos_delta']['seconds']} | {share:.1%} | "
        f"{row['photos_delta']['queried']} | {row['photos_delta']['lists_written']} | ≤ 25 % |",
        f"| delta, every price changed | {row['prices_delta']['seconds']} | {price_share:.1%} | "
        f"{row['prices_delta']['queried']} | {row['prices_delta']['lists_written']} | ≤ 5 %, empty |",
    ]
    _report(args, row, lines)


def _delta(args: Any, index: VectorIndex, rules: FeedRules, out: Path, since: Path) -> dict[str, Any]:
    """A delta on `since` at `out`, profiled with --profile."""
    if not args.profile:
        return make_feed(index, rules, out, "jsonl", since=since)
    profiler = cProfile.Profile()
    summary = profiler.runcall(make_feed, index, rules, out, "jsonl", since=since)
    profiler.dump_stats(out.with_suffix(".prof"))
    pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(25)
    return summary


def _report(args: Any, row: dict[str, Any], lines: list[str]) -> None:
    """Print the table `lines` with the recall line after it, and write both (`write_results`)."""
    lines += [
        "",
        f"recall@{args.k} against exact brute force on {args.sample} products: {row['recall']} "
        "(target ≥ 0.99)",
    ]
    text = "\n".join(lines)
    print(text)
    write_results(args.out, "neighbours", row, text)


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB (ru_maxrss: KiB on Linux)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def full_only(args: Any, row: dict[str, Any], full: dict[str, Any], timing: dict[str, float]) -> None:
    """--full-only's results: the store's making, the full feed, its sizes and recall, the peak RSS."""
    row["max_rss_mib"] = peak_rss_mib()
    made = f"upsert {timing.get('upsert_s')} s" + (
        f", optimize {timing['optimize_s']} s" if "optimize_s" in timing else ", not optimized"
    )
    lines = [
        f"{args.size} products, {args.categories} categories, k={args.k}, --same category, layout "
        f"{args.layout}; store: {made} (timed when made, not by a run that reused it)",
        "",
        "| run | seconds | queried | lists written | feed MB | state MB | peak RSS MiB |",
        "|---|---|---|---|---|---|---|",
        f"| full feed | {row['full_s']} | {full['queried']} | {full['lists_written']} | "
        f"{row['feed_bytes'] / 1e6:.0f} | {row['state_bytes'] / 1e6:.0f} | {row['max_rss_mib']} |",
    ]
    _report(args, row, lines)


if __name__ == "__main__":
    main()
