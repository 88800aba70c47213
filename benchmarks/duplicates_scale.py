"""Time of `visrec duplicates` at --size products (default 100,000) on the embedded store (qdrant-edge).

The products, embedded by a trained model through visrec's own decoding (`Embedder.embed_refs`):
- --real Fashion-MNIST test photos (real embeddings; duplicates_calibration.py's cache file for --gallery);
- --planted real duplicates: the first of those photos re-uploaded as 2x up-scaled JPEGs (q75) under new ids;
- the rest up to --size: perturbed copies of the real embeddings, v + Gaussian noise of norm s (s = the
  median distance from a product to its nearest other product), so each is a distinct product in a real
  product's neighbourhood, not a duplicate. (Embedding 90,000 more photos would take hours on 2 shared
  cores; the scan's cost depends on how many vectors there are, hardly on how they were made.)

Then, through `visrec.duplicates`: as a sync leaves the store (no HNSW graph: every search is a full
scan), the per-product work (`get` + one search per photo) timed on a seeded sample of --sample products
and extrapolated to all of them (said so in the output); with --optimize, `optimize()` (timed), the sample
again, and with --full the whole `find_duplicates` run for real, with how many planted pairs it grouped.

    VISREC_ARTEFACT=/tmp/dup/model .venv/bin/python benchmarks/duplicates_scale.py --real 3000 --optimize
"""

from __future__ import annotations

import io
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from visrec.config import EmbedSettings, QdrantSettings, Settings
from visrec.duplicates import find_duplicates, relative_distance
from visrec.embed import Embedder, resolve_device
from visrec.filters import Filters
from visrec.index import VectorIndex
from visrec.index.edge import EdgeIndex

from common import (
    CLASSES,
    add_data_options,
    embed_cached,
    new_parser,
    prepare_split,
    upsert_gallery,
    write_results,
)


def products(args: Any) -> tuple[list[str], np.ndarray, np.ndarray, int]:
    """(ids, vectors, labels, planted): `args.size` products; ids `reupload-of-<id>` are the planted ones."""
    embedder = Embedder(
        args.model or Settings().artefact,
        resolve_device("auto"),
        EmbedSettings(batch_size=args.batch_size, workers=args.workers),
    )
    split = prepare_split(args.data, args.cache / "fashion-mnist", "test", args.real, args.seed)
    real = embed_cached(embedder, split.refs, args.cache, "duplicates-gallery")
    planted = min(args.planted, len(real))
    folder = args.cache / "duplicates-reuploads"
    folder.mkdir(parents=True, exist_ok=True)
    refs = []
    for i in range(planted):
        target = folder / f"{i}.jpg"
        if not target.is_file():
            buffer = io.BytesIO()
            image = Image.open(split.refs[i]).convert("RGB").resize((56, 56), Image.Resampling.BICUBIC)
            image.save(buffer, "JPEG", quality=75)
            target.write_bytes(buffer.getvalue())
        refs.append(str(target))
    copies = embed_cached(embedder, refs, args.cache, "duplicates-reuploads")
    rng = np.random.default_rng(args.seed)
    sample = rng.choice(len(real), 1000, replace=False)
    d2 = (real[sample] ** 2).sum(1)[:, None] + (real**2).sum(1)[None] - 2 * real[sample] @ real.T
    d2[np.arange(len(sample)), sample] = np.inf
    scale = float(np.median(np.sqrt(np.maximum(d2.min(1), 0))))
    synthetic = max(0, args.size - len(real) - planted)
    base = rng.integers(0, len(real), synthetic)
    noise = rng.standard_normal((synthetic, real.shape[1])).astype(np.float32) * (
        scale / np.sqrt(real.shape[1])
    )
    vectors = np.concatenate([real, copies, real[base] + noise])[: args.size]
    labels = np.concatenate([split.labels, split.labels[:planted], split.labels[base]])[: args.size]
    ids = [f"fm-{i}" for i in range(len(real))] + [f"reupload-of-fm-{i}" for i in range(planted)]
    # fm-i is the i-th photo of the sample (split.refs[i]); reupload-of-fm-i its re-upload
    ids += [f"synthetic-{i}-near-fm-{b}" for i, b in enumerate(base)]
    print(f"scale (median nearest-other distance) {scale:.3f}; {synthetic} synthetic", file=sys.stderr)
    return ids[: args.size], vectors, labels, planted


def per_product(index: VectorIndex, ids: list[str], sample: np.ndarray, k: int) -> float:
    """Seconds per product of the scan's own work: `get` and one search per photo."""
    started = time.perf_counter()
    for i in sample:
        found = index.get(ids[i])
        assert found is not None
        for vector in np.atleast_2d(found[0]):
            index.search(vector, k, Filters(), exclude=[ids[i]])
    return (time.perf_counter() - started) / len(sample)


def main() -> None:
    p = new_parser(__doc__)
    add_data_options(p, cache=Path(".visrec/cache"), out=Path(".visrec/duplicates"))
    p.add_argument("--model", type=Path, default=None, help="artefact folder [VISREC_ARTEFACT]")
    p.add_argument("--size", type=int, default=100_000)
    p.add_argument("--real", type=int, default=10_000, help="test photos embedded (a seeded sample)")
    p.add_argument("--planted", type=int, default=300)
    p.add_argument("--sample", type=int, default=300, help="products timed to extrapolate from")
    p.add_argument("--max-distance", type=float, default=None, help="[the configured relative default]")
    p.add_argument("--neighbours", type=int, default=10)
    p.add_argument("--optimize", action="store_true", help="build the HNSW graph, then time again")
    p.add_argument("--full", action="store_true", help="with --optimize: the whole scan, for real")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    ids, vectors, labels, planted = products(args)
    n = len(ids)
    root = args.out / "edge"
    shutil.rmtree(root / "scale", ignore_errors=True)
    index = EdgeIndex(root, "scale", QdrantSettings())
    index.create(vectors.shape[1])
    started = time.perf_counter()
    upsert_gallery(index, ids, vectors, labels)
    upsert_s = round(time.perf_counter() - started, 1)
    max_distance = args.max_distance
    if max_distance is None:  # the configured default: a share of the median vector length
        max_distance, _ = relative_distance(index, Settings().duplicates.max_relative)
    row: dict[str, Any] = {"n": n, "planted": planted, "max_distance": max_distance, "k": args.neighbours}
    row["upsert_s"] = upsert_s
    sample = np.random.default_rng(args.seed).choice(n, min(args.sample, n), replace=False)
    started = time.perf_counter()
    after, pages = None, 0
    while True:
        _, after = index.browse(Filters(), 1000, after)
        pages += 1
        if after is None:
            break
    row["browse_all_s"] = round(time.perf_counter() - started, 2)
    seconds = per_product(index, ids, sample, args.neighbours)
    row["as_synced"] = {"ms_per_product": round(1000 * seconds, 2), "extrapolated_s": round(seconds * n)}
    print(row, file=sys.stderr)
    if args.optimize:
        started = time.perf_counter()
        index.optimize()
        row["optimize_s"] = round(time.perf_counter() - started, 1)
        seconds = per_product(index, ids, sample, args.neighbours)
        row["optimized"] = {"ms_per_product": round(1000 * seconds, 2), "extrapolated_s": round(seconds * n)}
        print(row, file=sys.stderr)
        if args.full:
            started = time.perf_counter()
            scan = find_duplicates(index, max_distance, args.neighbours)
            row["full_scan_s"] = round(time.perf_counter() - started, 1)
            grouped = {pid: g for g, group in enumerate(scan.groups) for pid in group.product_ids}
            found = sum(
                grouped.get(f"reupload-of-fm-{i}", -1) == grouped.get(f"fm-{i}", -2) for i in range(planted)
            )
            row["full"] = {
                "groups": len(scan.groups),
                "products_in_groups": len(grouped),
                "largest_group": max((len(g.products) for g in scan.groups), default=0),
                "planted_pairs_grouped": found,
                "categories_in_groups": sorted({CLASSES[labels[ids.index(p)]] for p in list(grouped)[:50]}),
            }
    index.close()
    shutil.rmtree(root / "scale", ignore_errors=True)
    synced = row["as_synced"]
    lines = [
        f"{n} products ({planted} planted re-uploads), k={args.neighbours}, max distance {max_distance}; "
        f"browse all pages: {row['browse_all_s']} s; upsert: {row['upsert_s']} s",
        "",
        "| state | ms per product (sample of "
        f"{len(sample)}) | {n} products, extrapolated s | optimize s | full scan s (measured) |",
        "|---|---|---|---|---|",
        f"| as synced (no graph) | {synced['ms_per_product']} | {synced['extrapolated_s']} | – | – |",
    ]
    if optimized := row.get("optimized"):
        lines.append(
            f"| optimized (HNSW) | {optimized['ms_per_product']} | {optimized['extrapolated_s']} | "
            f"{row['optimize_s']} | {row.get('full_scan_s', '–')} |"
        )
    if "full" in row:
        lines += ["", f"full scan: {row['full']}"]
    text = "\n".join(lines)
    print(text)
    write_results(args.out, "duplicates_scale", row, text)


if __name__ == "__main__":
    main()
