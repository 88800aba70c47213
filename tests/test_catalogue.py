from __future__ import annotations

import json
from pathlib import Path

import pytest

from visrec.catalogue import RESERVED_KEYS, read_catalogue
from visrec.config import IngestSettings
from visrec.errors import CatalogueError

SAMPLE = Path(__file__).parents[1] / "data" / "sample" / "catalogue.csv"


def test_csv_fields_types_and_extra_columns(tmp_path: Path) -> None:
    (tmp_path / "c.csv").write_text(
        "id,image,category,colour,price,title,brand\n"
        "a1,img/a.png,shirt,red,12.5,Red shirt,acme\n"
        "a2,/abs/b.png,,,,,\n"
        "a3,https://example.invalid/c.jpg,jeans,blue,0,,\n"
    )
    catalogue = read_catalogue(tmp_path / "c.csv", IngestSettings(image_roots=[Path("/abs")]))
    assert catalogue.errors == []
    a1, a2, a3 = catalogue.products
    assert (a1.category, a1.colour, a1.price, a1.title) == ("shirt", "red", 12.5, "Red shirt")
    assert a1.metadata()["brand"] == "acme"  # unknown columns are kept for the payload
    assert (a2.category, a2.price) == (None, None)
    assert catalogue.photo_refs(a1)[0] == str((tmp_path / "img/a.png").resolve())
    assert catalogue.photo_refs(a2)[0] == "/abs/b.png"
    assert catalogue.photo_refs(a3)[0] == "https://example.invalid/c.jpg"


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
        ("a,x.png,shirt,1,extra", "5 cells for 4 columns"),
        ("a,x.png", "2 cells for 4 columns"),
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


def test_an_ids_first_row_is_its_product_even_when_refused(tmp_path: Path) -> None:
    """A later row never stands in for a refused first one (what became of an id depended on which check
    its first row failed: outside trial)."""
    (tmp_path / "c.csv").write_text("id,image,price\na,1.png,cheap\na,2.png,3\nb, 3.png,\n")
    catalogue = read_catalogue(tmp_path / "c.csv")
    assert [p.id for p in catalogue.products] == ["b"]
    assert [(e.line, e.product_id) for e in catalogue.errors] == [(2, "a"), (3, "a")]
    assert "first on line 2" in catalogue.errors[1].message


def test_bad_jsonl_rows(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text('{"id": "a", "image": "a.png"}\n{not json\n[1, 2]\n{"id": "c"}\n')
    catalogue = read_catalogue(path)
    assert [p.id for p in catalogue.products] == ["a"]
    assert [(e.line, e.message.split(":")[0]) for e in catalogue.errors] == [
        (2, "not valid JSON"),
        (3, "not a JSON object"),
        (4, "row"),  # "row: no photo: give `image` or `images`"
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


def test_bundled_sample_catalogue() -> None:
    catalogue = read_catalogue(SAMPLE)
    assert len(catalogue.products) == 2000 and catalogue.errors == []
    categories = {p.category for p in catalogue.products}
    assert len(categories) == 10
    assert all(Path(catalogue.photo_refs(p)[0]).is_file() for p in catalogue.products)
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
    widened = read_catalogue(tmp_path / "shop" / "c.csv", IngestSettings(image_roots=[photos]))
    assert [p.id for p in widened.products] == ["in", "up", "abs"]
    assert [e.product_id for e in widened.errors] == ["etc"]


# Catalogue files as shops export them (issue #12): every kind of damage is a reported row or one clear
# CatalogueError, never a traceback; a row whose product is unknown has no product_id (it holds deletes).


def _ids(
    path: Path, settings: IngestSettings | None = None
) -> tuple[list[str], list[tuple[int, str | None]]]:
    catalogue = read_catalogue(path, settings)
    return [p.id for p in catalogue.products], [(e.line, e.product_id) for e in catalogue.errors]


@pytest.mark.parametrize(
    ("encoding", "prefix"),
    [
        ("utf-8", b""),
        ("utf-8", b"\xef\xbb\xbf"),
        ("utf-16", b""),  # Python's utf-16 and utf-32 codecs write a BOM
        ("utf-32", b""),
        ("utf-16-be", b"\xfe\xff"),
    ],
)
def test_encodings_with_a_byte_order_mark_are_read(tmp_path: Path, encoding: str, prefix: bytes) -> None:
    text = 'id,image,title\r\na,a.png,Crème brûlée\r\nb,b.png,"two\r\nlines, and a comma"\r\n'
    (tmp_path / "c.csv").write_bytes(prefix + text.encode(encoding))
    catalogue = read_catalogue(tmp_path / "c.csv")
    assert [p.id for p in catalogue.products] == ["a", "b"] and catalogue.errors == []
    assert catalogue.products[0].title == "Crème brûlée"
    assert catalogue.products[1].title == "two\r\nlines, and a comma"


def test_jsonl_with_a_bom(tmp_path: Path) -> None:
    (tmp_path / "c.jsonl").write_bytes(b'\xef\xbb\xbf{"id": "a", "image": "a.png"}\n')
    assert _ids(tmp_path / "c.jsonl") == (["a"], [])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"id,image\na,a.png\nb,b\xe9.png\n", r"not readable as UTF-8 \(line 3\)"),  # Latin-1
        ("id,image\na,a.png\n".encode("utf-16-le"), "byte-order mark"),  # UTF-16 without a BOM
    ],
)
def test_other_encodings_give_one_error_naming_the_line(tmp_path: Path, data: bytes, message: str) -> None:
    (tmp_path / "c.csv").write_bytes(data)
    with pytest.raises(CatalogueError, match=message):
        read_catalogue(tmp_path / "c.csv")


def test_rows_too_long_are_reported_and_the_rest_is_read(tmp_path: Path) -> None:
    settings = IngestSettings(max_row_chars=2000)
    big = "x" * 5000
    (tmp_path / "c.csv").write_text(f'id,image,title\na,a.png,{big}\nb,b.png,"{big}"\nc,c.png,ok\n')
    (tmp_path / "c.jsonl").write_text(
        f'{{"id": "a", "image": "a.png", "t": "{big}"}}\n{{"id": "c", "image": "c.png"}}\n'
    )
    assert _ids(tmp_path / "c.csv", settings) == (["c"], [(2, None), (3, None)])
    assert _ids(tmp_path / "c.jsonl", settings) == (["c"], [(1, None)])


def test_a_field_over_the_csv_module_default_limit_is_read(tmp_path: Path) -> None:
    (tmp_path / "c.csv").write_text(f'id,image,title\na,a.png,"{"y" * 200_000}"\n')
    assert _ids(tmp_path / "c.csv") == (["a"], [])


def test_a_stray_quote_does_not_swallow_the_rows_after_it(tmp_path: Path) -> None:
    """A lenient CSV reader folds the rows after an unclosed quote into one field, and those products
    would be deleted; read strictly, the damage is one unreadable row (which holds every delete)."""
    text = 'id,image,title\na,a.png,"unclosed\nb,b.png,x\nc,c.png,"y"z\nd,d.png,ok\n'
    (tmp_path / "c.csv").write_text(text)
    ids, errors = _ids(tmp_path / "c.csv")
    assert "d" in ids and errors and any(product_id is None for _, product_id in errors)


def test_blank_rows_and_an_unnamed_trailing_column_are_ignored(tmp_path: Path) -> None:
    (tmp_path / "c.csv").write_text(" id , image ,category,\na,a.png,shirt,\n,,,\n\nb,b.png,bag,\n")
    catalogue = read_catalogue(tmp_path / "c.csv")
    assert [p.id for p in catalogue.products] == ["a", "b"] and catalogue.errors == []
    assert "" not in catalogue.products[0].metadata()


@pytest.mark.parametrize(
    ("line", "message", "has_id"),
    [
        ('{"id": "a", "image": "a.png", "x": NaN}', "not finite", True),
        ('{"id": "a", "image": "a.png", "x": 1e400}', "not finite", True),
        ('{"id": "a", "image": "a.png", "x": 18446744073709551616}', "64 bits", True),
        ('{"id": "a", "image": "a.png", "x": "\\ud800"}', "not valid Unicode", True),
        ('{"id": "\\udc00", "image": "a.png"}', "no usable id", False),
        ('{"id": true, "image": "a.png"}', "no usable id", False),
        ('{"id": ["a"], "image": "a.png"}', "no usable id", False),
        ('{"id": "a", "image": "a.png", "x": ' + "[" * 12 + "]" * 12 + "}", "nested deeper", True),
        ('{"id": "a", "image": "a.png", "x": ' + "[" * 10**5 + "]" * 10**5 + "}", "not valid JSON", False),
        ('{"id": "a", "image": "a\\u0000.png"}', "not usable", True),
        ('{"id": "a", "image": "http://[::1"}', "image URL refused", True),
        ('{"id": "a", "image": "ftp://example.com/a.png"}', "image URL refused", True),
        ('{"id": "a", "image": "http://127.0.0.1/a.png"}', "image URL refused", True),
        ('{"id": "a", "image": "a.png", "price": true}', "a price is a number, not true or false", True),
    ],
)
def test_jsonl_values_the_index_cannot_hold_are_row_errors(
    tmp_path: Path, line: str, message: str, has_id: bool
) -> None:
    (tmp_path / "c.jsonl").write_text(line + '\n{"id": "ok", "image": "ok.png"}\n')
    catalogue = read_catalogue(tmp_path / "c.jsonl")
    assert [p.id for p in catalogue.products] == ["ok"]
    [error] = catalogue.errors
    assert message in error.message and error.line == 1
    assert (error.product_id == "a") is has_id


@pytest.mark.parametrize("column", sorted(RESERVED_KEYS))
def test_a_column_named_like_a_computed_field_is_refused(tmp_path: Path, column: str) -> None:
    (tmp_path / "c.csv").write_text(f"id,image,{column}\na,a.png,x\n")
    with pytest.raises(CatalogueError, match=f"column '{column}'.*rename.*shop_{column}"):
        read_catalogue(tmp_path / "c.csv")
    rows = [{"id": "a", "image": "a.png"}, {"id": "b", "image": "b.png", column: 1}]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(CatalogueError, match=rf"'{column}' \(line 2\)"):
        read_catalogue(tmp_path / "c.jsonl")


def test_the_reserved_keys_cover_every_field_sync_computes() -> None:
    """One list to keep in step with ingest: every payload key sync adds beyond the catalogue's own
    columns (and `image`, which it resolves) is reserved."""
    from PIL import Image

    from visrec import payload as schema
    from visrec.ahead import colour_fields
    from visrec.catalogue import Product

    product = Product(id="a", image="a.png")
    extracted = colour_fields(Image.new("RGB", (8, 8), "red"))
    record = schema.Bookkeeping("v", "m", [], "model")
    payload = schema.build("a", product.metadata(), ["/x/a.png"], bookkeeping=record, extracted=extracted)
    # `image` and `images` are catalogue columns that sync writes resolved.
    assert set(payload) - set(product.metadata()) - {"colour", "images"} <= RESERVED_KEYS


def test_upper_case_schemes_are_urls(tmp_path: Path) -> None:
    (tmp_path / "c.csv").write_text("id,image\na,HTTPS://example.com/a.jpg\n")
    catalogue = read_catalogue(tmp_path / "c.csv")
    assert catalogue.photo_refs(catalogue.products[0]) == ("HTTPS://example.com/a.jpg",)


def test_unreadable_file_is_a_catalogue_error(tmp_path: Path) -> None:
    (tmp_path / "c.csv").mkdir()
    with pytest.raises(CatalogueError):
        read_catalogue(tmp_path / "c.csv")


@pytest.mark.parametrize(
    ("delimiter", "name", "suffix"),
    [
        (",", "comma", ".csv"),
        (";", "semicolon", ".csv"),
        ("\t", "tab", ".csv"),
        ("\t", "tab", ".tsv"),
        ("\t", "tab", ".txt"),
    ],
)
def test_a_catalogue_as_spreadsheets_export_it(
    tmp_path: Path, delimiter: str, name: str, suffix: str
) -> None:
    """Semicolons and decimal commas (Excel in much of Europe), tabs, currency signs: every row is read,
    the delimiter is said, and a price that could mean two numbers refuses its row with both ways."""
    prices = {"a": ("19,99", 19.99), "b": ("€25", 25.0), "c": ("1.234,50 EUR", 1234.5), "d": ("$7", 7.0)}
    rows = [delimiter.join(["id", "image", "category", "price", "title"])]
    for pid, (written, _) in prices.items():
        cells = [pid, f"img/{pid}.png", "shirt", written, f"{pid}, {pid}; {pid}"]
        rows.append(delimiter.join(f'"{c}"' if delimiter in c else c for c in cells))
    rows.append(
        delimiter.join(["e", "img/e.png", "shirt", "1,234", "e"])
        if delimiter != ","
        else 'e,img/e.png,shirt,"1,234",e'
    )
    (tmp_path / f"c{suffix}").write_text("\n".join(rows) + "\n")
    catalogue = read_catalogue(tmp_path / f"c{suffix}")
    assert catalogue.delimiter == name
    assert {p.id: p.price for p in catalogue.products} == {pid: value for pid, (_, value) in prices.items()}
    assert {p.id: p.title for p in catalogue.products}["a"] == "a, a; a"
    [error] = catalogue.errors
    assert (error.line, error.product_id) == (6, "e")
    assert "ambiguous" in error.message and "1.234 or 1234" in error.message


def test_a_header_no_delimiter_fits_says_what_was_tried(tmp_path: Path) -> None:
    (tmp_path / "c.csv").write_text("id|image|category\na|x.png|b\n")
    with pytest.raises(CatalogueError, match=r"missing column.*split at each of comma, semicolon, tab"):
        read_catalogue(tmp_path / "c.csv")


def test_a_folder_given_as_the_catalogue_says_so(tmp_path: Path) -> None:
    with pytest.raises(CatalogueError, match="is a folder: name the catalogue file in it"):
        read_catalogue(tmp_path)
