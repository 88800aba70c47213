"""Calibrate `visrec duplicates --max-distance` on real product photos (Fashion-MNIST) with a trained model.

The products: --gallery photos of the test split (a seeded sample; all 10,000 by default). Positives:
--originals of them, each against its own copies re-encoded (JPEG qualities), resized (down then up,
up-scaled) and slightly cropped, as a shop re-uploads a photo. Negatives: each of those photos against the
nearest OTHER product of its own category among the products (the hardest honest non-duplicate), exact
pixel copies inside the dataset excluded and counted.
All images go through visrec's own decoding and the exported model (`Embedder.embed_refs`).

Colour (`visrec duplicates`' colour check, `visrec.duplicates.colours_agree`): every image's colour is
extracted as sync does (`visrec.colour`, on visrec's decoding), and pairs are judged by the vector distance
and by their colours. Duplicates that keep colour: the copies above, and copies of a tinted photo
(Fashion-MNIST is greyscale: the photo coloured as a shop's red product). Colour variants, which must not
be linked: the same photo tinted another colour (grey → red, red → orange/yellow/pink/blue, yellow →
pink), i.e. one shape in several colours. For each Delta E candidate: the share of duplicates whose colours
agree and of variants whose colours differ, and, at the chosen vector distance, how many of each are linked
without the colour check (before) and with it (after, at --colour-delta-e or the configured default).

For each candidate threshold: recall per kind of copy and overall, the false-link rate (share of products
whose nearest same-category product lies within it) and precision at one planted copy per product
(recall / (recall + false-link rate)). The chosen threshold: the largest candidate with a false-link rate
≤ --max-false (default 0.5%). Thresholds are also given relative to the model's scale: the median
distance from a product to its nearest other product (any category) among the products, and the median
length of an embedding.

    VISREC_ARTEFACT=/tmp/dup/model .venv/bin/python benchmarks/duplicates_calibration.py \
        --gallery 3000 --originals 200 --workers 1
"""

from __future__ import annotations

import functools
import io
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from visrec.colour import extract_colours
from visrec.config import EmbedSettings, Settings
from visrec.duplicates import colour_distance, colours_agree, photo_lab
from visrec.embed import Embedder, resolve_device
from visrec.images import ImageLimits, load_image

from common import add_data_options, embed_all, embed_cached, new_parser, prepare_split, write_results


def _jpeg(image: Image.Image, quality: int) -> bytes:
    """The photo re-encoded as a JPEG file (colour, as a shop's upload would be)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def _resized(image: Image.Image, size: int, back: bool = True) -> Image.Image:
    small = image.resize((size, size), Image.Resampling.BICUBIC)
    return small.resize(image.size, Image.Resampling.BICUBIC) if back else small


def _crop(image: Image.Image, left: int, top: int, right: int, bottom: int) -> Image.Image:
    w, h = image.size
    return image.crop((left, top, w - right, h - bottom))


# kind → how a shop's second upload of the same photo differs (the originals are 28 x 28 grayscale PNGs)
COPIES: dict[str, Callable[[Image.Image], Image.Image | bytes]] = {
    "jpeg q90": lambda im: _jpeg(im, 90),
    "jpeg q70": lambda im: _jpeg(im, 70),
    "jpeg q40": lambda im: _jpeg(im, 40),
    "jpeg q20": lambda im: _jpeg(im, 20),
    "upscaled 4x": lambda im: _resized(im, 112, back=False),
    "upscaled 2x + jpeg q75": lambda im: _jpeg(_resized(im, 56, back=False), 75),
    "down 0.7x, up": lambda im: _resized(im, 20),
    "down 0.5x, up": lambda im: _resized(im, 14),
    "crop 1 px each side": lambda im: _crop(im, 1, 1, 1, 1),
    "crop 2 px top-left": lambda im: _crop(im, 2, 2, 0, 0),
    "crop 2 px each side": lambda im: _crop(im, 2, 2, 2, 2),
}


# A shop's coloured product photo: the greyscale photo's light product on its black backdrop, coloured.
TINTS = {
    "red": (200, 30, 30),
    "orange": (235, 120, 30),
    "yellow": (230, 200, 40),
    "pink": (240, 130, 170),
    "blue": (40, 70, 200),
}


def _tinted(image: Image.Image, colour: str) -> Image.Image:
    return ImageOps.colorize(image.convert("L"), black=(0, 0, 0), white=TINTS[colour])


# Images made from each original for the colour pairs: name → how (the original itself is "grey").
TINTED: dict[str, Callable[[Image.Image], Image.Image | bytes]] = {
    **{colour: functools.partial(_tinted, colour=colour) for colour in TINTS},
    "red, jpeg q70": lambda im: _jpeg(_tinted(im, "red"), 70),
    "red, jpeg q40": lambda im: _jpeg(_tinted(im, "red"), 40),
    "red, upscaled 2x + jpeg q75": lambda im: _jpeg(_resized(_tinted(im, "red"), 56, back=False), 75),
    "red, down 0.7x, up": lambda im: _resized(_tinted(im, "red"), 20),
    "red, crop 1 px each side": lambda im: _crop(_tinted(im, "red"), 1, 1, 1, 1),
}
# Colour pairs: (first image, second image, whether they are one photo). Copies of the grey photo (COPIES)
# are duplicates too and are added from the positives.
COLOUR_PAIRS: list[tuple[str, str, bool]] = [
    ("red", "red, jpeg q70", True),
    ("red", "red, jpeg q40", True),
    ("red", "red, upscaled 2x + jpeg q75", True),
    ("red", "red, down 0.7x, up", True),
    ("red", "red, crop 1 px each side", True),
    ("grey", "red", False),
    ("red", "orange", False),
    ("red", "yellow", False),
    ("red", "pink", False),
    ("red", "blue", False),
    ("yellow", "pink", False),
]
DELTA_E_CANDIDATES = (3.0, 5.0, 8.0, 10.0, 12.0, 15.0, 20.0, 25.0, 30.0, 40.0)


def _colour(ref: str) -> dict[str, Any]:
    """The colour fields sync would store for this photo, through visrec's decoding."""
    return extract_colours(load_image(ref, ImageLimits())).payload()


def nearest_other(vectors: np.ndarray, queries: np.ndarray, skip: list[set[int]]) -> np.ndarray:
    """For each query row, the distance to the nearest vector not in its `skip` set (exact, numpy)."""
    sq = (vectors**2).sum(1)
    out = np.empty(len(queries))
    for start in range(0, len(queries), 256):
        block = queries[start : start + 256]
        d2 = (block**2).sum(1)[:, None] + sq[None, :] - 2 * block @ vectors.T
        for row, d in enumerate(d2):
            d[list(skip[start + row])] = np.inf
            out[start + row] = np.sqrt(max(float(d.min()), 0.0))
    return out


def main() -> None:
    p = new_parser(__doc__)
    add_data_options(p, cache=Path(".visrec/cache"), out=Path(".visrec/duplicates"))
    p.add_argument("--model", type=Path, default=None, help="artefact folder [VISREC_ARTEFACT]")
    p.add_argument("--gallery", type=int, default=10_000, help="test photos: the products (seeded sample)")
    p.add_argument("--originals", type=int, default=500, help="of them, photos copied (positives)")
    p.add_argument("--max-false", type=float, default=0.005, help="false-link rate the choice allows")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--colour-delta-e",
        type=float,
        default=None,
        help="colour rule's threshold for the before/after table [VISREC_DUPLICATES__MAX_COLOUR_DELTA_E]",
    )
    args = p.parse_args()

    artefact = args.model or Settings().artefact
    embedder = Embedder(
        artefact, resolve_device("auto"), EmbedSettings(batch_size=args.batch_size, workers=args.workers)
    )
    model = embedder.manifest.model_version
    split = prepare_split(args.data, args.cache / "fashion-mnist", "test", args.gallery, args.seed)
    started = time.perf_counter()
    gallery = embed_cached(embedder, split.refs, args.cache, "duplicates-gallery")
    took = time.perf_counter() - started
    print(f"gallery: {len(gallery)} products embedded ({took:.0f} s)", file=sys.stderr)

    rng = np.random.default_rng(args.seed)
    picks = np.sort(rng.choice(len(gallery), args.originals, replace=False))
    folder = args.cache / "duplicates-copies"
    refs: list[str] = []
    for kind_no, make in enumerate(COPIES.values()):
        (folder / str(kind_no)).mkdir(parents=True, exist_ok=True)
        for i in picks:
            copy = make(Image.open(split.refs[i]))
            path = folder / str(kind_no) / f"{i}.{'jpg' if isinstance(copy, bytes) else 'png'}"
            if isinstance(copy, bytes):
                path.write_bytes(copy)
            else:
                copy.save(path)
            refs.append(str(path))
    copies_file = (
        args.cache
        / f"duplicates-copies-{embedder.manifest.weights_sha256[:12]}-{len(picks)}-{len(gallery)}.npy"
    )
    if copies_file.is_file():
        copies = np.load(copies_file)
    else:
        copies = embed_all(embedder, refs).astype(np.float32).reshape(len(COPIES), len(picks), -1)
        np.save(copies_file, copies)
    positives = np.linalg.norm(copies - gallery[picks][None], axis=2)  # (kinds, originals)

    # Negatives: nearest other product of the same category; pixel-identical images are true duplicates.
    flat = split.pixels.reshape(len(split.pixels), -1)
    twins = [{int(j) for j in np.flatnonzero((flat == flat[i]).all(1))} for i in picks]
    exact_copies = sum(len(t) - 1 for t in twins)
    labels = split.labels
    negatives = np.empty(len(picks))
    for c in np.unique(labels[picks]):
        members = np.flatnonzero(labels == c)
        rows = np.flatnonzero(labels[picks] == c)
        position = {int(j): n for n, j in enumerate(members)}
        skip = [{position[j] for j in twins[r]} for r in rows]
        negatives[rows] = nearest_other(gallery[members], gallery[picks[rows]], skip)
    scale_sample = rng.choice(len(gallery), min(2000, len(gallery)), replace=False)
    scale = float(np.median(nearest_other(gallery, gallery[scale_sample], [{int(i)} for i in scale_sample])))

    norm = float(np.median(np.linalg.norm(gallery, axis=1)))

    # Candidates are shares of the median embedding length (what `visrec duplicates` is configured in).
    lo = float(np.quantile(positives, 0.05)) / norm
    hi = max(float(np.quantile(negatives, 0.2)), float(np.quantile(positives, 0.99))) / norm
    shares = sorted({float(f"{r:.2g}") for r in np.geomspace(max(lo, 1e-4), hi, 16)})
    kinds = list(COPIES)
    rows_out: list[dict[str, Any]] = []
    for share in shares:
        t = share * norm
        recall_by_kind = (positives <= t).mean(axis=1)
        recall = float(recall_by_kind.mean())
        false_rate = float((negatives <= t).mean())
        precision = recall / (recall + false_rate) if recall + false_rate else 1.0
        rows_out.append(
            {
                "share_of_norm": share,
                "threshold": t,
                "per_nn_scale": t / scale,
                "recall": recall,
                "false_link_rate": false_rate,
                "precision": precision,
                "recall_by_kind": dict(zip(kinds, map(float, recall_by_kind), strict=True)),
            }
        )
    allowed = [r for r in rows_out if r["false_link_rate"] <= args.max_false]
    chosen = max(allowed, key=lambda r: r["share_of_norm"]) if allowed else rows_out[0]

    lines = [
        f"model {model}; {len(picks)} originals x {len(kinds)} kinds of copy; negatives: nearest other "
        f"product of the same category among {len(gallery)} (exact pixel copies excluded: {exact_copies})",
        f"median embedding norm: {norm:.3f}; NN scale (median nearest-other-product distance): {scale:.3f}",
        "",
        "| kind of copy | median distance | p95 | max |",
        "|---|---|---|---|",
    ]
    for kind, d in zip(kinds, positives, strict=True):
        lines.append(f"| {kind} | {np.median(d):.3f} | {np.quantile(d, 0.95):.3f} | {d.max():.3f} |")
    q = np.quantile(negatives, [0.0, 0.005, 0.01, 0.05, 0.5])
    lines.append(
        f"| nearest same-category product (negatives) | {q[4]:.3f} | min {q[0]:.3f}, "
        f"p0.5 {q[1]:.3f}, p1 {q[2]:.3f}, p5 {q[3]:.3f} | |"
    )
    lines += [
        "",
        "| share of median norm | distance | / NN scale | recall | false-link rate | precision (1:1) "
        "| worst kind (recall) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows_out:
        worst = min(r["recall_by_kind"].items(), key=lambda kv: kv[1])
        mark = " **chosen**" if r is chosen else ""
        lines.append(
            f"| {r['share_of_norm']:g}{mark} | {r['threshold']:.2f} | {r['per_nn_scale']:.3f} | "
            f"{r['recall']:.3f} | {r['false_link_rate']:.3f} | {r['precision']:.3f} | "
            f"{worst[0]} ({worst[1]:.2f}) |"
        )
    lines += [
        "",
        f"chosen: {chosen['share_of_norm']:g} x the median norm (= distance {chosen['threshold']:.2f} for "
        f"this model): the largest candidate with a false-link rate <= {args.max_false}",
    ]
    colour_lines, colour_data = _colour_report(args, embedder, split.refs, gallery, picks, positives, chosen)
    lines += colour_lines
    text = "\n".join(lines)
    print(text)
    write_results(
        args.out,
        "duplicates_calibration",
        {
            "model": model,
            "scale": scale,
            "median_norm": norm,
            "positives": {k: d.tolist() for k, d in zip(kinds, positives, strict=True)},
            "negatives": negatives.tolist(),
            "rows": rows_out,
            "chosen": chosen,
            "colour": colour_data,
        },
        text,
    )


def _colour_report(
    args: Any,
    embedder: Embedder,
    refs: list[str],
    gallery: np.ndarray,
    picks: np.ndarray,
    positives: np.ndarray,
    chosen: dict[str, Any],
) -> tuple[list[str], dict[str, Any]]:
    """The colour pairs: tinted images made and embedded (cached), every image's colour extracted, and the
    tables of how the colour check treats duplicates and colour variants."""
    folder = args.cache / "duplicates-tinted"
    made: dict[str, list[str]] = {}
    for number, (name, make) in enumerate(TINTED.items()):
        (folder / str(number)).mkdir(parents=True, exist_ok=True)
        made[name] = []
        for i in picks:
            image = make(Image.open(refs[i]))
            path = folder / str(number) / f"{i}.{'jpg' if isinstance(image, bytes) else 'png'}"
            if isinstance(image, bytes):
                path.write_bytes(image)
            else:
                image.save(path)
            made[name].append(str(path))
    flat_refs = [ref for name in TINTED for ref in made[name]]
    cache_name = f"duplicates-tinted-{len(picks)}-{len(gallery)}"
    tinted = embed_cached(embedder, flat_refs, args.cache, cache_name).reshape(len(TINTED), len(picks), -1)
    vectors = {"grey": gallery[picks], **{name: tinted[n] for n, name in enumerate(TINTED)}}
    started = time.perf_counter()
    colours = {name: [_colour(ref) for ref in made[name]] for name in TINTED}
    colours["grey"] = [_colour(refs[i]) for i in picks]
    copy_folder = args.cache / "duplicates-copies"
    for number, kind in enumerate(COPIES):
        files = [copy_folder / str(number) / f"{i}.{ext}" for i in picks for ext in ("jpg", "png")]
        colours[kind] = [_colour(str(f)) for f in files if f.is_file()]
    took = time.perf_counter() - started
    print(f"colours of {sum(map(len, colours.values()))} images extracted ({took:.0f} s)", file=sys.stderr)

    # Each pair kind: (name, duplicate?, vector distances, the two photos' colour fields)
    Colours = list[tuple[dict[str, Any], dict[str, Any]]]
    pairs: list[tuple[str, bool, np.ndarray, Colours]] = []
    for number, kind in enumerate(COPIES):
        both = list(zip(colours["grey"], colours[kind], strict=True))
        pairs.append((f"grey: {kind}", True, positives[number], both))
    for a, b, duplicate in COLOUR_PAIRS:
        distance = np.linalg.norm(vectors[a] - vectors[b], axis=1)
        both = list(zip(colours[a], colours[b], strict=True))
        pairs.append((b if duplicate else f"{a} → {b}", duplicate, distance, both))

    limit = (
        args.colour_delta_e if args.colour_delta_e is not None else Settings().duplicates.max_colour_delta_e
    )
    t = chosen["threshold"]
    lines = [
        "",
        "Colour: Delta E (CIE76) between the two photos' dominant colours, and at the chosen distance "
        f"{t:.2f} the share linked without the colour check (before) and with it at Delta E {limit} (after)",
        "",
        "| pair | one photo? | median ΔE | p95 ΔE | max ΔE | within distance (before) | linked (after) | "
        + " | ".join(f"ΔE ≤ {c:g}" for c in DELTA_E_CANDIDATES)
        + " |",
        "|---|---|---|---|---|---|---|" + "---|" * len(DELTA_E_CANDIDATES),
    ]
    out: dict[str, Any] = {"max_colour_delta_e": limit, "pairs": {}}
    for name, duplicate, distance, both in pairs:
        labs = [(photo_lab(x, 0), photo_lab(y, 0)) for x, y in both]
        de = np.array([colour_distance(x, y) if x and y else np.nan for x, y in labs])
        within = distance <= t
        agree = np.array([colours_agree(x, 0, y, 0, limit) for x, y in both])  # the rule itself decides
        shares = [float((de <= c).mean()) for c in DELTA_E_CANDIDATES]
        lines.append(
            f"| {name} | {'yes' if duplicate else 'no: colour variant'} | {np.median(de):.1f} | "
            f"{np.quantile(de, 0.95):.1f} | {de.max():.1f} | {within.mean():.3f} | "
            f"{(within & agree).mean():.3f} | " + " | ".join(f"{v:.3f}" for v in shares) + " |"
        )
        out["pairs"][name] = {"duplicate": duplicate, "distance": distance.tolist(), "delta_e": de.tolist()}
    # The suggested Delta E: the largest candidate at which no kind of colour variant agrees more often
    # than --max-false (as the distance's choice allows false links); then what it keeps and rejects.
    variants = [np.array(v["delta_e"]) for v in out["pairs"].values() if not v["duplicate"]]
    fits = [
        c for c in DELTA_E_CANDIDATES if all(float((de <= c).mean()) <= args.max_false for de in variants)
    ]
    suggested = max(fits) if fits else DELTA_E_CANDIDATES[0]
    copies = [v for v in out["pairs"].values() if v["duplicate"]]
    within = np.concatenate([np.array(v["distance"]) <= t for v in copies])
    agree = np.concatenate([np.array(v["delta_e"]) <= suggested for v in copies])
    rejected = float(np.mean(np.concatenate(variants) > suggested))
    out["suggested_delta_e"] = suggested
    lines += [
        "",
        f"suggested Delta E: {suggested:g}, the largest candidate at which no kind of colour variant agrees "
        f"more often than {args.max_false}. There: copies linked at the distance {int(within.sum())} of "
        f"{within.size} before, {int((within & agree).sum())} after; copies whose colours agree "
        f"{agree.mean():.3f}; colour variants rejected {rejected:.3f}",
    ]
    return lines, out


if __name__ == "__main__":
    main()
