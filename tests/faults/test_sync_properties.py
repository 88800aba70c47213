"""Generated sequences of catalogue edits (metadata only, photo redrawn, photo added or removed, product
added or removed), synced one after the other: after every sync the index equals a fresh sync of the
last catalogue, and photos are embedded exactly when a product is new or its photos' bytes or list
changed. Examples: VISREC_FAULTS_EDIT_EXAMPLES (CI: 6); seed: VISREC_FAULTS_SEED."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from tests.faults.helpers import check_index_matches_catalogue
from tests.helpers import COLOURS, SHAPES, draw_product, run_sync, small_settings, write_csv
from visrec.artefact import Manifest

EXAMPLES = int(os.environ.get("VISREC_FAULTS_EDIT_EXAMPLES", "6"))
SEED = int(os.environ.get("VISREC_FAULTS_SEED", "0"))
IDS = [f"p{i}" for i in range(6)]

edit = st.one_of(
    st.tuples(st.just("price"), st.sampled_from(IDS), st.integers(1, 999)),
    st.tuples(st.just("title"), st.sampled_from(IDS), st.text("abc xyz", max_size=8)),
    st.tuples(st.just("redraw"), st.sampled_from(IDS), st.integers(0, 10_000)),
    st.tuples(st.just("add_photo"), st.sampled_from(IDS), st.integers(0, 10_000)),
    st.tuples(st.just("drop_photo"), st.sampled_from(IDS), st.just(0)),
    st.tuples(st.just("remove"), st.sampled_from(IDS), st.just(0)),
    st.tuples(st.just("add"), st.sampled_from(IDS), st.integers(0, 10_000)),
)


class Shop:
    """The catalogue as a model: products → (photos, metadata); which products' photos changed."""

    def __init__(self, root: Path) -> None:
        self.root, self.n = root, 0
        self.products: dict[str, dict[str, Any]] = {}
        for i, pid in enumerate(IDS[:4]):
            self.products[pid] = {"photos": [self.draw(i)], "price": 10 + i, "title": ""}

    def draw(self, variant: int) -> str:
        self.n += 1
        name = f"images/f{self.n}.png"
        draw_product(self.root / name, SHAPES[variant % 3], list(COLOURS)[variant % 3], variant=variant)
        return name

    def apply(self, kind: str, pid: str, value: Any) -> None:
        product = self.products.get(pid)
        if kind == "add":
            if product is None:
                self.products[pid] = {"photos": [self.draw(value)], "price": 1, "title": ""}
        elif product is None:
            return
        elif kind == "remove":
            del self.products[pid]
        elif kind in ("price", "title"):
            product[kind] = value
        elif kind == "redraw":  # the same file, new bytes
            path = self.root / product["photos"][0]
            draw_product(path, SHAPES[value % 3], list(COLOURS)[(value + 1) % 3], variant=value)
        elif kind == "add_photo":
            product["photos"].append(self.draw(value))
        elif len(product["photos"]) > 1:  # drop_photo
            product["photos"].pop()

    def photos_as_seen(self) -> dict[str, tuple[tuple[str, bytes], ...]]:
        """What each product's vectors depend on: its photos, in order, and their bytes."""
        return {
            pid: tuple((name, (self.root / name).read_bytes()) for name in p["photos"])
            for pid, p in self.products.items()
        }

    def write(self) -> Path:
        rows = [
            {"id": pid, "images": "|".join(p["photos"]), "price": p["price"], "title": p["title"]}
            for pid, p in self.products.items()
        ]
        return write_csv(self.root / "catalogue.csv", rows)


@seed(SEED)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(steps=st.lists(st.lists(edit, min_size=1, max_size=3), min_size=1, max_size=3))
def test_edits_synced_in_turn_equal_a_fresh_sync(
    steps: list[list[tuple[str, str, Any]]], artefact: tuple[Path, Manifest]
) -> None:
    root = Path(tempfile.mkdtemp(prefix="visrec-edits-"))
    try:
        shop = Shop(root)
        store = small_settings(root, artefact=artefact[0])
        first = run_sync(shop.write(), store, max_delete=1.0)
        assert first.added == 4
        for n, batch in enumerate(steps):
            seen = shop.photos_as_seen()
            before = set(shop.products)
            for kind, pid, value in batch:
                shop.apply(kind, pid, value)
            now = shop.photos_as_seen()
            changed = {pid for pid in now if pid in seen and now[pid] != seen[pid]}
            summary = run_sync(shop.write(), store, max_delete=1.0)
            new = set(shop.products) - before
            assert summary.added == len(new), (batch, summary)
            assert summary.updated == len(changed), (batch, summary)  # embedded exactly these
            assert summary.deleted == len(before - set(shop.products)), (batch, summary)
            assert summary.failed == 0
            lost, duplicated = check_index_matches_catalogue(store, root / "catalogue.csv", root / f"ref{n}")
            assert (lost, duplicated) == (0, 0)
    finally:
        shutil.rmtree(root, ignore_errors=True)
