"""Zero-downtime model upgrades: `reindex` builds the next collection version and switches the alias
atomically; `rollback` switches back; a running API follows, and queries during the switch never fail.
The quality gate: a version that retrieves worse than the live one is not made live (unless forced)."""

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

from tests.helpers import (
    MakeCatalogue,
    export_like,
    export_nudged,
    export_random,
    live_server,
    run_reindex,
    run_sync,
    write_csv,
)
from visrec.api import create_app
from visrec.artefact import HELDOUT_PRODUCTS, Manifest, load_artefact, read_manifest
from visrec.cli import app as cli_app
from visrec.config import GateSettings, QdrantSettings, Settings
from visrec.errors import IndexUnavailable, ModelError, VisrecError
from visrec.evaluation import choose_queries
from visrec.index import open_index, open_store
from visrec.index.server import ServerStore
from visrec.jobs import ReindexJob, RollbackJob
from visrec.versions import describe, rollback


@pytest.fixture(scope="module")
def new_model(artefact: tuple[Path, Manifest], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second real model: the session's, with every weight nudged (so its vectors differ). It retrieves
    worse than the session's (the quality gate would refuse it): the tests of the switch itself `force`."""
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

    summary = run_reindex(catalogue, settings, new_model, force=True)
    assert (summary.previous, summary.live, summary.points) == ("products__v1", "products__v2", 12)
    assert model_versions(settings) == {new}
    with open_index(settings.qdrant) as index:
        assert index.metadata()["model_version"] == new

    assert rollback(open_store(settings.qdrant))[:2] == ("products__v2", "products__v1")
    assert model_versions(settings) == {old}  # the old version was kept whole
    with pytest.raises(VisrecError, match="no version .* older"):
        rollback(open_store(settings.qdrant))

    again = run_reindex(catalogue, settings, new_model, force=True)  # v2 is reused, nothing re-embedded
    assert (again.live, again.sync.added, again.sync.unchanged) == ("products__v2", 0, 12)

    # A plain sync with another model than the live version's would mix two models in a queried
    # collection: refused, pointing at reindex. Rolled back, a reindex with the first model rebuilds v2.
    with pytest.raises(ModelError, match="built by model .*`visrec reindex"):
        run_sync(catalogue, settings)
    rollback(open_store(settings.qdrant))
    rebuilt = run_reindex(catalogue, settings, settings.artefact)  # the same model: equal figures, passed
    assert (rebuilt.live, rebuilt.sync.updated) == ("products__v2", 12) and model_versions(settings) == {old}
    assert rebuilt.gate is not None and rebuilt.gate.verdict == "passed"
    assert rebuilt.gate.live is not None and rebuilt.gate.new is not None
    assert rebuilt.gate.new.figures() == rebuilt.gate.live.figures()


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
    summary = run_reindex(catalogue, settings, new_model, force=True)
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
    run_reindex(catalogue, settings, new_model, store, force=True)
    client = store.conn.client
    assert [(a.alias_name, a.collection_name) for a in client.get_aliases().aliases] == [("shop", "shop__v2")]
    assert client.count("shop").count == 6
    assert rollback(store)[:2] == ("shop__v2", "shop__v1")
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

    app = create_app(settings, torch.device("cpu"))
    with live_server(app) as base:
        threads = [threading.Thread(target=client, args=(base, i % 2 == 1)) for i in range(4)]
        for t in threads:
            t.start()

        def answers_from(version: str) -> None:  # wait for 20 more answers from `version`'s model
            target = seen[(200, version)] + 20
            while seen[(200, version)] < target and not stop.wait(0.05):
                pass

        try:
            # Queries run during the build and the switch, which run in the service's writer (as a
            # handed-over `visrec reindex` / `rollback` would).
            writer = app.state.writes.writer
            reindex_job = ReindexJob(catalogue=catalogue, model=new_model, max_quality_drop=1.0)
            writer.run(reindex_job, lambda *_: None)
            answers_from(new)
            writer.run(RollbackJob(), lambda *_: None)
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
    done = runner.invoke(cli_app, ["reindex", str(catalogue), "--model", str(new_model), "--force", "--json"])
    assert done.exit_code == 0, done.output
    status = runner.invoke(cli_app, ["status", "--json"])
    assert '"live_version": "products__v2"' in status.output
    # A product written into v2 since the switch: v1 would serve it as it was, so rollback refuses.
    edited = catalogue.read_text().replace("10.5", "99.5").replace("p5,", "gone,")
    (catalogue.parent / "edited.csv").write_text(edited)
    monkeypatch.setenv("VISREC_ARTEFACT", str(new_model))  # v2's model
    synced = runner.invoke(cli_app, ["sync", str(catalogue.parent / "edited.csv"), "--max-delete", "1"])
    assert synced.exit_code == 0, synced.output
    refused = runner.invoke(cli_app, ["rollback"])
    assert refused.exit_code == 2, refused.output
    assert "not rolled back: 3 products differ between products__v2 and products__v1" in refused.output
    assert "'gone', 'p0', 'p5'" in refused.output and "--force" in refused.output
    back = runner.invoke(cli_app, ["rollback", "--force", "--json"])
    assert back.exit_code == 0 and '"live": "products__v1"' in back.output
    answer = json.loads(back.output[back.output.index('{\n  "') :])  # after the warning it logs
    assert answer["dropped"] == ["gone", "p0", "p5"]  # a forced rollback says what it lost
    refused = runner.invoke(cli_app, ["rollback"])
    assert refused.exit_code == 2 and "no version" in refused.output
    words = " ".join(runner.invoke(cli_app, ["rollback", "--help"]).output.replace("│", " ").split())
    assert "--force --no-force <bool> Roll back even if products written since the switch" in words


def test_the_service_keeps_only_the_models_of_live_and_held_versions(
    make_catalogue: MakeCatalogue, settings: Settings, new_model: Path
) -> None:
    """A service that followed many reindexes must not keep every model it ever loaded (~100 MB each):
    the live version's, and a replaced version's only while a reader still holds it."""
    from visrec.service import Service
    from visrec.writer import Writer

    catalogue = make_catalogue(6)
    run_sync(catalogue, settings)
    settings = settings.model_copy(update={"api": settings.api.model_copy(update={"alias_check_s": 0})})
    service = Service(settings, torch.device("cpu"))
    writer = Writer(service)
    try:
        assert service.live().model().artefact_dir == settings.artefact.resolve()
        job = ReindexJob(catalogue=catalogue, model=new_model, max_quality_drop=1.0)
        with service.reading():  # a long reader holds v1 through the switch
            writer.run(job, lambda *_: None)
            assert service.live().model().artefact_dir == new_model.resolve()
            assert service.models() == {settings.artefact.resolve(), new_model.resolve()}
        assert service.models() == {new_model.resolve()}  # v1 closed with its last reader
        writer.run(RollbackJob(), lambda *_: None)
        assert service.live().model().artefact_dir == settings.artefact.resolve()
        assert service.models() == {settings.artefact.resolve()}
    finally:
        service.close()


# --- the quality gate -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_model(artefact: tuple[Path, Manifest], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real model that learnt nothing: the session's architecture with fresh random weights."""
    out = tmp_path_factory.mktemp("random-model") / "model"
    export_random(artefact[0], out)
    return out


def with_heldout(source: Path, out: Path, heldout: list[str]) -> Path:
    """The model at `source` exported to `out` with a manifest that lists `heldout` as its held-out
    products (as `visrec train` records them)."""
    model, manifest = load_artefact(source, torch.device("cpu"))
    export_like(model, manifest, out, {**manifest.training, HELDOUT_PRODUCTS: heldout})
    return out


def cli_env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VISREC_QDRANT__PATH", str(settings.qdrant.path))
    monkeypatch.setenv("VISREC_ARTEFACT", str(settings.artefact))
    monkeypatch.setenv("VISREC_EMBED__WORKERS", "0")
    monkeypatch.setenv("VISREC_EMBED__DEVICE", "cpu")
    monkeypatch.setenv("VISREC_INGEST__FAILURE_REPORT", str(settings.ingest.failure_report))


def test_a_model_that_learnt_nothing_is_refused_unless_forced(
    make_catalogue: MakeCatalogue,
    settings: Settings,
    random_model: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`visrec reindex` with random weights: exit 3, both versions' figures printed, the live version
    unchanged and the new one kept; `status` shows both versions' figures; `--force` switches to it."""
    catalogue = make_catalogue(24)
    run_sync(catalogue, settings)
    cli_env(settings, monkeypatch)
    runner = CliRunner()
    old, new = read_manifest(settings.artefact).model_version, read_manifest(random_model).model_version

    refused = runner.invoke(cli_app, ["reindex", str(catalogue), "--model", str(random_model)])
    assert refused.exit_code == 3, refused.output
    message = " ".join(refused.stderr.split())
    assert "products__v2 not made live" in message and "more than 0.01" in message
    assert (
        f"live products__v1 ({old}): p@10 0." in message and f"new products__v2 ({new}): p@10 0." in message
    )
    assert "--force" in message and "Traceback" not in refused.output
    with open_store(settings.qdrant) as store:
        assert store.live() == "products__v1" and store.versions() == ["products__v1", "products__v2"]
    assert model_versions(settings) == {old}

    status = runner.invoke(cli_app, ["status", "--json"])
    quality = json.loads(status.stdout)["quality"]
    assert quality["products__v1"]["model_version"] == old and quality["products__v2"]["model_version"] == new
    assert quality["products__v2"]["p@10"] < quality["products__v1"]["p@10"] - 0.01
    assert quality["products__v2"]["compared_with"]["p@10"] == quality["products__v1"]["p@10"]
    assert {q["query_set"] for q in quality.values()} == {"sample"} and quality["products__v1"][
        "queries"
    ] == 24
    table = runner.invoke(cli_app, ["status"])
    assert table.exit_code == 0 and "quality products__v2" in table.stdout and "p@10" in table.stdout

    # A tolerance as large as the figures accepts it without --force; put back, --force does.
    lenient = runner.invoke(
        cli_app,
        ["reindex", str(catalogue), "--model", str(random_model), "--max-quality-drop", "1", "--json"],
    )
    assert lenient.exit_code == 0, lenient.output
    assert json.loads(lenient.stdout)["quality_gate"]["verdict"] == "passed"
    assert rollback(open_store(settings.qdrant))[:2] == ("products__v2", "products__v1")
    forced = runner.invoke(
        cli_app, ["reindex", str(catalogue), "--model", str(random_model), "--force", "--json"]
    )
    assert forced.exit_code == 0, forced.output
    done = json.loads(forced.stdout)
    assert done["live"] == "products__v2" and done["added"] == 0  # kept: nothing re-embedded
    gate = done["quality_gate"]
    assert gate["verdict"] == "forced" and gate["new"]["p@10"] < gate["live"]["p@10"] - 0.01
    assert model_versions(settings) == {new}


def test_a_better_model_switches_and_the_first_build_is_not_compared(
    make_catalogue: MakeCatalogue, settings: Settings, random_model: Path
) -> None:
    catalogue = make_catalogue(24)
    first = run_reindex(catalogue, settings, random_model)  # nothing yet: builds v1, nothing to compare
    assert first.live == "products__v1" and first.gate is not None
    assert first.gate.verdict == "nothing to compare" and "first version" in first.gate.note
    assert first.gate.live is None and first.gate.new is not None  # its own figures, recorded
    with open_store(settings.qdrant) as store:
        assert describe(store)["quality"]["products__v1"]["p@10"] == round(first.gate.new.p_at_10, 4)

    better = run_reindex(catalogue, settings, settings.artefact)  # the trained model
    assert better.live == "products__v2" and better.gate is not None and better.gate.verdict == "passed"
    assert better.gate.live is not None and better.gate.new is not None
    assert better.gate.new.p_at_10 > better.gate.live.p_at_10 and better.gate.new.queries == 24
    with open_store(settings.qdrant) as store:
        quality = describe(store)["quality"]
    assert quality["products__v1"]["model_version"] == read_manifest(random_model).model_version
    assert quality["products__v2"]["compared_with"]["p@10"] == quality["products__v1"]["p@10"]

    run_sync(catalogue, settings)  # an incremental sync into the live version keeps its figures
    with open_store(settings.qdrant) as store:
        assert describe(store)["quality"] == quality


def test_nothing_to_compare_without_categories(
    make_catalogue: MakeCatalogue, settings: Settings, random_model: Path
) -> None:
    plain = make_catalogue(9).parent / "plain.csv"
    write_csv(plain, [{"id": f"p{i}", "image": f"images/p{i}.png"} for i in range(9)])
    run_sync(plain, settings)
    summary = run_reindex(plain, settings, random_model)
    assert summary.live == "products__v2" and summary.gate is not None
    assert (summary.gate.verdict, summary.gate.live, summary.gate.new) == ("nothing to compare", None, None)
    assert "no product has a category" in summary.gate.note


def test_the_gate_queries_products_neither_model_was_trained_on(
    make_catalogue: MakeCatalogue, settings: Settings, random_model: Path, tmp_path: Path
) -> None:
    """Where both manifests list their held-out products, the queries are drawn from those both held out
    (the seeded sample only when there are too few)."""
    catalogue = make_catalogue(24)
    ids = [f"p{i}" for i in range(24)]
    live_model = with_heldout(settings.artefact, tmp_path / "live-model", ids[:18])
    new_model = with_heldout(settings.artefact, tmp_path / "new-model", ids[6:])
    run_sync(catalogue, settings.model_copy(update={"artefact": live_model}))
    gated = settings.model_copy(update={"gate": GateSettings(queries=10)})
    summary = run_reindex(catalogue, gated, new_model)
    assert summary.gate is not None and summary.gate.new is not None
    assert summary.gate.new.query_set == "held-out" and summary.gate.new.queries == 10
    assert "10 of the 12 indexed products no model measured was trained on" in summary.gate.note

    new_categories = {p: ("circle", "square", "triangle")[i % 3] for i, p in enumerate(ids)}
    chosen = choose_queries(new_categories, new_categories, set(ids[6:18]), 10, seed=0)
    assert chosen.kind == "held-out" and set(chosen.products) <= set(ids[6:18]) and len(chosen.products) == 10
    assert choose_queries(new_categories, new_categories, set(ids[6:18]), 10, seed=0) == chosen  # seeded
    too_few = choose_queries(new_categories, new_categories, {"p1", "p2"}, 10, seed=0)
    assert too_few.kind == "sample" and too_few.drawn_from == 24
    moved = {**new_categories, "p0": "square"}  # a product whose category changed is no query
    assert "p0" not in choose_queries(new_categories, moved, None, 100, seed=0).products


def test_a_reindex_needs_the_live_version(make_catalogue: MakeCatalogue, settings: Settings) -> None:
    """The embedded store admits one open handle per version: while a service holds the live one, a
    reindex run beside it (not handed over) cannot read it: neither for the gate nor for the products
    written over HTTP, which a new version without them would lose. So it stays unswitched (exit 4),
    --force included (force overrides the gate's verdict, never a lost write)."""
    from visrec.service import Service

    catalogue = make_catalogue(6)
    run_sync(catalogue, settings)
    settings = settings.model_copy(update={"qdrant": settings.qdrant.model_copy(update={"lock_wait_s": 0})})
    service = Service(settings, torch.device("cpu"))
    try:
        service.live()
        for force in (False, True):
            with pytest.raises(IndexUnavailable, match="written over HTTP into products__v1 cannot be read"):
                run_reindex(catalogue, settings, settings.artefact, force=force)
        with open_store(settings.qdrant) as store:
            assert store.live() == "products__v1"
    finally:
        service.close()


def test_rollback_refuses_when_a_product_was_patched_again_since_the_switch(
    make_catalogue: MakeCatalogue, settings: Settings
) -> None:
    """A product PATCHed before a reindex and again after it: the older version holds the first value,
    so rolling back would lose the second (an outside review saw it succeed and lose it)."""
    from prometheus_client import CollectorRegistry

    from visrec.errors import WritesWouldBeLost
    from visrec.product_writes import ProductWrites
    from visrec.service import Service
    from visrec.writer import Writer

    catalogue = make_catalogue(6)
    run_sync(catalogue, settings)
    service = Service(settings, torch.device("cpu"))
    writer = Writer(service)
    writes = ProductWrites(writer, CollectorRegistry())
    try:
        writes.patch("p0", {"title": "A"})
        job = ReindexJob(catalogue=catalogue, model=settings.artefact, max_quality_drop=1)
        writer.run(job, lambda *_: None)
        writes.patch("p0", {"title": "B"})
        writes.patch("p1", {"title": "B"})
        with pytest.raises(WritesWouldBeLost, match="2 products differ between products__v2 and products__"):
            writer.run(RollbackJob(), lambda *_: None)
        assert service.live().collection == "products__v2"
        with service.reading() as live:
            assert live.index.payloads(["p0"])["p0"]["title"] == "B"
    finally:
        service.close()


def test_rollback_refuses_when_a_product_changed_owner_since_the_switch(
    make_catalogue: MakeCatalogue, settings: Settings
) -> None:
    """A product written over HTTP with exactly its catalogue row's content changes only its owner (a
    later file sync no longer deletes it); the older version would give it back to the catalogue, so a
    rollback must refuse (an outside review saw it pass, and a later reindex delete the product)."""
    from dataclasses import replace

    from visrec.catalogue import read_catalogue
    from visrec.handle import ModelHandle
    from visrec.ingest import SyncOptions, sync

    catalogue = make_catalogue(4)
    run_sync(catalogue, settings)
    run_reindex(catalogue, settings, settings.artefact, force=True)
    rows = read_catalogue(catalogue, settings.ingest)
    rows.products = [p for p in rows.products if p.id == "p1"]
    options = replace(SyncOptions.from_settings(settings), source="api", deletes=False, optimize=False)
    with open_index(settings.qdrant) as index:  # as the service writes a PUT: the same row, owned by HTTP
        summary = sync(rows, index, ModelHandle(settings.artefact, settings.embed), options)
    assert summary.outcomes == {"p1": "metadata_updated"}
    with open_store(settings.qdrant) as store, pytest.raises(VisrecError, match="1 products differ .*'p1'"):
        rollback(store)
