"""A Hypothesis state machine over the write routes of a real `visrec serve`: random PUT, PATCH,
DELETE, batch and file-sync steps against a model of the catalogue. After every step each product's
answer equals the model (present or not, photo count, fields), each product's owner as the store records
it (`source`: "catalogue" or "api", which no answer shows) equals the model's, and photos are fetched
(so embedded) only when a product's photo list changed. The server and its store live for the module, so
the model does too. Examples: VISREC_FAULTS_WRITE_EXAMPLES (CI: 3), steps each: …_WRITE_STEPS (6)."""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from tests.faults.helpers import run_visrec
from tests.faults.served import Served, serve, synced_store
from tests.fetch_servers import Handler, Server
from tests.fetch_servers import serve as serve_images
from tests.helpers import COLOURS, SHAPES, product_image, write_csv
from visrec.artefact import Manifest
from visrec.config import Settings
from visrec.filters import Filters
from visrec.index import open_index

EXAMPLES = int(os.environ.get("VISREC_FAULTS_WRITE_EXAMPLES", "3"))
STEPS = int(os.environ.get("VISREC_FAULTS_WRITE_STEPS", "6"))
WRITE = "model-write-key"
IDS = st.sampled_from([f"m{i}" for i in range(5)])
PHOTOS = st.lists(st.integers(0, 6), min_size=1, max_size=3, unique=True)
TITLES = st.one_of(st.none(), st.text("ab ", max_size=5))


def photo(handler: Handler) -> None:
    n = int(handler.path.strip("/").split(".")[0])
    buffer = io.BytesIO()
    product_image(SHAPES[n % 3], list(COLOURS)[(n + 1) % 3], variant=300 + n).save(buffer, "PNG")
    handler.reply(200, buffer.getvalue(), {"Content-Type": "image/png"})


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory, artefact: tuple[Path, Manifest]
) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("write-model")
    store = synced_store(root, artefact[0], n=3)
    with serve_images(photo) as host:
        env = {"VISREC_INGEST__ALLOWED_HOSTS": '["127.0.0.1"]', "VISREC_API__WRITE_KEY": WRITE}
        with serve(store, root / "serve.log", env=env) as served:
            model = {f"p{i}": {"photos": 1, "source": "catalogue", "fields": None} for i in range(3)}
            yield {"root": root, "store": store, "host": host, "served": served, "model": model}


class Writes(RuleBasedStateMachine):
    world: dict[str, Any]

    def __init__(self) -> None:
        super().__init__()
        self.served: Served = self.world["served"]
        self.host: Server = self.world["host"]
        self.model: dict[str, dict[str, Any]] = self.world["model"]
        self.client = httpx.Client(base_url=self.served.url, timeout=120, headers={"X-API-Key": WRITE})

    def urls(self, photos: list[int]) -> list[str]:
        return [self.host.url(f"/{n}.png") for n in photos]

    def expect(self, pid: str, photos: list[int], fields: dict[str, Any], source: str) -> None:
        self.model[pid] = {"photos": len(photos), "urls": photos, "fields": fields, "source": source}

    @initialize(pid=IDS, photos=PHOTOS, price=st.integers(0, 99), title=TITLES)
    def put_and_patch(self, pid: str, photos: list[int], price: int, title: str | None) -> None:
        """Every example first writes a product and patches it: Hypothesis leaves random rules out of
        each example (swarm testing), and the 18 steps CI runs would otherwise never PATCH a product the
        API owns (whose owner a PATCH must keep)."""
        self.put(pid, photos, price)
        self.patch(pid, price + 1, title)

    @rule(pid=IDS, photos=PHOTOS, price=st.integers(0, 99))
    def put(self, pid: str, photos: list[int], price: int) -> None:
        before = self.model.get(pid)
        fetched = len(self.host.hits)
        answer = self.client.put(f"/products/{pid}", json={"images": self.urls(photos), "price": price})
        assert answer.status_code == 200, answer.text
        same_photos = before is not None and before.get("urls") == photos
        assert (len(self.host.hits) == fetched) == same_photos  # embedded exactly when photos changed
        outcome = answer.json()["outcome"]
        if before is None:
            assert outcome == "added"
        elif same_photos:
            assert outcome in ("unchanged", "metadata_updated")
        else:
            assert outcome == "updated"
        self.expect(pid, photos, {"price": price}, "api")

    @rule(pid=IDS, price=st.integers(0, 99), title=TITLES)
    def patch(self, pid: str, price: int, title: str | None) -> None:
        answer = self.client.patch(f"/products/{pid}", json={"price": price, "title": title})
        if pid not in self.model:
            assert answer.status_code == 404
            return
        assert answer.status_code == 200, answer.text
        entry = self.model[pid]
        if entry["fields"] is not None:  # as a catalogue row: text stripped, a blank is no field
            entry["fields"] = {**entry["fields"], "price": price, "title": (title or "").strip()}
            if not entry["fields"]["title"]:
                del entry["fields"]["title"]

    @rule(pid=IDS)
    def delete(self, pid: str) -> None:
        outcome = self.client.delete(f"/products/{pid}").json()["outcome"]
        assert outcome == ("deleted" if self.model.pop(pid, None) is not None else "absent")

    @rule(
        rows=st.lists(
            st.tuples(IDS, PHOTOS, st.integers(0, 99)), min_size=1, max_size=3, unique_by=lambda r: r[0]
        )
    )
    def batch(self, rows: list[tuple[str, list[int], int]]) -> None:
        body = [{"id": pid, "images": self.urls(photos), "price": price} for pid, photos, price in rows]
        answer = self.client.post("/products/batch", json=body)
        assert answer.status_code == 200, answer.text
        assert all(not r["outcome"].startswith("error") for r in answer.json()["results"])
        for pid, photos, price in rows:
            self.expect(pid, photos, {"price": price}, "api")

    @rule(rows=st.lists(st.tuples(IDS, PHOTOS), max_size=3, unique_by=lambda r: r[0]))
    def file_sync(self, rows: list[tuple[str, list[int]]]) -> None:
        """A catalogue file listing these products (and the store's first three): handed to the service;
        it takes them over and deletes the catalogue's products it no longer lists, never the API's."""
        listed = [{"id": f"p{i}", "images": f"images/p{i}.png"} for i in range(3)]
        listed += [{"id": pid, "images": "|".join(self.urls(photos))} for pid, photos in rows]
        root: Path = self.world["root"]
        catalogue = write_csv(root / "file.csv", listed)
        store: Settings = self.world["store"]
        done = run_visrec(store, "sync", str(catalogue), "--json", "--max-delete", "1")
        assert done.returncode == 0, done.stderr
        for pid, entry in list(self.model.items()):
            if entry["source"] == "catalogue" and pid not in {r["id"] for r in listed}:
                del self.model[pid]
        for pid, photos in rows:
            self.expect(pid, photos, {}, "catalogue")
        assert json.loads(done.stdout)["failed"] == 0

    @invariant()
    def answers_equal_the_model(self) -> None:
        for pid in [f"m{i}" for i in range(5)] + ["p0"]:
            answer = self.client.get(f"/products/{pid}")
            if pid not in self.model:
                assert answer.status_code == 404, (pid, answer.text)
                continue
            assert answer.status_code == 200, (pid, answer.text)
            got, entry = answer.json(), self.model[pid]
            assert got["photos"] == entry["photos"], (pid, got, entry)
            if entry["fields"] is not None:
                shown = {k: v for k, v in got["payload"].items() if k in ("price", "title")}
                assert shown == entry["fields"], (pid, shown, entry)

    @invariant()
    def sources_equal_the_model(self) -> None:
        """Who owns each product, as the store records it: no answer shows `source`, and the embedded
        store is the running service's, so this reads a copy of its folder (a backup taken between steps,
        when no write is in flight: every answered write is in it)."""
        store: Settings = self.world["store"]
        with tempfile.TemporaryDirectory(dir=self.world["root"]) as scratch:
            copy = Path(scratch) / "store"
            shutil.copytree(store.qdrant.path, copy)
            with open_index(store.qdrant.model_copy(update={"path": copy})) as index:
                recorded = {
                    str(p["product_id"]): p.get("source")
                    for p in index.all_payloads(Filters(), ["product_id", "source"])
                }
        assert recorded == {pid: entry["source"] for pid, entry in self.model.items()}

    def teardown(self) -> None:
        self.client.close()


def test_writes_follow_the_model(world: dict[str, Any]) -> None:
    Writes.world = world
    run_state_machine_as_test(
        Writes,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,  # the same steps in every CI run
        ),
    )
