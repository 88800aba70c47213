"""Shared fixtures: generated product photos, catalogues, small settings, and one tiny real model.

Everything is real: Pillow-drawn images, a real ResNet18 (random init, 32 px) trained and exported
once per session, a real embedded Qdrant engine on a temp folder.
"""

from __future__ import annotations

import csv
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import uvicorn
from PIL import Image, ImageDraw

from visrec.artefact import Manifest
from visrec.catalogue import read_catalogue
from visrec.config import EmbedSettings, IngestSettings, QdrantSettings, Settings, TrainSettings

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60)}

torch.set_num_threads(2)


def draw_product(path: Path, shape: str, colour: str, size: int = 48, variant: int = 0) -> Path:
    """A product photo: a coloured shape on a white background, slightly varied by `variant`."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    m = 6 + variant % 5
    box = (m, m, size - m - variant % 3, size - m)
    rgb = tuple(min(255, c + 7 * (variant % 4)) for c in COLOURS[colour])
    if shape == "circle":
        draw.ellipse(box, fill=rgb)
    elif shape == "square":
        draw.rectangle(box, fill=rgb)
    else:
        draw.polygon([(size // 2, m), (m, size - m), (size - m, size - m)], fill=rgb)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def make_catalogue(tmp_path: Path) -> Callable[..., Path]:
    """Build a CSV catalogue of `n` drawn products: category = shape, with colour and price."""

    def make(n: int = 24, name: str = "catalogue.csv", start: int = 0) -> Path:
        rows = []
        for i in range(start, start + n):
            shape, colour = SHAPES[i % 3], list(COLOURS)[(i // 3) % 3]
            draw_product(tmp_path / "images" / f"p{i}.png", shape, colour, variant=i)
            rows.append(
                {
                    "id": f"p{i}",
                    "image": f"images/p{i}.png",
                    "category": shape,
                    "colour": colour,
                    "price": f"{10 + i}.5",
                    "title": f"{colour} {shape} {i}",
                }
            )
        return write_csv(tmp_path / name, rows)

    return make


def small_settings(root: Path, artefact: Path | None = None) -> Settings:
    """Settings sized for tests: ResNet18 at 32 px, random init, no DataLoader workers."""
    return Settings(
        artefact=artefact or root / "model",
        qdrant=QdrantSettings(path=root / "qdrant"),
        embed=EmbedSettings(device="cpu", batch_size=16, workers=0),
        ingest=IngestSettings(failure_report=root / "failures.jsonl"),
        train=TrainSettings(
            backbone="resnet18",
            weights="random",
            image_size=32,
            epochs_frozen=3,
            epochs_finetune=1,
            lr_frozen=3e-3,
            lr_finetune=1e-4,
            batch_size=16,
        ),
    )


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


@contextmanager
def live_server(app: object) -> Iterator[str]:
    """`app` served by a real uvicorn on a free loopback port, in a thread; yields its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))  # type: ignore[arg-type]
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
