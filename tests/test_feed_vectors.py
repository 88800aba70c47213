"""The photo vectors a feed keeps beside it (`FEED.vectors`): a delta reads from the engine only the
photos of products whose vectors changed, and is the delta it would be without them (previous +
delta == a full feed now); a vectors file cut short, damaged, or of another format is ignored, never
trusted and never an error; chained deltas keep what they did not read. Real embedded engine."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from tests.test_class_matrix import _assert_delta_makes_now
from visrec.config import QdrantSettings
from visrec.feed import read_state
from visrec.feed_run import make_feed
from visrec.feed_vectors import KeptVectors, Photos, kept_vectors, vectors_path
from visrec.index import IndexPoint, VectorIndex, open_index
from visrec.neighbours import FeedRules, fingerprint

RULES = FeedRules(k=3, same=("kind",))


def _catalogue(rng: np.random.Generator, n: int = 36) -> list[IndexPoint]:
    """Three classes; some products with two photos; one without a vectors hash (never kept)."""
    points = []
    for i in range(n):
        payload: dict[str, Any] = {"product_id": f"p{i:02d}", "kind": i % 3, "price": float(i)}
        if i != 5:
            payload["vectors_hash"] = f"h{i}"
        photos = rng.standard_normal((1 + (i % 4 == 0), 6)).astype(np.float32)
        points.append(IndexPoint(f"p{i:02d}", photos, payload))
    return points


def _photos(points: list[IndexPoint], chosen: Callable[[int], bool]) -> int:
    """The photos of the chosen products (by number)."""
    return sum(len(p.photo_vectors) for i, p in enumerate(points) if chosen(i))


@contextmanager
def _store(root: Path, points: list[IndexPoint]) -> Iterator[VectorIndex]:
    """An embedded store holding `points`."""
    with open_index(QdrantSettings(path=root / "s", collection="c")) as index:
        index.create(6)
        index.upsert(points)
        yield index


def _photo(point: IndexPoint, rng: np.random.Generator, step: int) -> IndexPoint:
    """The product with a new photo (and a new vectors hash, as sync records one)."""
    photos = rng.standard_normal((1, 6)).astype(np.float32)
    return IndexPoint(point.product_id, photos, {**point.payload, "vectors_hash": f"e{step}"})


def _engine_reads(index: VectorIndex, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The product ids whose vectors the engine is asked for from now on (a spy: the engine answers)."""
    asked: list[str] = []
    for name in ("vectors", "points"):
        read = getattr(index, name)

        def counted(product_ids: Any, read: Any = read) -> Any:
            asked.extend(product_ids)
            return read(product_ids)

        monkeypatch.setattr(index, name, counted)
    return asked


def test_a_delta_reads_from_the_engine_only_the_photos_that_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(3)
    feeds = tmp_path / "feeds"
    points = _catalogue(rng)
    with _store(tmp_path, points) as index:
        full = make_feed(index, RULES, feeds / "full.jsonl", "jsonl")
        assert len(KeptVectors(vectors_path(feeds / "full.jsonl"))) == len(points) - 1  # p05: no hash
        index.upsert([_photo(points[7], rng, 1), _photo(points[8], rng, 1)])
        index.delete(["p09"])
        added = {**points[9].payload, "product_id": "p99", "vectors_hash": "n99"}
        index.upsert([IndexPoint("p99", rng.standard_normal((1, 6)).astype(np.float32), added)])
        asked = _engine_reads(index, monkeypatch)
        delta = make_feed(index, RULES, feeds / "delta.jsonl", "jsonl", since=feeds / "full.jsonl")
        monkeypatch.undo()
        make_feed(index, RULES, feeds / "now.jsonl", "jsonl")
    assert full["lists_written"] == len(points)
    # Every class is read whole again (each holds a moved product); the photos of the 33 products
    # whose hashes did not change come from the file; the engine's: the moved ones, p05, and those
    # whose lists a delta searches again (their own photos, to search with).
    assert delta["photos_reused"] == _photos(points, lambda i: i not in (5, 7, 8, 9))
    searched = set(asked) - {"p07", "p08", "p99", "p05"}
    assert len(searched) <= delta["queried"]
    _assert_delta_makes_now(feeds)


def test_chained_deltas_keep_what_they_did_not_read(tmp_path: Path) -> None:
    """A delta that reads one class keeps the others' photos from the feed before it: the next delta,
    on it, still takes them from the file."""
    rng = np.random.default_rng(4)
    feeds = tmp_path / "feeds"
    points = _catalogue(rng)
    with _store(tmp_path, points) as index:
        make_feed(index, RULES, feeds / "f0.jsonl", "jsonl")
        index.upsert([_photo(points[3], rng, 1)])  # class 0 only
        first = make_feed(index, RULES, feeds / "f1.jsonl", "jsonl", since=feeds / "f0.jsonl")
        assert first["photos_reused"] == _photos(points, lambda i: i % 3 == 0 and i != 3)  # class 0
        assert len(KeptVectors(vectors_path(feeds / "f1.jsonl"))) == len(points) - 1
        index.upsert([_photo(points[4], rng, 2)])  # class 1, which the first delta did not read
        second = make_feed(index, RULES, feeds / "delta.jsonl", "jsonl", since=feeds / "f1.jsonl")
        make_feed(index, RULES, feeds / "now.jsonl", "jsonl")
    assert second["photos_reused"] == _photos(points, lambda i: i % 3 == 1 and i != 4)
    lines = {}  # the first feed with the first delta applied, as one feed
    for name in ("f0.jsonl", "f1.jsonl"):
        for line in (feeds / name).read_text().splitlines():
            lines[json.loads(line)["product_id"]] = line
    applied = [line for line in lines.values() if not json.loads(line).get("deleted")]
    (feeds / "full.jsonl").write_text("".join(f"{line}\n" for line in applied))
    _assert_delta_makes_now(feeds)


damage = st.one_of(
    st.tuples(st.just("cut"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("flip"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("replace"), st.binary(max_size=256)),
)


@hypothesis_settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(seed=st.integers(0, 2**32 - 1), how=damage)
def test_a_damaged_vectors_file_is_ignored(
    seed: int, how: tuple[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Whatever happened to the vectors file beside the previous feed (cut short anywhere, one byte
    changed anywhere, bytes added, another content), a delta raises nothing and is the delta made
    without it: it takes nothing from a file whose index does not check, and no product whose rows do
    not."""
    rng = np.random.default_rng(seed)
    root = tmp_path_factory.mktemp("damaged")
    feeds = root / "feeds"
    points = _catalogue(rng, 18)
    with _store(root, points) as index:
        make_feed(index, RULES, feeds / "full.jsonl", "jsonl")
        kept = vectors_path(feeds / "full.jsonl")
        data = bytearray(kept.read_bytes())
        kind, value = how
        if kind == "cut":
            data = data[: int(value * len(data))]
        elif kind == "flip":
            data[int(value * len(data))] ^= 1 + int(value * 1e6) % 255
        elif kind == "append":
            data += value
        else:
            data = bytearray(value)
        kept.write_bytes(bytes(data))
        whole = kind != "flip"  # a byte changed in a product's rows loses that product only
        assert len(KeptVectors(kept)) == 0 or not whole
        index.upsert([_photo(points[int(rng.integers(len(points)))], rng, 1)])
        delta = make_feed(index, RULES, feeds / "delta.jsonl", "jsonl", since=feeds / "full.jsonl")
        make_feed(index, RULES, feeds / "now.jsonl", "jsonl")
    assert delta["photos_reused"] == 0 or not whole
    _assert_delta_makes_now(feeds)


@hypothesis_settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=512), magic=st.booleans())
def test_any_bytes_read_as_a_vectors_file_or_as_none(data: bytes, magic: bool, tmp_path_factory: Any) -> None:
    """Arbitrary bytes, with or without the format's magic at their end: read as nothing kept, never an
    error."""
    from visrec.feed_vectors import MAGIC

    path = tmp_path_factory.mktemp("bytes") / "f.vectors"
    path.write_bytes(data + (MAGIC if magic else b""))
    assert len(KeptVectors(path)) == 0


def test_a_delta_that_reads_no_photo_keeps_the_file_as_it_is(tmp_path: Path) -> None:
    """After prices alone changed, a delta reads no photo: its vectors file is the previous one (a link,
    nothing copied), the next delta still takes every unchanged photo from it, and a delta written over
    its own `--since` keeps its file too."""
    rng = np.random.default_rng(5)
    feeds = tmp_path / "feeds"
    points = _catalogue(rng)
    with _store(tmp_path, points) as index:
        make_feed(index, RULES, feeds / "f0.jsonl", "jsonl")
        index.upsert([IndexPoint(p.product_id, p.photo_vectors, {**p.payload, "price": 1.0}) for p in points])
        prices = make_feed(index, RULES, feeds / "f1.jsonl", "jsonl", since=feeds / "f0.jsonl")
        assert prices["lists_written"] == 0 and prices["photos_reused"] == 0
        assert vectors_path(feeds / "f1.jsonl").samefile(vectors_path(feeds / "f0.jsonl"))
        again = make_feed(index, RULES, feeds / "f1.jsonl", "jsonl", since=feeds / "f1.jsonl")
        assert again["lists_written"] == 0
        assert len(KeptVectors(vectors_path(feeds / "f1.jsonl"))) == len(points) - 1
        index.upsert([_photo(points[3], rng, 1)])
        photos = make_feed(index, RULES, feeds / "delta.jsonl", "jsonl", since=feeds / "f1.jsonl")
        make_feed(index, RULES, feeds / "now.jsonl", "jsonl")
    assert photos["photos_reused"] == _photos(points, lambda i: i % 3 == 0 and i != 3)
    for name in ("f0.jsonl", "f1.jsonl"):  # the price delta wrote no line: f1 is f0
        assert (feeds / name).exists()
    (feeds / "full.jsonl").write_bytes((feeds / "f0.jsonl").read_bytes())
    _assert_delta_makes_now(feeds)


def test_photos_are_kept_under_the_fingerprint_read_with_them(tmp_path: Path) -> None:
    """A product whose photos changed between the class's scroll (its payload said h1) and the read of
    its vectors (now h2's) is kept under h2: kept under h1, a later return to its first photos (h1 again)
    would take h2's vectors from the file."""
    later = np.ones((1, 6), np.float32)

    def read(product_ids: Any) -> list[IndexPoint]:
        return [IndexPoint(p, later, {"product_id": p, "vectors_hash": "h2"}) for p in product_ids]

    with kept_vectors(tmp_path / "feed.jsonl") as writer:
        photos = Photos(read, lambda payload: fingerprint(payload, None), writer)
        assert photos([{"product_id": "p", "vectors_hash": "h1"}])["p"].tolist() == later.tolist()
    kept = KeptVectors(vectors_path(tmp_path / "feed.jsonl"))
    assert kept.get("p", ":h1") is None
    assert kept.get("p", ":h2") is not None


def test_a_vectors_file_of_photos_of_another_length_is_not_taken(tmp_path: Path) -> None:
    """Another store's feed vectors beside the previous feed, its products of the same ids and hashes
    but their photos of another length: nothing is taken from it (no traceback), the delta is right."""
    rng = np.random.default_rng(6)
    other = [
        IndexPoint(p.product_id, rng.standard_normal((1, 8)).astype(np.float32), p.payload)
        for p in _catalogue(rng)
    ]
    with open_index(QdrantSettings(path=tmp_path / "o", collection="c")) as index:
        index.create(8)
        index.upsert(other)
        make_feed(index, RULES, tmp_path / "other.jsonl", "jsonl")
    feeds = tmp_path / "feeds"
    points = _catalogue(rng)
    with _store(tmp_path, points) as index:
        make_feed(index, RULES, feeds / "full.jsonl", "jsonl")
        vectors_path(feeds / "full.jsonl").write_bytes(vectors_path(tmp_path / "other.jsonl").read_bytes())
        index.upsert([_photo(points[3], rng, 1)])
        delta = make_feed(index, RULES, feeds / "delta.jsonl", "jsonl", since=feeds / "full.jsonl")
        make_feed(index, RULES, feeds / "now.jsonl", "jsonl")
    assert delta["photos_reused"] == 0
    _assert_delta_makes_now(feeds)


def test_a_vectors_file_cut_or_changed_while_a_delta_reads_it_costs_only_those_photos(
    tmp_path: Path,
) -> None:
    """The file cut short, or changed in place, after a delta opened it: the photos that no longer read
    as written are taken from the engine (the file is read, not mapped: a mapping would end the process
    with SIGBUS). An outside review's case."""
    rng = np.random.default_rng(7)
    feeds = tmp_path / "feeds"
    points = _catalogue(rng)
    with _store(tmp_path, points) as index:
        make_feed(index, RULES, feeds / "full.jsonl", "jsonl")
        path = vectors_path(feeds / "full.jsonl")
        kept = KeptVectors(path)
        assert kept.get("p00", ":h0") is not None
        first = kept._entries["p00"][1] * kept.dim * 4  # where p00's photos start
        with path.open("r+b") as f:  # one byte of them changed, in place
            f.seek(first)
            byte = f.read(1)[0]
            f.seek(first)
            f.write(bytes([byte ^ 0xFF]))
        assert kept.get("p00", ":h0") is None and kept.get("p01", ":h1") is not None
        os.truncate(path, 0)
        assert kept.get("p01", ":h1") is None


def test_a_delta_through_a_link_takes_the_photos_beside_the_file_it_names(tmp_path: Path) -> None:
    """`--since latest.jsonl`, a link to the last feed (the docs' nightly line): its photos are found
    beside the file the link names, as its state is (an outside review: never found through a link)."""
    rng = np.random.default_rng(8)
    feeds = tmp_path / "feeds"
    points = _catalogue(rng)
    with _store(tmp_path, points) as index:
        make_feed(index, RULES, feeds / "full.jsonl", "jsonl")
        (feeds / "latest.jsonl").symlink_to("full.jsonl")
        index.upsert([_photo(points[3], rng, 1)])
        delta = make_feed(index, RULES, feeds / "delta.jsonl", "jsonl", since=feeds / "latest.jsonl")
        make_feed(index, RULES, feeds / "now.jsonl", "jsonl")
    assert delta["photos_reused"] == _photos(points, lambda i: i % 3 == 0 and i != 3)
    _assert_delta_makes_now(feeds)


def test_a_vectors_file_that_cannot_be_written_costs_only_the_cache(tmp_path: Path) -> None:
    """A folder where the vectors file goes: the feed and the delta over it are written and succeed
    (the cache is only logged as not written), and the delta is right."""
    rng = np.random.default_rng(9)
    feeds = tmp_path / "feeds"
    points = _catalogue(rng)
    vectors_path(feeds / "full.jsonl").mkdir(parents=True)
    with _store(tmp_path, points) as index:
        make_feed(index, RULES, feeds / "full.jsonl", "jsonl")
        shutil.copy(feeds / "full.jsonl", feeds / "first.jsonl")
        index.upsert([_photo(points[3], rng, 1)])
        delta = make_feed(index, RULES, feeds / "full.jsonl", "jsonl", since=feeds / "full.jsonl")
        make_feed(index, RULES, feeds / "now.jsonl", "jsonl")
    assert delta["photos_reused"] == 0 and vectors_path(feeds / "full.jsonl").is_dir()
    shutil.move(feeds / "full.jsonl", feeds / "delta.jsonl")
    shutil.move(feeds / "first.jsonl", feeds / "full.jsonl")
    _assert_delta_makes_now(feeds)


def test_photos_of_a_product_in_two_classes_are_counted_once(tmp_path: Path) -> None:
    rng = np.random.default_rng(10)
    points = _catalogue(rng)
    points[0] = IndexPoint("p00", points[0].photo_vectors, {**points[0].payload, "kind": [0, 1]})
    with _store(tmp_path, points) as index:
        make_feed(index, RULES, tmp_path / "full.jsonl", "jsonl")
        index.upsert([_photo(points[3], rng, 1), _photo(points[4], rng, 1)])  # classes 0 and 1 read
        delta = make_feed(index, RULES, tmp_path / "delta.jsonl", "jsonl", since=tmp_path / "full.jsonl")
    assert delta["photos_reused"] == _photos(points, lambda i: i % 3 in (0, 1) and i not in (3, 4))


def test_a_state_replaced_while_a_delta_reads_it_is_read_as_it_was(tmp_path: Path) -> None:
    """Another run replaces the previous feed's state while a delta reads it: the delta's records and
    the lines it copies are the state it opened (an outside review: it copied the new file at the old
    offsets, and wrote a state every later delta refused)."""
    rng = np.random.default_rng(11)
    points = _catalogue(rng)
    with _store(tmp_path, points) as index:
        make_feed(index, RULES, tmp_path / "x.jsonl", "jsonl")
        state = read_state(tmp_path / "x.jsonl")
        spans = [(offset, length) for _, offset, length in state.records()]
        before = [record["id"] for record in state.read_at(spans)]
        index.upsert(
            [
                IndexPoint(
                    "a-new",
                    rng.standard_normal((1, 6)).astype(np.float32),
                    {"product_id": "a-new", "vectors_hash": "n", "kind": 0},
                )
            ]
        )
        make_feed(index, RULES, tmp_path / "x.jsonl", "jsonl")  # replaces x's state
    assert [record["id"] for record in state.read_at(spans)] == before
    assert [record["id"] for record, _, _ in state.records()] == before
