"""Dominant product colour: generated photos with known colours, Lab references, and real sample photos."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image, ImageDraw

from visrec.colour import PALETTE, ColourInfo, extract_colours, rgb_to_lab

WHITE_BG = (255, 255, 255)
BLACK_BG = (0, 0, 0)
SHAPES = ("ellipse", "rectangle", "polygon")

# Several everyday shades per palette colour, as a person would name them.
KNOWN_SHADES: dict[str, list[tuple[int, int, int]]] = {
    "black": [(10, 10, 10), (35, 30, 30), (20, 22, 30)],
    "white": [(250, 250, 250), (242, 242, 236)],
    "grey": [(128, 128, 128), (90, 90, 95), (185, 185, 180)],
    "red": [(200, 30, 30), (150, 20, 30), (230, 50, 40)],  # red, burgundy, bright red
    "orange": [(240, 140, 20), (255, 120, 40), (255, 165, 0)],
    "yellow": [(250, 220, 40), (240, 220, 60), (255, 240, 110)],
    "green": [(30, 150, 60), (100, 120, 40), (150, 220, 150), (0, 100, 0)],  # green, olive, mint, forest
    "blue": [(20, 30, 120), (30, 90, 200), (130, 190, 235)],  # navy, royal, sky
    "purple": [(120, 40, 150), (150, 110, 210), (90, 40, 110)],  # purple, lavender, plum
    "pink": [(240, 150, 190), (255, 105, 180), (250, 190, 200)],  # pink, hot pink, light pink
    "brown": [(120, 70, 30), (90, 55, 40), (150, 95, 60)],
    "beige": [(225, 205, 170), (235, 220, 195), (210, 185, 150)],
}
CASES = [
    (name, rgb, i % len(SHAPES)) for name, shades in KNOWN_SHADES.items() for i, rgb in enumerate(shades)
]


def product_photo(
    rgb: tuple[int, int, int],
    background: tuple[int, int, int] = WHITE_BG,
    shape: str = "ellipse",
    box: tuple[float, float, float, float] = (0.2, 0.15, 0.8, 0.85),
    size: int = 160,
    noise: float = 3.0,
    seed: int = 0,
) -> Image.Image:
    """A product shape in `rgb` on a flat background, with mild sensor noise. `box` is in frame units."""
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = (round(v * size) for v in box)
    if shape == "ellipse":
        draw.ellipse((x0, y0, x1, y1), fill=rgb)
    elif shape == "rectangle":
        draw.rectangle((x0, y0, x1, y1), fill=rgb)
    else:
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        draw.polygon([(cx, y0), (x1, cy), (x1 - 8, y1), (x0 + 8, y1), (x0, cy)], fill=rgb)
    pixels = np.asarray(image, dtype=np.float64)
    pixels += np.random.default_rng(seed).normal(0, noise, pixels.shape)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


@pytest.mark.parametrize("background", [WHITE_BG, BLACK_BG], ids=["on-white", "on-black"])
@pytest.mark.parametrize(("expected", "rgb", "shape"), CASES, ids=[f"{n}-{c}" for n, c, _ in CASES])
def test_known_colours_are_named(
    expected: str, rgb: tuple[int, int, int], shape: int, background: tuple[int, int, int]
) -> None:
    # White on white and black on black cannot be separated from the backdrop: the centre-region fallback
    # must still name them right.
    info = extract_colours(product_photo(rgb, background, SHAPES[shape]))
    assert info.name == expected, info
    assert info.names[0] == expected


def test_two_colour_product_lists_both_most_common_first() -> None:
    # A blue shirt with white stripes (60 % / 40 %) on a grey backdrop.
    image = Image.new("RGB", (192, 192), (150, 150, 150))
    draw = ImageDraw.Draw(image)
    for top in range(30, 160, 20):
        draw.rectangle((40, top, 151, top + 11), fill=(30, 60, 180))
        draw.rectangle((40, top + 12, 151, top + 19), fill=(250, 250, 250))
    info = extract_colours(image)
    assert info.name == "blue"
    assert info.names == ["blue", "white"]
    hist = dict(zip(PALETTE, info.histogram, strict=True))
    assert hist["blue"] == pytest.approx(0.6, abs=0.08)
    assert hist["white"] == pytest.approx(0.4, abs=0.08)
    assert hist["grey"] < 0.05  # the backdrop is not part of the product


def test_small_product_on_large_white_background_is_not_white() -> None:
    # ~7 % of the frame, off-centre: neither the backdrop nor the centre-region fallback may win.
    info = extract_colours(product_photo((200, 30, 30), box=(0.08, 0.1, 0.38, 0.4), size=256))
    assert info.name == "red"
    assert info.names == ["red"]
    assert info.histogram[PALETTE.index("white")] < 0.05


def test_fashion_mnist_like_greyscale_on_black() -> None:
    # 28x28 single-channel, garment on black, as in Fashion-MNIST: mode conversion and a tiny frame.
    image = Image.new("L", (28, 28), 0)
    ImageDraw.Draw(image).rectangle((7, 4, 20, 24), fill=140)
    info = extract_colours(image)
    assert info.name == "grey"
    assert "black" not in info.names


def test_busy_background_falls_back_to_the_centre() -> None:
    # No flat backdrop (multi-coloured border): the centre region is named.
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(160, 160, 3)).astype(np.uint8)
    pixels[50:110, 50:110] = (30, 150, 60)
    assert extract_colours(Image.fromarray(pixels, "RGB")).name == "green"


def test_rgb_is_the_mean_of_the_dominant_pixels() -> None:
    info = extract_colours(product_photo((120, 40, 150), BLACK_BG, noise=0))
    assert info.name == "purple"
    assert np.abs(np.array(info.rgb) - (120, 40, 150)).max() <= 1
    expected_lab = rgb_to_lab(np.array(info.rgb, dtype=np.uint8))
    assert info.lab == pytest.approx(tuple(expected_lab), abs=0.051)


def test_payload_and_histogram() -> None:
    info = extract_colours(product_photo((240, 140, 20), seed=3))
    payload = info.payload()
    assert set(payload) == {"colour", "colours", "colour_rgb", "colour_lab", "colour_histogram"}
    assert payload["colour"] == info.name == "orange"
    assert payload["colours"] == info.names
    assert payload["colour_rgb"] == list(info.rgb)
    assert len(info.histogram) == len(PALETTE)
    assert all(0.0 <= share <= 1.0 for share in info.histogram)
    assert sum(info.histogram) == pytest.approx(1.0, abs=1e-9)
    assert all(isinstance(v, int) for v in info.rgb)


def test_deterministic() -> None:
    image = product_photo((150, 110, 210), seed=5)
    assert extract_colours(image) == extract_colours(image.copy())


@pytest.mark.parametrize(
    ("rgb", "lab"),
    [
        ((255, 255, 255), (100.0, 0.0, 0.0)),
        ((0, 0, 0), (0.0, 0.0, 0.0)),
        ((255, 0, 0), (53.24, 80.09, 67.20)),
        ((0, 0, 255), (32.30, 79.19, -107.86)),
        ((128, 128, 128), (53.59, 0.0, 0.0)),
    ],
)
def test_rgb_to_lab_references(rgb: tuple[int, int, int], lab: tuple[float, float, float]) -> None:
    assert tuple(rgb_to_lab(np.array(rgb, dtype=np.uint8))) == pytest.approx(lab, abs=0.5)


def test_rgb_to_lab_is_vectorised_and_dtype_agnostic() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, size=(4, 5, 3))
    lab = rgb_to_lab(rgb.astype(np.uint8))
    assert lab.shape == (4, 5, 3)
    np.testing.assert_allclose(lab, rgb_to_lab(rgb.astype(np.float32)), atol=1e-3)
    np.testing.assert_allclose(lab[2, 3], rgb_to_lab(rgb[2, 3].astype(np.uint8)))


def _sample_photo(name: str) -> Path:
    return Path(matplotlib.get_data_path()) / "sample_data" / name


def test_real_product_photo_gift_box() -> None:
    # matplotlib's sample "present" icon: a blue box with a silver ribbon, transparent background,
    # flattened on white the way visrec.images does it.
    rgba = Image.open(_sample_photo("Minduka_Present_Blue_Pack.png")).convert("RGBA")
    photo = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    info = extract_colours(photo)
    assert info.name == "blue"
    assert info.names == ["blue", "grey"]  # box, ribbon; the white backdrop is not reported
    r, g, b = info.rgb
    assert b > r + 100 and b > g
    assert info.lab[2] < -30  # clearly on the blue side of Lab


def test_real_photo_without_flat_background() -> None:
    # Grace Hopper's portrait: flag and sky behind her, so no flat backdrop; the centre is face and uniform.
    with Image.open(_sample_photo("grace_hopper.jpg")) as photo:
        info = extract_colours(photo.convert("RGB"))
    assert info.name in {"brown", "black"}
    assert "black" in info.names  # the dark navy uniform
    assert "blue" not in info.names  # the sky behind her is outside the centre region
    assert sum(info.histogram) == pytest.approx(1.0, abs=1e-9)


def test_colour_info_is_frozen() -> None:
    info = extract_colours(product_photo((30, 150, 60)))
    assert isinstance(info, ColourInfo)
    with pytest.raises(AttributeError):
        info.name = "red"  # type: ignore[misc]  # assigning a frozen field on purpose
