"""Draw the README's picture, `docs/similar.png`, from the demo's real output.

Each row is a query product from the demo's index and its nearest neighbours by distance: the rows
`visrec report` writes (`visrec.report.pick_queries` and `run_queries`, the same picks for the same
seed), drawn with Pillow from the products' own photos, with the distances the query returned. Run it
after the demo (`./scripts/demo.sh`), from the repository root:

    .venv/bin/python scripts/readme_picture.py            # reads .visrec/demo/qdrant, writes docs/similar.png
    .venv/bin/python scripts/readme_picture.py --store .visrec/qdrant --out /tmp/mine.png --queries 6 -k 8
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from visrec.config import load_settings
from visrec.errors import ImageError
from visrec.images import ImageLimits, load_image
from visrec.index import Hit, open_index
from visrec.payload import photos
from visrec.report import ReportRow, pick_queries, run_queries

DEMO_STORE = Path(".visrec/demo/qdrant")  # where scripts/demo.sh syncs the sample
TILE = 96  # photo size in pixels (the sample's 28 x 28 photos, scaled up without smoothing)
GAP = 10
CAPTION = 34  # two lines of text under each photo
MARGIN = 14
HEADER = 30
QUERY_RULE = 4  # the green line after each row's query, as in the HTML report
GREEN = (34, 170, 102)
GREY = (110, 110, 110)
INK = (34, 34, 34)


def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's own font at `size` (no system font needed)."""
    return ImageFont.load_default(size=size)


def tile(payload: dict[str, object], matched: int = 0) -> Image.Image:
    """The product's photo that matched (its first for the query), fitted into a TILE square."""
    refs = photos(payload)
    ref = str(refs[matched] if matched < len(refs) else refs[0])
    square = Image.new("RGB", (TILE, TILE), (244, 244, 244))
    try:
        photo = load_image(ref, ImageLimits())
    except ImageError:
        return square
    if max(photo.size) < TILE:  # tiny photos (Fashion-MNIST's) scaled up with sharp pixels, as in the report
        scale = TILE // max(photo.size)
        photo = photo.resize((photo.width * scale, photo.height * scale), Image.Resampling.NEAREST)
    else:
        photo.thumbnail((TILE, TILE), Image.Resampling.LANCZOS)
    square.paste(photo, ((TILE - photo.width) // 2, (TILE - photo.height) // 2))
    return square


def draw(rows: list[ReportRow], k: int, model_version: str) -> Image.Image:
    """One picture: per row the query, a green rule, then its neighbours with their distances."""
    width = 2 * MARGIN + (k + 1) * (TILE + GAP) + QUERY_RULE + GAP
    height = 2 * MARGIN + HEADER + len(rows) * (TILE + CAPTION + GAP)
    picture = Image.new("RGB", (width, height), "white")
    pen = ImageDraw.Draw(picture)
    title, small = font(15), font(12)
    pen.text(
        (MARGIN, MARGIN),
        f"query, then its {k} nearest neighbours by Euclidean distance d (demo model {model_version})",
        fill=INK,
        font=title,
    )
    for n, row in enumerate(rows):
        y = MARGIN + HEADER + n * (TILE + CAPTION + GAP)
        x = MARGIN
        picture.paste(tile(row.query), (x, y))
        caption(pen, x, y, "query", str(row.query.get("category", "")), small, GREEN)
        x += TILE + GAP
        pen.rectangle((x, y, x + QUERY_RULE - 1, y + TILE + CAPTION - 6), fill=GREEN)
        x += QUERY_RULE + GAP
        for hit in row.hits:
            picture.paste(tile(hit.payload, hit.matched), (x, y))
            caption(pen, x, y, f"d = {hit.distance:.2f}", category(hit), small, INK)
            x += TILE + GAP
    return picture


def category(hit: Hit) -> str:
    return str(hit.payload.get("category", ""))


def caption(
    pen: ImageDraw.ImageDraw,
    x: int,
    y: int,
    first: str,
    second: str,
    face: ImageFont.FreeTypeFont | ImageFont.ImageFont,
    colour: tuple[int, int, int],
) -> None:
    pen.text((x, y + TILE + 3), first, fill=colour, font=face)
    pen.text((x, y + TILE + 18), second[:16], fill=GREY, font=face)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--store", type=Path, help="embedded store [VISREC_QDRANT__PATH, else the demo's]")
    parser.add_argument("--out", type=Path, default=Path("docs/similar.png"))
    parser.add_argument("--queries", type=int, default=4, help="query products, spread over categories")
    parser.add_argument("-k", type=int, default=6, help="neighbours per query")
    parser.add_argument("--seed", type=int, default=0, help="which products are picked (as visrec report)")
    args = parser.parse_args()

    store = args.store or Path(os.environ.get("VISREC_QDRANT__PATH", DEMO_STORE))
    if not store.exists() and not os.environ.get("VISREC_QDRANT__URL"):
        parser.error(f"no store at {store}: run ./scripts/demo.sh first")
    settings = load_settings(qdrant={"path": str(store)})
    with open_index(settings.qdrant) as index:
        rows = run_queries(index, pick_queries(index, args.queries, args.seed), args.k, same_category=False)
    if not rows:
        parser.error(f"{store} holds no products: run ./scripts/demo.sh first")
    version = str(rows[0].query.get("model_version", ""))
    picture = draw(rows, args.k, version)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # 64 colours: grey photos, black text and one green; keeps the file small
    picture.quantize(64, dither=Image.Dither.NONE).save(args.out, optimize=True)
    print(f"{args.out}: {len(rows)} rows, {args.out.stat().st_size / 1024:.0f} KiB")
    for row in rows:
        neighbours = ", ".join(f"{h.product_id} {h.distance:.2f}" for h in row.hits)
        print(f"  {row.query_id} ({row.query.get('category')}): {neighbours}")


if __name__ == "__main__":
    main()
