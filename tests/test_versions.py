"""`visrec status`'s figures: the live version, the versions, and the points each model made."""

from __future__ import annotations

from tests.helpers import MakeCatalogue, run_sync
from visrec.artefact import read_manifest
from visrec.config import Settings
from visrec.index import IndexPoint, open_index, open_store
from visrec.versions import describe


def test_describe_counts_the_points_of_each_model(
    make_catalogue: MakeCatalogue, settings: Settings
) -> None:
    with open_store(settings.qdrant) as store:
        assert describe(store) == {
            "live_version": "products__v1",
            "versions": [],
            "points": 0,
            "points_by_model_version": {},
        }
    run_sync(make_catalogue(5), settings)
    model = read_manifest(settings.artefact).model_version
    with open_store(settings.qdrant) as store:
        assert describe(store)["points_by_model_version"] == {model: 5}
    with open_index(settings.qdrant) as index:  # a point some other model made (written by hand)
        found = index.get("p1")
        assert found is not None
        index.upsert([IndexPoint("p1", found[0], {**found[1], "model_version": "other"})])
    with open_store(settings.qdrant) as store:
        described = describe(store)
    assert described["points"] == 5 and described["versions"] == ["products__v1"]
    assert described["points_by_model_version"] == {model: 4, "other": 1}
