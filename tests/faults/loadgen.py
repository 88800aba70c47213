"""Load for the saturation test, in a process of its own so that its clients do not compete with the
test's /healthz probe for one interpreter lock: CLIENTS concurrent photo searches against a loopback
server for SECONDS (each client at most MAX_REQUESTS), then one JSON line on stdout.

    python -m tests.faults.loadgen URL PHOTO CLIENTS SECONDS [API_KEY]

Each client is a keep-alive connection sending one prepared request after another as soon as the last
is answered (raw HTTP/1.1 over asyncio streams: an HTTP library's own cost per request would make this
process, not the server, the bottleneck on a small machine). Only loopback URLs are accepted.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

MAX_REQUESTS = 5000  # per client: a bound even if the server answers instantly
BOUNDARY = "loadgenboundary"


def prepared_request(host: str, port: int, photo: bytes, key: str | None) -> bytes:
    body = (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="q.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + photo
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    head = [
        "POST /search/image?k=5 HTTP/1.1",
        f"Host: {host}:{port}",
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}",
        f"Content-Length: {len(body)}",
        *([f"X-API-Key: {key}"] if key else []),
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


async def client(host: str, port: int, request: bytes, deadline: float, tally: dict[str, Any]) -> None:
    writer: asyncio.StreamWriter | None = None
    try:
        for _ in range(MAX_REQUESTS):
            if time.monotonic() >= deadline:
                return
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            started = time.monotonic()
            try:
                writer.write(request)
                status, headers, body = await asyncio.wait_for(read_answer(reader), 30)
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                tally["errors"][type(exc).__name__] += 1
                writer.close()
                writer = None
                await asyncio.sleep(0.05)
                continue
            took = time.monotonic() - started
            tally["statuses"][status] += 1
            if status == 200:
                tally["served_s"].append(took)
            elif status == 503:
                tally["shed_s"].append(took)
                tally["shed_busy"] += "busy" in json.loads(body).get("detail", "")
                tally["shed_retry_after"] += bool(headers.get("retry-after"))
                await asyncio.sleep(0.005)  # a polite client would wait Retry-After; a hostile one does not
            else:
                tally["other"].append((status, body[:200].decode("utf-8", "replace")))
            if headers.get("connection", "").lower() == "close":
                writer.close()
                writer = None
    finally:
        if writer is not None:
            writer.close()


async def main(url: str, photo: Path, clients: int, seconds: float, key: str | None) -> dict[str, Any]:
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 80
    assert host == "127.0.0.1", "loopback only"
    tally: dict[str, Any] = {
        "statuses": Counter(),
        "errors": Counter(),
        "served_s": [],
        "shed_s": [],
        "shed_busy": 0,
        "shed_retry_after": 0,
        "other": [],
    }
    request = prepared_request(host, port, photo.read_bytes(), key)
    deadline = time.monotonic() + seconds
    await asyncio.gather(*(client(host, port, request, deadline, tally) for _ in range(clients)))
    served, shed = sorted(tally.pop("served_s")), sorted(tally.pop("shed_s"))
    return {
        **tally,
        "statuses": {str(k): v for k, v in sorted(tally["statuses"].items())},
        # Little's law: the mean number of searches being served at once, as this side saw them.
        "served_concurrency": round(sum(served) / seconds, 2),
        "served_p50_s": round(served[len(served) // 2], 4) if served else None,
        "served_p99_s": round(served[int(len(served) * 0.99)], 4) if served else None,
        "shed_p99_s": round(shed[int(len(shed) * 0.99)], 4) if shed else None,
    }


if __name__ == "__main__":
    args = sys.argv[1:]
    result = asyncio.run(
        main(args[0], Path(args[1]), int(args[2]), float(args[3]), args[4] if len(args) > 4 else None)
    )
    print(json.dumps(result), flush=True)
