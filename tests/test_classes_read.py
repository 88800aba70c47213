"""Which classes a feed reads whole: every class of two products or more where the engine filters each
`--same` field through a payload index (a read then costs what it finds), else the `CLASSES_READ`
largest (each read a scan of the store). A feed's state records which, so a delta made after a field
lost its index (a value of another kind written to it) searches the classes that switched again:
previous + delta == a full feed now. Real embedded engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.test_class_matrix import _assert_delta_makes_now
from visrec import class_matrix, neighbours
from visrec.config import QdrantSettings
from visrec.feed_run import make_feed
from visrec.index import IndexPoint, open_index
from visrec.neighbours import FeedRules

RULES = FeedRules(k=2, same=("kind",))


def _point(i: int, kind: Any, rng: np.random.Generator) -> IndexPoint:
    payload = {"product_id": f"p{i:02d}", "kind": kind, "vectors_hash": f"h{i}"}
    return IndexPoint(f"p{i:02d}", rng.standard_normal((1, 5)).astype(np.float32), payload)


def _loads(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The classes read whole from now on (their filters)."""
    loaded: list[Any] = []
    load = class_matrix.ClassMatrix.load

    def counted(index: Any, filters: Any, *args: Any, **kwargs: Any) -> Any:
        loaded.append(filters)
        return load(index, filters, *args, **kwargs)

    monkeypatch.setattr(class_matrix.ClassMatrix, "load", staticmethod(counted))
    return loaded


def test_every_class_is_read_whole_where_the_field_is_indexed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(neighbours, "CLASSES_READ", 2)
    rng = np.random.default_rng(0)
    feeds = tmp_path / "feeds"
    with open_index(QdrantSettings(path=tmp_path / "s", collection="c")) as index:
        index.create(5)
        index.upsert([_point(i, f"k{i % 6}", rng) for i in range(30)])  # 6 classes of text: indexed
        assert neighbours.read_limit(index, RULES) is None
        loaded = _loads(monkeypatch)
        make_feed(index, RULES, feeds / "full.jsonl", "jsonl")
        assert len(loaded) == 6
        index.upsert([_point(30, 7, rng)])  # a number in a text field: no one index serves both
        assert neighbours.read_limit(index, RULES) == 2
        loaded.clear()
        delta = make_feed(index, RULES, feeds / "delta.jsonl", "jsonl", since=feeds / "full.jsonl")
        make_feed(index, RULES, feeds / "now.jsonl", "jsonl")
        monkeypatch.undo()
    # the four classes no longer read whole are searched again, through the engine
    assert delta["queried"] >= 4 * 5
    _assert_delta_makes_now(feeds)
