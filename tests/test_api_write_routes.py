"""The write routes' contract through FastAPI's test client (the real app and guard, a real embedded store
and model): JSON-lines batches split only where a row ends, wrong write keys throttled whichever keys are
configured, one product per path on every method with truthful `Allow` headers, and PATCH refusing
exactly what its schema refuses. The same routes over real HTTP: tests/faults/test_api_writes.py."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pydantic import SecretStr

from tests.helpers import MakeCatalogue, run_sync
from visrec.api import create_app
from visrec.api.writes import json_lines
from visrec.config import ApiSettings, Settings

WRITE, READ = "write-key-9", "read-key-9"
EXAMPLES = int(os.environ.get("VISREC_WRITE_ROUTE_EXAMPLES", "60"))
SLOW = hypothesis_settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
# What str.splitlines splits at besides LF and CR, all but the controls legal unescaped in a JSON string.
LINE_BREAKS = "\u2028\u2029\u0085\x0b\x0c\x1c\x1d\x1e"


def app_client(settings: Settings, **api: Any) -> TestClient:
    return TestClient(
        create_app(settings.model_copy(update={"api": ApiSettings(**api)}), torch.device("cpu"))
    )


@pytest.fixture
def synced(make_catalogue: MakeCatalogue, settings: Settings) -> Settings:
    run_sync(make_catalogue(3), settings)  # p0, p1, p2
    return settings


@pytest.fixture
def writer(settings: Settings) -> Iterator[TestClient]:
    """An app with a write key and no read key, on an empty store (rows without photos touch nothing)."""
    with app_client(settings, write_key=SecretStr(WRITE)) as client:
        client.headers["X-API-Key"] = WRITE
        yield client


# --- 1. JSON lines ----------------------------------------------------------------------------------------

TEXT = st.text(max_size=12) | st.text(st.sampled_from(LINE_BREAKS + '\r\n a"\\'), max_size=8)
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)
# A row: mostly an object with an id (never a photo: nothing is fetched or embedded), sometimes anything.
ROW = (
    st.dictionaries(TEXT.filter(lambda key: key not in ("image", "images")), JSON, max_size=4).flatmap(
        lambda fields: st.builds(lambda i: {"id": i, **fields} if i is not None else fields, st.none() | TEXT)
    )
    | JSON
)


def batch_lines(client: TestClient, body: str) -> list[dict[str, Any]]:
    answer = client.post(
        "/products/batch", content=body.encode(), headers={"content-type": "application/x-ndjson"}
    )
    assert answer.status_code == 200, answer.text
    results: list[dict[str, Any]] = answer.json()["results"]
    return results


def test_the_reviews_three_rows_get_three_answers(writer: TestClient) -> None:
    rows = [{"id": "a", "title": "x\u2028y"}, {"id": "b", "title": "p\u2029q\u0085r"}, {"id": "c"}]
    body = "\r\n".join(json.dumps(row, ensure_ascii=False) for row in rows) + "\n"
    results = batch_lines(writer, body)
    assert [r["product_id"] for r in results] == ["a", "b", "c"], results
    assert all(r["outcome"].startswith("error: ") and "photo" in r["outcome"] for r in results), results


@SLOW
@given(
    rows=st.lists(ROW, min_size=1, max_size=6), newline=st.sampled_from(["\n", "\r\n"]), last=st.booleans()
)
def test_json_lines_answer_each_row_in_order(
    writer: TestClient, rows: list[Any], newline: str, last: bool
) -> None:
    """Any JSON rows, their strings of any text (line and paragraph separators, NEL, controls), one per
    line without escaping what JSON need not escape: one answer per row, in the rows' order."""
    body = newline.join(json.dumps(row, ensure_ascii=False) for row in rows) + (newline if last else "")
    assert len(json_lines(body)) == len(rows)
    results = batch_lines(writer, body)
    assert [r["product_id"] for r in results] == [
        str(row.get("id")) if isinstance(row, dict) else "" for row in rows
    ], results
    assert all(r["outcome"].startswith("error: ") for r in results)
