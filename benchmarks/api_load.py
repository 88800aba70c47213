"""Load and cost of the HTTP API on loopback, against an existing index and model (nothing leaves the
machine). Starts `visrec serve` on 127.0.0.1 (a free port) and either

- load (default): similar-by-id with a category filter from N concurrent clients, a bounded number of
  requests (and a time limit); prints requests/s, how many were served and shed, p50/p99 of each, and
  the server's CPU; or
- `--worst`: the most expensive requests the schema allows, one at a time (similar-to with k = 1000,
  diversity 1, five caps and a colour re-rank; recommend from 100 products and unlike 100 more, the same
  rules; a search by a 16 MP PNG, the same rules), and prints the server's CPU seconds for each until
  its work ended (read from /proc, so Linux only). `--add-photos N` first copies the index and adds N
  products of 32 random photos each (the most a product may have): the worst a catalogue can make.

    scripts/demo.sh                       # once: builds .visrec/demo/{model,qdrant}
    .venv/bin/python benchmarks/api_load.py --requests 2000 --concurrency 16
    .venv/bin/python benchmarks/api_load.py --worst --add-photos 1000
"""

from __future__ import annotations

import asyncio
import collections
import io
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from common import SAMPLE_CATALOGUE, catalogue_rows, new_parser

PHOTOS = 32  # the most photos a product may have (visrec.catalogue.MAX_PHOTOS)
CAPS = ["category=100", "colour=200", "brand=20", "line=50", "price=10"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], share: float) -> float:
    return sorted(values)[int(share * (len(values) - 1))] if values else float("nan")


async def load(
    base: str, ids: list[tuple[str, str]], total: int, concurrency: int, limit_s: float, pid: int
) -> None:
    latencies: dict[int, list[float]] = collections.defaultdict(list)
    queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    rng = random.Random(0)
    for _ in range(total):
        queue.put_nowait(rng.choice(ids))
    deadline = time.perf_counter() + limit_s

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty() and time.perf_counter() < deadline:
            product_id, category = queue.get_nowait()
            started = time.perf_counter()
            response = await http.get(
                f"/products/{product_id}/similar", params={"k": 10, "category": category}
            )
            latencies[response.status_code].append(time.perf_counter() - started)

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as http:
        cpu_before, started = cpu_s(pid), time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        wall, cpu = time.perf_counter() - started, cpu_s(pid) - cpu_before
    answered = sum(len(v) for v in latencies.values())
    served, shed = latencies.get(200, []), latencies.get(503, [])
    print(f"requests        {answered} in {wall:.1f} s at {concurrency} concurrent clients")
    print(f"requests/s      {answered / wall:.0f} ({len(served) / wall:.0f} served)")
    print(
        f"served (200)    {len(served)}: p50 {1000 * statistics.median(served or [0]):.1f} ms, "
        f"p99 {1000 * percentile(served, 0.99):.1f} ms"
    )
    print(
        f"shed (503)      {len(shed)}"
        + (
            f": p50 {1000 * statistics.median(shed):.1f} ms, p99 {1000 * percentile(shed, 0.99):.1f} ms"
            if shed
            else ""
        )
    )
    print(
        f"all answers     p50 {1000 * statistics.median(sum(latencies.values(), [])):.1f} ms, "
        f"p99 {1000 * percentile(sum(latencies.values(), []), 0.99):.1f} ms"
    )
    print(f"status codes    {dict(sorted((k, len(v)) for k, v in latencies.items()))}")
    print(f"server CPU      {cpu:.1f} s ({1000 * cpu / max(1, answered):.1f} ms a request)")


def settle(pid: int, quiet_s: float = 1.0) -> None:
    """Wait until process `pid` uses (almost) no CPU for `quiet_s`: its work is done."""
    while True:
        before = cpu_s(pid)
        time.sleep(quiet_s)
        if cpu_s(pid) - before < 0.05 * quiet_s:
            return


def worst(base: str, ids: list[str], pid: int) -> None:
    """The most expensive requests the schema allows, one at a time; the server's CPU for each, until its
    work ended (the deadline may answer first)."""
    photo = io.BytesIO()  # 16 MP, the most an upload may have; a PNG (a JPEG is decoded at reduced scale)
    Image.linear_gradient("L").resize((4000, 4000)).convert("RGB").save(photo, "PNG")
    rules: dict[str, Any] = {"diversity": 1, "max_per": CAPS}
    requests: list[tuple[str, str, str, dict[str, Any]]] = [
        (
            "similar, k 1000, rules, colour",
            "GET",
            f"/products/{ids[0]}/similar",
            {"params": {"k": 1000, "colour_weight": 1, **rules}},
        ),
        (
            "recommend 100+100, k 1000, rules",
            "POST",
            "/recommend",
            {"json": {"positive": ids[:100], "negative": ids[100:200], "k": 1000, **rules}},
        ),
        (
            "photo 16 MP, k 1000, rules, colour",
            "POST",
            "/search/image",
            {
                "params": {"k": 1000, "colour_weight": 1, **rules},
                "files": {"image": ("q.jpg", photo.getvalue(), "image/jpeg")},
            },
        ),
        ("similar, k 10 (for scale)", "GET", f"/products/{ids[0]}/similar", {"params": {"k": 10}}),
    ]
    with httpx.Client(base_url=base, timeout=900) as http:
        for name, method, path, kwargs in requests:
            for _ in range(2):  # the first of each warms caches; the second is reported
                before, started = cpu_s(pid), time.perf_counter()
                status = http.request(method, path, **kwargs).status_code
                answered = time.perf_counter() - started
                settle(pid)  # its work may outlive its answer (a deadline answers first)
                cpu = cpu_s(pid) - before
            print(f"{name:36s} status {status}  server CPU {cpu:6.2f} s  answered in {answered:6.2f} s")


@contextmanager
def with_photos(qdrant: Path, added: int) -> Iterator[tuple[Path, list[str]]]:
    """A copy of the store at `qdrant` with `added` products of PHOTOS random photos each (the norm of
    the indexed vectors), and their ids; removed afterwards."""
    from visrec.config import QdrantSettings
    from visrec.filters import Filters
    from visrec.index import IndexPoint, open_index

    folder = Path(tempfile.mkdtemp(prefix="visrec-api-load-"))
    try:
        shutil.copytree(qdrant, folder / "qdrant")
        rng = np.random.default_rng(0)
        ids = [f"many-{i}" for i in range(added)]
        with open_index(QdrantSettings(path=folder / "qdrant")) as index:
            page, _ = index.browse(Filters(), 1, None)
            found = index.get(page[0][0])
            assert found is not None
            dim, scale = found[0].shape[-1], float(np.linalg.norm(found[0][0]))
            for start in range(0, added, 50):
                points = []
                for i in range(start, min(added, start + 50)):
                    vectors = rng.normal(size=(PHOTOS, dim)).astype(np.float32)
                    vectors *= scale / np.linalg.norm(vectors, axis=1, keepdims=True)
                    images = [f"/nowhere/{i}-{j}.png" for j in range(PHOTOS)]
                    payload = {
                        "product_id": ids[i],
                        "image": images[0],
                        "images": images,
                        "category": f"c{i % 7}",
                        "colour": f"k{i % 5}",
                        "price": float(i % 90),
                        "brand": f"b{i % 11}",
                        "line": f"l{i % 13}",
                        "colour_lab": [50.0, float(i % 20), float(i % 30)],
                    }
                    points.append(IndexPoint(ids[i], vectors, payload))
                index.upsert(points)
        yield folder / "qdrant", ids
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def served(artefact: Path, qdrant: Path) -> Iterator[tuple[str, int]]:
    """`visrec serve` on a free loopback port over `artefact` and `qdrant`, once ready: (its URL, pid)."""
    port = free_port()
    env = {
        **os.environ,
        "VISREC_ARTEFACT": str(artefact),
        "VISREC_QDRANT__PATH": str(qdrant),
        "VISREC_API__PORT": str(port),
        "VISREC_API__HOST": "127.0.0.1",
    }
    server = subprocess.Popen([sys.executable, "-m", "visrec", "serve"], env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None:
                sys.exit(f"server exited with {server.returncode}")
            time.sleep(0.2)
        else:
            sys.exit("server not ready after 120 s")
        yield base, server.pid
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = new_parser(__doc__)
    parser.add_argument("--catalogue", type=Path, default=SAMPLE_CATALOGUE)
    parser.add_argument("--artefact", type=Path, default=Path(".visrec/demo/model"))
    parser.add_argument("--qdrant-path", type=Path, default=Path(".visrec/demo/qdrant"))
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--time-limit", type=float, default=120.0)
    parser.add_argument("--worst", action="store_true", help="the most expensive requests, their CPU")
    parser.add_argument("--add-photos", type=int, default=0, help="with --worst: N products of 32 photos")
    args = parser.parse_args()

    rows = [(row["id"], row["category"]) for row in catalogue_rows(args.catalogue)]
    if args.worst:
        if args.add_photos:
            with with_photos(args.qdrant_path, args.add_photos) as (qdrant, ids):
                print(f"{args.add_photos} products of {PHOTOS} photos added to a copy of the index")
                with served(args.artefact, qdrant) as (base, pid):
                    worst(base, ids, pid)
        else:
            with served(args.artefact, args.qdrant_path) as (base, pid):
                worst(base, [product_id for product_id, _ in rows], pid)
        return
    with served(args.artefact, args.qdrant_path) as (base, pid):
        asyncio.run(load(base, rows, args.requests, args.concurrency, args.time_limit, pid))


if __name__ == "__main__":
    main()
