"""Builders shared by the test modules (fixtures live in conftest.py): drawn product photos and the
catalogues that list them, small settings, one sync or reindex in this process, and loopback servers.

`run_sync` and `run_reindex` are the one place that knows how `visrec sync` and `visrec reindex` call
their stage, so a change of those signatures is made here.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI
from PIL import Image, ImageDraw

from visrec.artefact import Manifest, load_artefact, save_artefact
from visrec.catalogue import Catalogue, read_catalogue
from visrec.config import EmbedSettings, IngestSettings, QdrantSettings, Settings, TrainSettings
from visrec.embed import Embedder
from visrec.handle import ModelHandle
from visrec.index import Store, VectorIndex, open_index, open_store
from visrec.ingest import ProgressFn, SyncOptions, SyncSummary, sync
from visrec.model import VisrecNet, build_model
from visrec.versions import ReindexSummary, reindex

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60)}


# --- photos and catalogues --------------------------------------------------------------------------------


class MakeCatalogue(Protocol):
    """The `make_catalogue` fixture: writes a CSV catalogue of `n` drawn products (ids `p{start}` on) as
    `name` in the test's folder, with their photos under images/, and returns its path."""

    def __call__(self, n: int = 24, name: str = "catalogue.csv", start: int = 0) -> Path: ...


def draw_product(path: Path, shape: str, colour: str, size: int = 48, variant: int = 0) -> Path:
    """A product photo (`product_image`) saved at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    product_image(shape, colour, size, variant).save(path)
    return path


def product_image(shape: str, colour: str, size: int = 48, variant: int = 0) -> Image.Image:
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
    return image


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    """`rows` as a CSV file whose columns are every key, in order of first appearance."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_catalogue(root: Path, n: int = 24, name: str = "catalogue.csv", start: int = 0) -> Path:
    """A CSV catalogue of `n` drawn products (ids `p{start}` on) as `name` in `root`, with their photos
    under images/: category = shape, with colour and price (the `make_catalogue` fixture)."""
    rows = []
    for i in range(start, start + n):
        shape, colour = SHAPES[i % 3], list(COLOURS)[(i // 3) % 3]
        draw_product(root / "images" / f"p{i}.png", shape, colour, variant=i)
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
    return write_csv(root / name, rows)


def write_shop(root: Path, fmt: str = "csv") -> Path:
    """A shop's catalogue of 12 products (s0…s11) with photos under root/images: categories shirt, jeans
    and shoe; the shop's own colours (navy: not a palette name); and columns of its own, `brand` (acme,
    zeta), `in_stock` and `size`. As CSV every extra column is text ("true", "40"); as JSON lines
    `in_stock` and `size` are a JSON boolean and number, but for s0, whose `in_stock` is the text "true"."""
    rows: list[dict[str, Any]] = []
    for i in range(12):
        drawn = list(COLOURS)[i % 3]
        draw_product(root / "images" / f"s{i}.png", SHAPES[i % 3], drawn, variant=i)
        in_stock, size = i % 4 != 3, 38 + 2 * (i % 3)
        rows.append(
            {
                "id": f"s{i}",
                "image": f"images/s{i}.png",
                "category": ["shirt", "jeans", "shoe"][i % 3],
                "colour": {"red": "red", "green": "green", "blue": "navy"}[drawn],
                "price": 10 + 5 * i,
                "brand": "acme" if i < 6 else "zeta",
                "in_stock": ("true" if i == 0 else in_stock) if fmt == "jsonl" else str(in_stock).lower(),
                "size": size if fmt == "jsonl" else str(size),
            }
        )
    if fmt == "csv":
        return write_csv(root / "shop.csv", rows)
    path = root / "shop.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# --- settings ---------------------------------------------------------------------------------------------


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


# --- sync and reindex in this process ---------------------------------------------------------------------


def export_nudged(source: Path, out: Path, seed: int = 1) -> Manifest:
    """A second real model: the one at `source` with every weight nudged (so its vectors differ),
    exported to `out` (which may be `source` itself) with the same manifest fields."""
    model, manifest = load_artefact(source, torch.device("cpu"))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return export_like(model, manifest, out)


def export_like(
    model: VisrecNet, manifest: Manifest, out: Path, training: dict[str, Any] | None = None
) -> Manifest:
    """`model` exported to `out` with `manifest`'s fields (its `training` replaced if given)."""
    return save_artefact(
        model,
        out,
        backbone=manifest.backbone,
        pretrained=manifest.pretrained,
        classes=manifest.classes,
        preprocess=manifest.preprocess,
        metrics=manifest.metrics,
        training=manifest.training if training is None else training,
        loss=manifest.loss,
    )


def export_random(source: Path, out: Path, seed: int = 123) -> Manifest:
    """A real model that learnt nothing: the architecture of the one at `source` with freshly random
    weights (its embedding layer included), exported to `out` with the same manifest fields."""
    _, manifest = load_artefact(source, torch.device("cpu"))
    torch.manual_seed(seed)
    return export_like(build_model(manifest.backbone, len(manifest.classes)), manifest, out)


def sync_options(settings: Settings, **overrides: Any) -> SyncOptions:
    """`SyncOptions` as `visrec sync` builds them from `settings`, with `overrides` (e.g. `max_delete=1.0`,
    `shard=...`)."""
    return dataclasses.replace(SyncOptions.from_settings(settings), **overrides)


def cpu_embedder(settings: Settings, artefact: Path | None = None) -> Embedder:
    """The model at `artefact` (default: `settings.artefact`) on the CPU, as `settings.embed` say."""
    return Embedder(artefact or settings.artefact, torch.device("cpu"), settings.embed)


def cpu_model(
    settings: Settings, artefact: Path | None = None, embedder: Embedder | None = None
) -> ModelHandle:
    """The model a sync embeds with: `embedder`, or `cpu_embedder(settings, artefact)`."""
    embedder = embedder or cpu_embedder(settings, artefact)
    return ModelHandle(embedder.artefact_dir, settings.embed, loaded=embedder)


def _catalogue(catalogue: Path | Catalogue, settings: Settings) -> Catalogue:
    return catalogue if isinstance(catalogue, Catalogue) else read_catalogue(catalogue, settings.ingest)


def run_sync(
    catalogue: Path | Catalogue,
    settings: Settings,
    *,
    index: VectorIndex | None = None,
    embedder: Embedder | None = None,
    progress: ProgressFn | None = None,
    **options: Any,
) -> SyncSummary:
    """One `visrec sync` in this process: `catalogue` (a path is read with `settings.ingest`) into
    `index` (default: the store of `settings.qdrant`, opened for this call) with `embedder` (default:
    `cpu_embedder(settings)`), its options from `sync_options(settings, **options)`."""
    model = cpu_model(settings, embedder=embedder)
    with nullcontext(index) if index is not None else open_index(settings.qdrant) as opened:
        options_ = sync_options(settings, **options)
        return sync(_catalogue(catalogue, settings), opened, model, options_, progress=progress)


def run_reindex(
    catalogue: Path | Catalogue,
    settings: Settings,
    model: Path,
    store: Store | None = None,
    *,
    accept_failures: bool = False,
    force: bool = False,
    **options: Any,
) -> ReindexSummary:
    """One `visrec reindex --model MODEL` in this process, into `store` (default: the store of
    `settings.qdrant`), its quality gate `settings.gate` (`force`: switch whatever it measures);
    `options` as for `run_sync`."""
    with nullcontext(store) if store is not None else open_store(settings.qdrant) as opened:
        return reindex(
            _catalogue(catalogue, settings),
            opened,
            cpu_model(settings, model),
            sync_options(settings, **options),
            gate=settings.gate,
            force=force,
            accept_failures=accept_failures,
        )


def stored(index: VectorIndex, product_id: str) -> tuple[np.ndarray, dict[str, Any]]:
    """`index.get(product_id)` for a product the test knows is there: its vector and payload."""
    got = index.get(product_id)
    assert got is not None, f"{product_id} is not in the index"
    return got


# --- loopback servers -------------------------------------------------------------------------------------


@contextmanager
def live_server(app: FastAPI) -> Iterator[str]:
    """`app` served by a real uvicorn on a free loopback port, in a thread; yields its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
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


def closed_port(host: str = "127.0.0.1") -> int:
    """A port on `host` that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
