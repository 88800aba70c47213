"""A feed's state names, in its trailer, the products its lists hold without a record of their own
(`unlisted`: deleted while the feed ran), so that a delta finds them without gathering every list's
products; the trailer is under the state's checksum. Writes land in the middle of feeds and deltas
(from the progress callback, between the feed's batches: a real engine, real writes), and then a quiet
delta still makes, applied to the feeds before it, the full feed made now."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from visrec.config import QdrantSettings
from visrec.errors import Refused
from visrec.feed import read_state, state_path
from visrec.feed_run import make_feed
from visrec.index import IndexPoint, VectorIndex, open_index
from visrec.neighbours import BATCH, FeedRules

RULES = FeedRules(k=3, same=("kind",))
CLASSES = 50  # products 0-199: 50 classes of 4, each read whole into memory (`ClassMatrix`)
PRODUCTS = 200 + BATCH + 96  # the others each a class of its own: searched through the engine, 2 batches


def _kind(n: int) -> int:
    return n % CLASSES if n < 200 else n


def _point(
    product_id: str, n: int, rng: np.random.Generator, step: int = 0, kind: int | None = None
) -> IndexPoint:
    """A product's point; at step 0 the same photo and vectors hash whenever it is written (so that a
    product written, then written back, is what it was), at another step a new photo."""
    photos = (np.random.default_rng(n) if step == 0 else rng).standard_normal((1, 6)).astype(np.float32)
    chosen = _kind(n) if kind is None else kind
    payload = {"product_id": product_id, "kind": chosen, "vectors_hash": f"{product_id}-{step}"}
    return IndexPoint(product_id, photos, payload)


# (delete | add | photo | move to another class | back as it was first, which product: in a class read
# whole, or one of its own)
Write = tuple[str, int]
writes = st.lists(
    st.tuples(
        st.sampled_from(["delete", "add", "photo", "move", "back"]),
        st.sampled_from([*range(12), *range(200, 224)]),
    ),
    min_size=1,
    max_size=12,
)
# The progress callback's calls: a full feed's before its first batch, after each class read whole
# (50), after each of the engine's two batches; a delta's after reading the store, searching around
# what moved, searching the lists it makes again.
WHEN = [1, 2, CLASSES, CLASSES + 1, CLASSES + 2, CLASSES + 3]


def _writing_at(index: VectorIndex, at: int, chosen: list[Write], rng: np.random.Generator, step: int) -> Any:
    """A progress callback that makes the chosen writes at its `at`-th call (the feed goes on after)."""
    calls = [0]

    def progress(stage: str, done: int, total: int) -> None:
        calls[0] += 1
        if calls[0] != at:
            return
        for kind, n in chosen:
            product_id = f"p{n:04d}"
            if kind == "delete":
                index.delete([product_id])
            elif kind == "add":
                index.upsert([_point(f"n{step}-{n}", n, rng, step)])
            elif kind == "photo":
                index.upsert([_point(product_id, n, rng, step)])
            elif kind == "move":
                index.upsert([_point(product_id, n, rng, 0, kind=_kind(n + 1))])
            else:
                index.upsert([_point(product_id, n, rng)])

    return progress


def _lines(path: Path) -> dict[str, Any]:
    return {
        e["product_id"]: True
        if e.get("deleted")
        else [(n["product_id"], n["matched_image"], n["distance"]) for n in e["neighbours"]]
        for e in map(json.loads, path.read_text().splitlines())
    }


def _assert_applied_is_now(folder: Path, deltas: list[str]) -> None:
    """full.jsonl with the deltas applied in turn == now.jsonl: ids, order, photos matched exactly,
    distances to 1e-6."""
    applied = _lines(folder / "full.jsonl")
    for delta in deltas:
        for product_id, entry in _lines(folder / delta).items():
            if entry is True:
                applied.pop(product_id, None)
            else:
                applied[product_id] = entry
    now = _lines(folder / "now.jsonl")
    assert {p: [(n, m) for n, m, _ in e] for p, e in applied.items()} == {
        p: [(n, m) for n, m, _ in e] for p, e in now.items()
    }
    for product_id, entry in now.items():
        assert np.allclose([d for *_, d in entry], [d for *_, d in applied[product_id]], rtol=1e-6, atol=1e-6)


def _records(feed: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in state_path(feed).read_text().splitlines()[1:-1]]


def _recorded(feed: Path) -> set[str]:
    return {r["id"] for r in _records(feed)}


def _unlisted_as_it_is(feed: Path) -> set[str]:
    """The products the state's lists hold that have no record, read from its records."""
    return {n[0] for r in _records(feed) for n in r["n"]} - _recorded(feed)


@hypothesis_settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    seed=st.integers(0, 2**32 - 1),
    during_full=writes,
    full_at=st.sampled_from(WHEN),
    between=writes,
    during_delta=writes,
    delta_at=st.integers(1, 3),
    written_back=st.lists(st.sampled_from([*range(12), *range(200, 224)]), max_size=4),
)
def test_writes_during_feeds_leave_states_a_quiet_delta_makes_now_from(
    tmp_path_factory: pytest.TempPathFactory,
    seed: int,
    during_full: list[Write],
    full_at: int,
    between: list[Write],
    during_delta: list[Write],
    delta_at: int,
    written_back: list[int],
) -> None:
    """`written_back`: products moved to another class or given a new photo while a feed runs, and
    written back as they were before the next (a record that matches the store again, though lists
    made meanwhile saw them otherwise)."""
    root = tmp_path_factory.mktemp("unlisted")
    changed = [("move" if i % 2 else "photo", n) for i, n in enumerate(written_back)]
    during_full, during_delta = during_full + changed, during_delta + changed
    back = [("back", n) for n in written_back]
    rng = np.random.default_rng(seed)
    with open_index(QdrantSettings(path=root / "s", collection="c")) as index:
        index.create(6)
        index.upsert([_point(f"p{i:04d}", i, rng) for i in range(PRODUCTS)])
        make_feed(
            index,
            RULES,
            root / "full.jsonl",
            "jsonl",
            progress=_writing_at(index, full_at, during_full, rng, 1),
        )
        _writing_at(index, 1, back + between, rng, 2)("sync", 0, 0)  # a sync between the two
        make_feed(
            index,
            RULES,
            root / "delta-1.jsonl",
            "jsonl",
            since=root / "full.jsonl",
            progress=_writing_at(index, delta_at, during_delta, rng, 3),
        )
        _writing_at(index, 1, back, rng, 4)("sync", 0, 0)
        make_feed(index, RULES, root / "delta-2.jsonl", "jsonl", since=root / "delta-1.jsonl")
        make_feed(index, RULES, root / "now.jsonl", "jsonl")
    for feed in ("full.jsonl", "delta-1.jsonl", "delta-2.jsonl", "now.jsonl"):
        # every product its lists hold without a record, and none with one (a product deleted while
        # the delta ran may be named though no list holds it: it costs nothing)
        named, records = set(read_state(root / feed).trailer["unlisted"]), _recorded(root / feed)
        assert named >= _unlisted_as_it_is(root / feed) and not named & records, feed
    _assert_applied_is_now(root, ["delta-1.jsonl", "delta-2.jsonl"])


def test_a_changed_unlisted_is_refused_and_a_state_without_one_is_read(tmp_path: Path) -> None:
    """`unlisted` is under the state's checksum: changed, the delta refuses; a state from before it
    (a trailer without one, its checksum of the lines alone) is read, its lists gathered instead."""
    import hashlib

    rng = np.random.default_rng(3)
    with open_index(QdrantSettings(path=tmp_path / "s", collection="c")) as index:
        index.create(6)
        index.upsert([_point(f"p{i:04d}", i, rng) for i in range(60)])
        make_feed(index, RULES, tmp_path / "full.jsonl", "jsonl")
        index.delete(["p0007"])
        state = state_path(tmp_path / "full.jsonl")
        *lines, trailer = state.read_bytes().splitlines(keepends=True)
        end = json.loads(trailer)

        end["unlisted"] = ["p0001"]
        state.write_bytes(b"".join(lines) + json.dumps(end).encode() + b"\n")
        with pytest.raises(Refused, match="changed after it was written"):
            make_feed(index, RULES, tmp_path / "delta.jsonl", "jsonl", since=tmp_path / "full.jsonl")

        del end["unlisted"], end["written"]
        end["state_sha256"] = hashlib.sha256(b"".join(lines)).hexdigest()
        state.write_bytes(b"".join(lines) + json.dumps(end).encode() + b"\n")
        summary = make_feed(index, RULES, tmp_path / "delta.jsonl", "jsonl", since=tmp_path / "full.jsonl")
        make_feed(index, RULES, tmp_path / "now.jsonl", "jsonl")
    assert summary["deleted"] == 1
    _assert_applied_is_now(tmp_path, ["delta.jsonl"])


def test_a_product_deleted_while_a_delta_searches_its_list_is_named_for_the_lists_it_copied(
    tmp_path: Path,
) -> None:
    """q's nearest (n1-n4) are deleted, so too few of its kept products remain and the delta searches
    its list; q is deleted as the delta starts searching. p's list, copied unchanged, still holds q:
    the state must name q as a product its lists hold without a record, or the next delta would keep
    q in p's list."""
    at = {"q": (0.0, 0.0), "p": (0.0, -5.5), **{f"n{i}": (float(i), 0.0) for i in range(1, 7)}}
    at |= {f"b{j}": (0.0, -5.5 - j) for j in range(1, 6)}  # p's own nearest; q is its sixth

    def point(product_id: str) -> IndexPoint:
        x, y = at[product_id]
        photo = np.array([[x, y, 0, 0, 0, 0]], dtype=np.float32)
        return IndexPoint(
            product_id, photo, {"product_id": product_id, "kind": 0, "vectors_hash": product_id}
        )

    rules = FeedRules(k=3, same=("kind",))
    with open_index(QdrantSettings(path=tmp_path / "s", collection="c")) as index:
        index.create(6)
        index.upsert([point(p) for p in at])
        make_feed(index, rules, tmp_path / "full.jsonl", "jsonl")
        index.delete(["n1", "n2", "n3", "n4"])
        calls = [0]

        def delete_q_at_first(stage: str, done: int, total: int) -> None:
            calls[0] += 1
            if calls[0] == 1:  # the store read, no list searched yet
                index.delete(["q"])

        summary = make_feed(
            index,
            rules,
            tmp_path / "delta.jsonl",
            "jsonl",
            since=tmp_path / "full.jsonl",
            progress=delete_q_at_first,
        )
        make_feed(index, rules, tmp_path / "after.jsonl", "jsonl", since=tmp_path / "delta.jsonl")
        make_feed(index, rules, tmp_path / "now.jsonl", "jsonl")
    assert "q" in read_state(tmp_path / "delta.jsonl").trailer["unlisted"]
    assert "q" in {n[0] for r in _records(tmp_path / "delta.jsonl") if r["id"] == "p" for n in r["n"]}
    assert summary["queried"] >= 1  # q's list searched
    _assert_applied_is_now(tmp_path, ["delta.jsonl", "after.jsonl"])


def test_the_cycle_collector_pauses_while_any_feed_runs_and_resumes_after_the_last(tmp_path: Path) -> None:
    """Two feeds in two threads of one process (a service runs them as read jobs), each ending while
    the other runs in turn: the collector is off while either runs, on again once both ended."""
    import gc
    import threading

    rng = np.random.default_rng(5)
    seen: list[bool] = []
    with open_index(QdrantSettings(path=tmp_path / "s", collection="c")) as index:
        index.create(6)
        index.upsert([_point(f"p{i:04d}", i, rng) for i in range(60)])
        a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

        def feed_a() -> None:
            def progress(*_: Any) -> None:
                a_in.set()
                b_in.wait(30)  # B starts while A runs
                seen.append(gc.isenabled())

            make_feed(index, RULES, tmp_path / "a.jsonl", "jsonl", progress=progress)
            a_out.set()

        def feed_b() -> None:
            def progress(*_: Any) -> None:
                b_in.set()
                a_out.wait(30)  # A ends while B runs
                seen.append(gc.isenabled())

            a_in.wait(30)
            make_feed(index, RULES, tmp_path / "b.jsonl", "jsonl", progress=progress)

        assert gc.isenabled()
        threads = [threading.Thread(target=feed_a), threading.Thread(target=feed_b)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert seen and not any(seen)
    assert a_out.is_set() and gc.isenabled()


@pytest.mark.parametrize(
    "edit",
    [
        "no checksum",  # an outside review: a trailer without one passed every edit
        "a record of other types, checksummed again",  # the checksum is no seal: a clear refusal all the same
        "a loop of links",
    ],
)
def test_a_state_without_its_checksum_of_other_types_or_behind_a_loop_is_refused(
    tmp_path: Path, edit: str
) -> None:
    import hashlib

    rng = np.random.default_rng(4)
    with open_index(QdrantSettings(path=tmp_path / "s", collection="c")) as index:
        index.create(6)
        index.upsert([_point(f"p{i:04d}", i, rng) for i in range(30)])
        make_feed(index, RULES, tmp_path / "full.jsonl", "jsonl")
        state = state_path(tmp_path / "full.jsonl")
        header, *records, trailer = state.read_bytes().splitlines(keepends=True)
        end = json.loads(trailer)
        since = tmp_path / "full.jsonl"
        if edit == "no checksum":
            del end["state_sha256"]
            state.write_bytes(header + b"".join(records) + json.dumps(end).encode() + b"\n")
        elif edit.startswith("a record"):
            first = json.loads(records[0])
            records[0] = json.dumps({**first, "n": 7, "key": 3}).encode() + b"\n"
            lists = b"".join(
                name.encode() + b":" + json.dumps(end[name]).encode() for name in ("unlisted", "written")
            )
            end["state_sha256"] = hashlib.sha256(header + b"".join(records) + lists).hexdigest()
            state.write_bytes(header + b"".join(records) + json.dumps(end).encode() + b"\n")
        else:
            since = tmp_path / "loop-a"
            since.symlink_to(tmp_path / "loop-b")
            (tmp_path / "loop-b").symlink_to(since)
        said = {"no checksum": "changed after it was written", "a loop of links": "cannot be followed"}
        with pytest.raises(Refused, match=said.get(edit, "is damaged at byte")):
            make_feed(index, RULES, tmp_path / "delta.jsonl", "jsonl", since=since)
