"""`visrec status`'s figures: the live version, the versions, and the points each model made."""

from __future__ import annotations

import json

import pytest

from tests.helpers import MakeCatalogue, run_sync
from visrec.artefact import read_manifest
from visrec.config import GateSettings, Settings
from visrec.evaluation import Quality, recorded, worse_by
from visrec.index import IndexPoint, open_index, open_store
from visrec.versions import describe


def test_describe_counts_the_points_of_each_model(make_catalogue: MakeCatalogue, settings: Settings) -> None:
    with open_store(settings.qdrant) as store:
        assert describe(store) == {
            "live_version": "products__v1",
            "versions": [],
            "points": 0,
            "points_by_model_version": {},
            "points_by_source": {},
            "quality": {},
            "layout": None,
        }
    run_sync(make_catalogue(5), settings)
    model = read_manifest(settings.artefact).model_version
    with open_store(settings.qdrant) as store:
        described = describe(store)
    assert described["points_by_model_version"] == {model: 5}
    assert described["points_by_source"] == {"catalogue": 5, "api": 0}
    assert described["quality"] == {"products__v1": None}  # a sync measures nothing; `reindex` does
    assert described["layout"] == {"multivector": True, "quantization": "none", "on_disk": False}
    with open_index(settings.qdrant) as index:  # a point some other model made (written by hand)
        found = index.get("p1")
        assert found is not None
        index.upsert([IndexPoint("p1", found[0], {**found[1], "model_version": "other"})])
    with open_store(settings.qdrant) as store:
        described = describe(store)
    assert described["points"] == 5 and described["versions"] == ["products__v1"]
    assert described["points_by_model_version"] == {model: 4, "other": 1}


def test_recorded_figures_are_those_of_the_model_that_built_the_version() -> None:
    figures = {"model_version": "m1", "p@10": 0.5, "map@10": 0.4, "queries": 3}
    metadata = {"model_version": "m1", "quality": json.dumps(figures)}
    assert recorded(metadata) == figures
    assert recorded({**metadata, "model_version": "m2"}) is None  # rebuilt in place by another model
    assert recorded({"model_version": "m1"}) is None and recorded({**metadata, "quality": "{"}) is None


def _quality(p_at_10: float, map_at_10: float) -> Quality:
    return Quality("m", p_at_10, map_at_10, 100, "sample", "2026-01-01T00:00:00+00:00", 0.1)


# live (P@10, mAP@10), new (P@10, mAP@10), how much lower the new one's worse figure is, written out.
GATE_CASES = [
    ((0.80, 0.70), (0.80, 0.60), 0.10),  # mAP@10 drops, P@10 the same
    ((0.80, 0.70), (0.70, 0.70), 0.10),  # P@10 drops, mAP@10 the same
    ((0.80, 0.70), (0.90, 0.65), 0.05),  # better on P@10, worse on mAP@10
    ((0.80, 0.70), (0.75, 0.90), 0.05),  # worse on P@10, better on mAP@10
    ((0.80, 0.70), (0.60, 0.40), 0.30),  # worse on both: the larger drop
    ((0.80, 0.70), (0.795, 0.70), 0.005),  # within a 0.01 tolerance
    ((0.80, 0.70), (0.85, 0.75), -0.05),  # better on both
]


@pytest.mark.parametrize(("live", "new", "drop"), GATE_CASES)
def test_the_gate_refuses_a_model_worse_on_either_figure(
    live: tuple[float, float], new: tuple[float, float], drop: float
) -> None:
    """The gate (`GateSettings`): the new version goes live only if P@10 and mAP@10 are EACH at most
    `max_quality_drop` below the live one's, so a drop on one figure alone refuses it."""
    worse = worse_by(_quality(*new), _quality(*live))
    assert worse == pytest.approx(drop, abs=1e-9)
    max_drop = GateSettings().max_quality_drop
    assert max_drop == 0.01
    each_within = all(live[i] - new[i] <= max_drop for i in (0, 1))
    assert (worse <= max_drop) is each_within
