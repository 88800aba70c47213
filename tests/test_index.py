"""Both backends through the one interface: the embedded engine (qdrant-edge) and qdrant-client's
local mode (the server backend's code path). The congruence test runs one scenario on both."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import qdrant_edge as qe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import stored
from visrec.config import QdrantSettings
from visrec.errors import CollectionMissing, IndexUnavailable, InvalidFilter, PointRejected, VisrecError
from visrec.filters import Where
from visrec.index import Filters, IndexPoint, VectorIndex, open_index, open_store, point_id
from visrec.index.edge import SCHEMA_TYPES, EdgeIndex
from visrec.index.points import POINT_NAMESPACE, field_of
from visrec.payload import INDEXED

DIM = 8


def _points(n: int = 30) -> list[IndexPoint]:
    """`n` products; every third has three photos (the rest one)."""
    rng = np.random.default_rng(0)
    return [
        IndexPoint(
            f"p{i}",
            rng.normal(size=(3, DIM) if i % 3 == 1 else DIM).astype(np.float32),
            {
                "product_id": f"p{i}",
                "images": [f"/img/p{i}-{n}.png" for n in range(3 if i % 3 == 1 else 1)],
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


def _nearest_photo(point: IndexPoint, vector: np.ndarray) -> tuple[float, int]:
    """(distance to the point's nearest photo, which photo)."""
    distances = np.linalg.norm(point.photo_vectors - vector, axis=1)
    return float(distances.min()), int(distances.argmin())


def _exact(points: list[IndexPoint], vector: np.ndarray, keep: list[IndexPoint]) -> list[str]:
    return [p.product_id for p in sorted(keep, key=lambda p: _nearest_photo(p, vector)[0])]


@pytest.fixture(params=["embedded", "server-local"])
def index(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[VectorIndex]:
    url = ":memory:" if request.param == "server-local" else None
    with open_index(QdrantSettings(path=tmp_path / "q", url=url, collection="test")) as opened:
        yield opened


@dataclass
class Scenario:
    """What `_scenario` saw: the hits and counts of each filter (by name), and the rest of the run."""

    count: int
    hits: dict[str, list[tuple[str, float, int]]]  # (product id, distance, matched photo), nearest first
    counts: dict[str, int]
    browse: tuple[list[str], list[str], str | None]  # the first page's ids, the next page's, the cursor
    after_delete: int
    records: list[tuple[str, str | None]]  # (product id, content hash)
    get: tuple[list[list[float]], Any]  # the vectors, rounded, and the category
    get_missing: tuple[np.ndarray, dict[str, Any]] | None


def _scenario(index: VectorIndex) -> Scenario:
    """Upsert, re-upsert, filter, delete, query by id: everything a sync and a query do."""
    points = _points()
    index.create(DIM)
    index.create(DIM)  # idempotent
    index.upsert(points[:20])
    index.upsert(points)  # overlapping rerun: no duplicates
    query = points[0].vectors
    count = index.count()
    hits: dict[str, list[tuple[str, float, int]]] = {}
    counts: dict[str, int] = {}
    for name, filters in {
        "none": Filters(),
        "category": Filters(category=["jeans"]),
        "colour_any": Filters(colour=["red", "blue"]),
        "price": Filters(price_min=5, price_max=12.5),
        "combined": Filters(category=["shirt", "shoe"], colour=["red"], price_max=20),
        "equals": Filters(equals={"brand": "acme"}),
    }.items():
        found = index.search(query, 5, filters, exclude=["p0"])
        hits[name] = [(h.product_id, round(h.distance, 4), h.matched) for h in found]
        counts[name] = index.count(filters)
    first, cursor = index.browse(Filters(category=["jeans"]), 4)
    rest, end = index.browse(Filters(category=["jeans"]), 10, after=cursor)
    browse = ([pid for pid, _ in first], [pid for pid, _ in rest], end)
    index.delete(["p1", "p2", "does-not-exist"])
    after_delete = index.count()
    records = sorted((k, v.content_hash) for k, v in index.sync_records().items())
    got = index.get("p4")  # three photos
    assert got is not None
    return Scenario(
        count=count,
        hits=hits,
        counts=counts,
        browse=browse,
        after_delete=after_delete,
        records=records,
        get=(np.round(got[0], 5).tolist(), got[1]["category"]),
        get_missing=index.get("p1"),
    )


def test_scenario_matches_exact_search(index: VectorIndex) -> None:
    results = _scenario(index)
    points = _points()
    query = points[0].vectors
    assert results.count == 30 and results.after_delete == 28
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
    by_id = {p.product_id: p for p in points}
    for name, keep in expected.items():
        kept = [p for p in points if keep(p) and p.product_id != "p0"]
        assert [pid for pid, _, _ in results.hits[name]] == _exact(points, query, kept)[:5], name
        for pid, distance, matched in results.hits[name]:  # the nearest photo's distance, and which
            expected_distance, expected_photo = _nearest_photo(by_id[pid], query)
            assert matched == expected_photo and distance == pytest.approx(expected_distance, abs=1e-3)
    assert any(matched for hits in results.hits.values() for _, _, matched in hits)  # not all photo 0
    assert np.array(results.get[0]).shape == (3, DIM)
    assert len(results.records) == 28
    first, rest, end = results.browse
    assert len(first) == 4 and end is None
    assert sorted(first + rest) == sorted(p.product_id for p in points if p.payload["category"] == "jeans")
    assert results.get_missing is None


def test_backends_are_congruent(tmp_path: Path) -> None:
    with open_index(QdrantSettings(path=tmp_path / "q", collection="c")) as embedded:
        edge = _scenario(embedded)
    with open_index(QdrantSettings(url=":memory:", collection="c")) as server:
        local = _scenario(server)
    assert edge.hits.keys() == local.hits.keys()
    for name in edge.hits:  # same ids in the same order, distances equal to float precision
        assert [(p, m) for p, _, m in edge.hits[name]] == [(p, m) for p, _, m in local.hits[name]], name
        np.testing.assert_allclose(
            [d for _, d, _ in edge.hits[name]], [d for _, d, _ in local.hits[name]], atol=1e-3
        )
    for field in dataclasses.fields(Scenario):  # the counts, browse pages, records and gets: equal
        if field.name != "hits":
            assert getattr(edge, field.name) == getattr(local, field.name), field.name


def test_point_ids_are_deterministic() -> None:
    assert point_id("sku-1") == point_id("sku-1") != point_id("sku-2")


@given(st.text())
def test_a_point_id_is_uuid5_of_the_product_id(product_id: str) -> None:
    """Point ids written by every earlier version stay the ids of their products."""
    try:
        expected = str(uuid.uuid5(POINT_NAMESPACE, product_id))
    except UnicodeEncodeError:  # a lone surrogate: no product id (the catalogue reads UTF-8)
        with pytest.raises(UnicodeEncodeError):
            point_id(product_id)
        return
    assert point_id(product_id) == expected
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
    points = [IndexPoint(f"p{i}", v, {"product_id": f"p{i}", **_extra(i)}) for i, v in enumerate(vectors)]
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
        # Filters on a shop's own columns (indexed when the first write carried them, so before the graph
        # was built) agree with exact search after optimize(), as on category: a selective one (97
        # points), one on booleans, one on a field holding text and booleans (searched by a full scan).
        for clause in ("brand=rare", "in_stock=false", "flag=true"):
            filters = Filters.parse(where=[clause])
            for v in vectors[:5]:
                exact = [h.product_id for h in index.search(v, 10, filters, exact=True)]
                assert [h.product_id for h in index.search(v, 10, filters)] == exact, clause
                assert all(
                    Where.parse(clause).matches(p.payload[clause.split("=")[0]])
                    for p in points
                    if p.product_id in exact
                )


def _extra(i: int) -> dict[str, Any]:
    """A shop's own columns: a rare brand, booleans, and a field holding text and booleans."""
    return {
        "brand": "rare" if i % 31 == 0 else "common",
        "in_stock": i % 7 != 0,
        "flag": "true" if i < 100 else i % 2 == 0,
    }


def test_busy_embedded_store_is_a_clear_error(tmp_path: Path) -> None:
    settings = QdrantSettings(path=tmp_path / "q", collection="c", lock_wait_s=0.5)
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
        assert 0.5 <= time.monotonic() - started < 5  # waited lock_wait_s for it, then an error, not a hang
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

    from visrec.index.server import ServerIndex

    index = open_index(QdrantSettings(url=":memory:", collection="c"))
    assert isinstance(index, ServerIndex)
    assert not index.exists()  # checked at open; another worker creates it right after:
    multivector = qm.MultiVectorConfig(comparator=qm.MultiVectorComparator.MAX_SIM)
    other = qm.VectorParams(size=DIM, distance=qm.Distance.EUCLID, multivector_config=multivector)
    index.client.create_collection(index.collection, vectors_config=other)
    index.create(DIM)
    assert index.multivector  # the winner's layout
    index.upsert(_points(3))
    assert index.count() == 3

    late = open_index(QdrantSettings(url=":memory:", collection="d"))
    assert isinstance(late, ServerIndex)
    late.client.create_collection(
        late.collection, vectors_config=qm.VectorParams(size=DIM + 1, distance=qm.Distance.EUCLID)
    )
    with pytest.raises(VisrecError, match="size"):
        late.create(DIM)  # the winner made it with another size: still refused


def test_lock_wait_gives_up_after_lock_wait_s(tmp_path: Path) -> None:
    """A store held by a process that is exiting is waited for, briefly; one held for good is "in use"."""
    settings = QdrantSettings(path=tmp_path / "q", collection="c", lock_wait_s=0.5)
    with open_index(settings) as first:
        first.create(DIM)
        started = time.monotonic()
        with pytest.raises(IndexUnavailable, match="in use by another process"):
            open_index(settings)
        assert 0.5 <= time.monotonic() - started < 2


def test_lock_wait_opens_once_the_holder_lets_go(tmp_path: Path) -> None:
    settings = QdrantSettings(path=tmp_path / "q", collection="c", lock_wait_s=5)
    first = open_index(settings)
    first.create(DIM)
    first.upsert(_points(4))
    closer = threading.Timer(0.3, first.close)
    started = time.monotonic()
    closer.start()
    try:
        with open_index(settings) as second:
            waited = time.monotonic() - started
            assert second.count() == 4
    finally:
        closer.join()
    assert 0.25 <= waited < 2  # opened soon after the close, long before lock_wait_s


def _filtered_counts(index: VectorIndex) -> list[int]:
    return [
        index.count(Filters(category=["jeans"])),
        index.count(Filters(price_min=5, price_max=12.5)),
        index.count(Filters(equals={"product_id": "p3", "model_version": "m1", "colour": "blue"})),
    ]


def test_embedded_payload_indexes_are_ensured_on_open(tmp_path: Path) -> None:
    """A first sync killed between creating the shard and its payload indexes: the next open adds them."""
    settings = QdrantSettings(path=tmp_path / "q", collection="c")
    shard = qe.EdgeShard.create(
        str(tmp_path / "q" / "c__v1"),
        qe.EdgeConfig(vectors=qe.EdgeVectorParams(size=DIM, distance=qe.Distance.Euclid)),
    )
    shard.update(
        qe.UpdateOperation.upsert_points(
            [qe.Point(point_id(p.product_id), p.photo_vectors[0].tolist(), p.payload) for p in _points()]
        )
    )
    assert shard.info().payload_schema == {}
    shard.close()
    with open_index(settings) as index:
        assert isinstance(index, EdgeIndex)
        schema = {name: info.data_type for name, info in index.shard.info().payload_schema.items()}
        assert schema == {name: SCHEMA_TYPES[kind] for name, kind in INDEXED}
        assert _filtered_counts(index) == [10, 8, 1]  # the indexes cover the points already there
        index.optimize()
        assert _filtered_counts(index) == [10, 8, 1]


@pytest.mark.parametrize("backend", ["embedded", "server-local"])
def test_a_collection_from_before_several_photos_keeps_working(tmp_path: Path, backend: str) -> None:
    """A collection made with one plain vector a point (before `images`): queries, gets and one-photo
    upserts work as before; a product with several photos is refused with what to do."""
    points = _points()
    single = [dataclasses.replace(p, vectors=p.photo_vectors[0]) for p in points]
    settings = QdrantSettings(
        path=tmp_path / "q", collection="c", url=":memory:" if backend != "embedded" else None
    )
    with open_store(settings) as store:
        if backend == "embedded":
            shard = qe.EdgeShard.create(
                str(tmp_path / "q" / "c__v1"),
                qe.EdgeConfig(vectors=qe.EdgeVectorParams(size=DIM, distance=qe.Distance.Euclid)),
            )
            shard.close()
        else:
            from qdrant_client import models as qm

            from visrec.index.server import ServerStore

            assert isinstance(store, ServerStore)
            store.conn.client.create_collection(
                "c__v1", qm.VectorParams(size=DIM, distance=qm.Distance.EUCLID)
            )
        index = store.open(store.live())
        assert not index.multivector
        index.create(DIM)  # as every sync does: the collection keeps its layout
        index.upsert(single)
        hits = index.search(single[0].vectors, 3, Filters(), exclude=["p0"])
        assert [h.product_id for h in hits] == _exact(single, single[0].vectors, single[1:])[:3]
        got = index.get("p4")
        assert got is not None and got[0].shape == (1, DIM)
        with pytest.raises(PointRejected, match="visrec reindex"):
            index.upsert([points[4]])  # three photos
        index.close()


def test_embedded_folder_of_a_cut_short_create_is_no_collection(tmp_path: Path) -> None:
    """A create killed after making the folder leaves no segments: the store says "not created yet"
    (and a sync creates it) instead of failing to open for good."""
    (tmp_path / "q" / "c__v1" / "wal").mkdir(parents=True)
    settings = QdrantSettings(path=tmp_path / "q", collection="c")
    with open_index(settings) as index:
        assert not index.exists()
        index.create(DIM)
        index.upsert(_points(3))
    with open_index(settings) as index:
        assert index.count() == 3


@pytest.mark.skipif(
    not (os.environ.get("VISREC_QDRANT__URL") or "").startswith("http"),
    reason="qdrant-client's local mode keeps no payload indexes (payload_schema stays empty): nothing to "
    "observe; needs a Qdrant server at VISREC_QDRANT__URL",
)
def test_server_payload_indexes_are_ensured_on_open() -> None:
    from qdrant_client import models as qm

    from visrec.index.server import SCHEMA_TYPES, ServerStore

    settings = QdrantSettings(
        url=os.environ["VISREC_QDRANT__URL"], collection=f"ensure_{uuid.uuid4().hex[:12]}"
    )
    store = open_store(settings)
    assert isinstance(store, ServerStore)
    try:
        client = store.conn.client
        collection = store.version(1)
        client.create_collection(
            collection, vectors_config=qm.VectorParams(size=DIM, distance=qm.Distance.EUCLID)
        )
        assert client.get_collection(collection).payload_schema == {}
        store.open(collection).close()
        schema = {n: i.data_type for n, i in client.get_collection(collection).payload_schema.items()}
        assert schema == {name: SCHEMA_TYPES[kind] for name, kind in INDEXED}
    finally:
        store.conn.client.delete_collection(store.version(1))
        store.close()


FULL_DISK_WRITER = """
import resource, signal, sys
from pathlib import Path
import numpy as np
from visrec.config import QdrantSettings
from visrec.errors import VisrecError
from visrec.index import IndexPoint, open_index

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing us
rng = np.random.default_rng(0)
try:
    with open_index(QdrantSettings(path=Path(sys.argv[1]), collection="c")) as index:
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
        for batch in range(20):
            ids = [f"p{batch}-{i}" for i in range(100)]
            index.upsert([IndexPoint(i, rng.random(8).astype(np.float32), {"product_id": i}) for i in ids])
            index.optimize()
except VisrecError as exc:
    print(f"{type(exc).__name__}: {exc}")
"""


def test_engine_failure_on_a_full_disk_is_one_clear_error(tmp_path: Path) -> None:
    """A real engine failure: writes beyond RLIMIT_FSIZE fail with EFBIG, as on a full disk."""
    settings = QdrantSettings(path=tmp_path / "q", collection="c")
    with open_index(settings) as index:
        index.create(DIM)
    done = subprocess.run(
        [sys.executable, "-c", FULL_DISK_WRITER, str(tmp_path / "q")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout
    assert lines[0].startswith(f"IndexUnavailable: embedded store {tmp_path / 'q' / 'c__v1'}: ")
    assert "the disk is full or the file size limit was reached" in lines[0]
    assert "File too large" in lines[0]
    with open_index(settings) as index:  # the store itself survives the failed write
        count = index.count()  # whole batches, the first at least: each upsert is all or nothing
        assert 100 <= count < 2000 and count % 100 == 0, count
        assert all(index.get(f"p0-{i}") is not None for i in range(100))


def test_a_point_the_engine_cannot_take_is_rejected_not_a_store_failure(tmp_path: Path) -> None:
    """Data the binding cannot convert is that point's fault (PointRejected: ingest isolates it), not the
    store's (IndexUnavailable: the sync stops)."""
    with open_index(QdrantSettings(path=tmp_path / "q", collection="c")) as index:
        index.create(DIM)
        good = _points(3)
        nan = IndexPoint(
            "bad", good[0].vectors, {**good[0].payload, "product_id": "bad", "price": float("nan")}
        )
        with pytest.raises(
            PointRejected,
            match=r"^point rejected by the store: product 'bad', field 'price': failed to convert NaN",
        ):
            index.upsert([*good, nan])
        surrogate = IndexPoint("odd", good[0].vectors, {"product_id": "odd", "title": "caf\udce9"})
        with pytest.raises(
            PointRejected,
            match="point rejected by the store: product 'odd', field 'title': UnicodeEncodeError",
        ) as raised:
            index.upsert([surrogate])
        assert "\n" not in str(raised.value)
        index.upsert(good)  # the store is fine: only those points were refused
        assert index.count() == 3
        for value in (2**70, "caf\udce9"):  # beyond 64 bits; a lone surrogate (JSON can carry one)
            with pytest.raises(InvalidFilter, match="filter rejected by the store: Filters"):
                index.search(good[0].vectors, 3, Filters(equals={"brand": value}))


def test_server_backend_rejects_a_point_the_client_cannot_send() -> None:
    """The client serialises a request before sending it: a lone surrogate fails there, whatever the server
    (none listens here), and is that point's PointRejected, not a raw pydantic error."""
    from qdrant_client import models as qm

    from visrec.index.server import Connection

    conn = Connection(QdrantSettings(url="http://127.0.0.1:9", retries=1, timeout_s=1, collection="c"))
    point = qm.PointStruct(id=point_id("odd"), vector=[0.0] * DIM, payload={"title": "caf\udce9"})
    with pytest.raises(PointRejected, match="point rejected by the store: .*surrogates not allowed"):
        conn.call(conn.client.upsert, "c", points=[point], wait=True, rejecting="point")
    conn.close()


def _shop_points() -> list[IndexPoint]:
    """Products whose own columns hold values of every kind, as catalogues and writes bring them: text
    (a CSV), JSON booleans and numbers, lists, nulls, and a field holding several kinds."""
    rng = np.random.default_rng(3)
    in_stock: list[Any] = ["true", "false", True, False, 1, None, "True"]
    size: list[Any] = ["38", "40", 40, 40.0, [38, 40], "x", 42.5]
    brand: list[Any] = ["acme", "Acme", "zeta", ["acme", "zeta"], "acme "]
    points = []
    for i in range(28):
        payload: dict[str, Any] = {"product_id": f"s{i}", "category": ["shirt", "jeans"][i % 2], "price": i}
        payload |= {"in_stock": in_stock[i % 7], "size": size[(i // 2) % 7], "brand": brand[i % 5]}
        if i % 9 == 0:
            del payload["size"]
        points.append(IndexPoint(f"s{i}", rng.normal(size=DIM).astype(np.float32), payload))
    return points


_CLAUSES = st.builds(
    "{}={}".format,
    st.sampled_from(["in_stock", "size", "brand", "price", "category", "nothing"]),
    st.sampled_from(
        [
            "true",
            "false",
            "True",
            "1",
            "40",
            "40.0",
            "38..40",
            "..39",
            "40..",
            "42.5",
            "acme",
            "Acme",
            "x",
            "shirt",
        ]
    ),
)


def test_where_matches_the_rule_on_both_backends(tmp_path: Path) -> None:
    """Any `where` (one or two conditions) on fields holding text, booleans, numbers, lists and several
    kinds at once: count, browse and exact search find exactly the products `Where.matches` says, on the
    embedded engine and on qdrant-client's local mode. (Local mode ignores payload indexes: that a
    server's search through them is as exact is what `test_server_indexes_new_columns` checks there.)"""
    points = _shop_points()
    query = points[0].vectors
    with (
        open_index(QdrantSettings(path=tmp_path / "q", collection="w")) as edge,
        open_index(QdrantSettings(url=":memory:", collection="w")) as local,
    ):
        for index in (edge, local):
            index.create(DIM)
            index.upsert(points[:10])
            index.upsert(points[10:])  # kinds first seen in a later write are recorded too

        @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(st.lists(_CLAUSES, min_size=1, max_size=2))
        def check(clauses: list[str]) -> None:
            filters = Filters.parse(where=clauses)
            wheres = [Where.parse(c) for c in clauses]
            keep = [
                p
                for p in points
                if all(w.field in p.payload and w.matches(p.payload[w.field]) for w in wheres)
            ]
            expected = _exact(points, query, keep)
            for index in (edge, local):
                assert index.count(filters) == len(keep), (clauses, index)
                assert sorted(str(p["product_id"]) for p in index.all_payloads(filters)) == sorted(expected)
                assert [h.product_id for h in index.search(query, 30, filters)] == expected, (clauses, index)

        check()


@pytest.mark.parametrize("backend", ["embedded", "server-local"])
def test_new_columns_get_payload_indexes_and_their_kinds_are_recorded(tmp_path: Path, backend: str) -> None:
    """A write that first carries a field callers may see indexes it (its first value's kind: text →
    keyword, boolean → bool, number → float) and records the kinds each field holds in the collection's
    metadata, which outlives the handle; a payload rewrite does the same; sync bookkeeping and server
    paths are never indexed. The engine's facet counts values of text and boolean fields."""
    settings = QdrantSettings(path=tmp_path / "q", url=":memory:" if backend == "server-local" else None)
    points = _shop_points()
    index = open_index(settings)
    try:
        index.create(DIM)
        index.upsert(points)
        # Columns named like paths are one field each; a name no engine can address is kept, unindexed.
        odd = {"season": "winter", "in stock": "yes", "size.eu": 40, "a/b": True, 'say "hi"': "x"}
        index.overwrite_payloads({"s1": {**points[1].payload, **odd}})
        kinds = index.field_kinds()
        assert 'say "hi"' not in kinds and stored(index, "s1")[1]['say "hi"'] == "x"
        for clause in ("in stock=yes", "size.eu=40", "a/b=true", "size.eu=39..41"):
            assert index.count(Filters.parse(where=[clause])) == 1, clause
            assert [
                h.product_id for h in index.search(points[1].vectors, 3, Filters.parse(where=[clause]))
            ] == ["s1"]
        assert index.facet("in stock", 10) == [("yes", 1)]
        assert kinds["brand"] == {"text"} and kinds["season"] == {"text"} and kinds["price"] == {"number"}
        assert kinds["in_stock"] == {"text", "bool", "number"} and kinds["size"] == {"text", "number"}
        assert dict(index.facet("brand", 10) or []) == {"acme": 11, "zeta": 11, "Acme": 6, "acme ": 5}
        assert index.facet("season", 10) == [("winter", 1)]
        assert index.facet("price", 10) is None and index.facet("size", 10) is None  # numbers: no counts
        if isinstance(index, EdgeIndex):
            schema = {name: info.data_type for name, info in index.shard.info().payload_schema.items()}
            assert schema["brand"] == schema["season"] == qe.PayloadSchemaType.Keyword
            assert schema["in_stock"] == qe.PayloadSchemaType.Keyword  # its first value's kind: "true"
            assert schema["size"] == qe.PayloadSchemaType.Keyword
            assert not {"image", "images", "content_hash", "photo_files"} & set(schema)
            named = {field_of(key): kind for key, kind in schema.items()}
            assert (
                named["in stock"] == qe.PayloadSchemaType.Keyword
                and named["a/b"] == qe.PayloadSchemaType.Bool
            )
            assert named["size.eu"] == qe.PayloadSchemaType.Float
            index.close()
            index = open_index(settings)
            assert isinstance(index, EdgeIndex)
            assert index.field_kinds() == kinds  # recorded with the collection
            bools = [IndexPoint("b", points[0].vectors, {"product_id": "b", "gift": True})]
            index.upsert(bools)
            assert index.shard.info().payload_schema["gift"].data_type == qe.PayloadSchemaType.Bool
            assert index.facet("gift", 10) == [(True, 1)]
    finally:
        index.close()


@pytest.mark.integration
@pytest.mark.skipif(
    not os.environ.get("VISREC_QDRANT__URL"),
    reason="qdrant-client's local mode keeps no payload indexes and searches every point: what a server "
    "does with them needs a Qdrant server at VISREC_QDRANT__URL",
)
def test_server_indexes_new_columns() -> None:
    """On a server: a shop's own columns get payload indexes of their kind at the first write, its facet
    counts them, and filtered searches on them agree with exact search."""
    settings = QdrantSettings(
        url=os.environ["VISREC_QDRANT__URL"], collection=f"cols_{uuid.uuid4().hex[:12]}"
    )
    from qdrant_client import models as qm

    from visrec.index.server import ServerStore

    store = open_store(settings)
    assert isinstance(store, ServerStore)
    try:
        index = store.open(store.version(1))
        index.create(DIM)
        points = _shop_points()
        index.upsert(points)
        schema = store.conn.client.get_collection(index.collection).payload_schema
        assert schema["brand"].data_type == qm.PayloadSchemaType.KEYWORD
        assert dict(index.facet("brand", 10) or []) == {"acme": 11, "zeta": 11, "Acme": 6, "acme ": 5}
        for clause in ("brand=acme", "in_stock=true", "size=40", "size=38..40"):
            filters = Filters.parse(where=[clause])
            exact = [h.product_id for h in index.search(points[0].vectors, 10, filters, exact=True)]
            assert [h.product_id for h in index.search(points[0].vectors, 10, filters)] == exact, clause
    finally:
        store.conn.client.delete_collection(store.version(1))
        store.close()
