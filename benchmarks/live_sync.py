"""A live catalogue on the embedded store: what a sync costs when little changed, and what reads see
while a sync runs through the service (issue #22's targets). Everything through the real `visrec`
command and a real `visrec serve` on loopback.

    .venv/bin/python benchmarks/live_sync.py                      # the 2,000-product sample, random ResNet50
    .venv/bin/python benchmarks/live_sync.py --artefact .visrec/demo/model

Prints, in one run: (1) the first sync (every photo embedded); (2) a no-change resync: wall time, the
photo bytes it read (the quick check) and the process's read syscalls (/proc/PID/io rchar), beside a
`--checksum` resync that hashes every photo; (3) every price changed: wall time and photos embedded,
against the first sync; (4) similar-by-id and /healthz reads (one client) while idle and while the
service embeds 2,000 new products handed over by `visrec sync` and replaces the live version by an
optimized copy made in another process; (5) products written over HTTP (PUT, batches of 50) with photos
from a loopback host, PATCH latency, and reads meanwhile.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
from embed_throughput import random_artefact

from common import SAMPLE_CATALOGUE, catalogue_rows, new_parser

WRITE_KEY = "bench-write-key"
WRITE_HEADERS = {"X-API-Key": WRITE_KEY}
# Runs the CLI, then reports its own /proc/self/io on stderr's last line (what the whole process read).
_WITH_IO = (
    "import sys\nfrom visrec.cli import app\ntry:\n    app()\nfinally:\n"
    "    print('IO ' + open('/proc/self/io').read().replace('\\n', ' '), file=sys.stderr)\n"
)


def visrec_sync(env: dict[str, str], catalogue: Path, *extra: str) -> tuple[dict[str, Any], float, int]:
    """`visrec sync CATALOGUE --json` in a fresh process: (summary, wall seconds, rchar of the process)."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _WITH_IO, "sync", str(catalogue), "--json", "--max-delete", "1", *extra],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"visrec sync failed ({done.returncode}): {done.stderr[-2000:]}")
    fields = done.stderr.rsplit("IO ", 1)[1].split()  # "rchar: N wchar: N ..."
    io = dict(zip(fields[::2], fields[1::2], strict=False))
    return json.loads(done.stdout), wall, int(io.get("rchar:", -1))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main() -> None:
    p = new_parser(__doc__)
    p.add_argument("--artefact", type=Path, help="model to embed with (default: random ResNet50 weights)")
    p.add_argument("--input-size", type=int, default=64)
    p.add_argument("--idle-s", type=float, default=10.0, help="reads timed before the handed-over sync")
    p.add_argument(
        "--optimize-after", type=int, default=1000, help="VISREC_QDRANT__OPTIMIZE_AFTER of the service"
    )
    p.add_argument(
        "--writes", type=int, default=200, help="products written by PUT, and by batch, and patched"
    )
    p.add_argument(
        "--scale", type=int, help="instead: N products (points written directly), resync and prices"
    )
    args = p.parse_args()
    if args.scale:
        scale_run(args.scale, args.input_size)
        return

    root = Path(tempfile.mkdtemp(prefix="visrec-live-"))
    rows = catalogue_rows(SAMPLE_CATALOGUE)
    images = SAMPLE_CATALOGUE.parent / "images"
    for row in rows:
        row["image"] = str(images / Path(row["image"]).name)
        row["price"] = "10"
    catalogue = write_catalogue_rows(root / "catalogue.csv", rows)
    artefact = args.artefact or random_artefact(root / "model", args.input_size)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VISREC_")} | {
        "VISREC_ARTEFACT": str(artefact),
        "VISREC_QDRANT__PATH": str(root / "qdrant"),
        "VISREC_INGEST__FAILURE_REPORT": str(root / "failures.jsonl"),
        "VISREC_INGEST__IMAGE_ROOTS": json.dumps([str(images)]),
    }
    print(f"{len(rows)} products, photos in {images}, model {'random' if not args.artefact else artefact}")

    first, first_wall, _ = visrec_sync(env, catalogue)
    print(f"(1) first sync: {first['added']} embedded in {first_wall:.1f} s wall ({first['seconds']:.1f} s)")
    same, same_wall, same_io = visrec_sync(env, catalogue)
    checked, checked_wall, checked_io = visrec_sync(env, catalogue, "--checksum")
    print(
        f"(2) no-change resync: {same_wall:.2f} s wall ({same['seconds']:.2f} s sync), photo bytes read "
        f"{same['photo_bytes_read']}, process rchar {same_io / 1e6:.1f} MB; with --checksum "
        f"{checked_wall:.2f} s, photo bytes {checked['photo_bytes_read'] / 1e6:.1f} MB, rchar "
        f"{checked_io / 1e6:.1f} MB"
    )
    for row in rows:
        row["price"] = "11"
    write_catalogue_rows(catalogue, rows)
    priced, priced_wall, _ = visrec_sync(env, catalogue)
    print(
        f"(3) every price changed: {priced['metadata_updated']} payloads rewritten, {priced['updated']} "
        f"embedded, in {priced_wall:.2f} s wall ({priced['seconds']:.2f} s sync) vs the first sync's "
        f"{first_wall:.1f} s: {first_wall / priced_wall:.0f}x faster wall, "
        f"{first['seconds'] / max(priced['seconds'], 1e-3):.0f}x sync"
    )

    port = free_port()
    images_host = ThreadingHTTPServer(
        ("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(images))
    )
    threading.Thread(target=images_host.serve_forever, daemon=True).start()
    photo_url = f"http://127.0.0.1:{images_host.server_address[1]}"
    served_env = env | {
        "VISREC_API__PORT": str(port),
        "VISREC_API__WRITE_KEY": WRITE_KEY,
        "VISREC_INGEST__ALLOWED_HOSTS": '["127.0.0.1"]',
        # the handed-over sync of 2,000 products ends with an optimized copy made beside the live one
        "VISREC_QDRANT__OPTIMIZE_AFTER": str(args.optimize_after),
    }
    log = (root / "serve.log").open("wb")
    command = [sys.executable, "-m", "visrec", "serve"]
    server = subprocess.Popen(command, env=served_env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, server)
        with Reads(url) as idle:
            time.sleep(args.idle_s)
        print(f"(4) reads while idle: {idle.line()}")
        write_catalogue_rows(catalogue, rows + [{**row, "id": row["id"] + "-b"} for row in rows])
        with Reads(url) as busy:
            handed, handed_wall, _ = visrec_sync(env, catalogue)
        print(
            f"    during a handed-over sync of {handed['added']} new products ({handed_wall:.1f} s, its "
            f"optimized copy included): {busy.line()}; p99 {busy.p99() / idle.p99():.1f}x idle"
        )
        with Reads(url) as during, httpx.Client(base_url=url, timeout=120, headers=WRITE_HEADERS) as writer:
            started = time.perf_counter()
            for n, row in enumerate(rows[: args.writes]):
                body = {"image": f"{photo_url}/{Path(row['image']).name}", "category": row["category"]}
                assert writer.put(f"/products/w{n}", json=body).json()["outcome"] == "added"
            put_rate = args.writes / (time.perf_counter() - started)
            batch = [
                {
                    "id": f"x{n}",
                    "image": f"{photo_url}/{Path(row['image']).name}",
                    "category": row["category"],
                }
                for n, row in enumerate(rows[: args.writes])
            ]
            started = time.perf_counter()
            for start in range(0, len(batch), 50):
                answer = writer.post("/products/batch", json=batch[start : start + 50]).json()["results"]
                assert {r["outcome"] for r in answer} == {"added"}, answer[:3]
            batch_rate = args.writes / (time.perf_counter() - started)
            patches: list[float] = []
            for n in range(args.writes):
                started = time.perf_counter()
                assert writer.patch(f"/products/w{n}", json={"price": n}).status_code == 200
                patches.append((time.perf_counter() - started) * 1000)
        print(
            f"(5) HTTP writes, photos from a loopback host: PUT {put_rate:.1f} products/s, batch of 50 "
            f"{batch_rate:.1f} products/s (the CLI's first sync: {first['added'] / first_wall:.1f}/s); "
            f"PATCH p50 {statistics.median(patches):.1f} ms, p99 {percentile(patches, 0.99):.1f} ms "
            f"({len(patches)} at {4000 + 2 * args.writes} products); reads meanwhile: {during.line()}"
        )
    finally:
        server.terminate()
        server.wait(timeout=30)
        images_host.shutdown()
        shutil.rmtree(root, ignore_errors=True)


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class Reads:
    """One client reading similar-by-id, and /healthz, in a loop while the block runs."""

    def __init__(self, url: str) -> None:
        self.url, self.ms, self.health_ms, self.failed = url, [], [], 0  # type: ignore[var-annotated]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while not self._stop.is_set():
                for path, into in (
                    ("/products/fmnist-00000/similar?k=10", self.ms),
                    ("/healthz", self.health_ms),
                ):
                    started = time.perf_counter()
                    try:
                        ok = client.get(path).status_code == 200
                    except httpx.HTTPError:
                        ok = False
                    if ok:
                        into.append((time.perf_counter() - started) * 1000)
                    else:
                        self.failed += 1

    def p99(self) -> float:
        return percentile(self.ms, 0.99)

    def line(self) -> str:
        return (
            f"similar p50 {statistics.median(self.ms):.1f} ms, p99 {self.p99():.1f} ms ({len(self.ms)}), "
            f"/healthz p99 {percentile(self.health_ms, 0.99):.1f} ms, max {max(self.health_ms):.1f} ms; "
            f"failed {self.failed}"
        )

    def __enter__(self) -> Reads:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def scale_run(n: int, input_size: int) -> None:
    """No-change resync and every price changed at `n` products: n distinct local photo files (a sample
    PNG and a counter after its end, which readers ignore), points written directly with the records a
    sync would write (random vectors: nothing here embeds), then `visrec sync` as a user runs it."""
    import numpy as np

    from visrec import payload, plan
    from visrec.catalogue import read_catalogue
    from visrec.config import QdrantSettings
    from visrec.index import IndexPoint, open_index
    from visrec.manifest import read_manifest

    root = Path(tempfile.mkdtemp(prefix="visrec-scale-"))
    try:
        png = (SAMPLE_CATALOGUE.parent / "images" / "fmnist-00000.png").read_bytes()
        (root / "images").mkdir()
        rows = []
        for i in range(n):
            (root / "images" / f"s{i}.png").write_bytes(png + i.to_bytes(8, "big"))
            rows.append({"id": f"s{i}", "image": f"images/s{i}.png", "category": str(i % 10), "price": "10"})
        catalogue = write_catalogue_rows(root / "catalogue.csv", rows)
        artefact = random_artefact(root / "model", input_size)
        version = read_manifest(artefact).model_version
        parsed = read_catalogue(catalogue)
        started = time.perf_counter()
        with open_index(QdrantSettings(path=root / "qdrant")) as index:
            index.create(1000, {"model_version": version, "artefact": str(artefact)})
            rng = np.random.default_rng(0)
            for start in range(0, n, 1000):
                points = []
                for product in parsed.products[start : start + 1000]:
                    refs = parsed.photo_refs(product)
                    files, _ = plan.photo_files(refs, [])
                    record = plan.bookkeeping(product, refs, files, version)
                    body = payload.build(
                        product.id, product.metadata(), refs, bookkeeping=record, extracted={}
                    )
                    points.append(IndexPoint(product.id, rng.standard_normal((1, 1000), np.float32), body))
                index.upsert(points)
        print(f"{n} products written directly in {time.perf_counter() - started:.0f} s (no optimize)")
        env = {k: v for k, v in os.environ.items() if not k.startswith("VISREC_")} | {
            "VISREC_ARTEFACT": str(artefact),
            "VISREC_QDRANT__PATH": str(root / "qdrant"),
            "VISREC_INGEST__FAILURE_REPORT": str(root / "failures.jsonl"),
        }
        same, same_wall, same_io = visrec_sync(env, catalogue)
        print(
            f"(2) no-change resync of {n}: {same_wall:.1f} s wall ({same['seconds']:.1f} s sync), "
            f"{same['unchanged']} unchanged, photo bytes read {same['photo_bytes_read']}, process rchar "
            f"{same_io / 1e6:.1f} MB (the catalogue and the store's files; the photos are "
            f"{n * (len(png) + 8) / 1e6:.1f} MB)"
        )
        write_catalogue_rows(catalogue, [{**row, "price": "11"} for row in rows])
        priced, priced_wall, _ = visrec_sync(env, catalogue)
        print(
            f"(3) every price changed at {n}: {priced['metadata_updated']} payloads rewritten, "
            f"{priced['updated']} embedded, photo bytes read {priced['photo_bytes_read']}, "
            f"{priced_wall:.1f} s wall ({priced['seconds']:.1f} s sync)"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


def write_catalogue_rows(path: Path, rows: list[dict[str, str]]) -> Path:
    columns = list(rows[0])
    lines = [",".join(columns)] + [",".join(_cell(row.get(c, "")) for c in columns) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def _cell(value: str) -> str:
    return '"' + value.replace('"', '""') + '"' if any(c in value for c in ',"\n') else value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, server: subprocess.Popen[bytes], timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit("visrec serve exited")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("visrec serve did not get ready")


if __name__ == "__main__":
    main()
