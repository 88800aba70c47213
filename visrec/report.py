"""A visual report like the paper's Fig. 2: each row a query image, then its neighbours by distance.
A product with several photos shows the matched one large and all of them small, the matched one framed.

One self-contained HTML file (thumbnails inlined), so it can be mailed or opened anywhere.
"""

from __future__ import annotations

import base64
import html
import io
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from PIL import Image

from visrec.duplicates import DuplicateGroup, DuplicateScan
from visrec.errors import ImageError, OutputUnwritable
from visrec.fs import folder_problem, write_atomically
from visrec.images import ImageLimits, load_image
from visrec.index import Filters, Hit, VectorIndex
from visrec.payload import photos
from visrec.query import similar_to_product

THUMB = 112


@dataclass
class ReportRow:
    query_id: str
    query: dict[str, Any]
    filters: Filters
    hits: list[Hit]

    @property
    def same_category(self) -> int:
        """How many neighbours share the query's category."""
        return sum(h.payload.get("category") == self.query.get("category") for h in self.hits)


def pick_queries(index: VectorIndex, n: int, seed: int = 0) -> list[str]:
    """`n` indexed product ids, spread over the categories, the same for the same index and seed."""
    by_category: dict[str, list[str]] = {}
    after: str | None = None
    while True:
        page, after = index.browse(Filters(), 1000, after)
        for product_id, payload in page:
            by_category.setdefault(str(payload.get("category")), []).append(product_id)
        if after is None:
            break
    rng = random.Random(seed)
    pools = [rng.sample(sorted(ids), len(ids)) for _, ids in sorted(by_category.items())]
    picked: list[str] = []
    while len(picked) < n and any(pools):
        for pool in pools:
            if pool and len(picked) < n:
                picked.append(pool.pop())
    return picked


def run_queries(index: VectorIndex, product_ids: list[str], k: int, same_category: bool) -> list[ReportRow]:
    """Query each product; with `same_category`, neighbours are filtered to the query's category."""
    rows = []
    for product_id in product_ids:
        found = index.get(product_id)
        payload = found[1] if found else {}
        category = payload.get("category")
        filters = Filters(category=[category] if same_category and category else [])
        rows.append(
            ReportRow(product_id, payload, filters, similar_to_product(index, product_id, k, filters))
        )
    return rows


def check_writable(out: Path, page: str = "report.html", ours: Callable[[Path], bool] | None = None) -> None:
    """Refuse a page path that cannot be written (a folder, a file where a folder should be, a read-only
    folder) before the work is done; missing folders are made. The write itself can still fail (a full
    disk) and says so the same way."""
    if out.is_dir():
        raise OutputUnwritable(f"{out} is a folder: name the page's file, e.g. {out / page}")
    # A mistyped --out must not replace a catalogue: only what visrec wrote there (`ours`: a page).
    if out.is_file() and not (ours or _is_our_page)(out):
        raise OutputUnwritable(f"{out} exists and is not a file visrec wrote: name another, or remove it")
    problem = folder_problem(out.parent)
    if problem:
        raise OutputUnwritable(f"cannot write {out}: {problem}")


def write_html(rows: list[ReportRow], out: Path, title: str, model_version: str) -> Path:
    """Write the report; returns its path."""
    return _write_page(out, title, model_version, "\n".join(_row_html(row) for row in rows))


def write_duplicates_html(scan: DuplicateScan, out: Path, model_version: str) -> Path:
    """A page of `visrec duplicates` groups: each group a row of its products, every photo of each, with
    the links (distances) that joined them; returns its path."""
    summary = (
        f'<p class="muted">{len(scan.groups)} groups among {scan.products} products · max distance '
        f"{scan.max_distance:g} · {scan.neighbours} neighbours searched per photo</p>"
    )
    body = summary + "\n".join(_group_html(n, group) for n, group in enumerate(scan.groups, 1))
    return _write_page(out, "visrec: near-duplicate products", model_version, body)


def _write_page(out: Path, title: str, model_version: str, body: str) -> Path:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    try:
        _write_html(out, title, model_version, when, body)
    except OSError as exc:
        raise OutputUnwritable(f"cannot write {out}: {exc.strerror or exc}") from exc
    return out


def _is_our_page(path: Path) -> bool:
    """Whether `path` is a page visrec wrote (its title is "visrec: …"), which a new one may replace."""
    try:
        with path.open("rb") as page:
            return b"<title>visrec: " in page.read(4096)
    except OSError:
        return False


def _write_html(out: Path, title: str, model_version: str, when: str, body: str) -> None:
    write_atomically(
        out,
        f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 24px; color: #222; }}
.row {{ display: flex; flex-wrap: wrap; gap: 10px; align-items: flex-start; margin: 14px 0;
        padding-bottom: 12px; border-bottom: 1px solid #ddd; }}
figure {{ margin: 0; width: {THUMB}px; text-align: center; font-size: 12px; }}
figure img {{ width: {THUMB}px; height: {THUMB}px; object-fit: contain; background: #f4f4f4;
              image-rendering: pixelated; }}
figure.query {{ padding-right: 10px; border-right: 3px solid #2a6; }}
.photos img {{ width: {THUMB // 4}px; height: {THUMB // 4}px; border: 2px solid transparent; }}
.photos img.matched {{ border-color: #2a6; }}
.muted {{ color: #777; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p class="muted">model {html.escape(model_version)} · Euclidean distance on the 1000-d embedding · {when}</p>
{body}
</body></html>
""",
    )


def _group_html(number: int, group: DuplicateGroup) -> str:
    links = ", ".join(
        f"{html.escape(link.a)} ~ {html.escape(link.b)} d = {link.distance:.2f}" for link in group.links
    )
    figures = []
    for product_id, payload in group.products:
        figures.append(_figure(payload, html.escape(product_id)))
    head = (
        f'<p><b>group {number}</b> · {len(group.products)} products · <span class="muted">{links}</span></p>'
    )
    return f'{head}<div class="row">{"".join(figures)}</div>'


def _row_html(row: ReportRow) -> str:
    condition = html.escape(", ".join(row.filters.category) or "none")
    caption = f'<b>query</b> {html.escape(row.query_id)}<br><span class="muted">filter: {condition}</span>'
    query = _figure(row.query, caption, "query")
    neighbours = "".join(
        _figure(h.payload, f"{html.escape(h.product_id)}<br>d = {h.distance:.2f}", matched=h.matched)
        for h in row.hits
    )
    return f'<div class="row">{query}{neighbours}</div>'


def _figure(payload: dict[str, Any], caption: str, css: str = "", matched: int = 0) -> str:
    category = html.escape(str(payload.get("category", "")))
    extra = "".join(f"<br>{html.escape(str(payload[k]))}" for k in ("colour", "price") if k in payload)
    refs = [str(ref) for ref in photos(payload)]
    shown = refs[matched] if matched < len(refs) else refs[0]
    strip = ""
    if len(refs) > 1:
        thumbs = [
            f'<img src="{_thumbnail(ref)}" alt="photo {n}" class="{"matched" if n == matched else ""}">'
            for n, ref in enumerate(refs)
        ]
        strip = f'<div class="photos">{"".join(thumbs)}</div>'
    return (
        f'<figure class="{css}"><img src="{_thumbnail(shown)}" alt="">{strip}'
        f"<figcaption>{caption}<br>{category}{extra}</figcaption></figure>"
    )


def _thumbnail(ref: str) -> str:
    if ref.startswith(("http://", "https://")):
        return html.escape(ref)
    try:
        image = load_image(ref, ImageLimits())
    except ImageError:
        return ""
    image.thumbnail((THUMB * 2, THUMB * 2), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
