"""`visrec duplicates`: planted re-uploads of one photo under other SKUs are grouped, unrelated products
are not; through the stage and the CLI, on the real embedded engine with the session's real small model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.helpers import MakeCatalogue, run_sync
from visrec.cli import app
from visrec.config import DuplicateSettings, Settings
from visrec.duplicates import find_duplicates, relative_distance
from visrec.index import open_index
from visrec.report import write_duplicates_html

runner = CliRunner()
DEFAULT = DuplicateSettings()  # the calibrated default: a share of the median vector length


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
        scan = find_duplicates(index, relative_distance(index, DEFAULT.max_relative)[0])
    assert (scan.products, scan.photos) == (9, 10)
    assert [g.product_ids for g in scan.groups] == [["p4", "p8"]] and scan.groups[0].closest < 1e-3
    html = write_duplicates_html(scan, tmp_path / "albums.html", "test").read_text()
    assert html.count('class="matched"') == 1  # p8's photos shown, small, beside its first
