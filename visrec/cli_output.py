"""How the `visrec` command prints results: rich tables and progress bars for people, JSON on stdout
with --json."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from visrec.index import Hit
from visrec.payload import for_operators

out = Console()
err = Console(stderr=True)


def emit(as_json: bool, data: Any, table: Table | str) -> None:
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    else:
        out.print(table)


def hit_dict(hit: Hit) -> dict[str, Any]:
    return hit.to_dict(for_operators)


def key_value_table(title: str, data: dict[str, Any]) -> Table:
    table = Table("", "", title=title, show_header=False)
    for key, value in data.items():
        table.add_row(key, json.dumps(value, default=str) if isinstance(value, dict) else str(value))
    return table


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


def hits_table(hits: list[Hit]) -> Table:
    fields = [f for f in ("category", "colour", "price", "title") if any(f in h.payload for h in hits)]
    table = Table("#", "product", "distance", *fields)
    for rank, hit in enumerate(hits, 1):
        table.add_row(
            str(rank), hit.product_id, f"{hit.distance:.3f}", *(str(hit.payload.get(f, "")) for f in fields)
        )
    return table


@contextmanager
def progress_bars(enabled: bool) -> Iterator[Callable[[str, int, int], None]]:
    """A rich progress bar per stage, on stderr; silent when `enabled` is false (e.g. --json).
    The benchmarks use it too."""
    if not enabled:
        yield lambda stage, done, total: None
        return
    columns = (TextColumn("{task.description:>14}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=False) as bar:
        tasks: dict[str, Any] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        yield update
