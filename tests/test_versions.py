"""`visrec status`'s figures: the live version, the versions, and the points each model made."""

from __future__ import annotations

import json

from tests.helpers import MakeCatalogue, run_sync
from visrec.artefact import read_manifest
from visrec.config import Settings
from visrec.evaluation import recorded
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
