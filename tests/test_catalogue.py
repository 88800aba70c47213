from __future__ import annotations

import json
from pathlib import Path

import pytest

from visrec.catalogue import read_catalogue
from visrec.errors import CatalogueError

SAMPLE = Path(__file__).parents[1] / "data" / "sample" / "catalogue.csv"


def test_csv_fields_types_and_extra_columns(tmp_path: Path) -> None:
    (tmp_path / "c.csv").write_text(
        "id,image,category,colour,price,title,brand\n"
        "a1,img/a.png,shirt,red,12.5,Red shirt,acme\n"
        "a2,/abs/b.png,,,,,\n"
        "a3,https://example.invalid/c.jpg,jeans,blue,0,,\n"
    )
    catalogue = read_catalogue(tmp_path / "c.csv", image_roots=[Path("/abs")])
    assert catalogue.errors == []
    a1, a2, a3 = catalogue.products
    assert (a1.category, a1.colour, a1.price, a1.title) == ("shirt", "red", 12.5, "Red shirt")
    assert a1.metadata()["brand"] == "acme"  # unknown columns are kept for the payload
    assert (a2.category, a2.price) == (None, None)
    assert catalogue.image_ref(a1) == str((tmp_path / "img/a.png").resolve())
    assert catalogue.image_ref(a2) == "/abs/b.png"
    assert catalogue.image_ref(a3) == "https://example.invalid/c.jpg"


def test_jsonl_rows(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text(
        json.dumps({"id": 7, "image": "x.png", "price": 3, "tags": ["a", "b"]})
        + "\n\n"
        + json.dumps({"id": "b", "image": "y.png", "category": "bag"})
        + "\n"
    )
    catalogue = read_catalogue(path)
    assert [p.id for p in catalogue.products] == ["7", "b"]
    assert catalogue.products[0].metadata()["tags"] == ["a", "b"]


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (",x.png,shirt,1", "id"),  # missing id
        ("a,,shirt,1", "image"),  # missing image
        ("a,x.png,shirt,abc", "price"),  # not a number
        ("a,x.png,shirt,-3", "price"),  # negative
        ("a,x.png,shirt,nan", "price"),  # not finite
        ("a,x.png,shirt,1,extra", "more cells"),
        ("a,x.png", "fewer cells"),
    ],
)
def test_each_bad_csv_row_is_reported_with_its_line(tmp_path: Path, row: str, expected: str) -> None:
    (tmp_path / "c.csv").write_text(f"id,image,category,price\nok,ok.png,shirt,1\n{row}\nok2,ok2.png,bag,2\n")
    catalogue = read_catalogue(tmp_path / "c.csv")
    assert [p.id for p in catalogue.products] == ["ok", "ok2"]
    [error] = catalogue.errors
    assert error.line == 3
    assert expected in error.message


def test_duplicate_id_keeps_the_first(tmp_path: Path) -> None:
    (tmp_path / "c.csv").write_text("id,image\na,1.png\nb,2.png\na,3.png\n")
    catalogue = read_catalogue(tmp_path / "c.csv")
    assert [p.image for p in catalogue.products] == ["1.png", "2.png"]
    assert catalogue.errors[0].line == 4 and "first on line 2" in catalogue.errors[0].message


def test_bad_jsonl_rows(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text(
        '{"id": "a", "image": "a.png"}\n{not json\n[1, 2]\n{"id": "c"}\n'
        '{"id": "d", "image": "d.png", "content_hash": "x"}\n'
    )
    catalogue = read_catalogue(path)
    assert [p.id for p in catalogue.products] == ["a"]
    assert [(e.line, e.message.split(":")[0]) for e in catalogue.errors] == [
        (2, "not valid JSON"),
        (3, "not a JSON object"),
        (4, "image"),
        (5, "reserved column(s) ['content_hash']"),
    ]
    assert catalogue.errors[2].product_id == "c"


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("missing.csv", None, "not found"),
        ("c.xlsx", "x", "unknown catalogue format"),
        ("c.csv", "id,category\na,b\n", "missing column"),
    ],
)
def test_unusable_file_raises(tmp_path: Path, name: str, text: str | None, message: str) -> None:
    if text is not None:
        (tmp_path / name).write_text(text)
    with pytest.raises(CatalogueError, match=message):
        read_catalogue(tmp_path / name)


def test_content_hash_follows_image_bytes_and_metadata(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"one")
    (tmp_path / "c.csv").write_text("id,image,price\na,a.png,1\n")
    first = read_catalogue(tmp_path / "c.csv")
    digest = first.content_hash(first.products[0])
    assert digest == read_catalogue(tmp_path / "c.csv").content_hash(first.products[0])
    (tmp_path / "a.png").write_bytes(b"two")
    assert first.content_hash(first.products[0]) != digest
    (tmp_path / "a.png").write_bytes(b"one")
    (tmp_path / "c.csv").write_text("id,image,price\na,a.png,2\n")
    changed = read_catalogue(tmp_path / "c.csv")
    assert changed.content_hash(changed.products[0]) != digest


def test_bundled_sample_catalogue() -> None:
    catalogue = read_catalogue(SAMPLE)
    assert len(catalogue.products) == 2000 and catalogue.errors == []
    categories = {p.category for p in catalogue.products}
    assert len(categories) == 10
    assert all(Path(catalogue.image_ref(p)).is_file() for p in catalogue.products)
    assert all(p.price is None and p.colour is None for p in catalogue.products)  # none invented


def test_local_images_must_lie_in_the_catalogues_folder_or_an_image_root(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    (tmp_path / "shop").mkdir()
    (tmp_path / "shop" / "c.csv").write_text(
        f"id,image\nin,img/a.png\nup,../photos/b.png\nabs,{photos}/c.png\netc,/etc/passwd\n"
    )
    confined = read_catalogue(tmp_path / "shop" / "c.csv")
    assert [p.id for p in confined.products] == ["in"]
    assert [(e.product_id, "outside" in e.message) for e in confined.errors] == [
        ("up", True),
        ("abs", True),
        ("etc", True),
    ]
    widened = read_catalogue(tmp_path / "shop" / "c.csv", image_roots=[photos])
    assert [p.id for p in widened.products] == ["in", "up", "abs"]
    assert [e.product_id for e in widened.errors] == ["etc"]
