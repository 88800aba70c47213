"""Load test of the HTTP API on loopback: similar-by-id with a category filter, N concurrent clients.

Starts `visrec serve` on 127.0.0.1 (a free port) over an existing index and model, sends a bounded
number of requests (and stops after a time limit), and prints requests/s, p50/p99 latency and the
status-code histogram. Nothing leaves the machine.

    scripts/demo.sh                       # once: builds .visrec/demo/{model,qdrant}
    .venv/bin/python benchmarks/api_load.py --requests 2000 --concurrency 16
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from common import SAMPLE_CATALOGUE, catalogue_rows, new_parser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def run(base: str, ids: list[tuple[str, str]], total: int, concurrency: int, limit_s: float) -> None:
    latencies: list[float] = []
    statuses: collections.Counter[int] = collections.Counter()
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
            latencies.append(time.perf_counter() - started)
            statuses[response.status_code] += 1

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    latencies.sort()
    print(f"requests        {len(latencies)} in {wall:.1f} s at {concurrency} concurrent clients")
    print(f"requests/s      {len(latencies) / wall:.0f}")
    print(f"latency p50     {1000 * statistics.median(latencies):.1f} ms")
    print(f"latency p99     {1000 * latencies[int(0.99 * (len(latencies) - 1))]:.1f} ms")
    print(f"status codes    {dict(sorted(statuses.items()))}")


def main() -> None:
    parser = new_parser(__doc__)
    parser.add_argument("--catalogue", type=Path, default=SAMPLE_CATALOGUE)
    parser.add_argument("--artefact", type=Path, default=Path(".visrec/demo/model"))
    parser.add_argument("--qdrant-path", type=Path, default=Path(".visrec/demo/qdrant"))
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--time-limit", type=float, default=120.0)
    args = parser.parse_args()

    ids = [(row["id"], row["category"]) for row in catalogue_rows(args.catalogue)]
    port = free_port()
    env = {
        **os.environ,
        "VISREC_ARTEFACT": str(args.artefact),
        "VISREC_QDRANT__PATH": str(args.qdrant_path),
        "VISREC_API__PORT": str(port),
        "VISREC_API__HOST": "127.0.0.1",
    }
    server = subprocess.Popen([sys.executable, "-m", "visrec", "serve"], env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None:
                sys.exit(f"server exited with {server.returncode}")
            time.sleep(0.2)
        else:
            sys.exit("server not ready after 60 s")
        asyncio.run(run(base, ids, args.requests, args.concurrency, args.time_limit))
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()
