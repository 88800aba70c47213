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
import random
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


def test_the_raw_body_is_bounded_too(fetcher: Callable[..., Fetcher]) -> None:
    """The bytes as sent count against the limit, not only what they decode to: gzip makes random bytes
    a little larger, so a body just under the limit once decoded is over it as sent (chunked: no length
    to refuse it by)."""
    body = gzip.compress(random.randbytes(LIMIT - 100))
    assert len(body) > LIMIT
    f = fetcher(allowed_hosts=LOOPBACK)
    with serve(_respond(body, "gzip", chunked=True)) as server:
        assert fails(f, server.url(), LIMIT).endswith(f": larger than {LIMIT} bytes")


def test_a_body_in_many_reads_comes_back_whole(fetcher: Callable[..., Fetcher]) -> None:
    """A photo larger than one network read, as it is and gzipped: the same bytes, joined as they came."""
    photo = random.randbytes(300_000)
    f = fetcher(allowed_hosts=LOOPBACK)
    for body, encoding in (
        (photo, "identity"),
        (gzip.compress(photo), "gzip"),
        (gzip.compress(photo), "x-gzip"),
    ):
        with serve(_respond(body, encoding, chunked=True)) as server:
            assert f.fetch(server.url(), LIMIT) == photo, encoding


@pytest.mark.parametrize("encoding", ["identity", "IDENTITY", " gzip , identity", "gzip, Identity"])
def test_identity_is_no_encoding(fetcher: Callable[..., Fetcher], encoding: str) -> None:
    photo = b"a photo"
    body = gzip.compress(photo) if "gzip" in encoding else photo
    f = fetcher(allowed_hosts=LOOPBACK)
    with serve(_respond(body, encoding, chunked=False)) as server:
        assert f.fetch(server.url(), LIMIT) == photo


def test_an_empty_compressed_body_is_empty(fetcher: Callable[..., Fetcher]) -> None:
    f = fetcher(allowed_hosts=LOOPBACK)
    for encoding in ("gzip", "deflate"):
        with serve(_respond(b"", encoding, chunked=False)) as server:
            assert f.fetch(server.url(), LIMIT) == b"", encoding


@pytest.mark.parametrize(
    ("encoding", "wbits"),
    [("gzip", zlib.MAX_WBITS), ("gzip", -zlib.MAX_WBITS), ("deflate", 16 + zlib.MAX_WBITS)],
)
def test_a_body_in_another_format_than_declared_is_refused(
    fetcher: Callable[..., Fetcher], encoding: str, wbits: int
) -> None:
    """gzip means gzip's header: a zlib or raw deflate body declared gzip cannot be decoded, and a gzip
    body declared deflate neither (deflate takes zlib's header, or none)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, wbits)
    body = packer.compress(b"a photo" * 100) + packer.flush()
    f = fetcher(allowed_hosts=LOOPBACK)
    with serve(_respond(body, encoding, chunked=False)) as server:
        assert f"the response body cannot be decoded ({encoding}: " in fails(f, server.url(), LIMIT)


def test_the_decoder_asks_each_step_for_no_more_than_the_limit_allows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every decompression step is asked for at most what is left of the limit plus one byte: a bomb is
    never inflated past it. The decoded sizes add up over the body's pieces, whatever their number."""
    from visrec import fetch

    asked: list[int] = []
    step = fetch._Layer._step

    def spy(layer: fetch._Layer, data: bytes, most: int, final: bool) -> bytes:
        asked.append(most)
        return step(layer, data, most, final)

    monkeypatch.setattr(fetch._Layer, "_step", spy)
    piece = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    decoding = fetch._Decoding("gzip", 1000)
    decoding.feed(piece.compress(bytes(300)) + piece.flush(zlib.Z_SYNC_FLUSH))
    assert asked == [1001] and decoding.size == 300
    decoding.feed(piece.compress(bytes(300)) + piece.flush(zlib.Z_SYNC_FLUSH))
    assert asked == [1001, 701] and decoding.size == 600
    decoding.feed(piece.compress(bytes(300)) + piece.flush(zlib.Z_SYNC_FLUSH))
    assert decoding.size == 900
    with pytest.raises(fetch._Answered, match=r"^larger than 1000 bytes once decoded \(gzip\)$"):
        decoding.feed(piece.compress(bytes(300)) + piece.flush(zlib.Z_SYNC_FLUSH))
    assert asked[-1] == 101


def test_the_decoder_without_an_encoding_still_counts() -> None:
    from visrec import fetch

    decoding = fetch._Decoding("", 10)
    decoding.feed(b"x" * 6)
    with pytest.raises(fetch._Answered, match=r"^larger than 10 bytes$"):
        decoding.feed(b"x" * 5)


def test_an_unknown_encoding_is_named_briefly() -> None:
    from visrec import fetch
    from visrec.urls import clip

    name = "x" * 100
    with pytest.raises(fetch._Answered) as refused:
        fetch._Decoding(f"gzip, {name}", 10)
    assert str(refused.value) == f"unsupported Content-Encoding {clip(name, 40)!r} (identity was asked for)"


def test_deflate_without_its_header_is_told_at_the_start_only() -> None:
    """A deflate body lacking zlib's header is found out at its first bytes; a zlib stream that breaks
    later is broken, not taken for a new raw stream (which the broken part may well look like)."""
    from visrec import fetch

    rng = random.Random(1)
    text = bytes(rng.choice(b"abcdefgh ") for _ in range(5000))
    raw = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    other = raw.compress(b"B" * 100) + raw.flush()
    layer = fetch._Layer("deflate")
    assert layer.run(zlib.compress(text, 9)[:40], 10**6, False) is not None
    decoding_error = r"\(deflate: Error -3 while decompressing data: invalid distance too far back\)$"
    with pytest.raises(fetch._Answered, match=r"^the response body cannot be decoded " + decoding_error):
        layer.run(other, 10**6, False)
    assert fetch._Layer("deflate").run(other, 10**6, True) == b"B" * 100  # at the start: raw deflate
