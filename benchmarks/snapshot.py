"""How long `visrec snapshot` and `visrec restore` take, and how big a snapshot is, at N products.

A store of `--products` products written directly (random 1000-d vectors, one photo each, the payload a
sync would write; as live_sync.py's `--scale` writes them; not optimized; `--layout int8-disk`: int8
codes in RAM and the originals on disk, as docs/scale.md's 1M runs), beside a random-weight ResNet50
artefact; then, as a user runs them, each a real `visrec` process:

1. `visrec serve` on the store, and `visrec snapshot` handed over to it while one client reads
   similar-by-id in a loop: how long writes were held (the settle of the copy), the snapshot's seconds
   in the service (copy, settle, archive), the archive process's peak memory, and the reads' p50/p99/max
   while it ran against the same reads idle for 20 s just before and just after it (after 30 s of
   unmeasured reads that fault the store's pages in; one run: the ratio is the figure);
2. `visrec snapshot DIR` alone (no service: the command holds the store): seconds, archive bytes, and the
   store folder's size on disk (allocated, as `du`) beside it (`--no-alone` skips it);
3. `visrec restore SNAPSHOT` (the snapshot of 1) onto an empty folder (another machine): seconds,
   optimize included. `--restore no-graph` restores into a version whose HNSW graph is not built
   (VISREC_QDRANT__FULL_SCAN_THRESHOLD_KB above its size: the optimize merges segments only): on random
   1000-d vectors the graph takes far longer to build than on real embeddings, whose build time is the
   reindex's optimize (docs/scale.md); `--restore none` skips it.

    .venv/bin/python benchmarks/snapshot.py                          # 10,000 products
    .venv/bin/python benchmarks/snapshot.py --products 100000 --restore no-graph   # the docs' figures
    .venv/bin/python benchmarks/snapshot.py --products 1000000 --layout int8-disk --restore no-graph \
        --no-alone                                                    # 1M, as docs/scale.md
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from embed_throughput import random_artefact
from live_sync import wait_ready

from visrec.config import QdrantSettings
from visrec.fs import allocated_bytes
from visrec.index import IndexPoint, open_index
from visrec.manifest import read_manifest

from common import new_parser


def main() -> None:
    parser = new_parser(__doc__)
    parser.add_argument("--products", type=int, default=10_000)
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temp folder)")
    parser.add_argument(
        "--restore",
        choices=["full", "no-graph", "none"],
        default="full",
        help="(3): a restore ends with optimize(), which on random vectors takes far longer than on real "
        "embeddings (the graph of random 1000-d points is hard to build): no-graph leaves the graph out",
    )
    parser.add_argument("--no-restore", action="store_true", help="the same as --restore none")
    parser.add_argument("--no-alone", action="store_true", help="skip (2), the snapshot without a service")
    parser.add_argument("--layout", choices=["float32", "int8-disk"], default="float32")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="visrec-snapshot-"))
    try:
        restore = "none" if args.no_restore else args.restore
        run(root, args.products, restore=restore, alone=not args.no_alone, layout=args.layout)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


LAYOUTS = {"float32": {}, "int8-disk": {"quantization": "int8", "vectors_on_disk": True}}


def write_store(root: Path, n: int, layout: str = "float32") -> dict[str, str]:
    """The store, the artefact, and the environment of a `visrec` process that uses them."""
    artefact = random_artefact(root / "model", 224)
    version = read_manifest(artefact).model_version
    started = time.perf_counter()
    settings = LAYOUTS[layout]
    with open_index(QdrantSettings(path=root / "qdrant", **settings)) as index:
        index.create(1000, {"model_version": version, "artefact": str(artefact)})
        rng = np.random.default_rng(0)
        for start in range(0, n, 1000):
            index.upsert(
                [
                    IndexPoint(f"s{i}", rng.standard_normal((1, 1000), np.float32), payload(i, version))
                    for i in range(start, min(n, start + 1000))
                ]
            )
    # Not optimized: a snapshot reads the points, not the graph (and the graph of random vectors takes
    # far longer to build than a real catalogue's).
    print(f"{n} products written directly in {time.perf_counter() - started:.0f} s", flush=True)
    return (
        {k: v for k, v in os.environ.items() if not k.startswith("VISREC_")}
        | {
            "VISREC_ARTEFACT": str(artefact),
            "VISREC_QDRANT__PATH": str(root / "qdrant"),
            "VISREC_INGEST__FAILURE_REPORT": str(root / "failures.jsonl"),
        }
        | {f"VISREC_QDRANT__{k.upper()}": str(v).lower() for k, v in settings.items()}
    )


def payload(i: int, version: str) -> dict[str, Any]:
    """What a sync writes for a product with one local photo (bookkeeping fields included)."""
    return {
        "product_id": f"s{i}",
        "category": str(i % 10),
        "price": 10.0 + i % 90,
        "title": f"product {i}",
        "images": [f"images/s{i}.png"],
        "image": f"images/s{i}.png",
        "model_version": version,
        "vectors_hash": f"{i:064x}",
        "metadata_hash": f"{i * 7:064x}",
        "photo_files": [[f"/data/images/s{i}.png", 2100, 1764000000000000000, 1000 + i, 2049, f"{i:064x}"]],
        "source": "catalogue",
    }


def visrec(env: dict[str, str], *args: str) -> tuple[dict[str, Any], float]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "visrec", *args, "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"visrec {' '.join(args)} failed: {done.stderr.strip()}")
    return json.loads(done.stdout), time.perf_counter() - started


class Reads:
    """One client reading similar-by-id of random products until stopped; each latency in seconds."""

    def __init__(self, url: str, n: int) -> None:
        self.url, self.n = url, n
        self.seconds: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        rng = np.random.default_rng(1)
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while not self._stop.is_set():
                started = time.perf_counter()
                client.get(f"/products/s{rng.integers(self.n)}/similar", params={"k": 10}).raise_for_status()
                self.seconds.append(time.perf_counter() - started)

    def __enter__(self) -> Reads:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def figures(self) -> str:
        ms = sorted(s * 1000 for s in self.seconds)
        p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
        return f"{len(ms)} reads, p50 {statistics.median(ms):.1f} ms, p99 {p99:.1f} ms, max {ms[-1]:.1f} ms"


def run(
    root: Path,
    n: int,
    restore: str = "full",
    alone: bool = True,
    layout: str = "float32",
    warm_s: float = 30,
) -> None:
    env = write_store(root, n, layout)
    store_bytes = allocated_bytes(root / "qdrant")
    port = 18000 + os.getpid() % 1000
    serve_env = env | {"VISREC_API__PORT": str(port), "VISREC_API__HOST": "127.0.0.1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "visrec", "serve"], env=serve_env, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, server, timeout_s=600)
        with Reads(url, n):  # unmeasured: the first reads after the start fault the store's pages in
            time.sleep(warm_s)
        with Reads(url, n) as idle:
            time.sleep(20)
        with Reads(url, n) as busy:
            handed, wall = visrec(env, "snapshot", str(root / "snaps"))
        with Reads(url, n) as after:
            time.sleep(20)
        rss = handed.get("process_max_rss_mib")
        print(
            f"(1) snapshot of {n} handed to a running service: {wall:.1f} s wall ({handed['seconds']:.1f} s "
            f"in the service), writes held {handed['cut']['writes_held_s']:.2f} s, "
            f"{handed['bytes'] / 1e6:.0f} MB archive ({handed['bytes'] / n:.0f} B a product), the archive's "
            f"process {'(none)' if rss is None else f'{rss} MiB at its peak'}; the store folder "
            f"{store_bytes / 1e6:.0f} MB on disk; reads idle before: {idle.figures()}; during the "
            f"snapshot: {busy.figures()}; idle after: {after.figures()}",
            flush=True,
        )
    finally:
        server.terminate()
        server.wait(timeout=120)
    if alone:
        taken, wall = visrec(env, "snapshot", str(root / "snaps"))
        print(
            f"(2) snapshot alone of {n}: {wall:.1f} s wall ({taken['seconds']:.1f} s in the command), "
            f"{taken['bytes'] / 1e6:.0f} MB archive",
            flush=True,
        )
    if restore != "none":
        other = env | {"VISREC_QDRANT__PATH": str(root / "other")}
        if restore == "no-graph":  # every segment below the full-scan threshold: no graph is built
            other["VISREC_QDRANT__FULL_SCAN_THRESHOLD_KB"] = str(10**9)
        restored, wall = visrec(other, "restore", handed["snapshot"])
        print(
            f"(3) restore of {n} onto an empty folder ({restore}): {wall:.1f} s wall "
            f"({restored['seconds']:.1f} s in the command, of which optimize "
            f"{restored.get('optimize_seconds', float('nan')):.1f} s); the restored folder "
            f"{allocated_bytes(root / 'other') / 1e6:.0f} MB on disk",
            flush=True,
        )
        shutil.rmtree(root / "other")


if __name__ == "__main__":
    main()
