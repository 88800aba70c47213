"""Both backends through the one interface: the embedded engine (qdrant-edge) and qdrant-client's
local mode (the server backend's code path). The congruence test runs one scenario on both."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from visrec.config import QdrantSettings
from visrec.errors import CollectionMissing, IndexUnavailable, VisrecError
from visrec.index import Filters, IndexPoint, VectorIndex, open_index, point_id
from visrec.index.edge import EdgeIndex

DIM = 8


def _points(n: int = 30) -> list[IndexPoint]:
    rng = np.random.default_rng(0)
    return [
        IndexPoint(
            f"p{i}",
            rng.normal(size=DIM).astype(np.float32),
            {
                "product_id": f"p{i}",
                "category": ["shirt", "jeans", "shoe"][i % 3],
                "colour": ["red", "blue"][i % 2],
                "price": float(i),
                "brand": "acme" if i < 10 else "other",
                "content_hash": f"h{i}",
                "model_version": "m1",
            },
        )
        for i in range(n)
    ]


def _exact(points: list[IndexPoint], vector: np.ndarray, keep: list[IndexPoint]) -> list[str]:
    return [p.product_id for p in sorted(keep, key=lambda p: float(np.linalg.norm(p.vector - vector)))]


@pytest.fixture(params=["embedded", "server-local"])
def index(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[VectorIndex]:
    url = ":memory:" if request.param == "server-local" else None
    with open_index(QdrantSettings(path=tmp_path / "q", url=url, collection="test")) as opened:
        yield opened


def _scenario(index: VectorIndex) -> dict[str, object]:
    """Upsert, re-upsert, filter, delete, query by id: everything a sync and a query do."""
    points = _points()
    index.create(DIM)
    index.create(DIM)  # idempotent
    index.upsert(points[:20])
    index.upsert(points)  # overlapping rerun: no duplicates
    query = points[0].vector
    results: dict[str, object] = {"count": index.count()}
    for name, filters in {
        "none": Filters(),
        "category": Filters(category=["jeans"]),
        "colour_any": Filters(colour=["red", "blue"]),
        "price": Filters(price_min=5, price_max=12.5),
        "combined": Filters(category=["shirt", "shoe"], colour=["red"], price_max=20),
        "equals": Filters(equals={"brand": "acme"}),
    }.items():
        hits = index.search(query, 5, filters, exclude=["p0"])
        results[name] = [(h.product_id, round(h.distance, 4)) for h in hits]
        results[f"count_{name}"] = index.count(filters)
    first, cursor = index.browse(Filters(category=["jeans"]), 4)
    rest, end = index.browse(Filters(category=["jeans"]), 10, after=cursor)
    results["browse"] = ([pid for pid, _ in first], [pid for pid, _ in rest], end)
    index.delete(["p1", "p2", "does-not-exist"])
    results["after_delete"] = index.count()
    results["records"] = sorted((k, v.content_hash) for k, v in index.sync_records().items())
    got = index.get("p3")
    assert got is not None
    results["get"] = (np.round(got[0], 5).tolist(), got[1]["category"])
    results["get_missing"] = index.get("p1")
    return results


def test_scenario_matches_exact_search(index: VectorIndex) -> None:
    results = _scenario(index)
    points = _points()
    query = points[0].vector
    assert results["count"] == 30 and results["after_delete"] == 28
    expected = {
        "none": lambda p: p.product_id != "p0",
        "category": lambda p: p.payload["category"] == "jeans",
        "price": lambda p: 5 <= p.payload["price"] <= 12.5,
        "combined": lambda p: (
            p.payload["category"] in {"shirt", "shoe"}
            and p.payload["colour"] == "red"
            and p.payload["price"] <= 20
        ),
        "equals": lambda p: p.payload["brand"] == "acme",
    }
    for name, keep in expected.items():
        kept = [p for p in points if keep(p) and p.product_id != "p0"]
        assert [pid for pid, _ in results[name]] == _exact(points, query, kept)[:5], name  # type: ignore[attr-defined]
    assert len(results["records"]) == 28  # type: ignore[arg-type]
    first, rest, end = results["browse"]  # type: ignore[misc]
    assert len(first) == 4 and end is None
    assert sorted(first + rest) == sorted(p.product_id for p in points if p.payload["category"] == "jeans")
    assert results["get_missing"] is None


def test_backends_are_congruent(tmp_path: Path) -> None:
    with open_index(QdrantSettings(path=tmp_path / "q", collection="c")) as embedded:
        edge = _scenario(embedded)
    with open_index(QdrantSettings(url=":memory:", collection="c")) as server:
        local = _scenario(server)
    assert edge.keys() == local.keys()
    for key in edge:
        if key.startswith("count") or key in {"after_delete", "records", "get_missing", "get", "browse"}:
            assert edge[key] == local[key], key
        else:  # same ids in the same order, distances equal to float precision
            assert [p for p, _ in edge[key]] == [p for p, _ in local[key]], key  # type: ignore[attr-defined]
            np.testing.assert_allclose([d for _, d in edge[key]], [d for _, d in local[key]], atol=1e-3)  # type: ignore[attr-defined]


def test_point_ids_are_deterministic() -> None:
    assert point_id("sku-1") == point_id("sku-1") != point_id("sku-2")
    assert uuid.UUID(point_id("sku-1")).version == 5


def test_missing_collection_and_wrong_size(index: VectorIndex) -> None:
    assert not index.exists()
    with pytest.raises(CollectionMissing):
        index.search(np.zeros(DIM, np.float32), 3, Filters())
    index.create(DIM)
    with pytest.raises(VisrecError, match="another size|size"):
        index.create(DIM + 1)


def test_embedded_store_reopens_with_its_points(tmp_path: Path) -> None:
    settings = QdrantSettings(path=tmp_path / "q", collection="c")
    with open_index(settings) as index:
        index.create(DIM)
        index.upsert(_points(5))
    with open_index(settings) as index:
        assert index.count() == 5


def test_optimize_builds_the_graph_and_search_agrees_with_exact(tmp_path: Path) -> None:
    """3,000 points of 1000-d (12 MB, above the full-scan threshold) in 30 clusters, as product
    embeddings come: as a sync leaves them nothing is indexed; optimize() (what sync calls last) builds
    the HNSW graph, which finds the exact top-10. (On uniform random 1000-d points HNSW recall is poor
    and a test of it flaky; benchmarks/query_latency.py measures recall on real embeddings.)"""
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(30, 1000)).astype(np.float32)
    vectors = centres[np.arange(3000) % 30] + 0.1 * rng.normal(size=(3000, 1000)).astype(np.float32)
    points = [IndexPoint(f"p{i}", v, {"product_id": f"p{i}"}) for i, v in enumerate(vectors)]
    with open_index(QdrantSettings(path=tmp_path / "q", collection="big")) as index:
        assert isinstance(index, EdgeIndex)
        index.create(1000)
        for start in range(0, len(points), 500):
            index.upsert(points[start : start + 500])
        assert index.shard.info().indexed_vectors_count == 0
        index.optimize()
        assert index.shard.info().indexed_vectors_count == 3000
        found = [
            len(
                {h.product_id for h in index.search(v, 10, Filters())}
                & {h.product_id for h in index.search(v, 10, Filters(), exact=True)}
            )
            for v in vectors[:20]
        ]
        assert sum(found) >= 0.95 * 200, found


def test_busy_embedded_store_is_a_clear_error(tmp_path: Path) -> None:
    settings = QdrantSettings(path=tmp_path / "q", collection="c")
    with open_index(settings) as index:
        index.create(DIM)
        index.upsert(_points(5))
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from visrec.config import QdrantSettings;"
            "from visrec.index import open_index;"
            "i = open_index(QdrantSettings(path=Path(sys.argv[1]), collection='c'));"
            "print('open', flush=True); time.sleep(60)",
            str(tmp_path / "q"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        started = time.monotonic()
        with pytest.raises(IndexUnavailable, match="in use by another process"):
            open_index(settings)
        assert time.monotonic() - started < 5  # an error, not a hang
    finally:
        holder.kill()
        holder.wait()
    with open_index(settings) as index:  # not corrupted: reopens with everything in it
        assert index.count() == 5


def test_unreachable_server_fails_after_bounded_retries() -> None:
    started = time.monotonic()
    with pytest.raises(IndexUnavailable, match="unreachable"):
        open_index(QdrantSettings(url="http://127.0.0.1:9", retries=2, timeout_s=1, collection="c"))
    assert time.monotonic() - started < 10


def test_losing_the_create_race_to_another_worker_is_fine() -> None:
    """Sharded workers start together; all but one find the collection created under them."""
    from qdrant_client import models as qm

    index = open_index(QdrantSettings(url=":memory:", collection="c"))
    assert not index.exists()  # checked at open; another worker creates it right after:
    other = qm.VectorParams(size=DIM, distance=qm.Distance.EUCLID)
    index.client.create_collection(index.collection, vectors_config=other)  # type: ignore[attr-defined]
    index.create(DIM)
    index.upsert(_points(3))
    assert index.count() == 3

    late = open_index(QdrantSettings(url=":memory:", collection="d"))
    late.client.create_collection(  # type: ignore[attr-defined]
        late.collection, vectors_config=qm.VectorParams(size=DIM + 1, distance=qm.Distance.EUCLID)
    )
    with pytest.raises(VisrecError, match="size"):
        late.create(DIM)  # the winner made it with another size: still refused
