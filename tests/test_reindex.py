"""Zero-downtime model upgrades: `reindex` builds the next collection version and switches the alias
atomically; `rollback` switches back; a running API follows, and queries during the switch never fail."""

from __future__ import annotations

import io
import json
import threading
from collections import Counter
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tests.helpers import MakeCatalogue, export_nudged, live_server, run_reindex, run_sync
from visrec.api import create_app
from visrec.artefact import Manifest, read_manifest
from visrec.cli import app as cli_app
from visrec.config import QdrantSettings, Settings
from visrec.errors import ModelError, VisrecError
from visrec.index import open_index, open_store
from visrec.index.server import ServerStore
from visrec.versions import rollback


@pytest.fixture(scope="module")
def new_model(artefact: tuple[Path, Manifest], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second real model: the session's, with every weight nudged (so its vectors differ)."""
    out = tmp_path_factory.mktemp("new-model") / "model"
    export_nudged(artefact[0], out)
    return out


def model_versions(settings: Settings) -> set[str]:
    with open_index(settings.qdrant) as index:
        return {str(r.model_version) for r in index.sync_records().values()}


def test_reindex_switches_and_rollback_goes_back(
    make_catalogue: MakeCatalogue, settings: Settings, new_model: Path
) -> None:
    catalogue = make_catalogue(12)
    run_sync(catalogue, settings)
    old, new = read_manifest(settings.artefact).model_version, read_manifest(new_model).model_version
    assert model_versions(settings) == {old}

    summary = run_reindex(catalogue, settings, new_model)
    assert (summary.previous, summary.live, summary.points) == ("products__v1", "products__v2", 12)
    assert model_versions(settings) == {new}
    with open_index(settings.qdrant) as index:
        assert index.metadata()["model_version"] == new

    assert rollback(open_store(settings.qdrant)) == ("products__v2", "products__v1")
    assert model_versions(settings) == {old}  # the old version was kept whole
    with pytest.raises(VisrecError, match="no version .* older"):
        rollback(open_store(settings.qdrant))

    again = run_reindex(catalogue, settings, new_model)  # back up: v2 is reused, nothing re-embedded
    assert (again.live, again.sync.added, again.sync.unchanged) == ("products__v2", 0, 12)

    # A plain sync with another model than the live version's would mix two models in a queried
    # collection: refused, pointing at reindex. Rolled back, a reindex with the first model rebuilds v2.
    with pytest.raises(ModelError, match="built by model .*`visrec reindex"):
        run_sync(catalogue, settings)
    rollback(open_store(settings.qdrant))
    rebuilt = run_reindex(catalogue, settings, settings.artefact)
    assert (rebuilt.live, rebuilt.sync.updated) == ("products__v2", 12) and model_versions(settings) == {old}


def test_reindex_does_not_go_live_with_missing_products(
    make_catalogue: MakeCatalogue, settings: Settings, new_model: Path
) -> None:
    catalogue = make_catalogue(12)
    run_sync(catalogue, settings)
    broken = catalogue.parent / "images" / "p3.png"
    good = broken.read_bytes()
    broken.write_bytes(b"not an image")
    with pytest.raises(
        VisrecError, match="products__v2 not made live: it holds 11 points .* 1 images failed"
    ):
        run_reindex(catalogue, settings, new_model)
    with open_store(settings.qdrant) as store:
        assert store.live() == "products__v1"
    broken.write_bytes(good)  # fixed: the rerun carries on in v2, embedding only what was missing
    summary = run_reindex(catalogue, settings, new_model)
    assert (summary.live, summary.sync.added, summary.points) == ("products__v2", 1, 12)


def test_server_backend_switches_a_real_qdrant_alias(
    make_catalogue: MakeCatalogue, settings: Settings, new_model: Path
) -> None:
    """qdrant-client's local mode: the alias other services would query follows the switch."""
    catalogue = make_catalogue(6)
    store = open_store(QdrantSettings(url=":memory:", collection="shop"))
    assert isinstance(store, ServerStore)
    first = run_reindex(catalogue, settings, settings.artefact, store)  # nothing yet: builds v1
    assert first.live == "shop__v1" and store.live() == "shop__v1"
    run_reindex(catalogue, settings, new_model, store)
    client = store.conn.client
    assert [(a.alias_name, a.collection_name) for a in client.get_aliases().aliases] == [("shop", "shop__v2")]
    assert client.count("shop").count == 6
    assert rollback(store) == ("shop__v2", "shop__v1")
    assert [a.collection_name for a in client.get_aliases().aliases] == ["shop__v1"]
    store.close()


def test_queries_during_the_switch_never_fail(
    make_catalogue: MakeCatalogue, settings: Settings, new_model: Path
) -> None:
    """Clients query a live server by product and by photo while reindex and rollback switch versions
    under it: every answer is a 200 whose neighbours all come from one complete version, and photo
    queries are embedded by that version's own model."""
    catalogue = make_catalogue(18)
    run_sync(catalogue, settings)
    old, new = read_manifest(settings.artefact).model_version, read_manifest(new_model).model_version
    settings = settings.model_copy(update={"api": settings.api.model_copy(update={"alias_check_s": 0})})
    photo = io.BytesIO()
    Image.open(catalogue.parent / "images" / "p4.png").save(photo, "PNG")
    seen: Counter[tuple[int, str]] = Counter()
    stop = threading.Event()

    def client(base: str, by_photo: bool) -> None:
        with httpx.Client(base_url=base, timeout=30) as http:
            while not stop.is_set():
                if by_photo:
                    r = http.post(
                        "/search/image", params={"k": 18}, files={"image": ("p.png", photo.getvalue())}
                    )
                else:
                    r = http.get("/products/p4/similar", params={"k": 17})
                hits = r.json().get("results", []) if r.status_code == 200 else []
                versions = {h["payload"]["model_version"] for h in hits}
                complete = len(hits) == (18 if by_photo else 17) and len(versions) == 1
                seen[(r.status_code, versions.pop() if complete else "incomplete")] += 1

    with live_server(create_app(settings, torch.device("cpu"))) as base:
        threads = [threading.Thread(target=client, args=(base, i % 2 == 1)) for i in range(4)]
        for t in threads:
            t.start()

        def answers_from(version: str) -> None:  # wait for 20 more answers from `version`'s model
            target = seen[(200, version)] + 20
            while seen[(200, version)] < target and not stop.wait(0.05):
                pass

        try:
            run_reindex(catalogue, settings, new_model)  # queries run during the build and the switch
            answers_from(new)
            rollback(open_store(settings.qdrant))
            answers_from(old)
        finally:
            stop.set()
            for t in threads:
                t.join()
    assert set(seen) <= {(200, old), (200, new)}, seen
    assert seen[(200, new)] > 0 and seen[(200, old)] > 0, seen
    print(f"\nFIGURE reindex: {json.dumps({f'{code} {v[:24]}': n for (code, v), n in seen.items()})}")


def test_photo_queries_refuse_a_model_that_did_not_build_the_collection(
    make_catalogue: MakeCatalogue, settings: Settings, new_model: Path, tmp_path: Path
) -> None:
    """The collection records its model; if that artefact is gone and the configured one differs,
    photo queries must fail clearly rather than compare vectors from two models."""
    from visrec.artefact import artefact_for

    catalogue = make_catalogue(6)
    run_reindex(catalogue, settings, new_model)
    with open_index(settings.qdrant) as index:
        metadata = index.metadata()
    assert artefact_for(metadata, settings.artefact) == new_model.resolve()
    with pytest.raises(ModelError, match="built by model"):
        artefact_for({**metadata, "artefact": str(tmp_path / "gone")}, settings.artefact)


def test_cli_reindex_and_rollback(
    make_catalogue: MakeCatalogue, settings: Settings, new_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    catalogue = make_catalogue(6)
    run_sync(catalogue, settings)
    monkeypatch.setenv("VISREC_QDRANT__PATH", str(settings.qdrant.path))
    monkeypatch.setenv("VISREC_ARTEFACT", str(settings.artefact))
    monkeypatch.setenv("VISREC_EMBED__WORKERS", "0")
    monkeypatch.setenv("VISREC_INGEST__FAILURE_REPORT", str(settings.ingest.failure_report))
    runner = CliRunner()
    done = runner.invoke(cli_app, ["reindex", str(catalogue), "--model", str(new_model), "--json"])
    assert done.exit_code == 0, done.output
    status = runner.invoke(cli_app, ["status", "--json"])
    assert '"live_version": "products__v2"' in status.output
    back = runner.invoke(cli_app, ["rollback", "--json"])
    assert back.exit_code == 0 and '"live": "products__v1"' in back.output
    refused = runner.invoke(cli_app, ["rollback"])
    assert refused.exit_code == 1 and "no version" in refused.output


def test_the_service_keeps_only_the_models_of_live_and_retired_versions(
    make_catalogue: MakeCatalogue, settings: Settings, new_model: Path
) -> None:
    """A service that followed many reindexes must not keep every model it ever loaded (~100 MB each):
    the live version's and those of versions retired moments ago (requests may still hold them)."""
    from visrec.service import Service

    catalogue = make_catalogue(6)
    run_sync(catalogue, settings)
    settings = settings.model_copy(update={"api": settings.api.model_copy(update={"alias_check_s": 0})})
    service = Service(settings, torch.device("cpu"))
    try:
        assert service.live().model().artefact_dir == settings.artefact.resolve()
        run_reindex(catalogue, settings, new_model)
        assert service.live().model().artefact_dir == new_model.resolve()
        assert service.models() == {settings.artefact.resolve(), new_model.resolve()}  # one retired
        service.RETIRE_AFTER_S = 0  # retired versions close at the next check
        rollback(open_store(settings.qdrant))
        assert service.live().model().artefact_dir == settings.artefact.resolve()
        assert service.models() == {settings.artefact.resolve()}
    finally:
        service.close()
