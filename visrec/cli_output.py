"""How the `visrec` command prints results: rich tables for people, JSON on stdout with --json."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from visrec.index import Hit
from visrec.query import public_payload

out = Console()


def emit(as_json: bool, data: Any, table: Table | str) -> None:
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    else:
        out.print(table)


def hit_dict(hit: Hit) -> dict[str, Any]:
    payload = public_payload(hit.payload)
    return {"product_id": hit.product_id, "distance": round(hit.distance, 4), "payload": payload}


def key_value_table(title: str, data: dict[str, Any]) -> Table:
    table = Table("", "", title=title, show_header=False)
    for key, value in data.items():
        table.add_row(key, json.dumps(value, default=str) if isinstance(value, dict) else str(value))
    return table


def hits_table(hits: list[Hit]) -> Table:
    fields = [f for f in ("category", "colour", "price", "title") if any(f in h.payload for h in hits)]
    table = Table("#", "product", "distance", *fields)
    for rank, hit in enumerate(hits, 1):
        table.add_row(
            str(rank), hit.product_id, f"{hit.distance:.3f}", *(str(hit.payload.get(f, "")) for f in fields)
        )
    return table
