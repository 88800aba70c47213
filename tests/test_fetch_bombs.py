"""Compression bombs against visrec.fetch (issue #25), served by real loopback servers: a body of a few
KB whose Content-Encoding (gzip, deflate with and without its zlib header, gzip twice; declared length or
chunked) decodes to 64 MB, against a 1 MB limit. The fetcher asks for identity; a server may compress
anyway. Checked: refused, and the fetch's peak Python allocation (tracemalloc, which sees every bytes
object the decoders make) stays under 4 MB — the old one inflated a whole network read at a time.
Encodings visrec has no bounded decoder for (br, zstd) are refused; a legitimately gzipped photo and one
whose decoded size is exactly the limit are fetched whole.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import tracemalloc
import zlib
from collections.abc import Callable

import pytest
from PIL import Image

from tests.fetch_servers import LOOPBACK, Handler, fails, serve
from visrec.fetch import Fetcher

LIMIT = 1_000_000
BOMB = 64 * 1024 * 1024  # decoded size
PEAK_BUDGET = 4 * 1024 * 1024


def _compress(wbits: int, size: int = BOMB, times: int = 1) -> bytes:
    """`size` zero bytes compressed in a stream (never held whole), `times` times over."""
    out = io.BytesIO()
    packer = zlib.compressobj(9, zlib.DEFLATED, wbits)
    block = bytes(1024 * 1024)
    for _ in range(size // len(block)):
        out.write(packer.compress(block))
    out.write(packer.flush())
    data = out.getvalue()
    for _ in range(times - 1):
        data = gzip.compress(data, 9)
    return data


BOMBS = {
    "gzip": ("gzip", lambda: _compress(16 + zlib.MAX_WBITS)),
    "deflate": ("deflate", lambda: _compress(zlib.MAX_WBITS)),
    "raw deflate": ("deflate", lambda: _compress(-zlib.MAX_WBITS)),
    "gzip twice": ("gzip, gzip", lambda: _compress(16 + zlib.MAX_WBITS, times=2)),
}


def _respond(body: bytes, encoding: str, chunked: bool) -> Callable[[Handler], None]:
    def respond(h: Handler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "image/png")
        h.send_header("Content-Encoding", encoding)
        if chunked:
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            for i in range(0, len(body), 8192):
                piece = body[i : i + 8192]
                h.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            h.wfile.write(b"0\r\n\r\n")
        else:
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)

    return respond


def _peak(action: Callable[[], object]) -> int:
    """The peak of Python allocations while `action` runs, in bytes above what was held before."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        with contextlib.suppress(Exception):
            action()
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("chunked", [False, True], ids=["length", "chunked"])
@pytest.mark.parametrize("name", list(BOMBS))
def test_a_compression_bomb_is_refused_before_it_inflates(
    fetcher: Callable[..., Fetcher], name: str, chunked: bool
) -> None:
    encoding, make = BOMBS[name]
    body = make()
    assert len(body) < 300_000
    f = fetcher(allowed_hosts=LOOPBACK)
    with serve(_respond(body, encoding, chunked)) as server:
        message = fails(f, server.url(), LIMIT)
        peak = _peak(lambda: f.fetch(server.url(), LIMIT))
    print(f"\nFIGURE bomb: {name} chunked={chunked} wire={len(body)} decoded={BOMB} peak={peak}")
    assert "larger than 1000000 bytes" in message, message
    assert peak < PEAK_BUDGET, peak


@pytest.mark.parametrize("encoding", ["br", "zstd", "compress", "gzip, br"])
def test_an_encoding_without_a_bounded_decoder_is_refused(
    fetcher: Callable[..., Fetcher], encoding: str
) -> None:
    f = fetcher(allowed_hosts=LOOPBACK)
    with serve(_respond(b"\x00" * 100, encoding, False)) as server:
        message = fails(f, server.url(), LIMIT)
    assert "unsupported Content-Encoding" in message, message


def test_a_gzipped_photo_and_one_exactly_at_the_limit_are_fetched(fetcher: Callable[..., Fetcher]) -> None:
    photo = io.BytesIO()
    Image.effect_noise((64, 64), 40).save(photo, "PNG")
    f = fetcher(allowed_hosts=LOOPBACK)
    with serve(_respond(gzip.compress(photo.getvalue()), "gzip", True)) as server:
        assert f.fetch(server.url(), LIMIT) == photo.getvalue()
    exact = bytes(range(256)) * (LIMIT // 256) + bytes(LIMIT % 256)
    assert len(exact) == LIMIT
    with serve(_respond(zlib.compress(exact), "deflate", False)) as server:
        assert f.fetch(server.url(), LIMIT) == exact
        assert "larger than" in fails(f, server.url(), LIMIT - 1)
    with serve(_respond(b"not gzip at all", "gzip", False)) as server:
        assert "cannot be decoded" in fails(f, server.url(), LIMIT)
