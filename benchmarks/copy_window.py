"""Writes and reads while the service replaces its live embedded collection by an optimized copy.

Once `VISREC_QDRANT__OPTIMIZE_AFTER` points have changed, `visrec serve` copies the live collection's
folder (sparse: `EdgeIndex.copy`), optimizes the copy in a child process (`visrec.index.compact`),
catches it up with the writes made meanwhile (`visrec.catchup`) and swaps it in (`Writer.
_replace_by_optimized_copy`). Writes wait only for the flush and the copy. This measures that, on a
real `visrec serve` on loopback:

1. a store of `--products` products, written directly (random 1000-d vectors and the records a sync
   would write, as live_sync.py's `--scale` writes them) and optimized once, as a first sync leaves it;
   the random-weight ResNet50 of embed_throughput.py beside it (the service embeds PUT photos with it).
   `--store PATH` keeps it there and reuses it on the next run (a run's writes stay in it);
2. idle, one at a time after warm-up requests: similar-by-id (GET /products/{id}/similar?k=10, random
   products, `--readers` clients, `--idle-requests` in all), PATCH (a new price, `--idle-patches`) and
   PUT (a new product with one new photo from a loopback image host, `--idle-puts`); then, for
   `--busy-s`, the window's load below with no copy under way (what the load costs by itself: a PUT's
   embedding takes CPU the other requests need);
3. PATCHes until `--optimize-after` points have changed: the last one (the crossing write) starts the
   copy. From it until /metrics counts `visrec_optimized_copies_total{outcome="made"}` once more (the
   window), concurrently: `--patchers` clients PATCHing random products, `--putters` clients PUTting new
   products with a new photo each, `--readers` clients reading similar-by-id. p50/p99/max, counts,
   non-2xx answers, and when in the window the slowest request of each kind started;
4. disk: the live folder (allocated, as `du`; and apparent, the sum of file sizes: the engine's files
   are sparse) before the trigger and at the crossing write, the finished copy (the folder
   `<collection>.current` names) after the swap, and their ratio; how long a sparse copy of that folder
   takes here afterwards (what writes wait for, beside the flush); the service's own log lines
   ("replaced by an optimized copy after N changed points (X s; M written meanwhile)", the catch-up's
   and the optimizing process's).

Prints one JSON line per run, then a table with the targets beside the figures: PATCH and PUT p99
≤ 1 s during the window, similar p99 during the window ≤ 3x idle p99, copy ≤ 1.1x the live folder (du).

    .venv/bin/python benchmarks/copy_window.py                                 # 2,000 products
    .venv/bin/python benchmarks/copy_window.py --products 20000 --optimize-after 2000 --store /tmp/cw-20k
    .venv/bin/python benchmarks/copy_window.py --products 100000 --optimize-after 10000 \\
        --store /tmp/copy-window-100k --seconds 1800                         # the targets' scale
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from embed_throughput import random_artefact
from live_sync import WRITE_HEADERS, WRITE_KEY, free_port, percentile, wait_ready
from PIL import Image

from visrec import payload, plan
from visrec.catalogue import Product
from visrec.config import QdrantSettings
from visrec.fs import allocated_bytes, copy_tree_sparse
from visrec.index import IndexPoint, open_index, open_store
from visrec.index.edge import current_folder
from visrec.manifest import EMBEDDING_DIM, read_manifest

from common import CLASSES, command_line, new_parser

FIXTURE = "fixture.json"  # in --store: what was built there
MADE = re.compile(r'^visrec_optimized_copies_total\{outcome="(made|failed)"\}\s+([0-9.e+]+)$', re.M)
REPLACED = re.compile(
    r"replaced\s+by\s+an\s+optimized\s+copy\s+after\s+(\d+)\s+changed\s+points\s+\(([\d.]+)\s+s;\s+"
    r"(\d+)\s+written\s+meanwhile\)"
)
CAUGHT_UP = re.compile(r"caught\s+up:\s+(\d+)\s+written\s+meanwhile,\s+(\d+)\s+with\s+writes\s+held")
OPTIMIZED = re.compile(r"optimized\s+\S+\s+in\s+([\d.]+)\s+s")  # edge_copy's log line of the optimize child
TARGET_WRITE_P99_MS = 1000.0
TARGET_SIMILAR_RATIO = 3.0
TARGET_COPY_RATIO = 1.1


def product_id(i: int) -> str:
    return f"b{i:06d}"


# --- the store ----------------------------------------------------------------------------------------


def build_store(folder: Path, n: int, input_size: int, seed: int) -> dict[str, Any]:
    """`folder/qdrant` holding `n` products written directly, optimized; `folder/model` the artefact.
    A folder that holds a finished build of `n` products is reused as it is."""
    marker = folder / FIXTURE
    if marker.is_file():
        built: dict[str, Any] = json.loads(marker.read_text())
        if built["products"] != n:
            raise SystemExit(f"{folder} holds a store of {built['products']} products, not {n}")
        print(f"reusing the store of {n} products in {folder}")
        return built
    if folder.exists() and any(folder.iterdir()):
        raise SystemExit(f"{folder} is not empty and holds no finished build ({FIXTURE}): remove it first")
    folder.mkdir(parents=True, exist_ok=True)
    artefact = random_artefact(folder / "model", input_size)
    version = read_manifest(artefact).model_version
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    with open_index(QdrantSettings(path=folder / "qdrant")) as index:
        index.create(EMBEDDING_DIM, {"model_version": version, "artefact": str(artefact)})
        for start in range(0, n, 1000):
            points = []
            for i in range(start, min(n, start + 1000)):
                # a photo URL that is never fetched: nothing here re-embeds these products
                product = Product.model_validate(
                    {
                        "id": product_id(i),
                        "image": f"http://127.0.0.1:9/fixture/{i}.png",
                        "category": CLASSES[i % len(CLASSES)],
                        "price": 10 + i % 50,
                    }
                )
                refs = [str(product.image)]
                record = plan.bookkeeping(product, refs, [], version)
                body = payload.build(product.id, product.metadata(), refs, bookkeeping=record, extracted={})
                points.append(
                    IndexPoint(product.id, rng.standard_normal((1, EMBEDDING_DIM), np.float32), body)
                )
            index.upsert(points)
        written = time.perf_counter() - started
        index.optimize()
    built = {
        "products": n,
        "artefact": str(folder / "model"),
        "write_s": round(written, 1),
        "optimize_s": round(time.perf_counter() - started - written, 1),
    }
    marker.write_text(json.dumps(built))
    print(f"{n} products written directly in {written:.0f} s, optimized in {built['optimize_s']:.0f} s")
    return built


def disk(folder: Path) -> dict[str, Any]:
    """A folder's allocated bytes (what `du` counts) and apparent bytes (its files' sizes)."""
    apparent = sum(p.lstat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
    return {"folder": folder.name, "du": allocated_bytes(folder), "apparent": apparent}


# --- the loopback image host --------------------------------------------------------------------------


class Photos(BaseHTTPRequestHandler):
    """GET /<anything>/<n>.png: a 64x64 PNG of a colour and a square drawn from n (a new photo per n)."""

    def do_GET(self) -> None:  # noqa: N802 - the base's name
        match = re.fullmatch(r"/[\w-]+/(\d+)\.png", self.path)
        if match is None:
            self.send_response(404)
            self.send_header("content-length", "0")
            self.end_headers()
            return
        n = int(match[1])
        image = Image.new("RGB", (64, 64), (n * 37 % 256, n * 91 % 256, n * 53 % 256))
        image.paste((255 - n % 256, n * 7 % 256, 128), (8 + n % 24, 8 + n // 24 % 24, 40 + n % 24, 40))
        data = io.BytesIO()
        image.save(data, "PNG")
        self.send_response(200)
        self.send_header("content-type", "image/png")
        self.send_header("content-length", str(len(data.getvalue())))
        self.end_headers()
        self.wfile.write(data.getvalue())

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass


def _serve_photos(port: Connection) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Photos)
    server.daemon_threads = True
    port.send(server.server_address[1])
    port.close()
    server.serve_forever()


@contextmanager
def photo_host() -> Iterator[str]:
    """The image host on a free loopback port, in its own process (a shop's image host is not the load
    generator: in the clients' process, its answers waited for their turns at the GIL); yields its URL."""
    ours, theirs = multiprocessing.Pipe()
    host = multiprocessing.get_context("fork").Process(target=_serve_photos, args=(theirs,), daemon=True)
    host.start()
    try:
        if not ours.poll(30):
            raise RuntimeError("the image host did not start")
        yield f"http://127.0.0.1:{ours.recv()}"
    finally:
        host.terminate()
        host.join(10)


# --- the service --------------------------------------------------------------------------------------


@dataclass
class Service:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def serve(store: Path, artefact: Path, optimize_after: int, run: Path) -> Iterator[Service]:
    """`python -m visrec -v serve` (INFO: the copy's log line) on a free loopback port, writes allowed
    with a write key and photos from loopback; stopped on exit."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VISREC_")} | {
        "VISREC_ARTEFACT": str(artefact),
        "VISREC_QDRANT__PATH": str(store),
        "VISREC_QDRANT__OPTIMIZE_AFTER": str(optimize_after),
        "VISREC_INGEST__FAILURE_REPORT": str(run / "failures.jsonl"),
        "VISREC_INGEST__ALLOWED_HOSTS": '["127.0.0.1"]',
        "VISREC_API__HOST": "127.0.0.1",
        "VISREC_API__PORT": str(port),
        "VISREC_API__WRITE_KEY": WRITE_KEY,
        "COLUMNS": "400",  # the log's console: one line per message
    }
    log = run / "serve.log"
    with log.open("wb") as out:  # cwd: the run's folder, where no stray .env is read
        process = subprocess.Popen(
            [sys.executable, "-m", "visrec", "-v", "serve"], cwd=run, env=env, stdout=out, stderr=out
        )
    service = Service(f"http://127.0.0.1:{port}", process, log)
    try:
        wait_ready(service.url, process)
        yield service
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def copies(client: httpx.Client) -> dict[str, float]:
    """`visrec_optimized_copies_total` by outcome, from /metrics."""
    return {outcome: float(value) for outcome, value in MADE.findall(client.get("/metrics").text)}


# --- timed requests -----------------------------------------------------------------------------------


@dataclass
class Timings:
    """One kind of request: latencies (ms) of the 2xx answers, when each started (s from `origin`), and
    the other outcomes (status code or exception name) counted."""

    origin: float = field(default_factory=time.perf_counter)
    ms: list[float] = field(default_factory=list)
    at: list[float] = field(default_factory=list)
    failed: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def time(self, request: Callable[[], httpx.Response]) -> None:
        started = time.perf_counter()
        try:
            status = request().status_code
        except httpx.HTTPError as exc:
            status, outcome = 0, type(exc).__name__
        else:
            outcome = str(status)
        ms = (time.perf_counter() - started) * 1000
        with self.lock:
            if 200 <= status < 300:
                self.ms.append(ms)
                self.at.append(started - self.origin)
            else:
                self.failed[outcome] += 1

    def summary(self) -> dict[str, Any]:
        if not self.ms:
            return {"count": 0, "non_2xx": dict(self.failed)}
        slowest = max(range(len(self.ms)), key=self.ms.__getitem__)
        return {
            "count": len(self.ms),
            "p50_ms": round(statistics.median(self.ms), 1),
            "p99_ms": round(percentile(self.ms, 0.99), 1),
            "max_ms": round(self.ms[slowest], 1),
            "max_at_s": round(self.at[slowest], 2),
            "non_2xx": dict(self.failed),
        }


class Load:
    """What a run sends: similar-by-id of random fixture products, PATCHes of a random product's price,
    PUTs of new products with one new photo each (ids and photo URLs unique to the run)."""

    def __init__(self, url: str, photos: str, products: int, seed: int) -> None:
        self.url, self.photos, self.products = url, photos, products
        self.tag = f"r{int(time.time())}"
        self.rng = random.Random(seed)
        self._puts = 0
        self._lock = threading.Lock()

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120, headers=WRITE_HEADERS)

    def _random_id(self) -> str:
        with self._lock:
            return product_id(self.rng.randrange(self.products))

    def similar(self, client: httpx.Client) -> httpx.Response:
        return client.get(f"/products/{self._random_id()}/similar", params={"k": 10})

    def patch(self, client: httpx.Client) -> httpx.Response:
        with self._lock:
            price = self.rng.randrange(1, 1000)
        return client.patch(f"/products/{self._random_id()}", json={"price": price})

    def put(self, client: httpx.Client) -> httpx.Response:
        with self._lock:
            n, self._puts = self._puts, self._puts + 1
        body = {"image": f"{self.photos}/{self.tag}/{n}.png", "category": CLASSES[n % len(CLASSES)]}
        return client.put(f"/products/put-{self.tag}-{n}", json=body)


def sequential(
    load: Load, send: Callable[[httpx.Client], httpx.Response], count: int, clients: int = 1
) -> Timings:
    """`count` requests in all from `clients` clients, each waiting for its answer before the next."""
    timings = Timings()

    def one(share: int) -> None:
        with load.client() as client:
            for _ in range(share):
                timings.time(lambda: send(client))

    threads = [
        threading.Thread(target=one, args=(count // clients + (i < count % clients),)) for i in range(clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return timings


@contextmanager
def concurrently(
    load: Load, kinds: Mapping[str, tuple[Callable[[httpx.Client], httpx.Response], int]]
) -> Iterator[dict[str, Timings]]:
    """For each kind, its count of clients sending one request after another until the block ends."""
    stop = threading.Event()
    origin = time.perf_counter()
    timings = {name: Timings(origin) for name in kinds}

    def loop(name: str, send: Callable[[httpx.Client], httpx.Response]) -> None:
        with load.client() as client:
            while not stop.is_set():
                timings[name].time(lambda: send(client))

    threads = [
        threading.Thread(target=loop, args=(name, send))
        for name, (send, n) in kinds.items()
        for _ in range(n)
    ]
    for thread in threads:
        thread.start()
    try:
        yield timings
    finally:
        stop.set()
        for thread in threads:
            thread.join()


# --- the run ------------------------------------------------------------------------------------------


def measure(args: argparse.Namespace, store: Path, built: dict[str, Any], run: Path) -> dict[str, Any]:
    qdrant = store / "qdrant"
    with photo_host() as photos, serve(qdrant, Path(built["artefact"]), args.optimize_after, run) as service:
        load = Load(service.url, photos, args.products, args.seed)
        version = open_store(QdrantSettings(path=qdrant)).live()  # the alias's target, else version 1
        with load.client() as client:
            for send in (load.similar, load.patch, load.put):  # warm-up: the first embedding, connections
                for _ in range(3):
                    assert 200 <= send(client).status_code < 300, send
            changed = 6  # the warm-up's PATCHes and PUTs
            before = copies(client)
        idle = {
            "similar": sequential(load, load.similar, args.idle_requests, args.readers).summary(),
            "patch": sequential(load, load.patch, args.idle_patches).summary(),
            "put": sequential(load, load.put, args.idle_puts).summary(),
        }
        changed += args.idle_patches + args.idle_puts
        kinds = {
            "patch": (load.patch, args.patchers),
            "put": (load.put, args.putters),
            "similar": (load.similar, args.readers),
        }
        with concurrently(load, kinds) as busy:  # the window's load without a copy
            time.sleep(args.busy_s)
        changed += len(busy["patch"].ms) + len(busy["put"].ms)
        with load.client() as client:
            if changed >= args.optimize_after or copies(client) != before:
                raise SystemExit(
                    f"--optimize-after {args.optimize_after} must exceed the writes before the trigger "
                    f"({changed}): raise it, or lower --idle-patches, --idle-puts or --busy-s"
                )
        live_idle = disk(current_folder(qdrant, version))
        with load.client() as client:
            trigger = Timings()
            for _ in range(args.optimize_after - changed - 1):
                trigger.time(lambda: load.patch(client))
            crossing_started = time.perf_counter()
            trigger.time(lambda: load.patch(client))  # the crossing write: the copy starts
            live_crossing = disk(current_folder(qdrant, version))
            outcome, now = "timeout", before
            with concurrently(load, kinds) as window:
                while time.perf_counter() - crossing_started < args.seconds:
                    time.sleep(0.1)
                    now = copies(client)
                    if service.process.poll() is not None:
                        outcome = "service exited"
                        break
                    if now.get("made", 0) > before.get("made", 0):
                        outcome = "made"
                        break
                    if now.get("failed", 0) > before.get("failed", 0):
                        outcome = "failed"
                        break
                window_s = time.perf_counter() - crossing_started
        copy = disk(current_folder(qdrant, version))
        old = qdrant / live_crossing["folder"]
        line: dict[str, Any] = {}
        for _ in range(50):  # the log line follows the counter
            text = service.log_text()
            found = REPLACED.search(text)
            if found:
                line = {"changed": int(found[1]), "seconds": float(found[2]), "meanwhile": int(found[3])}
                if held := CAUGHT_UP.search(text):
                    line["with_writes_held"] = int(held[2])
                if optimized := OPTIMIZED.search(text):
                    line["optimize_s"] = float(optimized[1])
                break
            time.sleep(0.1)
    # what a write waits for beside the flush: the folder's sparse copy (page cache warm, as in the service)
    started = time.perf_counter()
    copy_tree_sparse(qdrant / copy["folder"], run / "copy-timed")
    copy["sparse_copy_s"] = round(time.perf_counter() - started, 2)
    shutil.rmtree(run / "copy-timed")
    return {
        "products": args.products,
        "optimize_after": args.optimize_after,
        "outcome": outcome,
        "copies": now,
        "window_s": round(window_s, 2),
        "log": line,
        "idle": idle,
        "busy": {name: t.summary() for name, t in busy.items()},
        "trigger_patch": trigger.summary(),
        "window": {name: t.summary() for name, t in window.items()},
        "clients": {"readers": args.readers, "patchers": args.patchers, "putters": args.putters},
        "disk": {
            "live_idle": live_idle,
            "live_at_crossing": live_crossing,
            "copy": copy,
            "old_live_left": old.is_dir() and old.name != copy["folder"],
            "ratio_du": round(copy["du"] / live_crossing["du"], 3),
        },
        "build": built,
        "load_average": os.getloadavg(),
        "cpus": os.cpu_count(),
        "command": command_line(),
    }


def table(result: dict[str, Any]) -> str:
    """The figures beside their targets, as a markdown table."""
    idle, window, d = result["idle"], result["window"], result["disk"]

    def ms(summary: dict[str, Any], key: str) -> str:
        return f"{summary[key]:.1f}" if key in summary else "-"

    def verdict(ok: bool) -> str:
        return "yes" if ok else "**no**"

    similar_limit = TARGET_SIMILAR_RATIO * idle["similar"].get("p99_ms", float("nan"))
    targets = {
        "patch": (f"p99 ≤ {TARGET_WRITE_P99_MS:.0f} ms", TARGET_WRITE_P99_MS),
        "put": (f"p99 ≤ {TARGET_WRITE_P99_MS:.0f} ms", TARGET_WRITE_P99_MS),
        "similar": (f"p99 ≤ 3x idle = {similar_limit:.1f} ms", similar_limit),
    }
    lines = [
        f"{result['products']} products, optimize_after {result['optimize_after']}: copy {result['outcome']} "
        f"{result['window_s']:.1f} s after the crossing write; the service's line: {result['log'] or 'none'}",
        "",
        "| when | request | count | p50 ms | p99 ms | max ms (at s) | non-2xx | target | met |",
        "|---|---|---:|---:|---:|---:|---|---|---|",
    ]
    for name in ("similar", "patch", "put"):
        s = idle[name]
        lines.append(
            f"| idle | {name} | {s['count']} | {ms(s, 'p50_ms')} | {ms(s, 'p99_ms')} | {ms(s, 'max_ms')} | "
            f"{s['non_2xx'] or 0} | | |"
        )
    for name in ("similar", "patch", "put"):
        s = result["busy"][name]
        lines.append(
            f"| busy, no copy | {name} | {s['count']} | {ms(s, 'p50_ms')} | {ms(s, 'p99_ms')} | "
            f"{ms(s, 'max_ms')} | {s['non_2xx'] or 0} | | |"
        )
    for name in ("similar", "patch", "put"):
        s, (text, limit) = window[name], targets[name]
        met = verdict(s["p99_ms"] <= limit and not s["non_2xx"]) if s["count"] else "n/a"
        lines.append(
            f"| window | {name} | {s['count']} | {ms(s, 'p50_ms')} | {ms(s, 'p99_ms')} | "
            f"{ms(s, 'max_ms')} ({s.get('max_at_s', '-')}) | {s['non_2xx'] or 0} | {text} | {met} |"
        )
    mib = 2**20
    lines += [
        "",
        "| folder | du MiB | apparent MiB |",
        "|---|---:|---:|",
        *(
            f"| {label}: {d[key]['folder']} | {d[key]['du'] / mib:.1f} | {d[key]['apparent'] / mib:.1f} |"
            for label, key in (
                ("live, idle", "live_idle"),
                ("live, at crossing", "live_at_crossing"),
                ("copy", "copy"),
            )
        ),
        "",
        f"sparse copy of the finished copy's folder, timed afterwards: {d['copy']['sparse_copy_s']:.2f} s",
        f"copy / live du: {d['ratio_du']:.2f} (target ≤ {TARGET_COPY_RATIO}: "
        f"{verdict(d['ratio_du'] <= TARGET_COPY_RATIO)}); old live folder still there: {d['old_live_left']}; "
        f"load average at the end {', '.join(f'{x:.1f}' for x in result['load_average'])} "
        f"on {result['cpus']} CPUs",
    ]
    return "\n".join(lines)


def main() -> None:
    p = new_parser(__doc__)
    p.add_argument("--products", type=int, default=2000)
    p.add_argument(
        "--optimize-after",
        type=int,
        default=1000,
        help="VISREC_QDRANT__OPTIMIZE_AFTER of the service (the service's default: 10000)",
    )
    p.add_argument("--seconds", type=float, default=600.0, help="the longest the copy window may take")
    p.add_argument("--store", type=Path, help="build the store here, or reuse the one built here")
    p.add_argument("--idle-requests", type=int, default=400, help="similar-by-id requests timed idle")
    p.add_argument("--idle-patches", type=int, default=100)
    p.add_argument("--idle-puts", type=int, default=20)
    p.add_argument(
        "--busy-s", type=float, default=10.0, help="the window's load run this long before, with no copy"
    )
    p.add_argument("--readers", type=int, default=2, help="similar-by-id clients (idle and in the window)")
    p.add_argument("--patchers", type=int, default=1, help="PATCH clients in the window")
    p.add_argument("--putters", type=int, default=1, help="PUT clients in the window")
    p.add_argument("--input-size", type=int, default=64, help="the random model's input size")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="visrec-copy-window-"))
    log = scratch / "run" / "serve.log"
    try:
        store = args.store or scratch / "store"
        built = build_store(store, args.products, args.input_size, args.seed)
        (scratch / "run").mkdir()
        result = measure(args, store, built, scratch / "run")
        print(json.dumps(result))
        print(table(result))
        if result["outcome"] != "made":
            raise SystemExit(f"the copy was not made ({result['outcome']})")
    except BaseException:
        if log.is_file():
            print(f"the service's log ends:\n{log.read_text(errors='replace')[-3000:]}", file=sys.stderr)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
