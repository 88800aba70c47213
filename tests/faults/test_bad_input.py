"""Bad input at scale: one catalogue mixing valid rows with every kind of bad row and bad image.

Decisions, per kind (docs/reliability.md has the table):
- indexed (valid images in an unusual form, converted to RGB): CMYK JPEG, 16-bit PNG (stretched to
  8 bits), animated GIF (first frame), a PNG named .jpg, RGBA and palette transparency (on white),
  EXIF-rotated JPEG, greyscale, an extreme 1x40000 strip, and a 1x1 pixel. The 1x1 is kept: it is a
  valid image and visrec cannot tell a swatch from a mistake; it embeds as a flat colour.
- reported and skipped: missing file, zero bytes, truncated JPEG, damaged PNG data, text with an image
  extension, a directory, a file over ingest.max_image_bytes, a decompression bomb (a PNG header
  declaring 100000x100000), a real image over ingest.max_image_pixels, an unreachable URL, a URL
  answering 404 or serving text; and every bad row (bad JSON, not an object, missing id or image, id
  too long, bad/negative/NaN/infinite price, duplicate id, an image path outside the
  catalogue's folder and the image roots by `..`, absolute path or symlink).
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.faults.helpers import drawn, figure, png_bomb, save
from tests.helpers import COLOURS, SHAPES, closed_port, draw_product, run_sync, stored
from visrec.config import IngestSettings, Settings
from visrec.index import open_index

COPIES = int(os.environ.get("VISREC_FAULTS_BAD_COPIES", "1"))  # the whole mix, repeated
VALID = 30  # ordinary drawn products per copy


def sixteen_bit() -> bytes:
    ramp = np.tile(np.linspace(0, 65535, 48, dtype=np.uint16), (48, 1))
    image = Image.fromarray(ramp)  # uint16 → mode I;16
    assert image.mode == "I;16"
    return save(image, "PNG")


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (40, 40), colour) for colour in ("red", "green", "blue")]
    return save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90° clockwise
    return save(drawn(size=(60, 30)), "JPEG", exif=exif)


def damaged_png() -> bytes:
    data = bytearray(save(Image.effect_noise((64, 64), 50).convert("RGB"), "PNG"))
    start = data.index(b"IDAT") + 20
    data[start : start + 200] = bytes(200)
    return bytes(data)


# product id → image bytes; all should be indexed
ODD_BUT_VALID: dict[str, Callable[[], bytes]] = {
    "cmyk-jpeg": lambda: save(drawn("CMYK"), "JPEG"),
    "16-bit-png": sixteen_bit,
    "animated-gif": animated_gif,
    "png-named-jpg": lambda: save(drawn(), "PNG"),
    "one-pixel": lambda: save(Image.new("RGB", (1, 1), (200, 40, 40)), "PNG"),
    "strip-1x40000": lambda: save(Image.new("RGB", (1, 40_000), "navy"), "PNG"),
    "rgba-cutout": lambda: save(drawn("RGBA"), "PNG"),
    "palette-transparency": lambda: save(drawn("P"), "PNG", transparency=0),
    "exif-rotated": exif_rotated,
    "greyscale": lambda: save(drawn("L"), "PNG"),
}
EXTENSION = {"png-named-jpg": "jpg", "cmyk-jpeg": "jpg", "exif-rotated": "jpg", "animated-gif": "gif"}

# product id → (image bytes, or None for no file; the error the report must give)
BAD_IMAGES: dict[str, tuple[Callable[[], bytes | None], str]] = {
    "missing-file": (lambda: None, "file not found"),
    "zero-bytes": (lambda: b"", "empty file"),
    "truncated-jpeg": (
        lambda: save(Image.effect_noise((64, 64), 60).convert("RGB"), "JPEG")[:500],
        "truncated",
    ),
    "damaged-png": (damaged_png, "corrupt"),
    "text-named-png": (lambda: b"<html>not a photo</html>", "not an image in a supported format"),
    "decompression-bomb": (png_bomb, "decompression bomb refused"),
    "huge-dimensions": (lambda: save(Image.new("1", (3000, 3000)), "PNG"), "above the limit of 4000000"),
    "over-max-bytes": (
        lambda: save(Image.effect_noise((700, 700), 90).convert("RGB"), "PNG"),
        "above the limit",
    ),
}


class QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base's name
        pass


@pytest.fixture
def web(tmp_path: Path) -> Iterator[str]:
    """A loopback HTTP server for the remote images (a real one, serving files)."""
    root = tmp_path / "web"
    root.mkdir()
    (root / "ok.png").write_bytes(save(drawn(), "PNG"))
    (root / "page.jpg").write_text("<html>a web page, not a photo</html>")
    handler = functools.partial(QuietFiles, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def build_catalogue(root: Path, web: str) -> tuple[Path, set[str], dict[str, str], dict[int, str]]:
    """The mixed catalogue. Returns its path, the ids that must be indexed, bad image id → expected
    error, and bad row line → expected error."""
    shop, img = root / "shop", root / "shop" / "img"
    img.mkdir(parents=True)
    secret = root / "secret"
    secret.mkdir()
    (secret / "outside.png").write_bytes(save(drawn(), "PNG"))
    (img / "link.png").symlink_to(secret / "outside.png")
    (img / "a-directory.png").mkdir()
    lines: list[str] = []
    valid: set[str] = set()
    bad_images: dict[str, str] = {}
    bad_rows: dict[int, str] = {}

    def row(data: dict[str, Any] | str, expect_row_error: str | None = None) -> None:
        lines.append(data if isinstance(data, str) else json.dumps(data))
        if expect_row_error:
            bad_rows[len(lines)] = expect_row_error

    for copy in range(COPIES):
        c = f"-{copy}" if copy else ""
        for i in range(VALID):
            shape, colour = SHAPES[i % 3], list(COLOURS)[(i // 3) % 3]
            draw_product(img / f"p{i}{c}.png", shape, colour, variant=i)
            row({"id": f"p{i}{c}", "image": f"img/p{i}{c}.png", "category": shape, "price": 10 + i})
            valid.add(f"p{i}{c}")
        for name, make in ODD_BUT_VALID.items():
            path = img / f"{name}{c}.{EXTENSION.get(name, 'png')}"
            path.write_bytes(make())
            row({"id": name + c, "image": str(path.relative_to(shop)), "category": "odd"})
            valid.add(name + c)
        for name, (make_bad, error) in BAD_IMAGES.items():
            data = make_bad()
            if data is not None:
                (img / f"{name}{c}.png").write_bytes(data)
            row({"id": name + c, "image": f"img/{name}{c}.png", "category": "bad"})
            bad_images[name + c] = error
        row({"id": f"dir{c}", "image": "img/a-directory.png"})
        bad_images[f"dir{c}"] = "not a regular file"
        for name, url, error in (
            ("url-ok", f"{web}/ok.png", ""),
            ("url-unreachable", f"http://127.0.0.1:{closed_port()}/x.jpg", "cannot connect"),
            ("url-404", f"{web}/gone.jpg", "HTTP 404"),
            ("url-not-an-image", f"{web}/page.jpg", "not an image in a supported format"),
        ):
            row({"id": name + c, "image": url})
            if error:
                bad_images[name + c] = error
            else:
                valid.add(name + c)
        row("{not json", "not valid JSON")
        row("[1, 2, 3]", "not a JSON object")
        row({"image": "img/p0.png"}, "no usable id")
        row({"id": f"no-image{c}"}, "no photo: give `image` or `images`")
        row({"id": "x" * 300, "image": "img/p0.png"}, "no usable id")
        row({"id": f"price-text{c}", "image": "img/p0.png", "price": "abc"}, "price")
        row({"id": f"price-negative{c}", "image": "img/p0.png", "price": -3}, "greater than or equal to 0")
        row(f'{{"id": "price-nan{c}", "image": "img/p0.png", "price": NaN}}', "finite")
        row(f'{{"id": "price-inf{c}", "image": "img/p0.png", "price": Infinity}}', "finite")
        row({"id": f"p0{c}", "image": "img/p1.png"}, "duplicate id")
        row({"id": f"dotdot{c}", "image": "../secret/outside.png"}, "outside the catalogue's folder")
        row({"id": f"deep-dotdot{c}", "image": "img/../../../../../../etc/passwd"}, "outside")
        row({"id": f"absolute{c}", "image": "/etc/passwd"}, "outside the catalogue's folder")
        row({"id": f"symlink-out{c}", "image": "img/link.png"}, "outside the catalogue's folder")
    catalogue = shop / "catalogue.jsonl"
    catalogue.write_text("\n".join(lines) + "\n")
    return catalogue, valid, bad_images, bad_rows


def test_a_mixed_catalogue_indexes_every_valid_row_and_reports_every_bad_one(
    store: Settings, tmp_path: Path, web: str
) -> None:
    """Fault: a catalogue mixing valid rows with every kind of bad row and bad image (module docstring),
    VISREC_FAULTS_BAD_COPIES times over. visrec: a bad row is skipped with its line number; a bad image
    is skipped with the reason; odd but valid images are converted and indexed; the run goes on and
    writes the failure report. Checked: exactly the valid products are indexed, each with a finite
    vector and its payload; the summary's counts; every bad image and bad row is in the report with its
    expected reason; a rerun changes nothing."""
    settings = store.model_copy(
        update={
            "ingest": IngestSettings(
                failure_report=tmp_path / "failures.jsonl",
                max_image_pixels=4_000_000,
                max_image_bytes=1_000_000,
                fetch_timeout_s=2,
                fetch_retries=1,
                allowed_hosts=["127.0.0.1"],  # the test's web server is on loopback
            )
        }
    )
    catalogue, valid, bad_images, bad_rows = build_catalogue(tmp_path, web)
    summary = run_sync(catalogue, settings)
    assert (summary.added, summary.failed, summary.invalid_rows) == (
        len(valid),
        len(bad_images),
        len(bad_rows),
    )

    report = [json.loads(line) for line in settings.ingest.failure_report.read_text().splitlines()]
    image_errors = {r["product_id"]: r["error"] for r in report if r["kind"] == "image"}
    row_errors = {r["line"]: r["error"] for r in report if r["kind"] == "row"}
    assert set(image_errors) == set(bad_images) and set(row_errors) == set(bad_rows)
    for product_id, expected in bad_images.items():
        assert expected in image_errors[product_id], (product_id, image_errors[product_id])
    for line, expected in bad_rows.items():
        assert expected in row_errors[line], (line, row_errors[line])

    with open_index(settings.qdrant) as index:
        records = index.sync_records()
        assert set(records) == valid and index.count() == len(valid)
        for product_id in valid:
            vector, payload = stored(index, product_id)
            assert np.isfinite(vector).all() and payload["product_id"] == product_id
            assert not str(payload["image"]).startswith(str(tmp_path / "secret"))
    again = run_sync(catalogue, settings)
    assert (again.added, again.updated, again.deleted, again.unchanged) == (0, 0, 0, len(valid))

    def short(error: str) -> str:
        return error.replace(str(catalogue.parent) + "/", "").replace(web, "http://loopback")

    figure(
        "bad inputs",
        {
            "rows": len(valid) + len(bad_images) + len(bad_rows),
            "indexed": len(valid),
            "bad_images_reported": len(bad_images),
            "bad_rows_reported": len(bad_rows),
            "outcomes": {
                **{k: "indexed" for k in sorted(ODD_BUT_VALID) + ["url-ok"]},
                **{k: short(image_errors[k]) for k in sorted(bad_images) if not k[-2:].startswith("-")},
                **{f"line {n}": short(row_errors[n]) for n in sorted(bad_rows)[: len(bad_rows) // COPIES]},
            },
        },
    )
