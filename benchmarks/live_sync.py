"""A live catalogue on the embedded store: what a sync costs when little changed, and what reads see
while a sync runs through the service (issue #22's targets). Everything through the real `visrec`
command and a real `visrec serve` on loopback.

    .venv/bin/python benchmarks/live_sync.py                      # the 2,000-product sample, random ResNet50
    .venv/bin/python benchmarks/live_sync.py --artefact .visrec/demo/model

Prints, in one run: (1) the first sync (every photo embedded); (2) a no-change resync: wall time, the
photo bytes it read (the quick check) and the process's read syscalls (/proc/PID/io rchar), beside a
`--checksum` resync that hashes every photo; (3) every price changed: wall time and photos embedded,
against the first sync; (4) similar-by-id reads (one client) while idle and while the service embeds
2,000 new products handed over by `visrec sync`: p50/p99 and failed reads.
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
from pathlib import Path
from typing import Any

import httpx
from embed_throughput import random_artefact

from common import SAMPLE_CATALOGUE, catalogue_rows, new_parser

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


def read_loop(url: str, stop: threading.Event, out: list[float], failed: list[int]) -> None:
    with httpx.Client(base_url=url, timeout=30) as client:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                ok = client.get("/products/fmnist-00000/similar", params={"k": 10}).status_code == 200
            except httpx.HTTPError:
                ok = False
            (out.append((time.perf_counter() - started) * 1000) if ok else failed.append(1))


def main() -> None:
    p = new_parser(__doc__)
    p.add_argument("--artefact", type=Path, help="model to embed with (default: random ResNet50 weights)")
    p.add_argument("--input-size", type=int, default=64)
    p.add_argument("--idle-s", type=float, default=10.0, help="reads timed before the handed-over sync")
    args = p.parse_args()

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
    served_env = env | {"VISREC_API__PORT": str(port)}
    log = (root / "serve.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "visrec", "serve"], env=served_env, stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, server)
        idle: list[float] = []
        failed: list[int] = []
        stop = threading.Event()
        reader = threading.Thread(target=read_loop, args=(url, stop, idle, failed))
        reader.start()
        time.sleep(args.idle_s)
        stop.set()
        reader.join()
        more = rows + [{**row, "id": row["id"] + "-b"} for row in rows]
        write_catalogue_rows(catalogue, more)
        busy: list[float] = []
        stop = threading.Event()
        reader = threading.Thread(target=read_loop, args=(url, stop, busy, failed))
        reader.start()
        handed, handed_wall, _ = visrec_sync(env, catalogue)
        stop.set()
        reader.join()
        print(
            f"(4) reads, one client: idle p50 {statistics.median(idle):.1f} ms, p99 "
            f"{percentile(idle, 0.99):.1f} ms ({len(idle)} reads); during a handed-over sync of "
            f"{handed['added']} new products ({handed_wall:.1f} s): p50 {statistics.median(busy):.1f} ms, "
            f"p99 {percentile(busy, 0.99):.1f} ms ({len(busy)} reads), p99 ratio "
            f"{percentile(busy, 0.99) / percentile(idle, 0.99):.1f}x; failed reads {len(failed)}"
        )
    finally:
        server.terminate()
        server.wait(timeout=30)
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


def wait_ready(url: str, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 180
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
