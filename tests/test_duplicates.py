"""`visrec duplicates`: planted re-uploads of one photo under other SKUs are grouped, unrelated products
are not; through the stage and the CLI, on the real embedded engine with the session's real small model."""

from __future__ import annotations

import colorsys
import io
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from tests.helpers import MakeCatalogue, run_sync, stored
from visrec.cli import app
from visrec.colour import extract_colours, rgb_to_lab
from visrec.config import DuplicateSettings, Settings
from visrec.duplicates import (
    DuplicateScan,
    colour_distance,
    colours_agree,
    find_duplicates,
    relative_distance,
)
from visrec.index import open_index
from visrec.report import write_duplicates_html

runner = CliRunner()
DEFAULT = DuplicateSettings()  # the calibrated default: a share of the median vector length
LIMIT = DEFAULT.max_colour_delta_e  # the calibrated colour check


def plant(catalogue: Path) -> Path:
    """Add two SKUs re-using p0's photo, as shops re-upload it: re-encoded as a JPEG (q80), and resized
    (up to 2x, then JPEG q90); returns the catalogue."""
    images = catalogue.parent / "images"
    original = Image.open(images / "p0.png").convert("RGB")
    original.save(images / "copy-jpeg.jpg", quality=80)
    original.resize((96, 96), Image.Resampling.BICUBIC).save(images / "copy-resized.jpg", quality=90)
    lines = catalogue.read_text().splitlines()
    extra = [
        "copy-jpeg,images/copy-jpeg.jpg,circle,red,12.5,re-upload A",
        "copy-resized,images/copy-resized.jpg,circle,red,13.5,re-upload B",
    ]
    catalogue.write_text("\n".join([*lines, *extra]) + "\n")
    return catalogue


def test_planted_reuploads_form_one_group_of_distinct_products(
    make_catalogue: MakeCatalogue, settings: Settings
) -> None:
    run_sync(plant(make_catalogue(9)), settings)  # 9 products: every shape in every colour, once
    with open_index(settings.qdrant) as index:
        max_distance, norm = relative_distance(index, DEFAULT.max_relative)
        scan = find_duplicates(index, max_distance, neighbours=5)
    assert max_distance == pytest.approx(DEFAULT.max_relative * norm) and norm > 0
    assert (scan.products, scan.photos) == (11, 11)
    assert [group.product_ids for group in scan.groups] == [["copy-jpeg", "copy-resized", "p0"]]
    group = scan.groups[0]
    assert all(link.a < link.b and link.distance <= max_distance for link in group.links)
    assert {p for link in group.links for p in (link.a, link.b)} == set(group.product_ids)
    assert group.products[0][1]["title"] == "re-upload A"  # payloads travel with the ids


def test_nothing_is_grouped_at_distance_zero_and_everything_when_far(
    make_catalogue: MakeCatalogue, settings: Settings
) -> None:
    run_sync(make_catalogue(6), settings)
    with open_index(settings.qdrant) as index:
        assert find_duplicates(index, 0.0).groups == []
        far = find_duplicates(index, 1e9, neighbours=5)
    assert [g.product_ids for g in far.groups] == [[f"p{i}" for i in range(6)]]  # transitive: one group
    assert far.saturated == [f"p{i}" for i in range(6)]  # each saw only its 5 nearest: said so


def test_cli_json_table_and_html(make_catalogue: MakeCatalogue, env: Settings, tmp_path: Path) -> None:
    run_sync(plant(make_catalogue(9)), env)
    page = tmp_path / "dups.html"
    result = runner.invoke(app, ["duplicates", "--json", "--out", str(page)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == {
        "max_relative",
        "median_norm",
        "max_distance",
        "neighbours",
        "max_colour_delta_e",
        "colour_rejected",
        "products_scanned",
        "photos_searched",
        "groups",
        "saturated",
        "report",
    }
    assert data["max_distance"] == pytest.approx(data["max_relative"] * data["median_norm"])
    assert data["max_relative"] == DEFAULT.max_relative and data["products_scanned"] == 11
    (group,) = data["groups"]
    assert [p["product_id"] for p in group["products"]] == ["copy-jpeg", "copy-resized", "p0"]
    assert all(p["payload"]["category"] == "circle" for p in group["products"])
    assert (
        set(group["links"][0]) == {"a", "b", "distance"} and group["closest"] == group["links"][0]["distance"]
    )
    html = page.read_text()
    assert data["report"] == str(page.resolve()) and html.count("data:image/png;base64") == 3
    assert "group 1" in html and "copy-resized" in html

    table = runner.invoke(app, ["duplicates", "--max-distance", str(data["max_distance"])])  # absolute
    assert table.exit_code == 0, table.output
    assert "1 duplicate groups among 11 products" in table.stdout and "copy-jpeg" in table.stdout
    none = runner.invoke(app, ["duplicates", "--max-distance", "0", "--json"])
    assert none.exit_code == 0 and json.loads(none.stdout)["groups"] == []


@pytest.mark.parametrize(
    ("args", "message", "code"),
    [
        (["--max-distance", "-1"], "max distance must be a finite number", 2),
        (["--max-distance", "nan"], "max distance must be a finite number", 2),
        (["--neighbours", "0"], "neighbours must be between 1", 2),
        ([], "run `visrec sync` first", 4),  # nothing synced
    ],
)
def test_bad_input_is_one_line_and_an_exit_code(
    env: Settings, args: list[str], message: str, code: int
) -> None:
    result = runner.invoke(app, ["duplicates", *args])
    assert result.exit_code == code, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_bad_configured_share_is_one_line(env: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VISREC_DUPLICATES__MAX_RELATIVE", "-0.1")
    result = runner.invoke(app, ["duplicates"])
    assert result.exit_code == 2 and "invalid setting: VISREC_DUPLICATES__MAX_RELATIVE" in result.stderr


def test_a_photo_reused_as_a_second_photo_is_found(
    make_catalogue: MakeCatalogue, settings: Settings, tmp_path: Path
) -> None:
    """p8 has two photos in the catalogue (`images`): its own, then p4's, re-used as is."""
    catalogue = make_catalogue(9)
    lines = catalogue.read_text().splitlines()
    lines[0] += ",images"
    lines = [
        line + ("," + ("images/p8.png|images/p4.png" if line.startswith("p8,") else "")) for line in lines
    ]
    lines[0] = lines[0].removesuffix(",")
    catalogue.write_text("\n".join(lines) + "\n")
    run_sync(catalogue, settings)
    with open_index(settings.qdrant) as index:
        # p8 (green) and p4 (blue) differ in colour, but sync extracted p8's from its first photo only:
        # the pair through its second photo is judged by the distance alone
        scan = find_duplicates(
            index, relative_distance(index, DEFAULT.max_relative)[0], max_colour_delta_e=LIMIT
        )
    assert (scan.products, scan.photos) == (9, 10)
    assert [g.product_ids for g in scan.groups] == [["p4", "p8"]] and scan.groups[0].closest < 1e-3
    html = write_duplicates_html(scan, tmp_path / "albums.html", "test").read_text()
    assert html.count('class="matched"') == 1  # p8's photos shown, small, beside its first


# --- colour: a recolour of a product is another product, a re-encode of its photo is the same -------------

RECOLOURS = {"yellow": (230, 200, 40), "pink": (240, 130, 170)}


def recolour(source: Path, target: Path, rgb: tuple[int, int, int]) -> Path:
    """The same drawing in another colour: every product pixel (not the white backdrop) takes `rgb`, with
    its anti-aliased rims blended as before."""
    pixels = np.asarray(Image.open(source).convert("RGB"), dtype=np.float64)
    ink = 1 - pixels.min(axis=2, keepdims=True) / 255  # 0 on white, ~1 inside the shape
    out = 255 * (1 - ink) + ink * np.asarray(rgb, dtype=np.float64)
    Image.fromarray(np.rint(out).clip(0, 255).astype(np.uint8)).save(target)
    return target


def plant_variants(catalogue: Path) -> Path:
    """p0 (a red circle) recoloured yellow and pink under new SKUs, and re-uploaded as a JPEG (q70), up-scaled
    (2x, JPEG q85) and cropped (2 px each side): the issue's red, yellow and pink shoes, and true copies."""
    images = catalogue.parent / "images"
    original = Image.open(images / "p0.png").convert("RGB")
    for name, rgb in RECOLOURS.items():
        recolour(images / "p0.png", images / f"p0-{name}.png", rgb)
    original.save(images / "copy-q70.jpg", quality=70)
    original.resize((96, 96), Image.Resampling.BICUBIC).save(images / "copy-up.jpg", quality=85)
    original.crop((2, 2, 46, 46)).save(images / "copy-crop.png")
    extra = [f"p0-{name},images/p0-{name}.png,circle,{name},10.5,{name} circle" for name in RECOLOURS] + [
        f"{ref.split('.')[0]},images/{ref},circle,red,12.5,re-upload"
        for ref in ("copy-q70.jpg", "copy-up.jpg", "copy-crop.png")
    ]
    catalogue.write_text(catalogue.read_text() + "\n".join(extra) + "\n")
    return catalogue


VARIANTS = ["p0-yellow", "p0-pink"]
COPIES = ["copy-crop", "copy-q70", "copy-up"]


def test_colour_variants_are_not_duplicates_and_copies_still_are(
    make_catalogue: MakeCatalogue, settings: Settings
) -> None:
    """At a distance that takes in the recolours (so the vector alone would link them: checked), the colour
    check leaves them out of p0's group and keeps every copy in it."""
    run_sync(plant_variants(make_catalogue(9)), settings)
    with open_index(settings.qdrant) as index:
        original = stored(index, "p0")[0]
        farthest = max(
            float(np.linalg.norm(stored(index, pid)[0] - original)) for pid in [*VARIANTS, *COPIES]
        )
        distance = farthest * 1.01  # every planted product within it of p0
        everyone = index.count() - 1
        without = find_duplicates(index, distance, neighbours=everyone, max_colour_delta_e=None)
        scan = find_duplicates(index, distance, neighbours=everyone, max_colour_delta_e=LIMIT)

    def group_of(found: DuplicateScan, product_id: str) -> set[str]:
        return next(set(g.product_ids) for g in found.groups if product_id in g.product_ids)

    assert {"p0", *VARIANTS, *COPIES} <= group_of(without, "p0") and without.colour_rejected == 0
    assert group_of(scan, "p0") >= {"p0", *COPIES}  # every re-upload still found
    assert not group_of(scan, "p0") & set(VARIANTS)  # neither recolour
    assert all(not set(VARIANTS) <= set(g.product_ids) for g in scan.groups)  # nor yellow with pink
    assert scan.colour_rejected >= 2  # at least p0 against each recolour
    assert scan.to_dict(dict)["max_colour_delta_e"] == LIMIT


def test_points_without_colour_data_are_linked_as_before(
    make_catalogue: MakeCatalogue, settings: Settings
) -> None:
    """A payload written before colour was extracted (no `colour_lab`) is judged by the distance alone."""
    run_sync(plant_variants(make_catalogue(9)), settings)
    with open_index(settings.qdrant) as index:
        distance = float(np.linalg.norm(stored(index, "p0-pink")[0] - stored(index, "p0")[0])) * 1.01
        everyone = index.count() - 1
        judged = find_duplicates(index, distance, neighbours=everyone, max_colour_delta_e=LIMIT)
        old = {k: v for k, v in stored(index, "p0-pink")[1].items() if not k.startswith("colour")}
        index.overwrite_payloads({"p0-pink": old})
        scan = find_duplicates(index, distance, neighbours=everyone, max_colour_delta_e=LIMIT)
    assert not any({"p0", "p0-pink"} <= set(g.product_ids) for g in judged.groups)
    assert any({"p0", "p0-pink"} <= set(g.product_ids) for g in scan.groups)


# --- the rule on real photos, over colours (no model: the rule reads the colour sync extracts) -----------


def shoe(rgb: tuple[int, int, int], size: int = 96) -> Image.Image:
    """A product photo: a filled shape in `rgb` on a white backdrop, anti-aliased by drawing it 4x larger."""
    big = Image.new("RGB", (size * 4, size * 4), "white")
    draw = ImageDraw.Draw(big)
    s = size * 4
    draw.polygon([(s // 8, s * 5 // 8), (s // 2, s // 4), (s * 7 // 8, s * 5 // 8), (s * 7 // 8, s * 7 // 8),
                  (s // 8, s * 7 // 8)], fill=rgb)  # fmt: skip
    return big.resize((size, size), Image.Resampling.LANCZOS)


def fields(image: Image.Image) -> dict[str, object]:
    return dict(extract_colours(image).payload())


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


# Product colours a shop photographs: saturated enough not to be taken for the white backdrop.
hues = st.floats(0, 1, exclude_max=True)
product_colours = st.tuples(hues, st.floats(0.45, 1.0), st.floats(0.35, 0.9))


def rgb_of(hsv: tuple[float, float, float]) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(*hsv)
    return round(r * 255), round(g * 255), round(b * 255)


@hypothesis_settings(max_examples=60, deadline=None)
@given(
    colour=product_colours,
    quality=st.integers(50, 95),
    scale=st.sampled_from([0.5, 0.75, 1.5, 2.0]),
    crop=st.integers(0, 4),
)
def test_a_reencoded_resized_or_cropped_photo_keeps_its_colour(
    colour: tuple[float, float, float], quality: int, scale: float, crop: int
) -> None:
    original = shoe(rgb_of(colour))
    size = round(96 * scale)
    copy = jpeg(
        original.crop((crop, crop, 96 - crop, 96 - crop)).resize((size, size), Image.Resampling.BICUBIC),
        quality,
    )
    assert colours_agree(fields(original), 0, fields(copy), 0, LIMIT)


@hypothesis_settings(max_examples=80, deadline=None)
@given(colour=product_colours, shift=st.floats(0.03, 0.97))
def test_a_recolour_beyond_the_limit_is_told_apart_and_one_within_is_not(
    colour: tuple[float, float, float], shift: float
) -> None:
    """The same photo with its product's hue turned by `shift` of the circle: colours agree exactly when
    the two fill colours lie within the limit (a margin of 2 Delta E either side for the extraction)."""
    hue, saturation, value = colour
    a, b = rgb_of(colour), rgb_of(((hue + shift) % 1, saturation, value))
    between = colour_distance(rgb_to_lab(np.array(a)).tolist(), rgb_to_lab(np.array(b)).tolist())
    agree = colours_agree(fields(shoe(a)), 0, fields(shoe(b)), 0, LIMIT)
    if between > LIMIT + 2:
        assert not agree, (a, b, between)
    elif between < LIMIT - 2:
        assert agree, (a, b, between)


def test_colour_is_judged_only_where_both_photos_have_it() -> None:
    red, pink = fields(shoe((200, 30, 30))), fields(shoe((240, 130, 170)))
    assert not colours_agree(red, 0, pink, 0, LIMIT)
    assert colours_agree(red, 0, pink, 0, None)  # the rule off
    assert colours_agree(red, 1, pink, 0, LIMIT)  # a second photo: sync extracted no colour from it
    older = {k: v for k, v in pink.items() if k != "colour_lab"}
    assert colours_agree(red, 0, older, 0, LIMIT) and colours_agree(older, 0, red, 0, LIMIT)
    assert colours_agree(red, 0, {**pink, "colour_lab": ["x", 1, 2]}, 0, LIMIT)  # unreadable: unknown
