"""A live catalogue on the embedded store: `visrec sync`, `reindex` and `rollback` run beside a real
`visrec serve` (which owns the store) hand their jobs to it, while a reader keeps querying; a service
killed mid-sync loses nothing, and the command run again finishes the job."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import torch

from tests.faults.helpers import run_visrec as visrec
from tests.faults.helpers import settings_env
from tests.faults.served import serve, synced_store
from tests.helpers import draw_product, export_like, run_sync
from visrec.artefact import Manifest, load_artefact
from visrec.catalogue import read_catalogue
from visrec.config import QdrantSettings
from visrec.handover import find_owner
from visrec.index import open_index

TIMING = {"seconds", "optimize_seconds", "images_per_second", "failure_report"}


class Reader:
    """Polls similar-by-id until stopped; every answer's status is counted."""

    def __init__(self, url: str) -> None:
        self.statuses: Counter[int] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(url,), daemon=True)

    def _run(self, url: str) -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            while not self._stop.is_set():
                try:
                    self.statuses[client.get("/products/p0/similar", params={"k": 5}).status_code] += 1
                except httpx.HTTPError:
                    self.statuses[0] += 1

    def __enter__(self) -> Reader:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def edit_catalogue(root: Path) -> Path:
    """The served catalogue with a price changed, a photo changed, a product removed and one added."""
    path = root / "catalogue.csv"
    lines = path.read_text().splitlines()
    header, rows = lines[0], lines[1:]
    rows = [r for r in rows if not r.startswith("p26,")]
    rows = [r.rsplit(",", 1)[0] + ",999" if r.startswith("p1,") else r for r in rows]
    draw_product(root / "images" / "p2.png", "circle", "green", variant=77)
    draw_product(root / "images" / "new.png", "square", "blue", variant=78)
    rows.append("new,images/new.png,square,blue,5")
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_sync_reindex_and_rollback_hand_over_to_the_running_service(
    tmp_path: Path, artefact: tuple[Path, Manifest]
) -> None:
    settings = synced_store(tmp_path, artefact[0])
    catalogue = edit_catalogue(tmp_path)
    # What a sync without a service reports: the same sync on a copy of the store.
    reference = settings.model_copy(update={"qdrant": QdrantSettings(path=tmp_path / "reference")})
    shutil.copytree(settings.qdrant.path, reference.qdrant.path)
    expected = run_sync(catalogue, reference, max_delete=1.0).to_dict()

    # Every handed-over sync ends with an optimized copy made by another process.
    env = {"VISREC_QDRANT__OPTIMIZE_AFTER": "1"}
    with serve(settings, tmp_path / "serve.log", env=env) as served, Reader(served.url) as reader:
        assert find_owner(settings.qdrant) is not None
        synced = visrec(settings, "sync", str(catalogue), "--max-delete", "1", "--json")
        assert synced.returncode == 0, synced.stderr
        summary = json.loads(synced.stdout)
        assert {k: v for k, v in summary.items() if k not in TIMING} == {
            k: v for k, v in expected.items() if k not in TIMING
        }
        assert (summary["added"], summary["updated"], summary["metadata_updated"], summary["deleted"]) == (
            1,
            1,
            1,
            1,
        )
        with httpx.Client(base_url=served.url, timeout=30) as client:  # read-your-writes
            assert client.get("/products/new").status_code == 200
            assert client.get("/products/p26").status_code == 404
            assert client.get("/products/p1").json()["payload"]["price"] == 999
        again = visrec(settings, "sync", str(catalogue), "--json")
        assert again.returncode == 0 and json.loads(again.stdout)["unchanged"] == 27
        # The live version now lives in an optimized copy (made in the background), read by the service.
        pointer = settings.qdrant.path / "products__v1.current"
        deadline = time.monotonic() + 60
        while not pointer.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pointer.read_text().startswith("products__v1.g")

        # A second model: reindex builds v2 beside the live v1 (its gate reads v1 through the service).
        model, manifest = load_artefact(artefact[0], torch.device("cpu"))
        with torch.no_grad():
            model.backbone.fc.weight.mul_(1.01)
        export_like(model, manifest, tmp_path / "model2")
        reindexed = visrec(
            settings, "reindex", str(catalogue), "--model", str(tmp_path / "model2"), "--force", "--json"
        )
        assert reindexed.returncode == 0, reindexed.stderr
        assert json.loads(reindexed.stdout)["live"].endswith("__v2")
        rolled = visrec(settings, "rollback", "--json")
        assert rolled.returncode == 0, rolled.stderr
        answer = json.loads(rolled.stdout)
        assert answer == {"previous": "products__v2", "live": "products__v1", "dropped": []}
        refused = visrec(settings, "sync", str(tmp_path / "missing.csv"))
        assert refused.returncode == 2 and "catalogue not found" in refused.stderr  # the same exit codes
        time.sleep(0.5)
    assert reader.statuses and set(reader.statuses) == {200}, reader.statuses
    assert find_owner(settings.qdrant) is None  # the marker goes with the service
    status = visrec(settings, "status", "--json")  # alone again: opens the optimized copy itself
    assert status.returncode == 0 and json.loads(status.stdout)["points"] == 27, status.stderr
    assert not (settings.qdrant.path / "products__v1").exists()  # the replaced folder went with its handle


def test_a_service_killed_mid_sync_loses_nothing(tmp_path: Path, artefact: tuple[Path, Manifest]) -> None:
    settings = synced_store(tmp_path, artefact[0], n=6)
    rows = [f"q{i},images/q{i}.png,circle,red,{i}" for i in range(150)]
    for i in range(150):
        draw_product(tmp_path / "images" / f"q{i}.png", "circle", "red", variant=100 + i)
    catalogue = tmp_path / "catalogue.csv"
    catalogue.write_text(catalogue.read_text() + "\n".join(rows) + "\n")
    with serve(settings, tmp_path / "serve.log") as served:
        command = subprocess.Popen(
            [sys.executable, "-m", "visrec", "sync", str(catalogue), "--json"],
            env=settings_env(settings),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # until the service has written some of the new products
            with open_records(served.url) as count:
                if count() > 6:
                    break
            time.sleep(0.2)
        served.process.send_signal(signal.SIGKILL)
        _, stderr = command.communicate(timeout=60)
        assert command.returncode == 4 and "ended during the sync" in stderr, stderr
        assert "run the sync again to finish it" in stderr, stderr
    again = visrec(settings, "sync", str(catalogue), "--json")  # no service now: runs here
    assert again.returncode == 0, again.stderr
    summary: dict[str, Any] = json.loads(again.stdout)
    assert summary["added"] + summary["unchanged"] == 156 and summary["failed"] == 0
    with open_index(settings.qdrant) as index:
        assert index.count() == 156 == len(index.sync_records())
    assert len(read_catalogue(catalogue).products) == 156


class open_records:  # noqa: N801 - a tiny context manager around one client
    """How many products the service answers in a browse (bounded to one page)."""

    def __init__(self, url: str) -> None:
        self.client = httpx.Client(base_url=url, timeout=10)

    def __enter__(self) -> Any:
        def count() -> int:
            try:
                return len(self.client.get("/products", params={"limit": 200}).json()["products"])
            except (httpx.HTTPError, ValueError, KeyError):
                return 0

        return count

    def __exit__(self, *exc: object) -> None:
        self.client.close()
