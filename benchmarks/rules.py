"""The shop's rules at --products products (default 5,000; the target is `--products 100000`): query p50
with and without boosts, a decay and a 100-id exclude (and the same exclude left to the engine, as before
#32), side by side on the same queries in one run, the depth the engine is asked for (the over-fetch each
rule needs) and its searches a query (past 1: deeper for ties, or an exclude's fallback), how many of
the excluding queries answer exactly what the engine's exclude answers, and the CPU a 304 costs against
the search it stands for.

The store is written directly (clustered random 1000-d vectors, as benchmarks/neighbours.py makes
them), each product with `in_stock` (a boolean, or CSV text), a `margin` and an arrival date `added`,
into the embedded engine as the service serves it (`<path>/bench__v1`); `--optimize` builds the HNSW
graph first (minutes at 50k+), else every query is an exact scan of the unindexed segment.

Query p50: `query.similar_to_product`, k=10, each configuration on the same --queries products,
interleaved (at each turn every configuration asks about another of them, so that none finds the
neighbourhood it searches warm from the query before). The 304: a `visrec serve` process on the
store (its CPU read from /proc), --requests GETs of one product's similar products with a boost and a
decay, answered 200 (searched), then the same with If-None-Match, answered 304.

    nice -n 10 .venv/bin/python benchmarks/rules.py --store /tmp/rulesbench
    nice -n 10 .venv/bin/python benchmarks/rules.py --products 100000 --optimize --queries 1000 \
        --requests 400 --store /tmp/rulesbench --reuse   # the target; --reuse keeps the store

The 304's CPU is read in clock ticks (10 ms): --requests 400 puts it within a few percent.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from datetime import date, timedelta
from pathlib import Path
from typing import Any
from unittest.mock import patch

import httpx
import numpy as np

from visrec import query
from visrec.config import QdrantSettings, Settings
from visrec.index import Hit, VectorIndex, exclusion, open_store
from visrec.rules import Rules

from common import new_parser, write_results
from neighbours import clustered, point

K = 10
NEAREST = 20  # of each product's nearest, the most a cart holds
CONFIGS: dict[str, dict[str, Any]] = {
    "plain": {},
    "boost in_stock=1, margin=0.05": {"boost": ["in_stock=1", "margin=0.05"]},
    "decay added=30d": {"decay": ["added=30d"]},
    "exclude 100 ids": {"exclude": "100"},
    "exclude 100 ids, the engine's (before #32)": {"exclude": "100"},
    # A cart of items like the product: n of its nearest among the 100 (past EXCLUDE_SLACK - 1 of them, the
    # over-fetched pool runs short and the engine searches again: the fallback's cost).
    "exclude 100 ids, 10 of them the nearest": {"exclude": "100", "nearest": 10},
    "exclude 100 ids, 20 of them the nearest": {"exclude": "100", "nearest": 20},
    "all three": {"boost": ["in_stock=1", "margin=0.05"], "decay": ["added=30d"], "exclude": "100"},
}
# Excluded by the engine whatever the list's length: what every exclude did before it was dropped
# after the search (`visrec.index.exclusion`), timed beside it.
BY_THE_ENGINE = {"exclude 100 ids, the engine's (before #32)"}


def made(args: Any) -> tuple[Settings, VectorIndex]:
    """The store, written directly (a fresh one each run; with --reuse, the one a run with the same
    --products, --seed and --optimize left, if there is one)."""
    settings = Settings(
        qdrant=QdrantSettings(path=args.store, collection="bench"), artefact=args.store / "none"
    )
    built = args.store / "built.json"
    recipe = {
        "products": args.products,
        "seed": args.seed,
        "optimize": args.optimize,
        "made": str(date.today()),
    }
    if args.reuse and built.exists() and json.loads(built.read_text()) == recipe:
        return settings, open_store(settings.qdrant).open("bench__v1", owner=True)
    shutil.rmtree(args.store, ignore_errors=True)
    rng = np.random.default_rng(args.seed)
    vectors, labels = clustered(args.products, 50, rng)
    store = open_store(settings.qdrant)
    index = store.open("bench__v1", owner=True)
    index.create(vectors.shape[1], {"model_version": "bench"})
    today = date.today()
    for start in range(0, args.products, 1000):
        points = []
        for i in range(start, min(start + 1000, args.products)):
            p = point(i, vectors[i], int(labels[i]), 10.0 + i % 90)
            stock = bool(rng.random() < 0.6)
            p.payload["in_stock"] = stock if i % 2 else str(stock).lower()  # JSON, or a CSV's text
            p.payload["margin"] = round(float(rng.random() * 30), 1)
            p.payload["added"] = (today - timedelta(days=int(rng.integers(0, 720)))).isoformat()
            points.append(p)
        index.upsert(points)
    if args.optimize:
        index.optimize()
    built.write_text(json.dumps(recipe))  # last: a store whose making was cut short is made again
    return settings, index


def rules_of(config: dict[str, Any], rng: np.random.Generator, products: int, nearest: list[str]) -> Rules:
    """`config`'s rules: its exclude, `nearest[:n]` (the product's n nearest) and random other ids."""
    chosen = dict(config)
    near = nearest[: chosen.pop("nearest", 0)]
    if "exclude" in chosen:
        n = int(chosen["exclude"])
        others = [f"b{i:06d}" for i in rng.choice(products, n, replace=False)]
        chosen["exclude"] = [*near, *[p for p in others if p not in near][: n - len(near)]]
    return Rules(**chosen)


def query_p50(index: VectorIndex, args: Any) -> dict[str, dict[str, Any]]:
    rng = np.random.default_rng(args.seed + 1)
    asked = [f"b{i:06d}" for i in rng.choice(args.products, args.queries, replace=False)]
    times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    queries: dict[str, list[tuple[str, Rules]]] = {name: [] for name in CONFIGS}
    # Untimed: each product's nearest, for the carts of items like it.
    nearest = {p: [h.product_id for h in query.similar_to_product(index, p, NEAREST)] for p in asked}
    names = list(CONFIGS)
    stride = max(1, len(asked) // len(names))
    for turn in range(len(asked)):
        # Each configuration asks about every product once, side by side in time, but never about the
        # product another has just asked about: a query right after another on the same product finds its
        # neighbourhood in the CPU's caches, which a storefront's next query (another product) does not.
        for j, name in enumerate(names):
            product_id = asked[(turn + j * stride) % len(asked)]
            rules = rules_of(CONFIGS[name], rng, args.products, nearest[product_id])
            queries[name].append((product_id, rules))
            with exclusion.by_the_engine() if name in BY_THE_ENGINE else nullcontext():
                started = time.perf_counter()
                query.similar_to_product(index, product_id, K, rules=rules)
                times[name].append(time.perf_counter() - started)
    plain = statistics.median(times["plain"])
    figures = {}
    for name in CONFIGS:
        p50 = statistics.median(times[name])
        with exclusion.by_the_engine() if name in BY_THE_ENGINE else nullcontext():
            depths = engine_depths(index, queries[name])
        figures[name] = {
            "p50_ms": round(p50 * 1000, 2),
            "vs_plain": round(p50 / plain - 1, 3),
            "fetched": statistics.median(d[0] for d in depths),
            "searches": round(statistics.mean(len(d) for d in depths), 3),
            "same": same_as_the_engines(index, queries[name]) if "exclude" in CONFIGS[name] else None,
        }
    return figures


def same_as_the_engines(index: VectorIndex, asked: list[tuple[str, Rules]]) -> str:
    """Of these queries (again, untimed), how many answer what the engine's exclude answers: the same
    products, distances and photos (on the HNSW graph, where dropping ids after the search could walk
    the graph otherwise)."""

    def answer(product_id: str, rules: Rules) -> list[tuple[str, float, int]]:
        hits = query.similar_to_product(index, product_id, K, rules=rules)
        return [(h.product_id, h.distance, h.matched) for h in hits]

    same = 0
    for product_id, rules in asked:
        dropped = answer(product_id, rules)
        with exclusion.by_the_engine():
            same += dropped == answer(product_id, rules)
    return f"{same}/{len(asked)}"


def engine_depths(index: VectorIndex, asked: list[tuple[str, Rules]]) -> list[list[int]]:
    """The depth of each search the engine ran for each query (again, untimed): the first is what the
    rules and an exclude's over-fetch fetch; more than one, a deeper search for ties or an exclude's
    fallback."""
    depths: list[int] = []
    search = index._search

    def counted(vector: np.ndarray, k: int, *rest: Any) -> list[Hit]:
        depths.append(k)
        return search(vector, k, *rest)

    each = []
    with patch.object(index, "_search", counted):
        for product_id, rules in asked:
            depths.clear()
            query.similar_to_product(index, product_id, K, rules=rules)
            each.append(list(depths))
    return each


def _cpu_s(pid: int) -> float:
    """User and system CPU seconds of process `pid` so far (/proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def not_modified_cpu(settings: Settings, args: Any) -> dict[str, float]:
    """The server's CPU (a `visrec serve` process, read from /proc) per request: answered 200 (the
    search) and answered 304 (If-None-Match)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        "VISREC_QDRANT__PATH": str(settings.qdrant.path),
        "VISREC_QDRANT__COLLECTION": "bench",
        "VISREC_ARTEFACT": str(settings.artefact),
        "VISREC_API__PORT": str(port),
    }
    server = subprocess.Popen([sys.executable, "-m", "visrec", "serve"], env=env, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/products/b000001/similar"
    params: dict[str, str | int] = {"k": K, "boost": "in_stock=1", "decay": "added=30d"}
    try:
        with httpx.Client(timeout=30) as client:
            for _ in range(600):
                try:
                    if client.get(url, params=params).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            tag = client.get(url, params=params).headers["ETag"]

            def cpu(headers: dict[str, str], status: int) -> float:
                before = _cpu_s(server.pid)
                for _ in range(args.requests):
                    assert client.get(url, params=params, headers=headers).status_code == status
                return (_cpu_s(server.pid) - before) / args.requests

            searched = cpu({}, 200)
            unchanged = cpu({"If-None-Match": tag}, 304)
    finally:
        server.terminate()
        server.wait(30)
    return {
        "search_cpu_ms": round(searched * 1000, 2),
        "not_modified_cpu_ms": round(unchanged * 1000, 2),
        "share": round(unchanged / searched, 3),
    }


def main() -> None:
    p = new_parser(__doc__)
    p.add_argument("--products", type=int, default=5000)
    p.add_argument("--queries", type=int, default=50)
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--optimize", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--store", type=Path, default=Path("/tmp/visrec-rules-bench"))
    p.add_argument("--out", type=Path, default=Path(".visrec/rules"))
    p.add_argument(
        "--reuse",
        action="store_true",
        help="keep the store for the next run, and use the one a run with the same --products, --seed and "
        "--optimize kept today (building 100,000 products takes minutes)",
    )
    args = p.parse_args()
    settings, index = made(args)
    try:
        figures = query_p50(index, args)
    finally:
        index.close()  # the service opens the store next
    caching = not_modified_cpu(settings, args)
    lines = [
        f"{args.products:,} products, k={K}, {args.queries} queries, "
        f"{'HNSW (optimized)' if args.optimize else 'exact scan (not optimized)'}",
        "",
        "| rules | p50 ms | vs plain | engine's depth (median) | searches a query | same as the engine's |",
        "| --- | --- | --- | --- | --- | --- |",
        *(
            f"| {name} | {f['p50_ms']} | {f['vs_plain']:+.1%} | {f['fetched']:g} | {f['searches']} | "
            f"{f['same'] or '-'} |"
            for name, f in figures.items()
        ),
        "",
        f"304 vs the search (server CPU per request, a `visrec serve` process, {args.requests} each): "
        f"{caching['not_modified_cpu_ms']} ms vs {caching['search_cpu_ms']} ms = {caching['share']:.1%}",
    ]
    text = "\n".join(lines)
    print(text)
    write_results(args.out, f"rules-{args.products}", {"queries": figures, "not_modified": caching}, text)
    if not args.reuse:
        shutil.rmtree(args.store, ignore_errors=True)


if __name__ == "__main__":
    main()
