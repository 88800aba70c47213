"""Embedding throughput: model only, decoding only, and a whole `visrec sync`, in one run.

Makes product-sized JPEGs from the bundled sample (upscaled), an artefact with random weights (the same
speed as trained ones) unless `--artefact` names a trained one, then measures:
  (a) model-only img/s on pre-made tensors, for each batch size;
  (b) decode + preprocess img/s through the DataLoader (workers as configured; with --decode-on-device
      the workers check the JPEGs and the device decodes them);
  (c) end-to-end sync img/s into a fresh embedded store (decode, colour, embed, upsert, and the closing
      optimize(), also shown apart: on a GPU its fixed cost would hide the pipeline's own overhead);
  (d) with --precision bf16/fp16, --compile or --decode-on-device: the top-10 neighbour overlap with
      plain fp32 embeddings of the same images (use a trained --artefact: random weights say little
      about neighbours);
and prints (c)/(a) and (c)/(b): the pipeline's overhead. Device: CUDA when present, else CPU.
`--no-sync` leaves (c) out (no Qdrant engine needed: the GPU kit's run, docs/gpu.md); `--results` appends
the run's figures as one JSON line; `--images-dir` keeps the JPEGs for the next run.

    .venv/bin/python benchmarks/embed_throughput.py --count 512 --input-size 128      # CPU-sized
    .venv/bin/python benchmarks/embed_throughput.py --count 512 --artefact .visrec/quality/model \
        --precision bf16 --channels-last                                                # CPU, bf16
    .venv/bin/python benchmarks/embed_throughput.py --count 4096 --input-size 224 --batch-sizes 64 128 256 \
        --channels-last --precision bf16 --compile --decode-on-device                   # GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from visrec.artefact import save_artefact
from visrec.catalogue import Catalogue, read_catalogue
from visrec.config import EmbedSettings, IngestSettings, QdrantSettings
from visrec.embed import Embedder, resolve_device
from visrec.handle import ModelHandle
from visrec.images import (
    ImageDataset,
    ImageLimits,
    JpegPassThrough,
    Preprocess,
    collate_images,
    preprocess_jpegs,
)
from visrec.index import open_index
from visrec.ingest import SyncOptions, sync
from visrec.model import build_model, load_pretrained

from common import SAMPLE_CATALOGUE, catalogue_rows, embed_all, new_parser, write_catalogue


def make_jpegs(out: Path, count: int, size: int) -> Path:
    """`count` JPEGs of `size` px from the sample catalogue, and a catalogue.csv listing them (written
    last: where it is already there, the JPEGs are reused)."""
    if (out / "catalogue.csv").is_file():
        return out / "catalogue.csv"
    sample = catalogue_rows()
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        row = sample[i % len(sample)]
        image = (
            Image.open(SAMPLE_CATALOGUE.parent / row["image"])
            .convert("RGB")
            .resize((size, size), Image.Resampling.BICUBIC)
        )
        image.save(out / "images" / f"{i}.jpg", quality=90)
        rows.append((f"{row['id']}-{i}", f"images/{i}.jpg", row["category"]))
    return write_catalogue(out / "catalogue.csv", rows)


def model_only(embedder: Embedder, batch: int, count: int, size: int) -> float:
    pixels = torch.randn(batch, 3, size, size)
    embedder.embed_pixels(pixels)  # warm-up
    steps = max(1, count // batch)
    started = time.perf_counter()
    for _ in range(steps):
        embedder.embed_pixels(pixels)
    if embedder.device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - started)


def decode_only(refs: list[str], pre: Preprocess, batch: int, workers: int, on: torch.device | None) -> float:
    """Images/s decoded and preprocessed: by the workers, or, `on` a device, checked by the workers and
    decoded there."""
    loader = DataLoader(
        (JpegPassThrough if on else ImageDataset)(refs, pre, ImageLimits()),
        batch_size=batch,
        num_workers=workers,
        collate_fn=collate_images,
    )
    started = time.perf_counter()
    seen = 0
    for b in loader:
        seen += len(b.indices)
        if on and b.encoded:
            preprocess_jpegs(b.encoded, pre, on)
    if on and on.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - started)


def main() -> None:
    parser = new_parser(__doc__)
    parser.add_argument("--count", type=int, default=512, help="images")
    parser.add_argument("--jpeg-size", type=int, default=256, help="JPEG side in pixels")
    parser.add_argument("--input-size", type=int, default=128, help="model input side in pixels")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64])
    parser.add_argument("--workers", type=int, default=EmbedSettings().workers, help="default: the cores")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--compile", action="store_true", help="torch.compile the embedding path")
    parser.add_argument(
        "--decode-on-device", action="store_true", help="decode JPEGs on the device (nvJPEG on CUDA)"
    )
    parser.add_argument("--no-pin-memory", action="store_true", help="CUDA: pageable host batches")
    parser.add_argument(
        "--artefact", type=Path, help="a trained model (its input size wins); default: random weights"
    )
    parser.add_argument(
        "--weights",
        default="random",
        help="without --artefact: the made model's backbone weights ('random', 'packaged' or a checkpoint)",
    )
    parser.add_argument("--no-sync", dest="sync", action="store_false", help="leave out (c): no Qdrant")
    parser.add_argument("--results", type=Path, help="append this run's figures to a JSON-lines file")
    parser.add_argument("--images-dir", type=Path, help="where the JPEGs go, reused by a later run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="visrec-bench-") as scratch:  # the random model, JPEGs, store
        run(args, Path(scratch))


def run(args: argparse.Namespace, root: Path) -> None:
    """Every measurement of one run; its scratch files (random model, JPEGs, store) go under `root`."""
    device = resolve_device(args.device)
    jpegs = args.images_dir / f"jpegs-{args.count}-{args.jpeg_size}" if args.images_dir else root / "data"
    catalogue_path = make_jpegs(jpegs, args.count, args.jpeg_size)
    catalogue = read_catalogue(catalogue_path)
    artefact = args.artefact or random_artefact(root / "model", args.input_size, args.weights)
    batch = args.batch_sizes[0]  # of the decoding, sync and overlap runs
    embedder = Embedder(
        artefact,
        device,
        EmbedSettings(
            batch_size=batch,
            workers=args.workers,
            channels_last=args.channels_last,
            precision=args.precision,
            compile=args.compile,
            decode_on_device=args.decode_on_device,
            pin_memory=not args.no_pin_memory,
        ),
    )
    pre = embedder.manifest.preprocess
    refs = [ref for p in catalogue.products for ref in catalogue.photo_refs(p)]
    print(
        f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{args.count} JPEGs of {args.jpeg_size} px, model input {pre.input_size} px, "
        f"{args.workers} workers, channels_last={args.channels_last}, {args.precision}, "
        f"compile={args.compile}, decode_on_device={args.decode_on_device}, "
        f"pin_memory={embedder.pin_memory}, "
        f"weights {'of ' + str(artefact) if args.artefact else args.weights}"
    )
    figures: dict[str, Any] = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "count": args.count,
        "jpeg_size": args.jpeg_size,
        "input_size": pre.input_size,
        "workers": args.workers,
        "channels_last": args.channels_last,
        "precision": args.precision,
        "compile": args.compile,
        "decode_on_device": args.decode_on_device,
        "pin_memory": embedder.pin_memory,
        "weights": str(artefact) if args.artefact else args.weights,
    }

    if args.compile:  # compilation is paid once per process: keep it out of the rates
        started = time.perf_counter()
        for b in args.batch_sizes:
            embedder.embed_pixels(torch.randn(b, 3, pre.input_size, pre.input_size))
        figures["compile_s"] = time.perf_counter() - started
        print(f"torch.compile warm-up: {figures['compile_s']:.0f} s")
    model_rates = {b: model_only(embedder, b, args.count, pre.input_size) for b in args.batch_sizes}
    figures["model_only"] = model_rates
    for b, rate in model_rates.items():  # not `batch`: the decoding, sync and overlap runs use the first
        print(f"(a) model only, batch {b:4d}:   {rate:8.1f} img/s")
    decode = decode_only(refs, pre, batch, args.workers, device if args.decode_on_device else None)
    figures["decode"] = decode
    print(f"(b) decode + preprocess:         {decode:8.1f} img/s")
    if args.sync:
        figures["sync"] = end_to_end_sync(catalogue, embedder, root, model_rates[batch], decode)
    if args.precision != "fp32" or args.compile or args.decode_on_device:
        plain = Embedder(artefact, device, EmbedSettings(batch_size=batch, workers=args.workers))
        reference, fast = (embed_all(e, refs) for e in (plain, embedder))
        figures["overlap"] = overlap_ = overlap(reference, fast)
        print(f"(d) top-10 neighbour overlap with plain fp32 on the {len(refs)} images: {overlap_:.3f}")
    if args.results:
        with args.results.open("a") as f:
            f.write(json.dumps(figures) + "\n")


def end_to_end_sync(
    catalogue: Catalogue, embedder: Embedder, root: Path, model_rate: float, decode: float
) -> dict[str, float]:
    """(c): a whole sync into a fresh embedded store; its rates, with and without the closing optimize()."""
    batch = embedder.settings.batch_size
    with open_index(QdrantSettings(path=root / "qdrant")) as index:
        options = SyncOptions(IngestSettings(), root / "failures.jsonl", 1.0)
        model = ModelHandle(embedder.artefact_dir, embedder.settings, loaded=embedder)
        summary = sync(catalogue, index, model, options)
    # A sync ends with the index's optimize(), a cost of the store that a fast GPU run would otherwise
    # read as pipeline overhead: both rates are printed, with and without it.
    end_to_end = summary.added / summary.seconds
    without_optimize = summary.added / (summary.seconds - summary.optimize_seconds)
    print(
        f"(c) end-to-end sync, batch {batch}: {end_to_end:8.1f} img/s ({summary.added} in "
        f"{summary.seconds:.1f} s, of which {summary.optimize_seconds:.1f} s the closing optimize(); "
        f"{without_optimize:.1f} img/s without it)"
    )
    print(
        f"(c)/(a) = {end_to_end / model_rate:.2f} ({without_optimize / model_rate:.2f} "
        f"without optimize)   (c)/(b) = {end_to_end / decode:.2f}"
    )
    return {
        "images_per_s": end_to_end,
        "images_per_s_without_optimize": without_optimize,
        "seconds": summary.seconds,
        "optimize_seconds": summary.optimize_seconds,
    }


def random_artefact(out: Path, input_size: int, weights: str = "random") -> Path:
    """A ResNet50 artefact with random weights (the same speed as a trained one), or with the backbone's
    `weights` (packaged or a checkpoint; `fc` stays random): neighbours then mean something."""
    torch.manual_seed(0)
    model = build_model("resnet50", 2)
    save_artefact(
        model,
        out,
        backbone="resnet50",
        pretrained=load_pretrained(model, "resnet50", weights),
        classes=["a", "b"],
        preprocess=Preprocess(input_size=input_size),
        metrics={},
        training={},
    )
    return out


def overlap(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    """Mean share of each image's k nearest neighbours (itself excluded) that both embeddings agree on."""

    def neighbours(v: np.ndarray) -> np.ndarray:
        squared = (v * v).sum(1)
        d = squared[:, None] + squared[None] - 2 * v @ v.T
        np.fill_diagonal(d, np.inf)
        return np.argsort(d, axis=1)[:, :k]

    na, nb = neighbours(a), neighbours(b)
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(na, nb, strict=True)]))


if __name__ == "__main__":
    main()
