"""Several photos per product (issue #15): one multivector point per product, or one point per photo?

Both layouts on the embedded engine (qdrant-edge), straight through its API, same data, same payloads:

- multivector: one point per product, its photos as one multivector (`MultiVectorConfig(MaxSim)`, Euclid);
  a single-vector query `Query.Nearest([q])` scores a product by the distance to its nearest photo, so
  the top-k points are the top-k products;
- per-photo: one point per photo with the payload `product_id`; qdrant-edge has no group-by, so a query
  fetches `--fetch` photos (default k × photos, which can never hold fewer than k distinct products) and
  keeps each product's first hit, client-side.

Every point carries category (keyword index), price (float index) and product_id (keyword index), all
three indexes created before the first upsert (so before optimize()). The vectors are synthetic but
clustered, seeded (`--seed`), float32:

    category centre  c ~ N(0, 1)^1000 for 10 categories
    product          p = c + W z + e,  z ~ N(0, 1)^32, W (1000×32) ~ N(0, 0.5²/32)  (one W for all),
                     e ~ N(0, 0.1²)^1000: per-dimension spread 0.5 within a category, on a 32-d manifold
    photo            p + N(0, s²)^1000, s = --photo-noise (0.15: a product's photos are close together)
    query            a random product's random photo + N(0, 0.15²)^1000

Ground truth: numpy, the exact distance from each query to every photo, a product's distance being its
nearest photo's, the top-k products among those the filter lets through. Each layout runs in a fresh
process (clean RSS figures): build (points/s, products/s), then top-k-distinct-products latency p50/p99
and recall@k unfiltered, with a category filter (the query product's) and with category + price 20..60,
first as built (appendable plain segments: an exact scan), then, with --optimize, after optimize() (HNSW
m=16, ef_construct=100, searched with ef=128: visrec's defaults); then close, reopen and first query.
RSS (VmRSS, and its anonymous and file-backed parts) before and after build, after optimize and after
reopen; disk (allocated blocks, as du counts them) per product.

    .venv/bin/python benchmarks/photo_layout.py --products 100000 --photos 4 --queries 200
    .venv/bin/python benchmarks/photo_layout.py --products 25000 --photos 4 --queries 200 --optimize
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import qdrant_edge as qe

from visrec.config import QdrantSettings

from common import command_line, new_parser, write_results

LAYOUTS = ("multivector", "per-photo")
CATEGORIES = 10
LATENT = 32
PRICE_MIN, PRICE_MAX = 20.0, 60.0
FILTERS = ("unfiltered", "category", "category + price")
BATCH = 500  # points per upsert call


# --- data ---------------------------------------------------------------------------------------------


class Data:
    """The seeded catalogue: photos (products × photos × dim, float32), each product's category and
    price, and the queries (a random product's photo, perturbed) with their categories."""

    def __init__(
        self, products: int, photos: int, dim: int, queries: int, seed: int, photo_noise: float = 0.15
    ) -> None:
        rng = np.random.default_rng(seed)
        centres = rng.standard_normal((CATEGORIES, dim), dtype=np.float32)
        mixing = rng.standard_normal((LATENT, dim), dtype=np.float32) * np.float32(0.5 / np.sqrt(LATENT))
        self.category = rng.integers(0, CATEGORIES, products)
        self.price = np.round(rng.lognormal(3.7, 0.6, products), 2)  # median ~40
        self.photos = np.empty((products, photos, dim), np.float32)
        for start in range(0, products, 10_000):
            stop = min(start + 10_000, products)
            n = stop - start
            product = centres[self.category[start:stop]]
            product += rng.standard_normal((n, LATENT), dtype=np.float32) @ mixing
            product += rng.standard_normal((n, dim), dtype=np.float32) * np.float32(0.1)
            noise = rng.standard_normal((n, photos, dim), dtype=np.float32) * np.float32(photo_noise)
            self.photos[start:stop] = product[:, None, :] + noise
        self.query_product = rng.choice(products, queries, replace=False)
        picked = self.photos[self.query_product, rng.integers(0, photos, queries)]
        self.queries = picked + rng.standard_normal(picked.shape, dtype=np.float32) * np.float32(0.15)
        self.query_category = self.category[self.query_product]

    def allowed(self, kind: str, q: int) -> np.ndarray | None:
        """The products a filter of `kind` lets through for query q (None: all)."""
        if kind == "unfiltered":
            return None
        mask = self.category == self.query_category[q]
        if kind == "category + price":
            mask &= (self.price >= PRICE_MIN) & (self.price <= PRICE_MAX)
        return mask

    def truth(self, k: int) -> tuple[dict[str, list[list[int]]], np.ndarray]:
        """Exact top-k products per filter kind and query, and each query's distance to its nearest
        product (unfiltered), from every photo's distance (float64)."""
        products, photos, dim = self.photos.shape
        flat = self.photos.reshape(-1, dim)
        norms = np.einsum("ij,ij->i", flat, flat, dtype=np.float64)
        out: dict[str, list[list[int]]] = {kind: [] for kind in FILTERS}
        nearest = np.empty(len(self.queries))
        for start in range(0, len(self.queries), 25):
            q = self.queries[start : start + 25].astype(np.float64)
            cross = (self.queries[start : start + 25] @ flat.T).astype(np.float64)  # float32 product
            squared = (q * q).sum(1)[:, None] + norms[None, :] - 2 * cross
            per_product = np.sqrt(np.maximum(squared, 0)).reshape(len(q), products, photos).min(2)
            for i, row in enumerate(per_product):
                nearest[start + i] = row.min()
                for kind in FILTERS:
                    mask = self.allowed(kind, start + i)
                    d = row if mask is None else np.where(mask, row, np.inf)
                    top = np.argpartition(d, k)[:k]
                    out[kind].append(top[np.argsort(d[top])].tolist())
        return out, nearest


# --- the store ----------------------------------------------------------------------------------------


def edge_config(layout: str, dim: int, settings: QdrantSettings) -> qe.EdgeConfig:
    maxsim = qe.MultiVectorConfig(comparator=qe.MultiVectorComparator.MaxSim)
    multi = maxsim if layout == "multivector" else None
    return qe.EdgeConfig(
        vectors=qe.EdgeVectorParams(size=dim, distance=qe.Distance.Euclid, multivector_config=multi),
        hnsw_config=qe.HnswIndexConfig(
            m=settings.hnsw_m,
            ef_construct=settings.hnsw_ef_construct,
            full_scan_threshold=settings.full_scan_threshold_kb,
        ),
    )


def build(shard: qe.EdgeShard, layout: str, data: Data) -> None:
    """Payload indexes, then every product (multivector) or every photo (per-photo), BATCH points a call."""
    for field, kind in (
        ("category", qe.PayloadSchemaType.Keyword),
        ("price", qe.PayloadSchemaType.Float),
        ("product_id", qe.PayloadSchemaType.Keyword),
    ):
        shard.update(qe.UpdateOperation.create_field_index(field, kind))
    products, photos, _ = data.photos.shape
    points: list[qe.Point] = []
    for p in range(products):
        payload = {"category": f"c{data.category[p]}", "price": float(data.price[p]), "product_id": f"p{p}"}
        if layout == "multivector":
            points.append(qe.Point(p, data.photos[p].tolist(), payload))
        else:
            points += [qe.Point(p * photos + j, data.photos[p, j].tolist(), payload) for j in range(photos)]
        if len(points) >= BATCH or p == products - 1:
            shard.update(qe.UpdateOperation.upsert_points(points))
            points = []


def product_of(point: qe.ScoredPoint) -> int:
    """The product a hit belongs to, from its payload's product_id ("p<n>")."""
    return int((point.payload or {})["product_id"][1:])


def edge_filter(data: Data, kind: str, q: int) -> qe.Filter | None:
    if kind == "unfiltered":
        return None
    must: list[Any] = [qe.FieldCondition(key="category", match=qe.MatchValue(f"c{data.query_category[q]}"))]
    if kind == "category + price":
        must.append(qe.FieldCondition(key="price", range=qe.RangeFloat(gte=PRICE_MIN, lte=PRICE_MAX)))
    return qe.Filter(must=must)


Search = Callable[[qe.EdgeShard, np.ndarray, qe.Filter | None], list[tuple[int, float]]]


def searcher(layout: str, k: int, fetch: int, ef: int) -> Search:
    """A query for the top `k` products, as (product, score) pairs. Per-photo: `fetch` photos, each
    product kept at its first (nearest) photo; the ranked product list is the whole deduplicated fetch,
    so that recall at smaller fetches can be read off its prefixes (see `distinct_prefix`)."""
    params = qe.SearchParams(hnsw_ef=ef, exact=False)

    def multivector(shard: qe.EdgeShard, q: np.ndarray, f: qe.Filter | None) -> list[tuple[int, float]]:
        request = qe.QueryRequest(
            limit=k, query=qe.Query.Nearest([q.tolist()]), filter=f, with_payload=True, params=params
        )
        return [(product_of(p), p.score) for p in shard.query(request)]

    def per_photo(shard: qe.EdgeShard, q: np.ndarray, f: qe.Filter | None) -> list[tuple[int, float]]:
        request = qe.QueryRequest(
            limit=fetch, query=qe.Query.Nearest(q.tolist()), filter=f, with_payload=True, params=params
        )
        seen: dict[int, float] = {}
        for p in shard.query(request):
            seen.setdefault(product_of(p), p.score)
        return list(seen.items())

    return multivector if layout == "multivector" else per_photo


def measure(
    shard: qe.EdgeShard,
    search: Search,
    data: Data,
    truth: dict[str, list[list[int]]],
    k: int,
    photos_fetched: int | None,
) -> dict[str, Any]:
    """Per filter kind: latency p50/p99 (ms), q/s and recall@k of the top-k distinct products; for
    per-photo, also recall@k had only the first 10, 20, … photos been fetched (prefixes of this fetch) and
    how many photos a query needed for its k distinct products."""
    out: dict[str, Any] = {}
    for kind in FILTERS:
        filters = [edge_filter(data, kind, q) for q in range(len(data.queries))]
        search(shard, data.queries[0], filters[0])  # warm-up
        times, recalls = [], []
        cpu_started = time.process_time()
        for q, f in enumerate(filters):
            started = time.perf_counter()
            hits = search(shard, data.queries[q], f)
            times.append(1000 * (time.perf_counter() - started))
            recalls.append(len({p for p, _ in hits[:k]} & set(truth[kind][q])) / k)
        cpu_ms = 1000 * (time.process_time() - cpu_started) / len(filters)
        cuts = statistics.quantiles(times, n=100)
        row: dict[str, Any] = {
            "p50_ms": round(statistics.median(times), 2),
            "p99_ms": round(cuts[98], 2),
            "qps": round(len(times) / (sum(times) / 1000), 1),
            "cpu_ms": round(cpu_ms, 2),
            f"recall@{k}": round(float(np.mean(recalls)), 4),
        }
        if photos_fetched is not None:
            row |= over_fetch(shard, data, kind, filters, truth[kind], k, photos_fetched)
        out[kind] = row
    return out


def over_fetch(
    shard: qe.EdgeShard,
    data: Data,
    kind: str,
    filters: list[qe.Filter | None],
    truth: list[list[int]],
    k: int,
    fetched: int,
) -> dict[str, Any]:
    """Per-photo only: recall@k of distinct products had the query fetched only its first n photos, for
    n = k, 2k, … up to `fetched`; and the photos needed for k distinct products (p50, p99, max)."""
    recall: dict[int, list[float]] = {n: [] for n in range(k, fetched + 1, k)}
    needed = []
    for q, f in enumerate(filters):
        request = qe.QueryRequest(
            limit=fetched,
            query=qe.Query.Nearest(data.queries[q].tolist()),
            filter=f,
            with_payload=["product_id"],
            params=qe.SearchParams(hnsw_ef=128),
        )
        ranked = [product_of(p) for p in shard.query(request)]
        for n in recall:
            distinct = list(dict.fromkeys(ranked[:n]))[:k]
            recall[n].append(len(set(distinct) & set(truth[q])) / k)
        seen: set[int] = set()
        need = len(ranked)
        for i, p in enumerate(ranked):
            seen.add(p)
            if len(seen) == k:
                need = i + 1
                break
        needed.append(need)
    return {
        "recall_by_fetch": {n: round(float(np.mean(r)), 4) for n, r in recall.items()},
        "photos_needed_p50_p99_max": [int(np.median(needed)), int(np.percentile(needed, 99)), max(needed)],
    }


# --- one layout, in its own process -------------------------------------------------------------------


def log(layout: str, what: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {layout}: {what}", file=sys.stderr, flush=True)


def memory_mib() -> dict[str, float]:
    """VmRSS, RssAnon and RssFile of this process, MiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) / 1024
    return out


def disk_mib(path: Path) -> float:
    """Allocated size of a folder (du -sk), MiB."""
    return (
        int(
            subprocess.run(
                ["du", "-sk", str(path)], capture_output=True, text=True, check=True
            ).stdout.split()[0]
        )
        / 1024
    )


def run_layout(layout: str, args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    data = Data(args.products, args.photos, args.dim, args.queries, args.seed, args.photo_noise)
    truth, nearest = data.truth(args.k)
    prepared_s = time.perf_counter() - started
    log(layout, f"data and ground truth in {prepared_s:.0f} s")
    settings = QdrantSettings()
    path = args.out / "stores" / f"{layout}-{args.products}x{args.photos}"
    shutil.rmtree(path, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    products, photos = args.products, args.photos
    points = products if layout == "multivector" else products * photos
    fetch = args.fetch or args.k * photos
    search = searcher(layout, args.k, fetch, settings.hnsw_ef)
    fetched = fetch if layout == "per-photo" else None
    row: dict[str, Any] = {"layout": layout, "products": products, "photos": photos, "points": points}
    row |= {"fetch": fetched, "photo_noise": args.photo_noise, "data_and_truth_s": round(prepared_s, 1)}
    row["load_average_at_start"] = [round(x, 1) for x in os.getloadavg()]
    mem: dict[str, dict[str, float]] = {"before_build": memory_mib()}

    config = edge_config(layout, args.dim, settings)
    shard = qe.EdgeShard.create(str(path), config)
    started, cpu = time.perf_counter(), time.process_time()
    build(shard, layout, data)
    shard.flush()
    build_s = time.perf_counter() - started
    row["build_cpu_s"] = round(time.process_time() - cpu, 1)  # all threads: steadier on a busy machine
    mem["after_build"] = memory_mib()
    log(layout, f"built in {build_s:.0f} s")
    row |= {
        "build_s": round(build_s, 1),
        "upsert_points_per_s": round(points / build_s),
        "upsert_products_per_s": round(products / build_s),
    }
    # The engine's score of the top unfiltered hit against numpy's distance to the nearest photo.
    top = [search(shard, data.queries[q], None)[0][1] for q in range(min(20, args.queries))]
    row["max_score_vs_numpy_nearest_distance"] = float(np.max(np.abs(np.array(top) - nearest[: len(top)])))
    row["as_built"] = measure(shard, search, data, truth, args.k, fetched)
    row["disk_mib_as_built"] = round(disk_mib(path), 1)
    log(layout, "measured as built")
    if args.optimize:
        started, cpu = time.perf_counter(), time.process_time()
        shard.optimize()
        row["optimize_s"] = round(time.perf_counter() - started, 1)
        row["optimize_cpu_s"] = round(time.process_time() - cpu, 1)
        log(layout, f"optimized in {row['optimize_s']} s")
        mem["after_optimize"] = memory_mib()
        row["optimized"] = measure(shard, search, data, truth, args.k, fetched)
        row["disk_mib_optimized"] = round(disk_mib(path), 1)
    info = shard.info()
    row["segments"] = info.segments_count
    row["indexed_vectors"] = info.indexed_vectors_count
    shard.flush()
    shard.close()
    del shard
    mem["after_close"] = memory_mib()
    started = time.perf_counter()
    shard = qe.EdgeShard.load(str(path))
    search(shard, data.queries[0], None)
    row["reopen_and_first_query_s"] = round(time.perf_counter() - started, 2)
    mem["after_reopen_first_query"] = memory_mib()
    row["reopened"] = measure(shard, search, data, truth, args.k, None)
    mem["after_reopen_queries"] = memory_mib()
    shard.close()
    row["memory_mib"] = {stage: {k: round(v) for k, v in m.items()} for stage, m in mem.items()}
    base = mem["before_build"]["VmRSS"]
    row["rss_growth_kib_per_product"] = {
        stage: round((m["VmRSS"] - base) * 1024 / products, 2)
        for stage, m in mem.items()
        if stage != "before_build"
    }
    row["load_average_at_end"] = [round(x, 1) for x in os.getloadavg()]
    row["disk"] = {"final_mib": round(disk_mib(path), 1)}
    row["disk_kib_per_product"] = round(row["disk"]["final_mib"] * 1024 / products, 2)
    if not args.keep:
        shutil.rmtree(path, ignore_errors=True)
    return row


# --- report -------------------------------------------------------------------------------------------


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    k = args.k
    lines = [
        f"{args.products} products × {args.photos} photos, {args.dim}-d, {args.queries} queries, top-{k} "
        "distinct products, one client, qdrant-edge; CPU ms/query: the process's CPU time (all threads) "
        "per query, steadier than wall time on a shared machine.",
        "",
        f"| layout | state | filter | p50 ms | p99 ms | q/s | CPU ms/query | recall@{k} | "
        "per-photo recall by fetch | photos needed p50/p99/max |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        for state in ("as_built", "optimized", "reopened"):
            for kind, m in r.get(state, {}).items():
                by_fetch = ", ".join(f"{n}: {v}" for n, v in m.get("recall_by_fetch", {}).items()) or "–"
                needed = "/".join(map(str, m.get("photos_needed_p50_p99_max", []))) or "–"
                lines.append(
                    f"| {r['layout']} | {state.replace('_', ' ')} | {kind} | {m['p50_ms']} | {m['p99_ms']} | "
                    f"{m['qps']} | {m.get('cpu_ms', '–')} | {m[f'recall@{k}']} | {by_fetch} | {needed} |"
                )
    lines += [
        "",
        "| layout | points | build s | upsert points/s | optimize s | reopen + 1st query s | "
        "RSS KiB/product (built / optimized / reopened+queried) | disk KiB/product |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        g = r["rss_growth_kib_per_product"]
        lines.append(
            f"| {r['layout']} | {r['points']} | {r['build_s']} | {r['upsert_points_per_s']} | "
            f"{r.get('optimize_s', '–')} | {r['reopen_and_first_query_s']} | "
            f"{g['after_build']} / {g.get('after_optimize', '–')} / {g['after_reopen_queries']} | "
            f"{r['disk_kib_per_product']} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = new_parser(__doc__)
    p.add_argument("--products", type=int, default=100_000)
    p.add_argument("--photos", type=int, default=4)
    p.add_argument("--dim", type=int, default=1000)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--fetch", type=int, default=0, help="per-photo: photos fetched per query (0: k × photos)")
    p.add_argument("--optimize", action="store_true", help="also optimize() (HNSW) and measure again")
    p.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    p.add_argument("--keep", action="store_true", help="keep the stores under --out/stores")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--photo-noise", type=float, default=0.15, help="per-dimension std of a photo around its product"
    )
    p.add_argument("--out", type=Path, default=Path(".visrec/photo_layout"))
    args = p.parse_args()
    rows = []
    for layout in args.layouts:  # a fresh process each: RSS deltas of one layout only
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            rows.append(pool.submit(run_layout, layout, args).result())
        print(json.dumps(rows[-1]), file=sys.stderr)
    text = report(rows, args)
    print(text)
    name = f"photo_layout-{args.products}x{args.photos}-noise{args.photo_noise}"
    name += "-optimized" if args.optimize else ""
    write_results(args.out, name, {"command": command_line(), "rows": rows}, text)


if __name__ == "__main__":
    main()
