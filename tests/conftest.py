"""Shared fixtures: generated catalogues, small settings on a fresh store, and one tiny real model (the
builders they use are in tests/helpers.py).

Everything is real: Pillow-drawn images, a real ResNet18 (random init, 32 px) trained and exported
once per session, a real embedded Qdrant engine on a temp folder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import (
    COLOURS,
    SHAPES,
    MakeCatalogue,
    draw_product,
    small_settings,
    write_catalogue,
    write_csv,
)
from visrec.artefact import Manifest
from visrec.catalogue import read_catalogue
from visrec.config import Settings
from visrec.fetch import Fetcher
from visrec.urls import FetchPolicy

torch.set_num_threads(2)


@pytest.fixture
def make_catalogue(tmp_path: Path) -> MakeCatalogue:
    """Build a CSV catalogue of `n` drawn products: category = shape, with colour and price."""

    def make(n: int = 24, name: str = "catalogue.csv", start: int = 0) -> Path:
        return write_catalogue(tmp_path, n, name, start)

    return make


@pytest.fixture(scope="session")
def artefact(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Manifest]:
    """One tiny real model, trained on drawn products and exported, shared by the session."""
    from visrec.train import export, train

    root = tmp_path_factory.mktemp("artefact")
    rows = []
    for i in range(45):
        shape, colour = SHAPES[i % 3], list(COLOURS)[(i // 3) % 3]
        draw_product(root / "images" / f"t{i}.png", shape, colour, variant=i)
        rows.append({"id": f"t{i}", "image": f"images/t{i}.png", "category": shape})
    settings = small_settings(root)
    result = train(read_catalogue(write_csv(root / "train.csv", rows)), settings, torch.device("cpu"))
    return settings.artefact, export(result, settings)


@pytest.fixture
def settings(tmp_path: Path, artefact: tuple[Path, Manifest]) -> Settings:
    """Small settings on a fresh store, pointing at the session's exported model."""
    return small_settings(tmp_path, artefact=artefact[0])


@pytest.fixture
def env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """`settings` as the environment of a `visrec` command run in this process (CliRunner)."""
    monkeypatch.setenv("VISREC_ARTEFACT", str(settings.artefact))
    monkeypatch.setenv("VISREC_QDRANT__PATH", str(settings.qdrant.path))
    monkeypatch.setenv("VISREC_INGEST__FAILURE_REPORT", str(settings.ingest.failure_report))
    monkeypatch.setenv("VISREC_EMBED__WORKERS", "0")
    monkeypatch.setenv("VISREC_EMBED__DEVICE", "cpu")
    return settings


@pytest.fixture
def fetcher() -> Iterator[Callable[..., Fetcher]]:
    """Make Fetchers with a given FetchPolicy (keyword arguments); closed after the test."""
    made: list[Fetcher] = []

    def make(**policy: Any) -> Fetcher:
        made.append(Fetcher(FetchPolicy(**policy)))
        return made[-1]

    yield make
    for f in made:
        f.close()
