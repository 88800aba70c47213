"""Memory per product: quantized and on-disk collections on both backends, their recall against exact
search on clustered real-like vectors, a reindex onto new settings, and settings checked clearly."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
from pydantic import ValidationError
from qdrant_client import models as qm
from typer.testing import CliRunner

from tests.helpers import MakeCatalogue, run_reindex, run_sync, small_settings, stored
from visrec.cli import app
from visrec.config import QdrantSettings, Settings
from visrec.index import Filters, IndexPoint, open_index, open_store
from visrec.index.edge import EdgeIndex
from visrec.index.server import ServerIndex, _quantization
from visrec.versions import describe

DIM = 1000


def _clustered(n: int = 3000, seed: int = 1) -> np.ndarray:
    """Product embeddings come in clusters (a category, a model line): 30 of them, 1000-d."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(30, DIM)).astype(np.float32)
    return centres[np.arange(n) % 30] + 0.3 * rng.normal(size=(n, DIM)).astype(np.float32)


@pytest.mark.parametrize(("quantization", "on_disk"), [("int8", False), ("int8", True), ("none", True)])
def test_quantized_search_finds_the_exact_top_10(
    tmp_path: Path, quantization: Literal["none", "int8"], on_disk: bool
) -> None:
    """After optimize() (what a sync ends with) the HNSW graph searches the int8 codes and rescores the
    best with the originals: the same top-10 as an exact float32 scan."""
    vectors = _clustered()
    settings = QdrantSettings(
        path=tmp_path / "q",
        collection="c",
        quantization=quantization,
        vectors_on_disk=on_disk,
        full_scan_threshold_kb=100,  # a graph even at this size
    )
    with open_index(settings) as index:
        assert isinstance(index, EdgeIndex)
        index.create(DIM)
        for start in range(0, len(vectors), 1000):
            index.upsert(
                [
                    IndexPoint(f"p{i}", vectors[i], {"product_id": f"p{i}", "category": f"c{i % 3}"})
                    for i in range(start, start + 1000)
                ]
            )
        index.optimize()
        config = index._stored_vectors()
        assert ("quantization_config" in config) == (quantization != "none"), config
        assert bool(config.get("on_disk")) == on_disk, config
        recall = []
        for i in range(0, len(vectors), 100):
            query = vectors[i] + 0.05
            for filters in (Filters(), Filters(category=["c1"])):
                found = {h.product_id for h in index.search(query, 10, filters)}
                exact = {h.product_id for h in index.search(query, 10, filters, exact=True)}
                recall.append(len(found & exact) / 10)
        assert np.mean(recall) >= 0.99


def test_the_server_backend_creates_collections_with_the_settings() -> None:
    """On a real server (VISREC_QDRANT__URL) the collection reports its quantization; qdrant-client's
    local mode keeps none (it searches exactly), so here the request's config is checked as built and
    the rest (on-disk originals, multivector, search with quantization parameters) through local mode."""
    url = os.environ.get("VISREC_QDRANT__URL") or ":memory:"
    settings = QdrantSettings(
        url=url, collection=f"q{uuid.uuid4().hex[:8]}", quantization="int8", vectors_on_disk=True
    )
    int8 = _quantization(settings)
    assert isinstance(int8, qm.ScalarQuantization) and int8.scalar.type == qm.ScalarType.INT8
    binary = _quantization(settings.model_copy(update={"quantization": "binary"}))
    assert isinstance(binary, qm.BinaryQuantization) and binary.binary.always_ram
    assert _quantization(settings.model_copy(update={"quantization": "none"})) is None
    with open_index(settings) as index:
        assert isinstance(index, ServerIndex)
        index.create(8)
        info = index.client.get_collection(index.collection)
        if url != ":memory:":
            assert info.config.quantization_config == int8
            assert index.layout() == {"multivector": True, "quantization": "int8", "on_disk": True}
        params = info.config.params.vectors
        assert isinstance(params, qm.VectorParams)
        assert params.on_disk and params.multivector_config is not None
        vectors = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
        index.upsert([IndexPoint(f"p{i}", v, {"product_id": f"p{i}"}) for i, v in enumerate(vectors)])
        assert index.search(vectors[2], 1, Filters())[0].product_id == "p2"


def test_reindex_moves_a_live_catalogue_to_new_settings(
    make_catalogue: MakeCatalogue, settings: Settings, tmp_path: Path
) -> None:
    catalogue = make_catalogue(12)
    run_sync(catalogue, settings)
    quantized = small_settings(tmp_path, artefact=settings.artefact)
    quantized.qdrant.quantization = "int8"
    quantized.qdrant.vectors_on_disk = True
    summary = run_reindex(catalogue, quantized, settings.artefact)
    assert summary.live.endswith("__v2")
    with open_store(quantized.qdrant) as store:
        layout = describe(store)["layout"]  # what `visrec status` shows
        assert layout == {"multivector": True, "quantization": "int8", "on_disk": True}
        old, new = (store.open(v) for v in store.versions())
        assert isinstance(old, EdgeIndex) and isinstance(new, EdgeIndex)
        assert "quantization_config" not in old._stored_vectors()
        assert "quantization_config" in new._stored_vectors()
        before = [h.product_id for h in old.search(stored(old, "p3")[0][0], 5, Filters())]
        after = [h.product_id for h in new.search(stored(new, "p3")[0][0], 5, Filters())]
        assert before == after  # the same model, the same answers
        old.close()
        new.close()


def test_bad_settings_are_clear(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="quantization"):
        QdrantSettings(quantization="int4")
    with pytest.raises(ValidationError, match="oversampling"):
        QdrantSettings(oversampling=0.5)
    monkeypatch.setenv("VISREC_QDRANT__PATH", str(settings.qdrant.path))
    monkeypatch.setenv("VISREC_QDRANT__QUANTIZATION", "int4")
    result = CliRunner().invoke(app, ["status", "--json"])
    assert result.exit_code == 2 and "invalid setting: VISREC_QDRANT__QUANTIZATION" in result.stderr
    assert "Traceback" not in result.output
