"""Memory, disk, build time, query latency and recall of top-10 search per index setting and size.

Settings (`--settings`, names in SETTINGS): float32 vectors in RAM (today's layout), int8 or 1-bit codes
in RAM with the float32 originals in RAM or on disk (`-disk`), and variants of binary quantization set
through qdrant-edge directly (2-bit and 1.5-bit codes with a 4-bit query, and codes of vectors centred on
the catalogue mean: Euclidean distances do not change under a shift, 1-bit signs of uncentred vectors
say little). One point per product, one 1000-d vector per point (a multivector of one photo, MaxSim), as
visrec stores a catalogue.

Vectors (`--vectors`):
- `real` (default): a trained visrec model's embeddings of Fashion-MNIST's 70,000 images (or a seeded
  sample of `--real-images`; cached under `--cache`); `--queries` of them are held out as queries (never
  indexed); beyond the others the
  catalogue is filled with synthetic products: each a mixture (1 - t) a + t b of two random same-class
  real vectors, t ~ U(0, 0.5), plus Gaussian noise of 0.1 x the class's per-dimension spread (docs/scale.md
  says what that does to recall);
- `random`: clustered Gaussian vectors, no model needed (a quick run, e.g. in CI).

For each size and setting: create the collection and upsert (timed), `optimize()` (the HNSW build,
timed), RSS before and after (VmRSS, its anonymous part, and the peak). Then, in a fresh process (the
steady state of a serving process): reopen (timed), RSS, and top-k queries unfiltered, by category and by
category + price range, each as p50/p95/p99 latency and recall@k against exact float32 search (numpy over
the same vectors and filters; checked against the engine's own `exact=True` on a few queries), for each
`--oversampling` (quantized settings) and `--ef` (the HNSW search breadth). Disk per product: the
collection folder's size.

    .venv/bin/python benchmarks/quality.py ...                 # once: the trained model it embeds with
    .venv/bin/python benchmarks/query_latency.py --sizes 100000 --settings float32 int8-disk binary-disk
    .venv/bin/python benchmarks/query_latency.py --vectors random --sizes 2000 --queries 20   # quick
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import qdrant_edge as qe

from visrec.config import EmbedSettings, QdrantSettings
from visrec.filters import Filters
from visrec.index.edge import EdgeIndex

from common import (
    CLASSES,
    add_data_options,
    add_run_options,
    new_parser,
    prepare_split,
    upsert_gallery,
    write_results,
)

COLOURS = ("black", "white", "grey", "red", "blue", "green", "beige", "brown", "pink", "yellow")
PRICE_MIN, PRICE_MAX = 20.0, 60.0
FILTER_NAMES = ("unfiltered", "category", "category + price")
REAL_IMAGES = 70_000


@dataclass(frozen=True)
class Setting:
    """How a collection keeps its vectors: `quantization` and `vectors_on_disk` as QdrantSettings takes
    them; `encoding`/`query_encoding` (binary only) and `centred` are set here, not through visrec."""

    quantization: Literal["none", "int8", "binary"] = "none"
    vectors_on_disk: bool = False
    encoding: str | None = None  # qe.BinaryQuantizationEncoding member
    query_encoding: str | None = None  # qe.BinaryQuantizationQueryEncoding member
    centred: bool = False  # store and query v - mean: the same Euclidean neighbours


SETTINGS = {
    "float32": Setting(),
    "float32-disk": Setting(vectors_on_disk=True),
    "int8": Setting("int8"),
    "int8-disk": Setting("int8", True),
    "int8-centred-disk": Setting("int8", True, centred=True),
    "binary": Setting("binary"),
    "binary-disk": Setting("binary", True),
    "binary-centred-disk": Setting("binary", True, centred=True),
    "binary2-disk": Setting("binary", True, "TwoBits", "Scalar4Bits"),
    "binary2-centred-disk": Setting("binary", True, "TwoBits", "Scalar4Bits", centred=True),
    "binary1.5-centred-disk": Setting("binary", True, "OneAndHalfBits", "Scalar4Bits", centred=True),
}


class BenchIndex(EdgeIndex):
    """visrec's embedded index, with the binary encodings visrec has no setting for."""

    def __init__(self, root: Path, collection: str, settings: QdrantSettings, setting: Setting) -> None:
        self.setting = setting
        super().__init__(root, collection, settings)

    def _config(self, dim: int) -> qe.EdgeConfig:
        config = super()._config(dim)
        if self.setting.encoding is None:
            return config
        s = self.settings
        return qe.EdgeConfig(
            vectors=qe.EdgeVectorParams(
                size=dim,
                distance=qe.Distance.Euclid,
                multivector_config=qe.MultiVectorConfig(comparator=qe.MultiVectorComparator.MaxSim),
                quantization_config=qe.BinaryQuantizationConfig(
                    always_ram=True,
                    encoding=getattr(qe.BinaryQuantizationEncoding, self.setting.encoding),
                    query_encoding=getattr(
                        qe.BinaryQuantizationQueryEncoding, self.setting.query_encoding or "Default"
                    ),
                ),
                on_disk=s.vectors_on_disk,
            ),
            hnsw_config=qe.HnswIndexConfig(
                m=s.hnsw_m, ef_construct=s.hnsw_ef_construct, full_scan_threshold=s.full_scan_threshold_kb
            ),
        )


def qdrant_settings(setting: Setting, oversampling: float = 2.0, ef: int = 128) -> QdrantSettings:
    return QdrantSettings(
        hnsw_ef=ef,
        quantization=setting.quantization,
        vectors_on_disk=setting.vectors_on_disk,
        oversampling=oversampling,
    )


# --- vectors ------------------------------------------------------------------------------------------


def real_embeddings(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """(vectors, labels) of `--real-images` Fashion-MNIST images (a seeded sample of the 70,000, train and
    test together; all by default) through the model; cached."""
    from visrec.embed import Embedder, resolve_device  # imports torch

    from common import embed_all

    settings = EmbedSettings(batch_size=args.batch_size, workers=args.workers)
    embedder = Embedder(args.artefact, resolve_device("auto"), settings)
    count = min(args.real_images or REAL_IMAGES, REAL_IMAGES)
    path = args.cache / f"latency-{embedder.manifest.weights_sha256[:12]}-{count}-seed{args.seed}.npz"
    if path.is_file():
        cached = np.load(path)
        return cached["vectors"], cached["labels"]
    splits = [prepare_split(args.data, args.cache / "fashion-mnist", split) for split in ("train", "test")]
    refs = [ref for s in splits for ref in s.refs]
    labels = np.concatenate([s.labels for s in splits])
    picks = np.sort(np.random.default_rng(args.seed).choice(len(refs), count, replace=False))
    started = time.perf_counter()
    vectors = embed_all(embedder, [refs[i] for i in picks]).astype(np.float32)
    print(f"embedded {count} images in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, vectors=vectors, labels=labels[picks])
    return vectors, labels[picks]


def random_embeddings(count: int, seed: int, dim: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Ten Gaussian clusters in `dim` dimensions, non-negative-ish like the model's (an uncentred cloud)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(2.0, 1.0, (len(CLASSES), dim)).astype(np.float32)
    labels = rng.integers(0, len(CLASSES), count)
    return centres[labels] + rng.normal(0, 0.7, (count, dim)).astype(np.float32), labels


def cache_folder(args: argparse.Namespace) -> Path:
    """Where the catalogue of the largest size, its queries and ground truths are cached."""
    real = f"-real{args.real_images}" if args.real_images else ""
    return args.cache / f"scale-{args.vectors}{real}-{largest(args)}-q{args.queries}-seed{args.seed}"


def largest(args: argparse.Namespace) -> int:
    """The catalogue's size: each --sizes is a prefix of it, so that a size's figures do not depend on
    which other sizes ran with it."""
    return int(args.catalogue_size or max(args.sizes))


@dataclass
class Catalogue:
    """The base vectors (memory-mapped, float32), their class labels, prices, colours; held-out queries."""

    vectors: np.ndarray
    labels: np.ndarray
    prices: np.ndarray
    colours: np.ndarray
    queries: np.ndarray
    query_labels: np.ndarray


def catalogue(args: argparse.Namespace, size: int) -> Catalogue:
    """The first `size` products of the largest size's catalogue (built once, cached as .npy files)."""
    total = largest(args)
    folder = cache_folder(args)
    done = folder / ".complete"
    if not done.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        if args.vectors == "real":
            real, real_labels = real_embeddings(args)
        else:
            real, real_labels = random_embeddings(min(total + args.queries, REAL_IMAGES), args.seed)
        rng = np.random.default_rng(args.seed)
        held = rng.choice(len(real), args.queries, replace=False)
        np.save(folder / "queries.npy", real[held])
        np.save(folder / "query_labels.npy", real_labels[held])
        keep = rng.permutation(np.setdiff1d(np.arange(len(real)), held))
        base, base_labels = real[keep], real_labels[keep]
        n_real = min(len(base), total)
        vectors = np.lib.format.open_memmap(folder / "vectors.npy", "w+", np.float32, (total, real.shape[1]))
        labels = np.empty(total, np.int64)
        vectors[:n_real], labels[:n_real] = base[:n_real], base_labels[:n_real]
        if total > n_real:
            synthesize(
                base, base_labels, vectors[n_real:], labels[n_real:], np.random.default_rng(args.seed + 1)
            )
        vectors.flush()
        del vectors
        np.save(folder / "labels.npy", labels)
        prices = np.round(rng.lognormal(3.7, 0.6, total), 2)  # median ~40
        np.save(folder / "prices.npy", prices)
        np.save(folder / "colours.npy", rng.choice(np.array(COLOURS), total))
        meta = {
            "real": n_real,
            "synthetic": total - n_real,
            **density(base, np.load(folder / "vectors.npy", mmap_mode="r"), n_real),
        }
        (folder / "meta.json").write_text(json.dumps(meta))
        print(f"catalogue: {meta}", file=sys.stderr, flush=True)
        done.touch()
    vectors = np.load(folder / "vectors.npy", mmap_mode="r")[:size]
    return Catalogue(
        vectors,
        np.load(folder / "labels.npy")[:size],
        np.load(folder / "prices.npy")[:size],
        np.load(folder / "colours.npy")[:size],
        np.load(folder / "queries.npy"),
        np.load(folder / "query_labels.npy"),
    )


def synthesize(
    vectors: np.ndarray, labels: np.ndarray, out: np.ndarray, out_labels: np.ndarray, rng: np.random.Generator
) -> None:
    """Fill `out` with synthetic products and `out_labels` with their classes: each (1 - t) a + t b +
    noise, a and b random real vectors of one class, t ~ U(0, 0.5), the noise Gaussian at 0.1 x the
    class's per-dimension standard deviation."""
    classes = np.unique(labels)
    members = {c: np.flatnonzero(labels == c) for c in classes}
    spread = {c: vectors[members[c]].std(axis=0) for c in classes}
    chunk = 20_000
    for start in range(0, len(out), chunk):
        n = min(chunk, len(out) - start)
        cls = rng.choice(classes, n)
        block = np.empty((n, vectors.shape[1]), np.float32)
        for c in classes:
            rows = np.flatnonzero(cls == c)
            a = vectors[rng.choice(members[c], len(rows))]
            b = vectors[rng.choice(members[c], len(rows))]
            t = rng.uniform(0, 0.5, (len(rows), 1)).astype(np.float32)
            noise = rng.normal(0, 1, (len(rows), vectors.shape[1])).astype(np.float32) * (0.1 * spread[c])
            block[rows] = (1 - t) * a + t * b + noise
        out[start : start + n] = block
        out_labels[start : start + n] = cls


def density(real: np.ndarray, vectors: np.ndarray, n_real: int, sample: int = 300) -> dict[str, float]:
    """How close products sit: the median distance from a real product to its nearest other real one,
    and from a synthetic product to its nearest real one (samples of `sample`)."""
    rng = np.random.default_rng(0)

    def nearest(points: np.ndarray, exclude_self: bool) -> float:
        d = (real * real).sum(1)[None, :] - 2 * points @ real.T + (points * points).sum(1)[:, None]
        if exclude_self:
            d[d < 1e-3 * np.median(d)] = np.inf
        return float(np.median(np.sqrt(np.maximum(d.min(1), 0))))

    out = {"median_nn_real_to_real": nearest(real[rng.choice(len(real), sample, replace=False)], True)}
    if len(vectors) > n_real:
        picks = n_real + rng.choice(len(vectors) - n_real, sample, replace=False)
        out["median_nn_synthetic_to_real"] = nearest(np.asarray(vectors[np.sort(picks)]), False)
    out["median_norm"] = float(np.median(np.linalg.norm(real[:sample], axis=1)))
    return {k: round(v, 3) for k, v in out.items()}


# --- ground truth -------------------------------------------------------------------------------------


def filter_masks(cat: Catalogue, q: int) -> dict[str, np.ndarray | None]:
    """Which base products each filter lets through for query `q` (None: all)."""
    same = cat.labels == cat.query_labels[q]
    priced = (cat.prices >= PRICE_MIN) & (cat.prices <= PRICE_MAX)
    return {"unfiltered": None, "category": same, "category + price": same & priced}


def ground_truth(cat: Catalogue, k: int) -> dict[str, list[list[int]]]:
    """Exact float32 top-k (row numbers) per filter and query: squared Euclidean distances in numpy."""
    queries = cat.queries.astype(np.float32)
    dist = np.empty((len(cat.vectors), len(queries)), np.float32)
    step = 50_000
    for start in range(0, len(cat.vectors), step):
        block = np.asarray(cat.vectors[start : start + step], dtype=np.float32)
        dist[start : start + step] = (block * block).sum(1, keepdims=True) - 2 * block @ queries.T
    truth: dict[str, list[list[int]]] = {name: [] for name in FILTER_NAMES}
    for q in range(len(queries)):
        for name, mask in filter_masks(cat, q).items():
            d = dist[:, q] if mask is None else np.where(mask, dist[:, q], np.inf)
            top = np.argpartition(d, k)[:k]
            truth[name].append(top[np.argsort(d[top])].tolist())
    return truth


# --- memory, disk -------------------------------------------------------------------------------------


def memory_mib() -> dict[str, float]:
    """This process's VmRSS, its anonymous part (RssAnon: not backed by a file), its file-backed part
    (RssFile: mapped files, evictable page cache) and the peak (VmHWM), in MiB, from /proc/self/status."""
    fields = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file", "VmHWM": "peak"}
    out: dict[str, float] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in fields:
            out[fields[key]] = round(int(line.split()[1]) / 1024, 1)
    return out


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# --- one size x setting -------------------------------------------------------------------------------


def build(args: argparse.Namespace, cat: Catalogue, name: str, root: Path, collection: str) -> dict[str, Any]:
    """Create, upsert and optimize in this process; returns timings and memory."""
    setting = SETTINGS[name]
    mean = cat.vectors[: min(len(cat.vectors), 50_000)].mean(axis=0) if setting.centred else None
    shutil.rmtree(root / collection, ignore_errors=True)
    before = memory_mib()
    index = BenchIndex(root, collection, qdrant_settings(setting), setting)
    index.create(cat.vectors.shape[1])
    started = time.perf_counter()
    step = 20_000
    for start in range(0, len(cat.vectors), step):
        block = np.asarray(cat.vectors[start : start + step], dtype=np.float32)
        if mean is not None:
            block = block - mean
        rows = range(start, start + len(block))
        upsert_gallery(
            index,
            [f"p{i}" for i in rows],
            block,
            cat.labels[start : start + len(block)],
            {
                "colour": cat.colours[start : start + len(block)].tolist(),
                "price": cat.prices[start : start + len(block)].tolist(),
            },
        )
    upsert_s = time.perf_counter() - started
    after_upsert = memory_mib()
    started = time.perf_counter()
    index.optimize()
    optimize_s = time.perf_counter() - started
    after_optimize = memory_mib()
    index.close()
    if mean is not None:
        np.save(root / f"{collection}.mean.npy", mean)
    return {
        "upsert_s": round(upsert_s, 1),
        "upsert_points_per_s": round(len(cat.vectors) / upsert_s),
        "optimize_s": round(optimize_s, 1),
        "build_mib": {"before": before, "after_upsert": after_upsert, "after_optimize": after_optimize},
    }


def serve(spec: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: reopen the collection, query it, and report latency, recall and memory."""
    setting = Setting(**spec["setting"])
    root, collection, k = Path(spec["root"]), spec["collection"], spec["k"]
    queries = np.load(spec["queries"])
    truth: dict[str, list[list[int]]] = json.loads(Path(spec["truth"]).read_text())
    mean_file = root / f"{collection}.mean.npy"
    if setting.centred:
        queries = queries - np.load(mean_file)
    cat_labels = np.load(spec["query_labels"])
    before = memory_mib()
    started = time.perf_counter()
    index = BenchIndex(root, collection, qdrant_settings(setting), setting)
    reopen_s = time.perf_counter() - started
    opened = memory_mib()
    filters = [
        {
            "unfiltered": Filters(),
            "category": Filters(category=[CLASSES[c]]),
            "category + price": Filters(category=[CLASSES[c]], price_min=PRICE_MIN, price_max=PRICE_MAX),
        }
        for c in cat_labels
    ]
    started = time.perf_counter()
    index.search(queries[0], k, Filters())
    first_query_s = time.perf_counter() - started
    results: dict[str, Any] = {}
    for ef, oversampling, name in spec["blocks"]:
        index.settings = qdrant_settings(setting, oversampling or 1.0, ef)
        per_filter = results.setdefault(f"{ef} / {'-' if oversampling is None else oversampling}", {})
        if spec["warm_up"]:
            for q in range(min(20, len(queries))):  # the pages the graph walks
                index.search(queries[q], k, filters[q][name])
        times, recalls = [], []
        for q in range(len(queries)):
            started = time.perf_counter()
            hits = index.search(queries[q], k, filters[q][name])
            times.append(1000 * (time.perf_counter() - started))
            found = {h.product_id for h in hits}
            recalls.append(len(found & {f"p{i}" for i in truth[name][q]}) / k)
        cuts = statistics.quantiles(times, n=100)
        per_filter[name] = {
            "p50_ms": round(statistics.median(times), 2),
            "p95_ms": round(cuts[94], 2),
            "p99_ms": round(cuts[98], 2),
            "recall@10": round(float(np.mean(recalls)), 4),
        }
    served = memory_mib()
    # The engine's own exact search agrees with numpy's (a few queries, after the memory
    # reading: it scans every vector, and would map every on-disk original into the page cache).
    check = min(spec["check_exact"], len(queries))
    agree = [
        len(
            {h.product_id for h in index.search(queries[q], k, filters[q][name], exact=True)}
            & {f"p{i}" for i in truth[name][q]}
        )
        / k
        for q in range(check)
        for name in FILTER_NAMES
    ]
    index.close()
    return {
        "load_average_1min": round(os.getloadavg()[0], 1),  # the machine's, as the queries ended
        "reopen_s": round(reopen_s, 2),
        "first_query_s": round(first_query_s, 3),
        "exact_agrees": round(float(np.mean(agree)), 4) if agree else None,
        "serve_mib": {"before_open": before, "after_open": opened, "after_queries": served},
        "queries": results,
    }


def drop_page_cache() -> None:
    """Evict clean page cache (root only): the on-disk originals must then come from the disk. Pages a
    process has mapped stay, so each cold measurement is a fresh process opened after this."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError as e:
        raise SystemExit(f"--page-cache cold needs root (writing /proc/sys/vm/drop_caches): {e}") from e


def read_through(path: Path) -> None:
    """Read every file of the collection once, so that all of it sits in page cache."""
    for f in path.rglob("*"):
        if f.is_file():
            with f.open("rb") as handle:
                while handle.read(1 << 24):
                    pass


def serve_in_child(spec: dict[str, Any], spec_file: Path) -> dict[str, Any]:
    spec_file.write_text(json.dumps(spec))
    child = subprocess.run(
        [sys.executable, __file__, "--serve", str(spec_file)], capture_output=True, text=True, check=False
    )
    if child.returncode != 0:
        raise RuntimeError(f"serving process failed:\n{child.stderr}")
    served: dict[str, Any] = json.loads(child.stdout)
    return served


def serve_with_page_cache(args: argparse.Namespace, spec: dict[str, Any], page_cache: str) -> dict[str, Any]:
    """Serve with the page cache as the build left it (`as-built`), holding the whole collection
    (`warm`), or emptied before every block of queries (`cold`: one fresh process per ef x oversampling
    x filter, opened after the cache is dropped, without warm-up queries)."""
    setting: Setting = SETTINGS[spec["setting_name"]]
    oversamplings = args.oversampling if setting.quantization != "none" else [None]
    blocks = [list(b) for b in itertools.product(args.ef, oversamplings, FILTER_NAMES)]
    spec_file = args.out / f"{spec['collection']}.spec.json"
    if page_cache != "cold":
        if page_cache == "warm":
            read_through(Path(spec["root"]) / spec["collection"])
        return serve_in_child({**spec, "blocks": blocks, "warm_up": True}, spec_file)
    served: dict[str, Any] = {}
    for n, block in enumerate(blocks):
        drop_page_cache()
        check = args.check_exact if n == len(blocks) - 1 else 0  # the exact scan reads every original
        one = serve_in_child({**spec, "blocks": [block], "warm_up": False, "check_exact": check}, spec_file)
        if not served:
            served = one
        else:
            for key, per_filter in one["queries"].items():
                served["queries"].setdefault(key, {}).update(per_filter)
            served["exact_agrees"] = one["exact_agrees"]
    return served


def run(
    args: argparse.Namespace, size: int, name: str, cat: Catalogue, truth_file: Path
) -> list[dict[str, Any]]:
    root, collection = args.out / "edge", f"scale-{size}-{name}"
    built: dict[str, Any] = {"n": size, "setting": name, **asdict(SETTINGS[name])}
    built.update(build(args, cat, name, root, collection))
    built["disk_bytes"] = disk_bytes(root / collection)
    spec = {
        "setting": asdict(SETTINGS[name]),
        "setting_name": name,
        "root": str(root),
        "collection": collection,
        "k": args.k,
        "queries": str(cache_folder(args) / "queries.npy"),
        "query_labels": str(cache_folder(args) / "query_labels.npy"),
        "truth": str(truth_file),
        "check_exact": args.check_exact,
    }
    rows = []
    for page_cache in args.page_cache:
        row = {**built, "page_cache": page_cache, **serve_with_page_cache(args, spec, page_cache)}
        serve_mib = row["serve_mib"]
        row["rss_bytes_per_product"] = round(
            (serve_mib["after_queries"]["rss"] - serve_mib["before_open"]["rss"]) * 2**20 / size
        )
        row["resident_bytes_per_product"] = round(
            (serve_mib["after_open"]["rss"] - serve_mib["before_open"]["rss"]) * 2**20 / size
        )
        row["anon_bytes_per_product"] = round(
            (serve_mib["after_queries"]["anon"] - serve_mib["before_open"]["anon"]) * 2**20 / size
        )
        row["disk_bytes_per_product"] = round(row["disk_bytes"] / size)
        print(json.dumps(row), file=sys.stderr, flush=True)
        with (args.out / "scale.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        rows.append(row)
    if not args.keep:
        shutil.rmtree(root / collection, ignore_errors=True)
    return rows


# --- report -------------------------------------------------------------------------------------------


def report(rows: list[dict[str, Any]]) -> str:
    s = QdrantSettings()
    lines = [
        f"HNSW m={s.hnsw_m}, ef_construct={s.hnsw_ef_construct}, ef={s.hnsw_ef}; top-10, one client, "
        f"{os.cpu_count()} CPUs. Memory of a fresh serving process, less before opening: heap (RssAnon) "
        "after the queries, VmRSS after reopening, VmRSS after the queries.",
        "",
        "| N | setting | page cache | B/product: heap / resident after reopen / after queries "
        "| disk B/product "
        "| upsert s | optimize s | reopen s "
        "| ef / oversampling | unfiltered p50/p99 ms | recall | category p50/p99 ms | recall "
        "| category + price p50/p99 ms | recall |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        for oversampling, per in r["queries"].items():
            cells = " | ".join(
                f"{per[f]['p50_ms']} / {per[f]['p99_ms']} | {per[f]['recall@10']}" for f in FILTER_NAMES
            )
            lines.append(
                f"| {r['n']} | {r['setting']} | {r.get('page_cache', 'as-built')} "
                f"| {r['anon_bytes_per_product']} / "
                f"{r['resident_bytes_per_product']} / {r['rss_bytes_per_product']} "
                f"| {r['disk_bytes_per_product']} | {r['upsert_s']} | {r['optimize_s']} | {r['reopen_s']} "
                f"| {oversampling} | {cells} |"
            )
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        print(json.dumps(serve(json.loads(Path(sys.argv[2]).read_text()))))
        return
    p = new_parser(__doc__)
    p.add_argument("--artefact", type=Path, default=Path(".visrec/quality/model"))
    add_data_options(p, cache=Path(".visrec/cache"), out=Path(".visrec/latency"))
    p.add_argument("--vectors", choices=("real", "random"), default="real")
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=["float32", "int8-disk"])
    p.add_argument("--real-images", type=int, help="Fashion-MNIST images embedded (default: all 70,000)")
    p.add_argument("--catalogue-size", type=int, help="products made (default: the largest --sizes)")
    p.add_argument("--oversampling", type=float, nargs="+", default=[2.0], help="quantized settings")
    p.add_argument("--ef", type=int, nargs="+", default=[QdrantSettings().hnsw_ef], help="HNSW search ef")
    p.add_argument("--queries", type=int, default=300)
    p.add_argument(
        "--check-exact", type=int, default=5, help="queries checked against the engine's exact search"
    )
    p.add_argument("--keep", action="store_true", help="keep the collections")
    p.add_argument(
        "--page-cache",
        nargs="+",
        choices=("as-built", "warm", "cold"),
        default=["as-built"],
        help="serve each built collection with the page cache as the build left it, holding all of it "
        "(warm), or dropped before each block of queries (cold; needs root)",
    )
    add_run_options(p, batch_size=128)
    args = p.parse_args()
    rows = []
    for size in args.sizes:
        cat = catalogue(args, size)
        started = time.perf_counter()
        truth_file = cache_folder(args) / f"truth-{size}-k{args.k}.json"
        if not truth_file.is_file():
            truth_file.write_text(json.dumps(ground_truth(cat, args.k)))
        print(f"{size}: ground truth in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        for name in args.settings:
            rows.extend(run(args, size, name, cat, truth_file))
    text = report(rows)
    print(text)
    write_results(args.out, "scale", rows, text)


if __name__ == "__main__":
    main()
