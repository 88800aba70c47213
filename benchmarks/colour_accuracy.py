"""Accuracy and speed of `visrec.colour.extract_colours` on generated, labelled product photos.

For every palette colour, random shades are drawn from that colour's core region, defined in HSV (a space
the extractor does not use) as a person would name them: e.g. red is HSV hue within 6 deg of 0 at high
saturation, navy and sky blue are both blue, brown is a dark, saturated orange. Each shade becomes a
random ellipse/rectangle/polygon of random size and position on a white, black or light-grey backdrop,
with mild shading, noise and JPEG compression, and the extractor's dominant name is compared with it.

    python benchmarks/colour_accuracy.py [--per-colour 20] [--size 512] [--seed 0]
"""

from __future__ import annotations

import colorsys
import io
import statistics
import time
from collections import Counter

import numpy as np
from PIL import Image, ImageDraw

from visrec.colour import PALETTE, extract_colours

from common import new_parser

# (hue degrees, saturation, value) ranges of each chromatic colour's core region.
HSV_REGIONS: dict[str, tuple[tuple[float, float], tuple[float, float], tuple[float, float]]] = {
    "red": ((-10, 7), (0.7, 1.0), (0.4, 1.0)),  # crimson .. tomato red, maroon .. bright red
    "orange": ((20, 38), (0.7, 1.0), (0.82, 1.0)),  # deep/burnt orange .. orange
    "yellow": ((45, 60), (0.5, 1.0), (0.82, 1.0)),  # gold, mustard .. lemon, light yellow
    "green": ((80, 160), (0.35, 1.0), (0.25, 0.95)),  # olive green, forest, lime, mint, emerald
    "blue": ((195, 240), (0.4, 1.0), (0.25, 1.0)),  # navy, royal, denim, sky blue
    "purple": ((265, 295), (0.35, 0.9), (0.3, 0.85)),  # indigo, violet, lavender, plum
    "pink": ((320, 350), (0.2, 0.7), (0.85, 1.0)),  # light pink, hot pink, raspberry
    "brown": ((15, 40), (0.4, 0.9), (0.2, 0.6)),  # chocolate, rust, coffee, light brown
    "beige": ((30, 50), (0.1, 0.3), (0.8, 0.97)),  # cream, sand, tan, khaki, almond
}
# Neutral colours: (grey level range, largest per-channel tint).
NEUTRAL_REGIONS: dict[str, tuple[tuple[int, int], int]] = {
    "black": ((0, 50), 8),
    "white": ((235, 255), 5),
    "grey": ((70, 210), 8),
}
BACKDROPS = ("white", "black", "light-grey")


def random_shade(name: str, rng: np.random.Generator) -> tuple[int, int, int]:
    """A random sRGB shade from the named colour's core region."""
    if name in NEUTRAL_REGIONS:
        (lo, hi), tint = NEUTRAL_REGIONS[name]
        level = rng.integers(lo, hi + 1)
        r, g, b = np.clip(level + rng.integers(-tint, tint + 1, size=3), 0, 255)
        return int(r), int(g), int(b)
    (h0, h1), (s0, s1), (v0, v1) = HSV_REGIONS[name]
    rgb = colorsys.hsv_to_rgb((rng.uniform(h0, h1) % 360) / 360, rng.uniform(s0, s1), rng.uniform(v0, v1))
    r, g, b = (round(255 * c) for c in rgb)
    return r, g, b


def backdrop_rgb(kind: str, rng: np.random.Generator) -> tuple[int, int, int]:
    if kind == "white":
        return 255, 255, 255
    if kind == "black":
        return 0, 0, 0
    level = int(rng.integers(200, 241))
    return level, level, level


def draw_product(
    shade: tuple[int, int, int], backdrop: tuple[int, int, int], size: int, rng: np.random.Generator
) -> Image.Image:
    """A photo-like image: one product shape with shading, noise and JPEG artefacts on a flat backdrop."""
    mask_img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask_img)
    area = rng.uniform(0.1, 0.6) * size * size  # product covers 10-60 % of the frame
    aspect = rng.uniform(0.6, 1.6)
    w = min(0.94 * size, np.sqrt(area * aspect))
    h = min(0.94 * size, area / w)
    x0 = rng.uniform(0.03 * size, size - w - 0.03 * size)
    y0 = rng.uniform(0.03 * size, size - h - 0.03 * size)
    box = (x0, y0, x0 + w, y0 + h)
    shape = rng.choice(["ellipse", "rectangle", "polygon"])
    if shape == "ellipse":
        draw.ellipse(box, fill=255)
    elif shape == "rectangle":
        draw.rectangle(box, fill=255)
    else:
        # Evenly spread, jittered vertices: an irregular but full-bodied polygon, not a sliver.
        count = int(rng.integers(5, 9))
        angles = (np.arange(count) + rng.uniform(-0.3, 0.3, size=count)) * 2 * np.pi / count
        radii = rng.uniform(0.75, 1.0, size=count)
        cx, cy = x0 + w / 2, y0 + h / 2
        draw.polygon(
            [
                (cx + r * w / 2 * np.cos(a), cy + r * h / 2 * np.sin(a))
                for a, r in zip(angles, radii, strict=True)
            ],
            fill=255,
        )
    mask = np.asarray(mask_img, dtype=np.float64)[..., None] / 255
    # Mild directional lighting on the product (+-6 %), sensor noise everywhere.
    ramp = np.linspace(-1, 1, size)
    light = 1 + 0.06 * rng.uniform(-1, 1) * (ramp[None, :, None] + ramp[:, None, None]) / 2
    product = np.asarray(shade, dtype=np.float64) * light
    pixels = mask * product + (1 - mask) * np.asarray(backdrop, dtype=np.float64)
    pixels += rng.normal(0, 3, size=pixels.shape)
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def main() -> None:
    parser = new_parser(__doc__)
    parser.add_argument("--per-colour", type=int, default=20, help="shades per colour and backdrop")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    hits: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    backdrop_hits: Counter[str] = Counter()
    confusions: Counter[tuple[str, str, str]] = Counter()
    times_ms: list[float] = []
    for name in PALETTE:
        for backdrop in BACKDROPS:
            for _ in range(args.per_colour):
                shade = random_shade(name, rng)
                image = draw_product(shade, backdrop_rgb(backdrop, rng), args.size, rng)
                start = time.perf_counter()
                got = extract_colours(image).name
                times_ms.append((time.perf_counter() - start) * 1000)
                totals[name] += 1
                if got == name:
                    hits[name] += 1
                    backdrop_hits[backdrop] += 1
                else:
                    confusions[(name, got, backdrop)] += 1

    n = sum(totals.values())
    print(f"images: {n} ({args.size}x{args.size}, seed {args.seed})")
    print(f"overall accuracy: {sum(hits.values()) / n:.3f}")
    for backdrop in BACKDROPS:
        print(f"  on {backdrop:10s} {backdrop_hits[backdrop] / (n / len(BACKDROPS)):.3f}")
    print("per colour:")
    for name in PALETTE:
        print(f"  {name:7s} {hits[name] / totals[name]:.3f}")
    print("confusions (true -> predicted, backdrop: count):")
    for (true, got, backdrop), count in sorted(confusions.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {true} -> {got} on {backdrop}: {count}")
    if not confusions:
        print("  none")
    print(f"median ms/image: {statistics.median(times_ms):.2f} (p95 {np.percentile(times_ms, 95):.2f})")


if __name__ == "__main__":
    main()
