from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from tests.faults.helpers import fork_run
from tests.helpers import MakeCatalogue, cpu_embedder, draw_product, run_sync, stored
from visrec.background import BackgroundWriter
from visrec.config import Settings
from visrec.errors import CatalogueError, IndexUnavailable, VisrecError
from visrec.index import IndexPoint, VectorIndex, open_index
from visrec.index.edge import EdgeIndex
from visrec.ingest import PAYLOAD_VERSION, Shard, SyncSummary


def rewrite(path: Path, edit: Callable[[dict[str, str]], dict[str, str] | None]) -> None:
    with path.open() as f:
        rows = list(csv.DictReader(f))
    rows = [r for r in map(edit, rows) if r is not None]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_first_sync_then_nothing_to_do(make_catalogue: MakeCatalogue, settings: Settings) -> None:
    catalogue = make_catalogue(24)
    first = run_sync(catalogue, settings)
    assert (first.added, first.updated, first.deleted, first.unchanged, first.failed) == (24, 0, 0, 0, 0)
    assert 0 <= first.optimize_seconds <= first.seconds  # the closing optimize(), timed apart
    again = run_sync(catalogue, settings)
    assert (again.added, again.updated, again.deleted, again.unchanged, again.failed) == (0, 0, 0, 24, 0)
    assert again.optimize_seconds == 0  # nothing changed: no optimize()
    with open_index(settings.qdrant) as index:
        assert index.count() == 24
        _, payload = stored(index, "p5")
        assert payload["category"] == "triangle" and payload["price"] == 15.5
        assert payload["model_version"] == first.model_version
        version, _, digest = payload["vectors_hash"].partition(":")
        assert version == str(PAYLOAD_VERSION) and len(digest) == 64
        assert len(payload["metadata_hash"]) == 64 and "content_hash" not in payload
        [(ref, size, _, _, _, sha)] = payload["photo_files"]
        assert ref == payload["image"] and size == Path(ref).stat().st_size and len(sha) == 64


def test_a_new_payload_version_reprocesses(
    make_catalogue: MakeCatalogue, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    catalogue = make_catalogue(4)
    run_sync(catalogue, settings)
    monkeypatch.setattr("visrec.plan.PAYLOAD_VERSION", PAYLOAD_VERSION + 1)
    summary = run_sync(catalogue, settings)
    assert (summary.updated, summary.unchanged) == (4, 0)


def test_an_unchanged_resync_never_loads_the_model(make_catalogue: MakeCatalogue, settings: Settings) -> None:
    catalogue = make_catalogue(6)
    run_sync(catalogue, settings)
    embedder = cpu_embedder(settings)
    run_sync(catalogue, settings, embedder=embedder, max_delete=1.0)
    assert embedder._model is None


def test_changes_and_removals_are_detected(
    make_catalogue: MakeCatalogue, settings: Settings, tmp_path: Path
) -> None:
    catalogue = make_catalogue(12)
    run_sync(catalogue, settings)
    draw_product(tmp_path / "images" / "p1.png", "circle", "green", variant=99)  # new photo
    rewrite(
        catalogue,
        lambda r: (
            None
            if r["id"] in {"p10", "p11"}
            # removed
            else {**r, "price": "99"}
            if r["id"] == "p2"
            else r
        ),
    )  # new price
    with catalogue.open("a") as f:
        f.write("p12,images/p0.png,circle,red,1,\n")  # a new product
    with open_index(settings.qdrant) as index:
        before = stored(index, "p2")
    summary = run_sync(catalogue, settings, max_delete=1.0)
    assert (summary.added, summary.updated, summary.metadata_updated) == (1, 1, 1)
    assert (summary.deleted, summary.unchanged) == (2, 8)
    with open_index(settings.qdrant) as index:
        assert index.count() == 11
        vectors, after = stored(index, "p2")
        # A price change rewrites the payload in place: same vectors, colour fields kept.
        assert after["price"] == 99 and np.array_equal(vectors, before[0])
        assert {k: v for k, v in after.items() if k not in ("price", "metadata_hash")} == {
            k: v for k, v in before[1].items() if k not in ("price", "metadata_hash")
        }
        assert index.get("p10") is None


def test_a_new_model_version_re_embeds(
    make_catalogue: MakeCatalogue, settings: Settings, tmp_path: Path
) -> None:
    catalogue = make_catalogue(4)
    run_sync(catalogue, settings)
    with open_index(settings.qdrant) as index:  # as if an older model had made these points
        records = index.sync_records()
        points = [(pid, stored(index, pid)) for pid in records]
        index.upsert([IndexPoint(pid, got[0], {**got[1], "model_version": "old"}) for pid, got in points])
    summary = run_sync(catalogue, settings)
    assert (summary.added, summary.updated, summary.unchanged) == (0, 4, 0)


def test_bad_rows_and_images_are_reported_and_the_rest_indexed(
    make_catalogue: MakeCatalogue,
    settings: Settings,
    tmp_path: Path,
) -> None:
    catalogue = make_catalogue(6)
    (tmp_path / "images" / "empty.png").write_bytes(b"")
    (tmp_path / "images" / "text.jpg").write_text("not an image")
    with catalogue.open("a") as f:
        f.write("bad1,images/missing.png,circle,red,1,\n")
        f.write("bad2,images/empty.png,circle,red,1,\n")
        f.write("bad3,images/text.jpg,circle,red,1,\n")
        f.write("bad4,images/p0.png,circle,red,not-a-price,\n")
    summary = run_sync(catalogue, settings)
    assert (summary.added, summary.failed, summary.invalid_rows) == (6, 3, 1)
    report = [json.loads(line) for line in settings.ingest.failure_report.read_text().splitlines()]
    assert {(r["kind"], r["product_id"]) for r in report} == {
        ("row", "bad4"),
        ("image", "bad1"),
        ("image", "bad2"),
        ("image", "bad3"),
    }
    assert any("file not found" in r["error"] for r in report)


def test_a_row_gone_bad_does_not_delete_its_product(
    make_catalogue: MakeCatalogue, settings: Settings
) -> None:
    catalogue = make_catalogue(3)
    run_sync(catalogue, settings)
    rewrite(catalogue, lambda r: {**r, "price": "oops"} if r["id"] == "p1" else r)
    summary = run_sync(catalogue, settings)
    assert (summary.deleted, summary.invalid_rows) == (0, 1)
    with open_index(settings.qdrant) as index:
        assert index.get("p1") is not None


def test_a_catalogue_with_no_valid_row_deletes_nothing(
    make_catalogue: MakeCatalogue, settings: Settings, tmp_path: Path
) -> None:
    run_sync(make_catalogue(3), settings)
    report = settings.ingest.failure_report
    report.write_text('{"from": "an earlier run"}\n')
    broken = tmp_path / "broken.csv"
    broken.write_text("id,image,price\n" + "".join(f"a{n},x.png,bad\n" for n in range(5)))
    with pytest.raises(CatalogueError, match="no valid product") as refused:
        run_sync(broken, settings)
    # Why, said at once, and the whole of it in this run's report (not an earlier run's).
    assert "line 2: " in str(refused.value) and "'bad' is not a price" in str(refused.value)
    assert f"all in {report.absolute()}" in str(refused.value)
    assert [json.loads(line)["line"] for line in report.read_text().splitlines()] == [2, 3, 4, 5, 6]
    with open_index(settings.qdrant) as index:
        assert index.count() == 3


@pytest.mark.parametrize(
    "damage",
    [
        "p9,images/p9.png,circle,red,1,extra,cells\n",  # shifted cells: the id cannot be trusted
        ',,,,,\n"unclosed,images/p0.png,circle,red,1,t\n',  # a stray quote
        ",images/p0.png,circle,red,1,no id\n",
    ],
)
def test_an_unreadable_row_holds_back_every_delete(
    make_catalogue: MakeCatalogue, settings: Settings, damage: str
) -> None:
    """Deletes are earned: a row that cannot be read, or has no id, could be any product, so the run
    deletes nothing and says so; once the row is fixed, the removed products go."""
    catalogue = make_catalogue(10)
    run_sync(catalogue, settings)
    rewrite(catalogue, lambda r: None if r["id"] in {"p8", "p9"} else r)
    clean = catalogue.read_text()
    catalogue.write_text(clean + damage)
    summary = run_sync(catalogue, settings)
    assert (summary.deleted, summary.deletes_held_back) == (0, 2)
    with open_index(settings.qdrant) as index:
        assert index.count() == 10
    catalogue.write_text(clean)
    summary = run_sync(catalogue, settings, max_delete=1.0)
    assert (summary.deleted, summary.deletes_held_back) == (2, 0)


def test_a_truncated_export_deletes_nothing(
    make_catalogue: MakeCatalogue, settings: Settings, tmp_path: Path
) -> None:
    """A feed job that died half-way: more than max_delete of the indexed products would go. Nothing is
    written (not even the new products), the error says how many and how to allow it."""
    catalogue = make_catalogue(10)
    run_sync(catalogue, settings)
    truncated = tmp_path / "truncated.csv"
    truncated.write_text("".join(catalogue.read_text().splitlines(keepends=True)[:6]))  # header + 5 rows
    with truncated.open("a") as f:
        f.write("new1,images/p0.png,circle,red,1,new\n")
    expected = r"would delete 5 of the 10 indexed products \(50%\).*--max-delete 1"
    with pytest.raises(CatalogueError, match=expected):
        run_sync(truncated, settings, max_delete=0.2)
    with open_index(settings.qdrant) as index:
        assert index.count() == 10 and index.get("new1") is None
    assert run_sync(truncated, settings, max_delete=0.5).deleted == 5
    assert run_sync(catalogue, settings, max_delete=0.2).added == 5  # additions are never limited


def test_the_mass_delete_guard_counts_per_shard(make_catalogue: MakeCatalogue, settings: Settings) -> None:
    """Two of the shard's products go: a small share of the index, a large one of the shard."""
    catalogue = make_catalogue(20)
    shard = Shard(0, 2)
    run_sync(catalogue, settings)
    in_shard = [f"p{i}" for i in range(20) if f"p{i}" in shard]
    rewrite(catalogue, lambda r: None if r["id"] in in_shard[:2] else r)
    share = 2 / len(in_shard)
    with pytest.raises(CatalogueError, match="would delete 2 of the"):
        run_sync(catalogue, settings, shard=shard, max_delete=share * 0.9)
    assert run_sync(catalogue, settings, shard=shard, max_delete=share).deleted == 2


def test_the_mass_delete_guard_counts_the_catalogues_own_products(
    make_catalogue: MakeCatalogue, settings: Settings
) -> None:
    """A store of 10 catalogue products and 30 written over HTTP (source "api": the writer's sync, no
    deletes). A file sync dropping 3 of the catalogue's 10 deletes 30% of what it owns, though only 7.5% of
    every point: with --max-delete 0.25 it is refused, and nothing is deleted, the API's products least."""
    catalogue = make_catalogue(10)  # p0..p9
    run_sync(catalogue, settings)
    api = run_sync(make_catalogue(30, "api.csv", start=10), settings, source="api", deletes=False)
    assert api.added == 30
    with open_index(settings.qdrant) as index:
        assert index.count() == 40
        assert {stored(index, f"p{i}")[1]["source"] for i in range(10, 40)} == {"api"}
        assert {stored(index, f"p{i}")[1]["source"] for i in range(10)} == {"catalogue"}
    rewrite(catalogue, lambda r: None if r["id"] in ("p0", "p1", "p2") else r)
    with pytest.raises(CatalogueError, match=r"would delete 3 of the 10 indexed products \(30%\)"):
        run_sync(catalogue, settings, max_delete=0.25)
    with open_index(settings.qdrant) as index:
        assert index.count() == 40 and all(index.get(f"p{i}") is not None for i in range(40))
    summary = run_sync(catalogue, settings, max_delete=0.3)  # 3 of 10 is allowed at 30%
    assert summary.deleted == 3
    with open_index(settings.qdrant) as index:
        assert index.count() == 37 and all(index.get(f"p{i}") is None for i in range(3))


def test_killed_sync_is_finished_by_a_rerun(
    make_catalogue: MakeCatalogue, settings: Settings, tmp_path: Path
) -> None:
    """SIGKILL a real `visrec sync` process after its first batches land, rerun, check every product once."""
    catalogue = make_catalogue(120)
    env = {
        **os.environ,
        "VISREC_ARTEFACT": str(settings.artefact),
        "VISREC_QDRANT__PATH": str(settings.qdrant.path),
        "VISREC_EMBED__BATCH_SIZE": "4",
        "VISREC_EMBED__WORKERS": "0",
        "VISREC_EMBED__DEVICE": "cpu",
        "VISREC_INGEST__FAILURE_REPORT": str(tmp_path / "f.jsonl"),
        "COLUMNS": "200",
    }
    argv = ["-v", "sync", str(catalogue), "--json"]
    # Real processes, forked from the fork server that has imported visrec and torch (their start saved).
    victim = fork_run(argv, env, tmp_path / "victim", {"after_upserts": 3, "delay_s": 0})
    assert victim["killed"], (tmp_path / "victim.err").read_text()
    with open_index(settings.qdrant) as index:
        partial = index.count()
    assert 12 <= partial < 120  # killed mid-run, with work done

    rerun = fork_run(argv, env, tmp_path / "rerun", None)
    assert rerun["status"] == 0, (tmp_path / "rerun.err").read_text()
    summary = json.loads((tmp_path / "rerun.out").read_text())
    assert summary["added"] == 120 - partial and summary["unchanged"] == partial
    with open_index(settings.qdrant) as index:
        records = index.sync_records()
        assert index.count() == 120 == len(records)
        assert sorted(records) == sorted(f"p{i}" for i in range(120))


def test_colour_is_extracted_and_the_catalogue_colour_wins(
    make_catalogue: MakeCatalogue, settings: Settings
) -> None:
    catalogue = make_catalogue(9)  # drawn in red, blue or green on white; the catalogue says which
    rewrite(catalogue, lambda r: {**r, "colour": "crimson"} if r["id"] == "p0" else r)
    run_sync(catalogue, settings)
    with open_index(settings.qdrant) as index:
        for product_id, _ in index.sync_records().items():
            payload = stored(index, product_id)[1]
            drawn = ["red", "blue", "green"][(int(product_id[1:]) // 3) % 3]
            assert payload["colour_extracted"] == drawn, product_id
            assert payload["colour"] == ("crimson" if product_id == "p0" else drawn)
            assert len(payload["colour_histogram"]) == 12 and len(payload["colour_rgb"]) == 3


def test_extracted_colour_is_filterable_without_a_colour_column(
    make_catalogue: MakeCatalogue, settings: Settings
) -> None:
    catalogue = make_catalogue(9)
    rewrite(catalogue, lambda r: {k: v for k, v in r.items() if k != "colour"})
    run_sync(catalogue, settings)
    from visrec.filters import Filters

    with open_index(settings.qdrant) as index:
        assert index.count(Filters(colour=["blue"])) == 3


@pytest.mark.parametrize("text", ["4/4", "-1/2", "a/b", "1", "1/0", ""])
def test_bad_shard_specs(text: str) -> None:
    with pytest.raises(VisrecError, match="i/N"):
        Shard.parse(text)


def test_shards_partition_the_catalogue() -> None:
    ids = [f"sku-{i}" for i in range(2000)]
    shards = [Shard.parse(f"{i}/4") for i in range(4)]
    owners = [[s.index for s in shards if product_id in s] for product_id in ids]
    assert all(len(o) == 1 for o in owners)  # exactly one shard each
    sizes = [sum(o == [i] for o in owners) for i in range(4)]
    assert min(sizes) > 400  # and balanced (500 each on average)
    assert all(p in Shard() for p in ids)  # the default shard is everything


def test_n_sharded_workers_cover_everything_once(
    make_catalogue: MakeCatalogue, settings: Settings, tmp_path: Path
) -> None:
    catalogue = make_catalogue(30)

    def sync_shard(text: str) -> SyncSummary:
        return run_sync(catalogue, settings, shard=Shard.parse(text), max_delete=1.0)

    summaries = [sync_shard(f"{i}/3") for i in range(3)]
    assert sum(s.added for s in summaries) == 30 and all(s.added > 0 for s in summaries)
    with open_index(settings.qdrant) as index:
        assert sorted(index.sync_records()) == sorted(f"p{i}" for i in range(30))
    # A product removed from the catalogue is deleted by its own shard's worker, not by the others.
    gone = next(f"p{i}" for i in range(30) if f"p{i}" in Shard(1, 3))
    rewrite(catalogue, lambda r: None if r["id"] == gone else r)
    assert sync_shard("0/3").deleted == 0 and sync_shard("2/3").deleted == 0
    assert sync_shard("1/3").deleted == 1
    with open_index(settings.qdrant) as index:
        assert index.count() == 29


def test_background_writer_writes_everything_in_order() -> None:
    written: list[int] = []
    with BackgroundWriter(written.append, max_pending=2) as writer:
        for i in range(50):
            writer.put(i)
    assert written == list(range(50))


def test_a_write_error_reaches_the_producer_without_deadlock() -> None:
    def write(item: int) -> None:
        if item == 3:
            raise IndexUnavailable("store gone")

    started = time.monotonic()
    with (
        pytest.raises(IndexUnavailable, match="store gone"),
        BackgroundWriter(write, max_pending=1) as writer,
    ):
        for i in range(1000):  # far more than the queue holds: a stuck producer would hang here
            writer.put(i)
    assert time.monotonic() - started < 5


def test_a_producer_error_stops_the_writer() -> None:
    written: list[int] = []
    with pytest.raises(RuntimeError, match="decode failed"), BackgroundWriter(written.append) as writer:
        writer.put(1)
        raise RuntimeError("decode failed")
    assert written == [1]  # what was queued before the error is still written; the thread has ended


def test_a_failing_store_stops_the_sync_with_its_error(
    make_catalogue: MakeCatalogue, settings: Settings
) -> None:
    class BrokenIndex(EdgeIndex):  # a real store whose writes fail, as a server going away would
        def upsert(self, points: Sequence[IndexPoint]) -> None:
            raise IndexUnavailable("Qdrant at test is unreachable")

    with (
        BrokenIndex(settings.qdrant.path, "c") as index,
        pytest.raises(IndexUnavailable, match="unreachable"),
    ):
        run_sync(make_catalogue(20), settings, index=index, max_delete=1.0)


def test_checksum_finds_the_one_change_the_quick_check_misses(
    make_catalogue: MakeCatalogue, settings: Settings, tmp_path: Path
) -> None:
    """A photo rewritten with other bytes of the same size and its modification time set back: the quick
    check (size, time, file identity) cannot see it; `--checksum` can."""
    catalogue = make_catalogue(3)
    photo, other = tmp_path / "images" / "p1.png", tmp_path / "other.png"
    draw_product(other, "square", "blue", variant=55)
    size = max(photo.stat().st_size, other.stat().st_size) + 8  # PNG readers ignore bytes after IEND
    for path in (photo, other):
        path.write_bytes(path.read_bytes().ljust(size, b"\0"))
    run_sync(catalogue, settings)
    stat = photo.stat()
    with photo.open("r+b") as f:  # same file, same size, other bytes
        f.write(other.read_bytes())
    os.utime(photo, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    missed = run_sync(catalogue, settings)
    assert (missed.updated, missed.unchanged, missed.photo_bytes_read) == (0, 3, 0)
    found = run_sync(catalogue, settings, checksum=True)
    assert (found.updated, found.unchanged) == (1, 2) and found.photo_bytes_read >= 3 * size - 16


@pytest.mark.parametrize(
    ("removed", "indexed", "max_delete", "refused"),
    [
        (2, 10, 0.2, False),  # exactly the share allowed
        (3, 10, 0.2, True),
        (1, 10, 0.0, True),  # --max-delete 0: no delete at all
        (0, 10, 0.0, False),
        (0, 0, 0.0, False),  # an empty index: nothing to delete, nothing refused
        (10, 10, 1.0, False),
    ],
)
def test_the_delete_guard_refuses_more_than_its_share(
    tmp_path: Path, removed: int, indexed: int, max_delete: float, refused: bool
) -> None:
    """`_check_deletes` alone (the syncs above drive it through a store): a plan deleting more than
    `max_delete` of the indexed products is refused with the counts and the way out, and the rows that
    failed are reported; at or under the share it passes and writes nothing."""
    from visrec.catalogue import Catalogue
    from visrec.config import IngestSettings
    from visrec.ingest import SyncOptions, _check_deletes
    from visrec.plan import SyncPlan

    catalogue = Catalogue(tmp_path / "shop.csv")
    plan = SyncPlan(removed=[f"p{i}" for i in range(removed)])
    report = tmp_path / "failures.jsonl"
    failures = [{"kind": "row", "line": 3, "product_id": "x", "error": "bad"}]
    options = SyncOptions(IngestSettings(), report, max_delete)
    if not refused:
        _check_deletes(catalogue, plan, indexed, options, failures)
        assert not report.exists()
        return
    with pytest.raises(CatalogueError) as raised:
        _check_deletes(catalogue, plan, indexed, options, failures)
    share = f"{removed / indexed:.0%}"
    assert str(raised.value) == (
        f"{catalogue.path}: this sync would delete {removed} of the {indexed} indexed products ({share}), "
        f"more than --max-delete {max_delete:g} allows; nothing was changed. If the catalogue really "
        "dropped them, rerun with --max-delete 1"
    )
    assert [json.loads(line) for line in report.read_text().splitlines()] == failures


def test_payload_rewrites_are_units_and_a_write_between_them_stands(
    make_catalogue: MakeCatalogue, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beside a service's other writes (a `Writing`), a price-only sync rewrites payloads a page per unit
    (an outside review saw a PATCH wait 8 s for all 20,000 at once); a product written between the plan
    and its page (here, a PATCH between units) is left as that write made it, not set back."""
    from contextlib import contextmanager

    from visrec import ingest, payload
    from visrec.catalogue import read_catalogue
    from visrec.handle import ModelHandle
    from visrec.ingest import SyncOptions, sync

    catalogue = make_catalogue(6)
    run_sync(catalogue, settings)
    catalogue.write_text(catalogue.read_text().replace(".5,", ".75,"))  # every price changes
    monkeypatch.setattr(ingest, "REWRITE_PAGE", 2)
    units = 0
    with open_index(settings.qdrant) as index:

        @contextmanager
        def writing() -> Iterator[VectorIndex]:
            nonlocal units
            units += 1
            if units == 3:  # the plan, the first page, then another writer's PATCH of a later page's p5
                old = index.payloads(["p5"])["p5"]
                index.overwrite_payloads(
                    {"p5": payload.patched(old, {**payload.catalogue_fields(old), "price": 1})}
                )
            yield index

        options = SyncOptions.from_settings(settings)
        summary = sync(
            read_catalogue(catalogue), writing, ModelHandle(settings.artefact, settings.embed), options
        )
        prices = {p: v["price"] for p, v in index.payloads([f"p{i}" for i in range(6)]).items()}
    assert units >= 4  # the plan, then 3 pages of 2
    assert summary.metadata_updated == 6
    assert prices == {**{f"p{i}": 10 + i + 0.75 for i in range(5)}, "p5": 1}
