"""Backups of a live store (issue #33): `visrec snapshot` and `visrec restore` as real processes on a real
embedded store, alone and beside a real `visrec serve` while readers poll and HTTP writes flow; damaged,
truncated and foreign snapshots refused with the live version untouched; kill -9 during either; the
server backend as far as qdrant-client's local mode goes (in this process: its store is the process's)."""

from __future__ import annotations

import json
import shutil
import signal
import stat
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.faults.helpers import run_visrec, settings_env, spawn_visrec
from tests.faults.served import Served, serve, synced_store
from tests.helpers import run_sync, write_csv
from visrec.archive import Archive, checksum_file, now
from visrec.artefact import Manifest
from visrec.config import QdrantSettings, Settings
from visrec.filters import Filters
from visrec.index import IndexPoint, open_index, open_store
from visrec.query import similar_to_product
from visrec.snapshot import CUT_ALONE, CUT_COPY, CUT_SCROLL, Cut, restore, take, version_record

WRITE_KEY = "snapshot-write-key"


def visrec(settings: Settings, *args: str, code: int = 0) -> Any:
    """`visrec ARGS --json` as a process of its own; its JSON answer (it must end with `code`)."""
    done = run_visrec(settings, *args, "--json")
    assert done.returncode == code, (args, done.stderr)
    return json.loads(done.stdout)


def refused(settings: Settings, *args: str, code: int = 2) -> str:
    """`visrec ARGS`, which must refuse with `code` and one line on stderr (after any progress bar); that
    line."""
    done = run_visrec(settings, *args)
    assert done.returncode == code, (args, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == lines[-1:] and "Traceback" not in done.stderr, done.stderr
    return errors[0]


def similar_all(settings: Settings, products: list[str]) -> dict[str, Any]:
    """Each product's 5 nearest (ids, distances, payloads), read here (no service runs)."""
    with open_index(settings.qdrant) as index:
        return {p: similar_to_product(index, p, 5, Filters()) for p in products}


def store_state(settings: Settings) -> tuple[str, list[str], int]:
    """The live version, the versions, and the live version's points, read here (no service runs)."""
    with open_store(settings.qdrant) as store, store.open(store.live()) as index:
        return store.live(), store.versions(), index.count()


def with_store(settings: Settings, path: Path, artefact: Path | None = None) -> Settings:
    return settings.model_copy(
        update={"qdrant": QdrantSettings(path=path), "artefact": artefact or settings.artefact}
    )


@pytest.fixture
def own_model(tmp_path: Path, artefact: tuple[Path, Manifest]) -> Path:
    """A copy of the session's model that this test may remove (a machine losing its model)."""
    return Path(shutil.copytree(artefact[0], tmp_path / "models" / "current"))


def test_a_snapshot_restores_the_version_it_was_taken_of(
    tmp_path: Path, artefact: tuple[Path, Manifest], own_model: Path
) -> None:
    settings = with_store(synced_store(tmp_path, own_model, n=12), tmp_path / "qdrant")
    products = [f"p{i}" for i in range(12)]
    before = similar_all(settings, products)
    taken = visrec(settings, "snapshot", str(tmp_path / "snaps"))
    path = Path(taken["snapshot"])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and taken["points"] == 12 == taken["photos"]
    assert checksum_file(path).read_text().split() == [taken["sha256"], path.name]  # `sha256sum -c` reads it
    header = Archive.open(path).header
    assert header.cut["holds"] == CUT_ALONE and header.dim == 1000 and header.points == 12
    assert header.collection == {
        "name": "products",
        "version": "products__v1",
        "live": "products__v1",
        "versions": ["products__v1"],
    }
    assert header.model and header.model["weights_sha256"] == artefact[1].weights_sha256
    assert header.model["manifest"]["model_version"] == artefact[1].model_version
    assert header.engine.startswith("qdrant-edge-py") and header.visrec_version
    with tarfile.open(path) as tar:  # the points and the header: nothing of the store's folder or machine
        names = tar.getnames()
    assert {n.split("/")[0] for n in names} == {"points", "header.json"}, names

    # Written since: a product deleted, a price changed. A restore would drop both: it needs --force.
    rows = [
        {"id": f"p{i}", "image": f"images/p{i}.png", "category": "circle", "price": 10 + i} for i in range(12)
    ]
    rows = [r for r in rows if r["id"] != "p0"]
    run_sync(write_csv(tmp_path / "edited.csv", rows), settings, max_delete=1.0)
    line = refused(settings, "restore", str(path))
    assert "products differ between the live products__v1 and the snapshot" in line and "--force" in line
    assert store_state(settings) == ("products__v1", ["products__v1"], 11)
    restored = visrec(settings, "restore", str(path), "--force")
    assert (restored["previous"], restored["live"], restored["points"]) == (
        "products__v1",
        "products__v2",
        12,
    )
    assert restored["dropped"] == 9  # p0 back, and the 8 whose category the edit changed (all circles)
    assert similar_all(settings, products) == before
    rolled = visrec(settings, "rollback", "--force")  # a restore is undone like a reindex
    assert (rolled["live"], len(rolled["dropped"])) == ("products__v1", 9)
    assert store_state(settings)[2] == 11

    # Another machine: an empty store, the model deployed under another path, the recorded one gone.
    shutil.rmtree(own_model)
    deployed = Path(shutil.copytree(artefact[0], tmp_path / "elsewhere" / "model"))
    other = with_store(settings, tmp_path / "other" / "qdrant", deployed)
    onto_empty = visrec(other, "restore", str(path))
    assert (onto_empty["previous"], onto_empty["live"], onto_empty["model"]) == (
        None,
        "products__v1",
        str(deployed),
    )
    assert similar_all(other, products) == before


def test_a_snapshot_with_its_model_restores_where_the_model_is_not(
    tmp_path: Path, artefact: tuple[Path, Manifest], own_model: Path
) -> None:
    settings = with_store(synced_store(tmp_path, own_model, n=6), tmp_path / "qdrant")
    plain = Path(visrec(settings, "snapshot", str(tmp_path / "snaps"))["snapshot"])
    carried = visrec(settings, "snapshot", str(tmp_path / "snaps"), "--with-model", "--keep", "1")
    assert carried["model_included"] and carried["removed"] == [plain.name]  # --keep 1: the older one goes
    assert sorted(p.name for p in (tmp_path / "snaps").iterdir()) == sorted(
        [Path(carried["snapshot"]).name, Path(carried["snapshot"]).name + ".sha256"]
    )
    before = similar_all(settings, ["p0", "p3"])
    shutil.rmtree(own_model)
    elsewhere = with_store(settings, tmp_path / "other" / "qdrant", tmp_path / "other" / "models" / "current")
    shutil.copy(Path(carried["snapshot"]), tmp_path / "carried.visrec.tar")
    shutil.copy(checksum_file(Path(carried["snapshot"])), checksum_file(tmp_path / "carried.visrec.tar"))
    restored = visrec(elsewhere, "restore", str(tmp_path / "carried.visrec.tar"))
    model = Path(restored["model"])
    assert model.parent == tmp_path / "other" / "models" and (model / "manifest.json").is_file()
    assert similar_all(elsewhere, ["p0", "p3"]) == before


def test_damaged_foreign_or_modelless_snapshots_are_refused(
    tmp_path: Path, artefact: tuple[Path, Manifest], own_model: Path
) -> None:
    settings = with_store(synced_store(tmp_path, own_model, n=6), tmp_path / "qdrant")
    good = Path(visrec(settings, "snapshot", str(tmp_path / "snaps"))["snapshot"])
    data = good.read_bytes()
    cases = tmp_path / "cases"
    cases.mkdir()

    def case(name: str, content: bytes, checksum: bool = True) -> str:
        path = cases / f"{name}.visrec.tar"
        path.write_bytes(content)
        if checksum:
            shutil.copy(checksum_file(good), checksum_file(path))
        return str(path)

    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x40
    # A store whose vectors are 8-d, made by a model that makes 1000-d ones.
    foreign = with_store(settings, tmp_path / "foreign" / "qdrant")
    with open_index(foreign.qdrant) as index:
        index.create(8, {"model_version": artefact[1].model_version, "artefact": str(own_model)})
        index.upsert(
            [IndexPoint(f"f{i}", np.ones((1, 8), np.float32) * i, {"product_id": f"f{i}"}) for i in range(3)]
        )
    foreign_snapshot = visrec(foreign, "snapshot", str(tmp_path / "foreign-snaps"))["snapshot"]
    live_before = store_state(settings)
    for args, code, says in [
        ([case("truncated", data[: len(data) // 2])], 2, "is damaged or truncated"),
        ([case("modified", bytes(flipped))], 2, "is damaged or truncated"),
        ([case("bare", data, checksum=False)], 2, "has no checksum file beside it"),
        ([str(cases / "nothing.visrec.tar")], 2, "no snapshot at"),
        ([foreign_snapshot], 2, "holds 8-d vectors, but its model"),
    ]:
        assert says in refused(settings, "restore", *args, code=code), args
        assert store_state(settings) == live_before  # no version made, none switched
    shutil.rmtree(own_model)  # the model is gone from this machine (and the snapshot does not carry it)
    line = refused(
        with_store(settings, settings.qdrant.path, tmp_path / "none"), "restore", str(good), code=3
    )
    assert f"the snapshot's model {artefact[1].model_version}" in line and "--with-model" in line
    assert store_state(settings) == live_before
    assert "keep at least 1" in refused(settings, "snapshot", str(tmp_path / "snaps"), "--keep", "0")


# --- beside a live service -------------------------------------------------------------------------------


class Writes:
    """PATCHes prices one after another (a counter, never a price a product had), recording each write
    the service acknowledged: (counter, product, when its answer came)."""

    def __init__(self, served: Served, products: list[str]) -> None:
        self.products = products
        self.acknowledged: list[tuple[int, str, float]] = []
        self._client = httpx.Client(base_url=served.url, timeout=30, headers={"X-API-Key": WRITE_KEY})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        counter = 1000
        while not self._stop.is_set():
            product = self.products[counter % len(self.products)]
            if self._client.patch(f"/products/{product}", json={"price": counter}).status_code == 200:
                self.acknowledged.append((counter, product, time.monotonic()))
            counter += 1

    def __enter__(self) -> Writes:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        self._client.close()

    def latest(self, up_to: int) -> dict[str, int]:
        """Each product's price after the writes numbered up to `up_to`."""
        return {product: counter for counter, product, _ in self.acknowledged if counter <= up_to}


class Readers:
    """Polls similar-by-id and a product until stopped; every answer's status is counted."""

    def __init__(self, served: Served) -> None:
        self.statuses: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(served.url,), daemon=True)

    def _run(self, url: str) -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            while not self._stop.is_set():
                for path in ("/products/p1/similar?k=5", "/products/p2"):
                    try:
                        status = client.get(path).status_code
                    except httpx.HTTPError:
                        status = 0
                    self.statuses[status] = self.statuses.get(status, 0) + 1

    def __enter__(self) -> Readers:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def prices(archive: Archive) -> dict[str, float]:
    return {p.product_id: p.payload["price"] for chunk in archive.chunks() for p in chunk}


def test_a_snapshot_of_a_live_service_holds_a_cut_and_restores_it(
    tmp_path: Path, artefact: tuple[Path, Manifest]
) -> None:
    settings = synced_store(tmp_path, artefact[0], n=9)
    products = [f"p{i}" for i in range(9)]
    with (
        serve(settings, tmp_path / "serve.log", env={"VISREC_API__WRITE_KEY": WRITE_KEY}) as served,
        Readers(served) as readers,
        httpx.Client(base_url=served.url, timeout=30) as client,
    ):

        def neighbours() -> dict[str, list[tuple[str, float]]]:
            answers = {p: client.get(f"/products/{p}/similar", params={"k": 4}).json() for p in products}
            return {p: [(h["product_id"], h["distance"]) for h in a["results"]] for p, a in answers.items()}

        def served_prices() -> dict[str, float]:
            return {p: client.get(f"/products/{p}").json()["payload"]["price"] for p in products}

        at_start = neighbours()
        with Writes(served, products) as writes:
            while len(writes.acknowledged) < 20:
                time.sleep(0.05)
            began = time.monotonic()
            taken = visrec(settings, "snapshot", str(tmp_path / "snaps"))
            time.sleep(0.3)  # writes go on after it
        archive = Archive.open(Path(taken["snapshot"]))
        assert archive.header.cut["holds"] == CUT_COPY and taken["cut"]["writes_held_s"] < 2
        held = prices(archive)
        # A cut: the snapshot holds exactly the writes numbered up to one of them, and every write
        # acknowledged before the snapshot began is among those.
        cut = max(int(v) for v in held.values())
        initial = {p: 10 + i for i, p in enumerate(products)}
        assert held == initial | writes.latest(cut)
        assert all(c <= cut for c, _, at in writes.acknowledged if at < began)
        assert any(c > cut for c, _, _ in writes.acknowledged)  # and the writes after it are not
        assert not list(settings.qdrant.path.glob("products__v1.g*"))  # its copy is gone

        line = refused(settings, "restore", taken["snapshot"])  # the writes since would be dropped
        assert "products differ between the live products__v1 and the snapshot" in line
        restored = visrec(settings, "restore", taken["snapshot"], "--force")
        assert restored["live"] == "products__v2"
        assert neighbours() == at_start and served_prices() == held  # as the original at the cut
        latest = served_prices()
        visrec(settings, "rollback", "--force")
        assert served_prices() == initial | writes.latest(max(c for c, _, _ in writes.acknowledged))
        assert latest != served_prices()
    assert set(readers.statuses) == {200}, readers.statuses


# --- kill -9 ---------------------------------------------------------------------------------------------


def random_store(root: Path, artefact: Path, n: int) -> Settings:
    """A store of `n` products written directly, random 1000-d vectors, as the model at `artefact` would
    have made them (as benchmarks/ scale scripts write them): big enough to be killed during a snapshot."""
    from visrec.manifest import read_manifest

    settings = synced_store(root, artefact, n=3)
    rng = np.random.default_rng(0)
    with open_index(settings.qdrant) as index:
        model = read_manifest(artefact).model_version
        for start in range(0, n, 1000):
            index.upsert(
                [
                    IndexPoint(
                        f"r{i}",
                        rng.standard_normal((1, 1000), np.float32),
                        {"product_id": f"r{i}", "model_version": model},
                    )
                    for i in range(start, min(n, start + 1000))
                ]
            )
    return settings


def wait_for(condition: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def partial_written(folder: Path) -> bool:
    return any(p.stat().st_size > 2**19 for p in folder.glob(".*.partial")) if folder.is_dir() else False


def test_kill_9_during_a_snapshot_or_a_restore_leaves_the_live_version(
    tmp_path: Path, artefact: tuple[Path, Manifest]
) -> None:
    settings = random_store(tmp_path, artefact[0], 2500)
    live = store_state(settings)
    snaps = tmp_path / "snaps"
    env = settings_env(settings)

    # The command alone, killed while it writes the archive: a partial nobody holds, swept by the next.
    command = spawn_visrec(env, tmp_path / "snapshot.log", tmp_path, "snapshot", str(snaps))
    wait_for(lambda: partial_written(snaps))
    command.send_signal(signal.SIGKILL)
    assert command.wait(30) == -signal.SIGKILL
    assert store_state(settings) == live and not list(snaps.glob("*.tar"))
    taken = visrec(settings, "snapshot", str(snaps))
    assert [n for n in taken["removed"] if n.endswith(".partial")] and not list(snaps.glob(".*"))

    # A restore killed while it builds the new version: the live one as it was, and a rerun finishes.
    restoring = spawn_visrec(env, tmp_path / "restore.log", tmp_path, "restore", taken["snapshot"])
    wait_for(lambda: (settings.qdrant.path / "products__v2").is_dir())  # made before its first point
    restoring.send_signal(signal.SIGKILL)
    assert restoring.wait(30) == -signal.SIGKILL
    assert store_state(settings)[0] == "products__v1" and store_state(settings)[2] == live[2]
    again = visrec(settings, "restore", taken["snapshot"])
    assert (again["live"], again["points"], again["dropped"]) == ("products__v2", live[2], 0)

    # The service killed during a handed-over snapshot: its copy is swept at its next start.
    with serve(settings, tmp_path / "serve.log") as served:
        command = spawn_visrec(env, tmp_path / "handed.log", tmp_path, "snapshot", str(snaps))
        wait_for(lambda: partial_written(snaps))
        served.process.send_signal(signal.SIGKILL)
        assert command.wait(60) == 4
    assert list(settings.qdrant.path.glob("products__v2.g*"))  # the copy it was reading
    with serve(settings, tmp_path / "serve2.log"):
        assert not list(settings.qdrant.path.glob("products__v2.g*"))
        again = visrec(settings, "snapshot", str(snaps), "--keep", "1")
        assert again["points"] == live[2] and len(list(snaps.glob("*.tar"))) == 1


# --- the server backend (qdrant-client's local mode) -------------------------------------------------


@pytest.fixture
def local_server(settings: Settings) -> Iterator[Any]:
    with open_store(settings.qdrant.model_copy(update={"url": ":memory:"})) as store:
        yield store


def answers(index: Any, products: list[str]) -> dict[str, list[tuple[str, float]]]:
    return {
        p: [(h.product_id, round(h.distance, 4)) for h in similar_to_product(index, p, 4, Filters())]
        for p in products
    }


def test_snapshots_move_between_the_embedded_store_and_a_server(
    tmp_path: Path, artefact: tuple[Path, Manifest], local_server: Any
) -> None:
    """Edge → server (local mode) → edge: the same answers. `create_snapshot` is not implemented in local
    mode, and no Qdrant server runs here: the server's snapshot is a scroll (`CUT_SCROLL`)."""
    settings = synced_store(tmp_path, artefact[0], n=9)
    products = [f"p{i}" for i in range(9)]
    with open_store(settings.qdrant) as store, store.open(store.live()) as index:
        expected = answers(index, products)
        edge = take(
            index,
            tmp_path / "snaps",
            record=version_record(store, store.live()),
            cut=Cut(now(), CUT_ALONE),
            engine="qdrant-edge-py",
            configured_model=artefact[0],
        )
    into_server = restore(Archive.open(Path(edge["snapshot"])), local_server, artefact[0])
    assert into_server["live"] == "products__v1"
    with local_server.open(local_server.live()) as index:
        assert answers(index, products) == expected
        back = take(
            index,
            tmp_path / "from-server",
            record=version_record(local_server, local_server.live()),
            cut=Cut(now(), CUT_SCROLL),
            engine="qdrant-client local mode",
            configured_model=artefact[0],
        )
    assert Archive.open(Path(back["snapshot"])).header.cut["holds"] == CUT_SCROLL
    other = with_store(settings, tmp_path / "other" / "qdrant")
    with open_store(other.qdrant) as store:
        restore(Archive.open(Path(back["snapshot"])), store, artefact[0])
        with store.open(store.live()) as index:
            assert answers(index, products) == expected
