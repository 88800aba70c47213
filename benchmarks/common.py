"""What the benchmarks share: the one Fashion-MNIST reader and its PNG cache, the sample catalogue's
reader and the catalogue writer, embedding a list of images, indexing a labelled gallery, the option
pieces several benchmarks repeat and the result files (json, and markdown headed by the command line).

How a benchmark imports it: `from common import ...`, nothing else. The README and docs/quality.md run
each benchmark as a script (`.venv/bin/python benchmarks/quality.py ...`), and for a script the
interpreter itself puts the script's folder first on `sys.path`, so `common` is found next to it from any
working directory without a line of ours touching `sys.path`; mypy finds it the same way (`mypy
benchmarks`: a folder without `__init__.py` is a search root), and benchmarks/ruff.toml tells isort that
`common` is local. The alternatives cost more than they give:
- a package (`benchmarks/__init__.py`, `from benchmarks.common import ...`) does not import under the
  documented commands: it needs `python -m benchmarks.quality` from the repository root, a change to every
  command in the README and docs/quality.md, for nothing the scripts need;
- `sys.path.insert(0, str(Path(__file__).parent))` in each script restates what the interpreter already
  does, five times over.
The price, stated: only the scripts in this folder can import this module (the library and the tests
never do), and a top-level module of the same name installed elsewhere would be shadowed for them (none
is installed).

Imports stay light (numpy, Pillow, visrec's index types; torch only inside `embed_all`): api_load.py and
colour_accuracy.py take just the parser and the catalogue reader and should not pay torch's import.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import lzma
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from visrec.index.base import VectorIndex
from visrec.index.points import IndexPoint

if TYPE_CHECKING:
    from visrec.embed import Embedder

# Debian's dataset-fashion-mnist; CLASSES in the dataset's label order.
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
SAMPLE_CATALOGUE = Path(__file__).resolve().parents[1] / "data" / "sample" / "catalogue.csv"


# --- data ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """One Fashion-MNIST split as written to the cache: image refs (absolute paths), labels and raw pixels,
    aligned, and the catalogue that lists them."""

    refs: list[str]
    labels: np.ndarray
    pixels: np.ndarray  # (n, 28, 28) uint8
    catalogue: Path


def read_idx(path: Path) -> np.ndarray:
    """An idx (MNIST format) file, gzip- (`.gz`, as Debian ships it) or xz-compressed (`.xz`, as the GPU
    kit carries it), as an array."""
    data = (lzma if path.suffix == ".xz" else gzip).decompress(path.read_bytes())
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def idx_file(data: Path, name: str) -> Path:
    """`<data>/<name>.gz`, or `<name>.xz` where only that is there (the GPU kit's data)."""
    gz = data / f"{name}.gz"
    return gz if gz.is_file() or not (data / f"{name}.xz").is_file() else data / f"{name}.xz"


def _write_pngs(folder: Path, start: int, images: np.ndarray) -> None:
    for i, image in enumerate(images, start):
        Image.fromarray(image, mode="L").save(folder / f"{i}.png")


def prepare_split(data: Path, cache: Path, split: str, limit: int | None = None, seed: int = 0) -> Split:
    """PNGs of a split ("train" or "test") under `cache` (written once, by a process per core) and a
    catalogue of all of them or of a seeded sample of `limit`."""
    prefix = "t10k" if split == "test" else "train"
    pixels = read_idx(idx_file(data, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(idx_file(data, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
    folder = cache / split
    if not (folder / ".complete").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        starts = range(0, len(pixels), 2000)
        with ProcessPoolExecutor(max(1, min(os.cpu_count() or 1, len(starts)))) as pool:
            list(
                pool.map(_write_pngs, [folder] * len(starts), starts, [pixels[i : i + 2000] for i in starts])
            )
        (folder / ".complete").touch()
    keep = np.arange(len(labels))
    if limit is not None and limit < len(keep):
        keep = np.sort(np.random.default_rng(seed).choice(keep, limit, replace=False))
    refs = [str((folder / f"{i}.png").resolve()) for i in keep]
    catalogue = write_catalogue(
        cache / f"{split}-{len(keep)}-seed{seed}.csv",
        ((f"{split}-{i}", ref, CLASSES[labels[i]]) for i, ref in zip(keep, refs, strict=True)),
    )
    return Split(refs, labels[keep], pixels[keep], catalogue)


def write_catalogue(path: Path, rows: Iterable[tuple[str, str, str]]) -> Path:
    """A catalogue CSV of (id, image, category) rows, as visrec reads it; returns `path`."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "image", "category"])
        writer.writerows(rows)
    return path


def catalogue_rows(path: Path = SAMPLE_CATALOGUE) -> list[dict[str, str]]:
    """The rows of a catalogue CSV (the bundled sample's by default) as dicts, in file order."""
    with path.open() as f:
        return list(csv.DictReader(f))


# --- embedding and indexing ---------------------------------------------------------------------------


def embed_all(embedder: Embedder, refs: Sequence[str]) -> np.ndarray:
    """The embeddings of `refs`, in order, through visrec's own decoding and batching (the embedder's
    batch size and workers)."""
    from visrec.images import ImageLimits  # imports torch: only the benchmarks that embed pay for it

    return np.concatenate([b.vectors for b in embedder.embed_refs(refs, ImageLimits())])


def embed_cached(embedder: Embedder, refs: Sequence[str], cache: Path, name: str) -> np.ndarray:
    """`embed_all(embedder, refs)` as float32, kept in `cache` as `<name>-<weights sha>-<count>.npy`
    and read from there by the next run."""
    path = cache / f"{name}-{embedder.manifest.weights_sha256[:12]}-{len(refs)}.npy"
    if path.is_file():
        return np.asarray(np.load(path))
    vectors = embed_all(embedder, refs).astype(np.float32)
    np.save(path, vectors)
    return vectors


def upsert_gallery(
    index: VectorIndex,
    ids: Sequence[str],
    vectors: np.ndarray,
    labels: np.ndarray,
    extra: Mapping[str, Sequence[Any]] | None = None,
) -> None:
    """Upsert vectors[i] as product ids[i] with its Fashion-MNIST category (and extra[key][i] for each
    extra payload field), a thousand points a call."""
    extra = extra or {}
    for start in range(0, len(ids), 1000):
        index.upsert(
            [
                IndexPoint(
                    ids[i],
                    vectors[i],
                    {"product_id": ids[i], "category": CLASSES[labels[i]]}
                    | {key: values[i] for key, values in extra.items()},
                )
                for i in range(start, min(start + 1000, len(ids)))
            ]
        )


# --- options and results ------------------------------------------------------------------------------


def new_parser(doc: str | None) -> argparse.ArgumentParser:
    """A benchmark's argument parser, its module docstring (`doc`) shown as written in --help."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_data_options(p: argparse.ArgumentParser, *, cache: Path, out: Path) -> None:
    """--data (the Fashion-MNIST folder), --cache and --out, with this benchmark's defaults."""
    p.add_argument("--data", type=Path, default=FASHION_MNIST)
    p.add_argument("--cache", type=Path, default=cache)
    p.add_argument("--out", type=Path, default=out)


def add_run_options(p: argparse.ArgumentParser, *, batch_size: int) -> None:
    """--k (neighbours), --batch-size, --workers (image loading) and --seed."""
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)


def command_line() -> str:
    """The command that ran this benchmark, as typed (near enough: the arguments joined by spaces)."""
    return " ".join(sys.argv)


def write_results(out: Path, name: str, data: Any, text: str) -> None:
    """`<out>/<name>.json` (the figures) and `<out>/<name>.md` (the printed markdown under its command)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=2, default=str))
    (out / f"{name}.md").write_text(f"`{command_line()}`\n\n{text}\n")
