"""Dominant product colour of a product photo, named with a small fixed palette.

Pipeline: downscale -> estimate the background from the image border -> drop pixels close to it (CIE Lab
Delta E) -> name every remaining pixel -> histogram over `PALETTE`.

Naming happens in OKLCh, not CIE LCh: CIE Lab's hue angle bends in the blue-purple region (pure sRGB blue
and a medium purple both sit at h = 306 deg), so no CIE hue boundary separates blue from purple; OKLab was
built to keep hue constant there. CIE Lab is still what is reported and what the background distance uses.

Inherent ambiguity: a product in the background's own colour (white shirt on white, black shoe on black)
cannot be told from it. When the "background" covers nearly the whole frame the centre region is named
instead, which is right for those cases and for a product that fills the frame. Likewise, parts of a
product in the background's colour (a white collar on a white backdrop) are dropped with the background.
Other known limits: a product covering most of the border is taken for the background, products under ~3 %
of the frame fall back to the centre region, and a soft grey drop shadow counts as (grey) product.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

log = logging.getLogger(__name__)

PALETTE: tuple[str, ...] = (
    "black", "white", "grey", "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "beige",
)  # fmt: skip
BLACK, WHITE, GREY, RED, ORANGE, YELLOW, GREEN, BLUE, PURPLE, PINK, BROWN, BEIGE = range(len(PALETTE))

THUMB_SIZE = 96  # at most ~9k pixels: plenty for a colour histogram, and about 1 ms per photo
BORDER_PX = 3
BACKGROUND_DELTA_E = 12.0  # above mild noise/JPEG on a flat backdrop, below e.g. beige vs white (~13)
MIN_FLAT_BORDER = 0.6  # share of the border that must match its median for the backdrop to count as flat
MAX_BACKGROUND_SHARE = 0.97
MIN_NAME_SHARE = 0.15
CENTRE_MARGIN = 0.25  # the fallback region is the middle half of each side
_BITS = 6  # look-up tables quantise each channel to 64 levels

# OKLab hue (degrees) upper edges of the hue families; pink wraps around 0.
_HUE_EDGES = np.array([12.0, 39.0, 78.0, 115.0, 190.0, 284.0, 338.0])
_HUE_FAMILY = np.array([PINK, RED, ORANGE, YELLOW, GREEN, BLUE, PURPLE, PINK])

_D65_WHITE = np.array([0.95047, 1.0, 1.08883])
_LINEAR_TO_XYZ = np.array(
    [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]]
)
_LINEAR_TO_LMS = np.array(
    [[0.4122214708, 0.5363325363, 0.0514459929], [0.2119034982, 0.6806995451, 0.1073969566],
     [0.0883024619, 0.2817188376, 0.6299787005]]
)  # fmt: skip
_LMS_TO_OKLAB = np.array(
    [[0.2104542553, 0.7936177850, -0.0040720468], [1.9779984951, -2.4285922050, 0.4505937099],
     [0.0259040371, 0.7827717662, -0.8086757660]]
)  # fmt: skip


def _srgb_to_linear(rgb: NDArray[Any]) -> NDArray[np.float64]:
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def rgb_to_lab(rgb: NDArray[Any]) -> NDArray[np.float64]:
    """Convert sRGB values 0-255 (uint8 or float, shape (..., 3)) to CIE Lab under D65, vectorised."""
    xyz = (_srgb_to_linear(rgb) @ _LINEAR_TO_XYZ.T) / _D65_WHITE
    epsilon, kappa = 216 / 24389, 24389 / 27
    f = np.where(xyz > epsilon, np.cbrt(xyz), (kappa * xyz + 16) / 116)
    return np.stack(
        [116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1
    )


def _name_pixels(linear: NDArray[np.float64]) -> NDArray[np.intp]:
    """Palette index per pixel from OKLCh, with L and C scaled to 0-100 for readable thresholds."""
    ok = np.cbrt(linear @ _LINEAR_TO_LMS.T) @ _LMS_TO_OKLAB.T * 100
    light, chroma = ok[:, 0], np.hypot(ok[:, 1], ok[:, 2])
    hue = np.degrees(np.arctan2(ok[:, 2], ok[:, 1])) % 360
    family = _HUE_FAMILY[np.searchsorted(_HUE_EDGES, hue, side="right")]
    names = family.copy()
    # Light or dull light red is what people call pink (salmon, dusty rose); dull dark red is a reddish
    # brown (chestnut).
    names[(family == RED) & ((light >= 72) | ((chroma < 12) & (light >= 60)))] = PINK
    names[(family == RED) & (chroma < 10) & (light < 60)] = BROWN
    # Dark pink hues read as burgundy (red side) or plum (purple side), not as pink.
    deep_pink = (family == PINK) & (light < 45)
    names[deep_pink & ((hue >= 350) | (hue < 12))] = RED
    names[deep_pink & (hue >= 338) & (hue < 350)] = PURPLE
    # Brown and beige are dark and pale/dull oranges and yellows, not hues of their own.
    orange, yellow = family == ORANGE, family == YELLOW
    names[orange & ((light < 55) | ((chroma < 13) & (light < 70)))] = BROWN
    names[orange & (chroma < 10) & (light >= 70)] = BEIGE
    names[yellow & (chroma < 9) & (light >= 65)] = BEIGE
    # Dark yellows are olive (a green) on the green side and bronze/mustard-brown on the orange side.
    names[yellow & (light < 65) & (hue >= 95)] = GREEN
    names[yellow & (light < 65) & (hue < 95)] = BROWN
    # The eye reads even a faint yellow tint in a light neutral as beige/cream, while blue- and pink-tinted
    # greys still look grey: warm hues get a lower neutral threshold.
    neutral = chroma < np.where((hue >= 50) & (hue < 115), 2.2, 3.5)
    names[neutral] = np.where(light[neutral] < 33, BLACK, np.where(light[neutral] >= 91, WHITE, GREY))
    return names


@functools.cache
def _tables() -> tuple[NDArray[np.float32], NDArray[np.uint8]]:
    """CIE Lab and palette index for every cell of a quantised RGB cube, built once (~0.2 s).

    Per image, cube roots and arctangents over ~9k pixels would cost several milliseconds on a slow
    core; a table look-up costs tens of microseconds. Cells are 4 sRGB units wide (about 1 Delta E).
    """
    centres = (np.arange(1 << _BITS) << (8 - _BITS)) + ((1 << (8 - _BITS)) - 1) / 2
    cube = np.stack(np.meshgrid(centres, centres, centres, indexing="ij"), axis=-1).reshape(-1, 3)
    lab = rgb_to_lab(cube).astype(np.float32)
    names = _name_pixels(_srgb_to_linear(cube)).astype(np.uint8)
    return lab, names


def _erode(mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """4-neighbour erosion; frame edges count as inside so a product touching the frame keeps that side."""
    out = mask.copy()
    out[1:] &= mask[:-1]
    out[:-1] &= mask[1:]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    return out


def _distance2(lab: NDArray[np.float32], ref: NDArray[np.float32]) -> NDArray[np.float32]:
    """Squared CIE76 Delta E to `ref`; summing the channels by hand is ~10x faster than .sum(axis=-1)."""
    d = lab - ref
    return d[..., 0] ** 2 + d[..., 1] ** 2 + d[..., 2] ** 2


def _product_mask(lab: NDArray[np.float32]) -> NDArray[np.bool_]:
    """Pixels that belong to the product: not background, or the centre region when that is undecidable."""
    h, w = lab.shape[:2]
    b = BORDER_PX
    if min(h, w) <= 4 * b:
        return np.ones((h, w), dtype=bool)  # too small to have a border worth estimating from
    sides = (lab[:b], lab[-b:], lab[b:-b, :b], lab[b:-b, -b:])
    border = np.concatenate([side.reshape(-1, 3) for side in sides])
    middle = len(border) // 2
    background = np.partition(border, middle, axis=0)[middle]  # per-channel median
    limit = BACKGROUND_DELTA_E**2
    flat_share = float(np.mean(_distance2(border, background) < limit))
    is_background = _distance2(lab, background) < limit
    background_share = float(is_background.mean())
    if flat_share >= MIN_FLAT_BORDER and background_share <= MAX_BACKGROUND_SHARE:
        product = ~is_background
        # Anti-aliased edges blend product and backdrop (red on white gives pink rims): drop a 1 px rim
        # unless the product is so thin that little would be left.
        eroded = _erode(product)
        return eroded if eroded.sum() >= 0.4 * product.sum() else product
    log.debug(
        "no separable background (flat border %.2f, background %.3f): using the centre region",
        flat_share,
        background_share,
    )
    centre = np.zeros((h, w), dtype=bool)
    dy, dx = int(h * CENTRE_MARGIN), int(w * CENTRE_MARGIN)
    centre[dy : h - dy, dx : w - dx] = True
    return centre


@dataclass(frozen=True)
class ColourInfo:
    """Colour summary of a product photo's product pixels (the background is never reported)."""

    name: str
    names: list[str]
    rgb: tuple[int, int, int]
    lab: tuple[float, float, float]
    histogram: list[float]

    def payload(self) -> dict[str, object]:
        """Fields for a search-index payload, under stable keys."""
        return {
            "colour": self.name,
            "colours": list(self.names),
            "colour_rgb": list(self.rgb),
            "colour_lab": list(self.lab),
            "colour_histogram": list(self.histogram),
        }


def extract_colours(image: Image.Image) -> ColourInfo:
    """Name the dominant colour(s) of the product in an RGB product photo of any size.

    Other modes are converted with `Image.convert("RGB")`; flatten transparency onto the intended backdrop
    first (as `visrec.images` does), since conversion keeps whatever colour hides under transparent pixels.

    The background is estimated from a thin border frame and removed; see the module docstring for the
    fallback when no flat background can be separated. Deterministic for a given image.
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    factor = -(-max(image.size) // THUMB_SIZE)
    if factor > 1:
        # Integer box reduction averages whole blocks: 4x faster than a resize, and exact area averaging.
        image = image.reduce(factor)
    rgb = np.asarray(image, dtype=np.uint8)
    h, w = rgb.shape[:2]
    flat = rgb.reshape(-1, 3)
    q = (flat >> (8 - _BITS)).astype(np.intp)
    cell = (q[:, 0] << (2 * _BITS)) | (q[:, 1] << _BITS) | q[:, 2]
    lab_table, name_table = _tables()
    product = np.flatnonzero(_product_mask(np.take(lab_table, cell, axis=0).reshape(h, w, 3)))
    names = np.take(name_table, np.take(cell, product))
    counts = np.bincount(names, minlength=len(PALETTE))
    shares = counts / counts.sum()
    dominant = int(np.argmax(shares))  # ties go to the earlier palette entry: deterministic
    order = sorted(range(len(PALETTE)), key=lambda i: (-shares[i], i))
    listed = [PALETTE[i] for i in order if i == dominant or shares[i] >= MIN_NAME_SHARE]
    mean = np.take(flat, product[names == dominant], axis=0).mean(axis=0)
    r, g, b = (int(v) for v in np.rint(mean))
    lab = rgb_to_lab(np.array([r, g, b], dtype=np.uint8))
    histogram = [round(float(s), 3) for s in shares]
    # Independent rounding can leave the sum at 0.999 or 1.001; the dominant entry absorbs the difference.
    histogram[dominant] = round(histogram[dominant] + 1.0 - sum(histogram), 3)
    return ColourInfo(
        name=PALETTE[dominant],
        names=listed,
        rgb=(r, g, b),
        lab=(round(float(lab[0]), 1), round(float(lab[1]), 1), round(float(lab[2]), 1)),
        histogram=histogram,
    )
