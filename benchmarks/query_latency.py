"""Query latency and recall of top-10 search at 10k, 50k and 100k real 1000-d embeddings.

The vectors are a trained visrec model's embeddings of Fashion-MNIST (70,000 images, then mirrored copies
up to the largest size), cached under `--cache`; payloads carry the category, a seeded colour and price.
For each size, through visrec's own index code: build the collection (points/s), then top-10 queries
unfiltered, with a category filter, and with category + price range, each as p50/p95/p99 latency, queries/s
(one client) and recall@10 against exact search — first as a sync leaves the store, then after
`optimize()` (timed). Then reopen time, process memory and disk. The embedded store (qdrant-edge) always;
a Qdrant server as well when VISREC_QDRANT__URL is set.

    .venv/bin/python benchmarks/quality.py ...              # once: the trained model it embeds with
    .venv/bin/python benchmarks/query_latency.py --sizes 10000 50000 100000 --queries 300
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from pydantic import SecretStr

from visrec.config import EmbedSettings, QdrantSettings
from visrec.embed import Embedder, resolve_device
from visrec.filters import Filters
from visrec.index import VectorIndex
from visrec.index.edge import EdgeIndex
from visrec.index.server import Connection, ServerIndex

from common import (
    CLASSES,
    add_data_options,
    add_run_options,
    embed_all,
    new_parser,
    prepare_split,
    upsert_gallery,
    write_results,
)

COLOURS = ("black", "white", "grey", "red", "blue", "green", "beige", "brown", "pink", "yellow")
FILTERS = {
    "unfiltered": lambda category: Filters(),
    "category": lambda category: Filters(category=[category]),
    "category + price": lambda category: Filters(category=[category], price_min=20, price_max=60),
}


def embeddings(artefact: Path, data: Path, cache: Path, count: int, batch_size: int, workers: int) -> tuple:
    """(vectors, labels) for `count` images: Fashion-MNIST's 70,000, then mirrored copies; cached."""
    settings = EmbedSettings(batch_size=batch_size, workers=workers)
    embedder = Embedder(artefact, resolve_device("auto"), settings)
    path = cache / f"latency-{embedder.manifest.weights_sha256[:12]}-{count}.npz"
    if path.is_file():
        cached = np.load(path)
        return cached["vectors"], cached["labels"]
    splits = [prepare_split(data, cache / "fashion-mnist", split) for split in ("train", "test")]
    refs = [ref for s in splits for ref in s.refs]
    labels = np.concatenate([s.labels for s in splits])
    mirrored = cache / "fashion-mnist" / "mirrored"
    mirrored.mkdir(exist_ok=True)
    for i in range(max(0, count - len(refs))):
        target = mirrored / f"{i}.png"
        if not target.is_file():
            ImageOps.mirror(Image.open(refs[i])).save(target)
        refs.append(str(target))
        labels = np.append(labels, labels[i])
    refs, labels = refs[:count], labels[:count]
    started = time.perf_counter()
    vectors = embed_all(embedder, refs).astype(np.float32)
    print(f"embedded {len(refs)} images in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    np.savez(path, vectors=vectors, labels=labels)
    return vectors, labels


def upsert(index: VectorIndex, vectors: np.ndarray, labels: np.ndarray, seed: int, first: int = 0) -> float:
    """Upsert the vectors as products p{first}, p{first + 1}, …; returns points/s."""
    rng = np.random.default_rng(seed + first)
    colours = rng.choice(COLOURS, len(vectors))
    prices = np.round(rng.lognormal(3.7, 0.6, len(vectors)), 2)  # median ~40
    started = time.perf_counter()
    ids = [f"p{first + i}" for i in range(len(vectors))]
    upsert_gallery(index, ids, vectors, labels, {"colour": colours.tolist(), "price": prices.tolist()})
    return len(vectors) / (time.perf_counter() - started)


def measure(index: VectorIndex, queries: np.ndarray, categories: list[str], k: int) -> dict[str, dict]:
    """For each filter kind: latency percentiles (ms), queries/s and recall@k against exact search."""
    out = {}
    for name, make in FILTERS.items():
        filters = [make(c) for c in categories]
        exact = [
            {h.product_id for h in index.search(q, k, f, exact=True)}
            for q, f in zip(queries, filters, strict=True)
        ]
        index.search(queries[0], k, filters[0])  # warm-up
        times, recalls = [], []
        for q, f, truth in zip(queries, filters, exact, strict=True):
            started = time.perf_counter()
            hits = index.search(q, k, f)
            times.append(1000 * (time.perf_counter() - started))
            recalls.append(len({h.product_id for h in hits} & truth) / max(len(truth), 1))
        cuts = statistics.quantiles(times, n=100)
        out[name] = {
            "p50_ms": round(statistics.median(times), 2),
            "p95_ms": round(cuts[94], 2),
            "p99_ms": round(cuts[98], 2),
            "qps": round(len(times) / (sum(times) / 1000), 1),
            "recall@10": round(float(np.mean(recalls)), 4),
        }
    return out


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_size(
    backend: str,
    opener: Callable[[], VectorIndex],
    vectors: np.ndarray,
    labels: np.ndarray,
    args: argparse.Namespace,
) -> dict:
    n = len(vectors)
    rng = np.random.default_rng(args.seed)
    picks = rng.choice(n, args.queries, replace=False)
    queries, categories = vectors[picks], [CLASSES[labels[i]] for i in picks]
    rss_before = rss_mib()
    index = opener()
    index.create(vectors.shape[1])
    points_per_s = upsert(index, vectors, labels, args.seed)
    row: dict = {"backend": backend, "n": n, "upsert_points_per_s": round(points_per_s)}
    row["as_synced"] = measure(index, queries, categories, args.k)
    started = time.perf_counter()
    index.optimize()
    row["optimize_s"] = round(time.perf_counter() - started, 1)
    row["optimized"] = measure(index, queries, categories, args.k)
    # An incremental sync's cost: 1 % new products (mirror images of existing ones), then optimize again.
    extra = max(1, n // 100)
    upsert(index, vectors[:extra, ::-1].copy(), labels[:extra], args.seed, first=n)
    started = time.perf_counter()
    index.optimize()
    row["optimize_after_1pct_new_s"] = round(time.perf_counter() - started, 1)
    row["rss_mib"] = round(rss_mib() - rss_before)
    index.close()
    started = time.perf_counter()
    index = opener()
    index.search(queries[0], args.k, Filters())
    row["reopen_and_first_query_s"] = round(time.perf_counter() - started, 2)
    if isinstance(index, EdgeIndex):
        row["disk_mib"] = round(sum(f.stat().st_size for f in index.path.rglob("*") if f.is_file()) / 2**20)
    index.close()
    print(json.dumps(row), file=sys.stderr)
    return row


def report(rows: list[dict], settings: QdrantSettings) -> str:
    lines = [
        f"HNSW m={settings.hnsw_m}, ef_construct={settings.hnsw_ef_construct}, ef={settings.hnsw_ef}; "
        f"top-10, one client, {os.cpu_count()} CPUs.",
        "",
        "| backend | N | state | query | p50 ms | p95 ms | p99 ms | q/s | recall@10 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        for state in ("as_synced", "optimized"):
            for name, m in r[state].items():
                lines.append(
                    f"| {r['backend']} | {r['n']} | {state.replace('_', ' ')} | {name} | {m['p50_ms']} | "
                    f"{m['p95_ms']} | {m['p99_ms']} | {m['qps']} | {m['recall@10']} |"
                )
    lines += [
        "",
        "| backend | N | upsert points/s | optimize s | optimize after 1 % new s | reopen + first query s "
        "| RSS growth MiB | disk MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['backend']} | {r['n']} | {r['upsert_points_per_s']} | {r['optimize_s']} | "
        f"{r['optimize_after_1pct_new_s']} | "
        f"{r['reopen_and_first_query_s']} | {r['rss_mib']} | {r.get('disk_mib', '–')} |"
        for r in rows
    ]
    return "\n".join(lines)


def main() -> None:
    p = new_parser(__doc__)
    p.add_argument("--artefact", type=Path, default=Path(".visrec/quality/model"))
    add_data_options(p, cache=Path(".visrec/cache"), out=Path(".visrec/latency"))
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 100_000])
    p.add_argument("--queries", type=int, default=300)
    add_run_options(p, batch_size=128)
    args = p.parse_args()
    vectors, labels = embeddings(
        args.artefact, args.data, args.cache, max(args.sizes), args.batch_size, args.workers
    )
    settings = QdrantSettings()
    server_url = os.environ.get("VISREC_QDRANT__URL")
    api_key = os.environ.get("VISREC_QDRANT__API_KEY")
    server = QdrantSettings(url=server_url, api_key=None if api_key is None else SecretStr(api_key))
    conn = Connection(server) if server_url else None
    rows = []
    for n in args.sizes:
        data = (vectors[:n], labels[:n])
        root, name = args.out / "edge", f"latency-{n}"
        shutil.rmtree(root / name, ignore_errors=True)
        rows.append(run_size("embedded", partial(EdgeIndex, root, name, settings), *data, args))
        shutil.rmtree(root / name, ignore_errors=True)
        if conn is not None:
            conn.client.delete_collection(name)
            rows.append(run_size("server", partial(ServerIndex, conn, name, server), *data, args))
            conn.client.delete_collection(name)
    text = report(rows, settings)
    print(text)
    write_results(args.out, "latency", rows, text)


if __name__ == "__main__":
    main()
