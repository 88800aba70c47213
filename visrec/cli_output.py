"""How the `visrec` command prints results: rich tables and progress bars for people, JSON on stdout
with --json."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group, RenderableType
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from visrec.payload import photos

if TYPE_CHECKING:  # the report and query modules (PIL, torch) load only for the commands that use them
    from visrec.manifest import Manifest

out = Console()
err = Console(stderr=True)


def emit(as_json: bool, data: Any, table: RenderableType) -> None:
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    else:
        out.print(table)


def key_value_table(title: str, data: dict[str, Any]) -> Table:
    table = Table("", "", title=title, show_header=False)
    for key, value in data.items():
        table.add_row(key, json.dumps(value, default=str) if isinstance(value, dict) else str(value))
    return table


def sync_table(title: str, summary: dict[str, Any]) -> RenderableType:
    """A sync's summary (`SyncSummary.to_dict`), then its first failures and where all of them are."""
    failures = summary.get("first_failures") or []
    table = key_value_table(title, {k: v for k, v in summary.items() if k != "first_failures"})
    if not failures:
        return table
    lines = [f"failures (the first {len(failures)}; all of them are in {summary.get('failure_report')}):"]
    for f in failures:
        where = f"line {f['line']}" if f.get("line") is not None else "row"
        who = f" {f['product_id']!r}" if f.get("product_id") is not None else ""
        lines.append(f"  {where}{who}: {f['error']}")
    return Group(table, Text("\n".join(lines)))


def quality_line(figures: dict[str, Any] | None) -> str:
    """A version's recorded quality figures (`visrec.evaluation`) as one line of a table."""
    if not figures:
        return "not measured (measured by `visrec reindex`)"
    if "problem" in figures:
        return f"unreadable: {figures['problem']}"
    return (
        f"p@10 {figures.get('p@10')}, map@10 {figures.get('map@10')} on {figures.get('queries')} "
        f"{figures.get('query_set')} queries ({figures.get('measured_at')})"
    )


def hits_table(hits: list[dict[str, Any]]) -> Table:
    """Hits as `Hit.to_dict` gives them (`visrec similar --json`)."""
    payloads = [h["payload"] for h in hits]
    fields = [f for f in ("category", "colour", "price", "title") if any(f in p for p in payloads)]
    several = any(len(photos(p)) > 1 for p in payloads)  # a column for the matched photo then
    scored = any(h.get("score", h["distance"]) != h["distance"] for h in hits)  # a rule ranked by more
    table = Table(
        "#",
        "product",
        "distance",
        *(["score"] if scored else []),
        *(["matched photo"] if several else []),
        *fields,
    )
    for rank, hit in enumerate(hits, 1):
        refs, matched_at = photos(hit["payload"]), hit["matched_image"]
        name = PurePath(refs[matched_at]).name if matched_at < len(refs) else "?"
        matched = [f"{matched_at}: {name}"] if several else []
        table.add_row(
            str(rank),
            hit["product_id"],
            f"{hit['distance']:.3f}",
            *([f"{hit['score']:.4g}"] if scored else []),
            *matched,
            *(str(hit["payload"].get(f, "")) for f in fields),
        )
    return table


def duplicates_table(scan: dict[str, Any]) -> Table:
    """`visrec duplicates` (its `--json`): one row per product of each group, the group's number and
    closest link on its first row."""
    groups = scan["groups"]
    payloads = [p["payload"] for g in groups for p in g["products"]]
    fields = [f for f in ("category", "title") if any(f in payload for payload in payloads)]
    report = scan.get("report")
    where = f" → {report}" if report else ""
    saturated, colour, rejected = (
        scan["saturated"],
        scan.get("max_colour_delta_e"),
        scan.get("colour_rejected"),
    )
    table = Table(
        "group",
        "product",
        "closest (distance)",
        *fields,
        title=f"{len(groups)} duplicate groups among {scan['products_scanned']} products{where}",
        caption=f"max distance {scan['max_distance']:g}, {scan['neighbours']} neighbours per photo"
        + (
            f", max colour Delta E {colour:g}"
            if (colour := scan.get("max_colour_delta_e")) is not None
            else ""
        )
        + (
            f"; {rejected} pairs within it differ in colour"
            if (rejected := scan.get("colour_rejected"))
            else ""
        )
        + (f"; {len(saturated)} products had all neighbours within it" if saturated else ""),
    )
    for number, group in enumerate(groups, 1):
        for row, product in enumerate(group["products"]):
            product_id = product["product_id"]
            nearest = min(
                (link for link in group["links"] if product_id in (link["a"], link["b"])),
                key=lambda link: link["distance"],
            )
            other = nearest["b"] if nearest["a"] == product_id else nearest["a"]
            table.add_row(
                str(number) if row == 0 else "",
                product_id,
                f"{other} ({nearest['distance']:.3f})",
                *(str(product["payload"].get(f, "")) for f in fields),
                end_section=row == len(group["products"]) - 1,
            )
    return table


def status_table(data: dict[str, Any]) -> Table:
    """`visrec status`: one row per field, and one per version's measured quality."""
    table = key_value_table("status", {k: v for k, v in data.items() if k != "quality"})
    for version, figures in data["quality"].items():
        table.add_row(f"quality {version}", quality_line(figures))
    return table


def reindex_table(summary: dict[str, Any]) -> Table:
    """`visrec reindex`: the summary (`ReindexSummary.to_dict`), and the quality gate's verdict with both
    versions' figures."""
    table = key_value_table(
        "reindex", {k: v for k, v in summary.items() if k not in ("quality_gate", "first_failures")}
    )
    gate = summary.get("quality_gate")
    if gate is not None:
        table.add_row("quality gate", f"{gate['verdict']}: {gate['note']} ({gate['seconds']:.1f} s)")
        for name in ("live", "new"):
            quality = gate.get(name)
            if quality is not None:
                figures = ", ".join(f"{k} {quality[k]:.4f}" for k in ("p@10", "map@10") if k in quality)
                table.add_row(f"  {name} {quality['model_version']}", figures)
    return table


def trained_table(manifest: Manifest, artefact: Path) -> Table:
    """`visrec train`'s summary: the exported model and its held-out figures."""
    table = Table(
        "model", "loss", "classes", "top-1", "top-3", "held-out", "artefact", title="trained and exported"
    )
    table.add_row(
        manifest.model_version,
        manifest.loss,
        str(len(manifest.classes)),
        f"{manifest.metrics['top1']:.3f}",
        f"{manifest.metrics['top3']:.3f}",
        str(int(manifest.metrics["heldout_images"])),
        str(artefact),
    )
    return table


def report_table(report: dict[str, Any]) -> Table:
    """`visrec report`'s summary (from its `--json`): each query product, its filter and its nearest
    neighbour."""
    table = Table(
        "query",
        "category",
        "filter",
        "nearest (distance)",
        "same category",
        title=f"report → {report['report']}",
    )
    for row in report["rows"]:
        hits = row["hits"]
        nearest = hits[0] if hits else None
        same = sum(h["payload"].get("category") == row["category"] for h in hits)
        table.add_row(
            row["query"],
            str(row["category"]),
            ",".join(row["filter"]) or "-",
            f"{nearest['payload'].get('category')} ({nearest['distance']:.1f})" if nearest else "-",
            f"{same}/{len(hits)}",
        )
    return table


@contextmanager
def progress_bars(enabled: bool) -> Iterator[Callable[[str, int, int], None]]:
    """A rich progress bar per stage, on stderr; silent when `enabled` is false (e.g. --json).
    The benchmarks use it too."""
    if not enabled:
        yield lambda stage, done, total: None
        return
    columns = (
        TextColumn("{task.description:>14}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),  # each stage's bar spans all of it (phase 2: epochs x batches)
    )
    with Progress(*columns, console=err, transient=False) as bar:
        tasks: dict[str, Any] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        yield update


def neighbours_table(feed: dict[str, Any]) -> Table:
    """`visrec neighbours`' summary (its `--json`)."""
    table = key_value_table(f"neighbours ({feed['kind']}) → {feed['feed']}", feed)
    return table
