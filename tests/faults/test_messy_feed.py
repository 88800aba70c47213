"""A shop's feed at its worst (issue #12), generated: Hypothesis builds catalogues that mix valid rows
with every kind of damage (unreadable rows, rows without an id, values the index cannot hold, rows too
long, junk lines, refused and malformed image URLs, image files that are damaged, odd or not files at
all) in CSV or JSONL, UTF-8 (with or without a BOM) or UTF-16, LF or CRLF, on top of an indexed
catalogue whose products are kept, damaged or dropped. Each example runs the real `visrec sync` (the
CLI, in this process) against a real embedded store, twice: the clean catalogue, then the messy one.

Checked every time: the run ends with exit 0 and a summary, never a traceback; every valid row is
indexed; every damaged row with an id is in the failure report with its reason and, if it was
indexed, is still there; a dropped product is deleted only when every row could be read (else the
deletes are held back and counted); the loopback server that the refused URLs name gets no request.

Examples: VISREC_FAULTS_FEED_EXAMPLES (CI: 12); seed: VISREC_FAULTS_SEED.
"""

from __future__ import annotations

import csv
import http.server
import io
import json
import os
import shutil
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from tests.faults.helpers import SEED, drawn, figure, png_bomb, save
from visrec.artefact import Manifest
from visrec.cli import app
from visrec.config import QdrantSettings
from visrec.index import open_index

EXAMPLES = int(os.environ.get("VISREC_FAULTS_FEED_EXAMPLES", "12"))
ROW_LIMIT = 4096  # VISREC_INGEST__MAX_ROW_CHARS for these runs: a long row is cheap to make

# Valid images in unusual forms: each is indexed.
VALID_IMAGES = (
    "rgb.png",
    "cmyk.jpg",
    "i16b.tif",
    "float.tif",
    "palette.gif",
    "rgba.webp",
    "bits.bmp",
    "la.png",
    "strip.png",
    "exif.jpg",
)
# Damaged, odd, or not images: each is a reported failure with this reason.
BAD_IMAGES = {
    "truncated.png": "corrupt or truncated",
    "empty.png": "empty",
    "text.jpg": "supported format",
    "drawing.eps": "supported format",
    "icon.ico": "supported format",
    "bomb.png": "pixels",
    "fifo.png": "not a regular file",
    "folder.png": "not a regular file",
    "missing.png": "not found",
}


class CountingHandler(http.server.BaseHTTPRequestHandler):
    """Serves an image to anyone; counts who asked. A catalogue must never get visrec to ask."""

    requests = 0

    def do_GET(self) -> None:  # noqa: N802 - the base class's name
        type(self).requests += 1
        body = save(drawn(), "PNG")
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base's name
        pass


@dataclass(frozen=True)
class Shop:
    folder: Path  # the images, and each example's catalogue
    port: int  # the loopback server that refused URLs point at


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shop]:
    folder = tmp_path_factory.mktemp("messy-feed")
    images = {
        "rgb.png": save(drawn(), "PNG"),
        "cmyk.jpg": save(drawn("CMYK"), "JPEG"),
        "i16b.tif": save(drawn("L").convert("I;16B"), "TIFF"),
        "float.tif": save(drawn("L").convert("F"), "TIFF"),
        "palette.gif": save(drawn("P"), "GIF", transparency=0),
        "rgba.webp": save(drawn("RGBA"), "WEBP"),
        "bits.bmp": save(drawn("1"), "BMP"),
        "la.png": save(drawn("LA"), "PNG"),
        "strip.png": save(drawn(size=(40, 40)).resize((3, 300)), "PNG"),
        "truncated.png": save(drawn(), "PNG")[:60],
        "empty.png": b"",
        "text.jpg": b"<html>not an image</html>",
        "drawing.eps": save(drawn(), "EPS"),
        "icon.ico": save(drawn(), "ICO"),
        "bomb.png": png_bomb(20_000, 20_000),
    }
    exif = drawn().getexif()
    exif[0x0112] = 6  # rotated 90 degrees
    images["exif.jpg"] = save(drawn(), "JPEG", exif=exif)
    for name, data in images.items():
        (folder / name).write_bytes(data)
    os.mkfifo(folder / "fifo.png")
    (folder / "folder.png").mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CountingHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield Shop(folder, server.server_address[1])
    server.shutdown()
    assert CountingHandler.requests == 0, "a catalogue made visrec request a loopback address"


@dataclass(frozen=True)
class Row:
    """One catalogue line and what must become of it."""

    kind: str  # valid | damaged (has an id, reported) | unidentified (no id can be read) | junk
    product_id: str | None
    fields: Mapping[str, object] | None  # written by the format's own writer
    raw: str | None = None  # a JSONL line written as is
    reason: str = ""  # in the failure report's message
    photos: int = 1  # valid: the photos it is indexed with
    dropped: tuple[str, ...] = ()  # valid: the reasons of the photos it is indexed without


def bad_urls(port: int) -> list[tuple[str, str]]:
    return [
        (f"http://127.0.0.1:{port}/a.png", "refused"),  # loopback, as a literal address
        (f"http://localhost:{port}/a.png", "refused"),  # a port other than 80 and 443
        ("http://localhost/a.png", "non-public"),  # loopback by name: refused when resolved
        (f"http://[::ffff:127.0.0.1]:{port}/a.png", "refused"),
        ("http://169.254.169.254/latest/meta-data/", "refused"),  # cloud metadata
        ("http://[::1", "refused"),  # unclosed bracket
        ("http://" + "a" * 70 + ".example/a.png", "refused"),  # a host label over 63 characters
        ("http://exa\tmple.com/a.png", "refused"),  # a control character
        ("ftp://example.com/a.png", "refused"),
        ("file:///etc/passwd", "refused"),
    ]


@st.composite
def rows(draw: st.DrawFn, port: int, base: list[str], jsonl: bool) -> list[Row]:
    """The messy catalogue: each base product kept, damaged or dropped; new rows of every kind."""
    out: list[Row] = []

    def product(product_id: str) -> Row:
        kinds = ["valid", "image", "url", "value", "photos"] + (["json"] if jsonl else [])
        choice = draw(st.sampled_from(kinds))
        title = draw(st.text(max_size=12))
        if choice == "photos":  # several photos, some good, some not (every one may be bad)
            good = draw(st.lists(st.sampled_from(VALID_IMAGES), max_size=3, unique=True))
            bad = draw(
                st.lists(st.sampled_from(sorted(BAD_IMAGES.items()) + bad_urls(port)), min_size=1, max_size=3)
                .map(dict)  # each bad photo once
                .map(sorted)
            )
            photos = draw(st.permutations([*good, *bad]))
            reasons = tuple(BAD_IMAGES.get(p) or dict(bad_urls(port))[p] for p in bad)
            fields = {"id": product_id, "images": photos}
            if good:
                return Row("valid", product_id, fields, photos=len(good), dropped=reasons)
            return Row("damaged", product_id, fields, reason=reasons[0])
        if choice == "valid":
            image = draw(st.sampled_from(VALID_IMAGES))
            return Row("valid", product_id, {"id": product_id, "image": image, "title": title})
        if choice == "image":
            image, reason = draw(st.sampled_from(sorted(BAD_IMAGES.items())))
            return Row("damaged", product_id, {"id": product_id, "image": image}, reason=reason)
        if choice == "url":
            url, reason = draw(st.sampled_from(bad_urls(port)))
            return Row("damaged", product_id, {"id": product_id, "image": url}, reason=reason)
        if choice == "value":
            price, reason = draw(st.sampled_from([("abc", "price"), ("-3", "price"), ("nan", "price")]))
            fields = {"id": product_id, "image": "rgb.png", "price": price}
            return Row("damaged", product_id, fields, reason=reason)
        snippet, reason = draw(
            st.sampled_from(
                [
                    ('"x": 1e999', "not finite"),
                    ('"x": "\\udc80"', "not valid Unicode"),
                    ('"x": ' + "[" * 20 + "]" * 20, "nested deeper"),
                    ('"x": 99999999999999999999', "64 bits"),
                ]
            )
        )
        raw = f'{{"id": {json.dumps(product_id)}, "image": "rgb.png", {snippet}}}'
        return Row("damaged", product_id, None, raw=raw, reason=reason)

    for product_id in base:
        if not draw(st.booleans()) or draw(st.booleans()):  # kept (valid or damaged) three times in four
            out.append(product(product_id))
    new = draw(st.integers(1, 4))
    out += [product(f"new-{i}") for i in range(new)]
    out.append(Row("valid", "new-valid", {"id": "new-valid", "image": draw(st.sampled_from(VALID_IMAGES))}))
    for _ in range(draw(st.integers(0, 2))):
        kind = draw(st.sampled_from(["no id", "too long", "junk", "unparseable"]))
        if kind == "no id":
            out.append(Row("unidentified", None, {"id": "", "image": "rgb.png"}, reason="no usable id"))
        elif kind == "too long":
            fields = {"id": "long", "image": "rgb.png", "title": "x" * (ROW_LIMIT + 10)}
            out.append(Row("unidentified", None, fields, reason="longer than"))
        elif kind == "unparseable":
            raw = '{"id": "broken", "image": ' if jsonl else '"broken,rgb.png,"x"y'
            out.append(Row("unidentified", None, None, raw=raw))
        else:  # junk: anything at all (no NUL, which in the first line reads as UTF-16 without a BOM)
            text = st.text(st.characters(blacklist_characters="\0"), max_size=40)
            if jsonl:
                raw = draw(text)
            else:  # cells of junk, quoted as a CSV writer does
                line = io.StringIO()
                csv.writer(line, lineterminator="").writerow(draw(st.lists(text, min_size=1, max_size=5)))
                raw = line.getvalue()
            out.append(Row("junk", None, None, raw=raw))
    return draw(st.permutations(out))


def write_catalogue(path: Path, catalogue: list[Row], jsonl: bool, encoding: str, newline: str) -> None:
    buffer = io.StringIO()
    if jsonl:
        for row in catalogue:
            buffer.write((row.raw if row.raw is not None else json.dumps(row.fields)) + newline)
    else:
        columns = ["id", "image", "images", "title", "price"]
        # Every cell quoted: a lone CR in a cell is a line break to CSV readers (ours too) unless quoted,
        # and the writer quotes only the characters of its own line terminator.
        writer = csv.writer(buffer, lineterminator=newline, quoting=csv.QUOTE_ALL)
        writer.writerow(columns)
        for row in catalogue:
            if row.raw is not None:
                buffer.write(row.raw + newline)
            else:
                fields = {**(row.fields or {})}
                if isinstance(images := fields.get("images"), list):  # a CSV cell: photos separated by |
                    fields["images"] = "|".join(images)
                writer.writerow([fields.get(c, "") for c in columns])
    path.write_bytes(buffer.getvalue().encode(encoding))


def run(catalogue: Path, store: Path, artefact: Path) -> tuple[int, str, str, list[dict[str, object]]]:
    """`visrec sync --json CATALOGUE` in this process; (exit code, stdout, stderr, failure report)."""
    report = store / "failures.jsonl"
    env = {
        "VISREC_ARTEFACT": str(artefact),
        "VISREC_QDRANT__PATH": str(store / "qdrant"),
        "VISREC_EMBED__DEVICE": "cpu",
        "VISREC_EMBED__WORKERS": "0",
        "VISREC_EMBED__BATCH_SIZE": "8",
        "VISREC_INGEST__FAILURE_REPORT": str(report),
        "VISREC_INGEST__MAX_ROW_CHARS": str(ROW_LIMIT),
        "VISREC_INGEST__MAX_DELETE": "1",
        "VISREC_INGEST__FETCH_TIMEOUT_S": "2",
        "VISREC_INGEST__FETCH_RETRIES": "1",
    }
    result = CliRunner().invoke(app, ["sync", "--json", str(catalogue)], env=env)
    failures = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
    return result.exit_code, result.stdout, result.stderr, failures


OUTCOMES: Counter[str] = Counter()


@pytest.mark.slow
def test_a_messy_feed_never_stalls_the_sync_or_deletes_a_listed_product(
    shop: Shop, artefact: tuple[Path, Manifest]
) -> None:
    @seed(SEED)
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def example(data: st.DataObject) -> None:
        jsonl = data.draw(st.booleans(), "jsonl")
        base = [f"base-{i}" for i in range(data.draw(st.integers(2, 5), "base"))]
        messy = data.draw(rows(shop.port, base, jsonl), "rows")
        encoding = data.draw(st.sampled_from(["utf-8", "utf-8-sig", "utf-16"]), "encoding")
        newline = data.draw(st.sampled_from(["\n", "\r\n"]), "newline")
        suffix = ".jsonl" if jsonl else ".csv"
        store = Path(tempfile.mkdtemp(dir=shop.folder, prefix="store-"))
        try:
            clean = [Row("valid", b, {"id": b, "image": VALID_IMAGES[i % 3]}) for i, b in enumerate(base)]
            write_catalogue(shop.folder / f"clean{suffix}", clean, jsonl, "utf-8", "\n")
            code, _, errors, _ = run(shop.folder / f"clean{suffix}", store, artefact[0])
            assert code == 0, errors
            write_catalogue(shop.folder / f"messy{suffix}", messy, jsonl, encoding, newline)
            code, output, errors, failures = run(shop.folder / f"messy{suffix}", store, artefact[0])
            assert code == 0 and "Traceback" not in errors and "unexpected" not in errors, errors
            check(messy, base, json.loads(output), failures, store)
        finally:
            shutil.rmtree(store)

    example()
    figure("messy feed: rows by kind and outcome", dict(sorted(OUTCOMES.items())))


def check(
    messy: list[Row], base: list[str], summary: dict[str, int], failures: list[dict[str, object]], store: Path
) -> None:
    reported: dict[str, list[dict[str, object]]] = {}
    for f in failures:
        if f["product_id"] is not None:
            reported.setdefault(str(f["product_id"]), []).append(f)
    listed = {row.product_id for row in messy if row.product_id}
    with open_index(QdrantSettings(path=store / "qdrant")) as index:
        for row in messy:
            OUTCOMES[row.kind] += 1
            got = reported.get(str(row.product_id), [])
            if row.kind == "valid":
                found = index.get(str(row.product_id))
                assert found is not None and found[1]["product_id"] == row.product_id, row
                assert len(found[0]) == row.photos, (row, found[1])
                assert sorted(str(f["kind"]) for f in got) == ["photo"] * len(row.dropped), (row, got)
                for reason in row.dropped:  # each dropped photo reported, the product indexed anyway
                    assert any(reason in str(f["error"]) for f in got), (row, got)
                OUTCOMES["valid, photos dropped"] += bool(row.dropped)
            elif row.kind == "damaged":
                assert any(row.reason in str(f["error"]) for f in got), (row, got)
                if row.product_id in base:
                    assert index.get(str(row.product_id)) is not None, f"{row.product_id} was deleted"
        unidentified = [f for f in failures if f["product_id"] is None]
        assert all(f["line"] for f in unidentified)
        for row in messy:
            if row.kind == "unidentified":
                assert unidentified and any(row.reason in str(f["error"]) for f in unidentified), row
        dropped = [b for b in base if b not in listed]
        if unidentified:
            assert summary["deletes_held_back"] == len(dropped) and summary["deleted"] == 0
            assert all(index.get(b) is not None for b in dropped)
            OUTCOMES["deletes held back"] += len(dropped)
        else:
            assert summary["deleted"] == len(dropped)
            assert all(index.get(b) is None for b in dropped)
            OUTCOMES["deleted"] += len(dropped)
