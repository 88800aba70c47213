"""Embedding throughput: model only, decoding only, and a whole `visrec sync`, in one run.

Makes product-sized JPEGs from the bundled sample (upscaled), an artefact with random weights (the same
speed as trained ones), then measures:
  (a) model-only img/s on pre-made tensors, for each batch size;
  (b) decode + preprocess img/s through the DataLoader (workers as configured);
  (c) end-to-end sync img/s into a fresh embedded store (decode, colour, embed, upsert);
and prints (c)/(a) and (c)/(b): the pipeline's overhead. Device: CUDA when present, else CPU.

    .venv/bin/python benchmarks/embed_throughput.py --count 512 --input-size 128      # CPU-sized
    .venv/bin/python benchmarks/embed_throughput.py --count 4096 --input-size 224 --batch-sizes 64 128 256
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader

from visrec.artefact import save_artefact
from visrec.catalogue import read_catalogue
from visrec.config import QdrantSettings
from visrec.embed import Embedder, resolve_device
from visrec.images import ImageDataset, ImageLimits, Preprocess, collate_images
from visrec.index import open_index
from visrec.ingest import sync
from visrec.model import WeightInfo, build_model


def make_jpegs(out: Path, count: int, size: int) -> Path:
    """`count` JPEGs of `size` px from the sample catalogue, and a catalogue.csv listing them."""
    sample = Path(__file__).parents[1] / "data" / "sample"
    with (sample / "catalogue.csv").open() as f:
        rows = list(csv.DictReader(f))
    (out / "images").mkdir(parents=True)
    with (out / "catalogue.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "image", "category"])
        for i in range(count):
            row = rows[i % len(rows)]
            image = (
                Image.open(sample / row["image"])
                .convert("RGB")
                .resize((size, size), Image.Resampling.BICUBIC)
            )
            image.save(out / "images" / f"{i}.jpg", quality=90)
            writer.writerow([f"{row['id']}-{i}", f"images/{i}.jpg", row["category"]])
    return out / "catalogue.csv"


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


def decode_only(refs: list[str], pre: Preprocess, batch: int, workers: int) -> float:
    loader = DataLoader(
        ImageDataset(refs, pre, ImageLimits()),
        batch_size=batch,
        num_workers=workers,
        collate_fn=collate_images,
    )
    started = time.perf_counter()
    seen = sum(len(b.indices) for b in loader)
    return seen / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=512, help="images")
    parser.add_argument("--jpeg-size", type=int, default=256, help="JPEG side in pixels")
    parser.add_argument("--input-size", type=int, default=128, help="model input side in pixels")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    args = parser.parse_args()

    device = resolve_device(args.device)
    root = Path(tempfile.mkdtemp(prefix="visrec-bench-"))
    catalogue_path = make_jpegs(root / "data", args.count, args.jpeg_size)
    catalogue = read_catalogue(catalogue_path)
    pre = Preprocess(input_size=args.input_size)
    save_artefact(
        build_model("resnet50", 2),
        root / "model",
        backbone="resnet50",
        pretrained=WeightInfo(source="random"),
        classes=["a", "b"],
        preprocess=pre,
        metrics={},
        training={},
    )
    embedder = Embedder(root / "model", device, args.channels_last, args.precision)
    refs = [catalogue.image_ref(p) for p in catalogue.products]
    print(
        f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{args.count} JPEGs of {args.jpeg_size} px, model input {args.input_size} px, "
        f"{args.workers} workers, channels_last={args.channels_last}, {args.precision}"
    )

    model_rates = {b: model_only(embedder, b, args.count, args.input_size) for b in args.batch_sizes}
    for batch, rate in model_rates.items():
        print(f"(a) model only, batch {batch:4d}:   {rate:8.1f} img/s")
    batch = args.batch_sizes[0]
    decode = decode_only(refs, pre, batch, args.workers)
    print(f"(b) decode + preprocess:         {decode:8.1f} img/s")
    with open_index(QdrantSettings(path=root / "qdrant")) as index:
        summary = sync(
            catalogue,
            index,
            embedder,
            limits=ImageLimits(),
            batch_size=batch,
            workers=args.workers,
            failure_report=root / "failures.jsonl",
        )
    end_to_end = summary.added / summary.seconds
    took = f"{summary.added} in {summary.seconds:.1f} s"
    print(f"(c) end-to-end sync, batch {batch}: {end_to_end:8.1f} img/s ({took})")
    print(f"(c)/(a) = {end_to_end / model_rates[batch]:.2f}   (c)/(b) = {end_to_end / decode:.2f}")


if __name__ == "__main__":
    main()
