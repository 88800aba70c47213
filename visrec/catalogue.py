"""The product catalogue: CSV or JSONL rows validated into `Product` records.

Shop feeds are messy, so reading is built to contain damage: a bad row (malformed, too long, no usable
id, a value the index cannot hold, an image URL or path that is refused) is reported with its line
number and skipped, and the rest is read. Only a problem with the file as a whole raises
`CatalogueError`: missing or unreadable, an unknown format, an encoding other than UTF-8 (with or
without a byte-order mark) or UTF-16/32 with one, no `id` column or neither `image` nor `images`, a
column named like a field visrec computes.

A product has one photo (`image`) or several (`images`: a JSON list in JSONL, `|`-separated in CSV; with
both, `image` comes first). A photo that is refused (its URL or path) is reported and dropped; the product
stays with its other photos, and is refused only when none is left.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from visrec import payload
from visrec.config import IngestSettings
from visrec.errors import CatalogueError
from visrec.numbers import read_price
from visrec.textfile import Lines, RowTooLong, csv_field_limit, not_decodable, open_text
from visrec.urls import FetchPolicy, check_url, is_url
from visrec.values import value_problem, written_value_problem

REQUIRED_COLUMNS = ("id",)
PHOTO_COLUMNS = ("image", "images")  # at least one of them
MAX_PHOTOS = 32  # per product: more is a feed bug, and each photo costs an embedding and 4 KB of index
PHOTO_SEPARATOR = "|"  # between the photos of a CSV `images` cell
# Payload keys visrec writes itself (sync bookkeeping, the colour it extracts): a catalogue column of the
# same name would overwrite them, so such a catalogue is refused. `colour` is the shop's own (it wins).
RESERVED_KEYS = payload.RESERVED
MAX_ID_LENGTH = 256


class Product(BaseModel):
    """One catalogue row. Columns beyond the known ones are kept (as `extra`) for the payload."""

    model_config = ConfigDict(extra="allow", str_strip_whitespace=True, frozen=True)

    id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    image: str | None = Field(default=None, min_length=1, max_length=4096)
    images: list[Annotated[str, Field(min_length=1, max_length=4096)]] | None = None
    category: str | None = None
    colour: str | None = None
    price: float | None = Field(default=None, ge=0, allow_inf_nan=False)  # NaN said "not >= 0"
    title: str | None = None

    @field_validator("image", "category", "colour", "title", "price", mode="before")
    @classmethod
    def _blank_is_missing(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("price", mode="before")
    @classmethod
    def _price_as_written(cls, value: Any) -> Any:
        """`19,99`, `€25`, `1.234,50 EUR` (`visrec.numbers`): read where they mean one number."""
        if isinstance(value, bool):  # pydantic would read true as 1.0
            raise ValueError("a price is a number, not true or false")
        return read_price(value) if isinstance(value, str) and value.strip() else value

    @field_validator("images", mode="before")
    @classmethod
    def _split_photos(cls, value: Any) -> Any:
        """A CSV cell lists its photos separated by `|`; blanks between separators are dropped."""
        if isinstance(value, str):
            value = value.split(PHOTO_SEPARATOR)
        if isinstance(value, list):
            value = [v.strip() if isinstance(v, str) else v for v in value]
            value = [v for v in value if v != ""] or None
        return value

    @model_validator(mode="after")
    def _has_photos(self) -> Product:
        if not self.photos:
            raise ValueError("no photo: give `image` or `images`")
        if len(self.photos) > MAX_PHOTOS:
            raise ValueError(f"{len(self.photos)} photos, more than {MAX_PHOTOS}")
        return self

    @property
    def photos(self) -> list[str]:
        """The product's photos as the catalogue names them, `image` first, each once."""
        return list(dict.fromkeys([*([self.image] if self.image else []), *(self.images or [])]))

    def metadata(self) -> dict[str, Any]:
        """Every field but `id`, blanks dropped: what goes into the index payload."""
        return {k: v for k, v in self.model_dump(exclude={"id"}).items() if v is not None}


@dataclass(frozen=True)
class RowError:
    """A row that was skipped: where it is and why. Without a `product_id`, the row may have been any
    product: a sync then deletes nothing (it cannot prove a product gone)."""

    line: int
    message: str
    product_id: str | None = None


@dataclass
class Catalogue:
    """The valid products of a catalogue file, the rows that were skipped, and where images resolve."""

    path: Path
    products: list[Product] = field(default_factory=list)
    errors: list[RowError] = field(default_factory=list)
    image_roots: tuple[Path, ...] = ()  # besides the catalogue's folder, where local images may live
    lines: dict[str, int] = field(default_factory=dict)  # product id → its (first) line in the file
    photos: dict[str, tuple[str, ...]] = field(default_factory=dict)  # product id → its usable photo refs
    photo_errors: list[RowError] = field(default_factory=list)  # photos dropped from a product kept
    delimiter: str | None = None  # a CSV's, as detected from its header

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    @property
    def unidentified(self) -> list[RowError]:
        """Skipped rows whose product is unknown (unparseable, no usable id)."""
        return [e for e in self.errors if e.product_id is None]

    def resolve(self, photo: str) -> str:
        """A photo as an absolute path or a URL: relative paths are relative to the catalogue file."""
        if is_url(photo):
            return photo
        # os.path: a third of Path.resolve's cost, which dominated reading a large catalogue
        return os.path.realpath(os.path.join(self.base_dir, photo))

    def photo_refs(self, product: Product) -> tuple[str, ...]:
        """The product's usable photos (refused ones dropped), resolved, `image` first."""
        return self.photos[product.id]

    def escapes_roots(self, ref: str) -> bool:
        """Whether a resolved local photo lies outside the catalogue's folder and the image roots (through
        `..`, an absolute path or a symlink): such a photo is refused, so a catalogue cannot make visrec
        read, index and serve an arbitrary file of the machine."""
        if is_url(ref):
            return False
        return not any(
            ref == root or ref.startswith(root.rstrip(os.sep) + os.sep)
            for root in map(str, (self.base_dir, *self.image_roots))
        )


def read_catalogue(path: Path, settings: IngestSettings | None = None) -> Catalogue:
    """Read and validate a `.csv` (`.tsv`, `.txt`) or `.jsonl` catalogue whose local images lie in its own
    folder or under one of `settings.image_roots`, and whose image URLs `settings` allows.

    Returns the valid products in file order and the skipped rows. Raises `CatalogueError` when the
    file cannot be used as a whole (see the module's docstring).
    """
    settings = settings or IngestSettings()
    if path.is_dir():
        raise CatalogueError(f"{path} is a folder: name the catalogue file in it (.csv, .tsv or .jsonl)")
    if not path.is_file():
        raise CatalogueError(f"catalogue not found: {path}")
    # (a spreadsheet's "text" export is tab-separated .tsv or .txt: the delimiter is found from the header)
    readers = {
        ".csv": _csv_rows,
        ".tsv": _csv_rows,
        ".txt": _csv_rows,
        ".jsonl": _jsonl_rows,
        ".ndjson": _jsonl_rows,
    }
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise CatalogueError(f"unknown catalogue format {path.suffix!r}: use .csv (or .tsv, .txt) or .jsonl")

    roots = tuple(root.resolve() for root in settings.image_roots)
    catalogue = Catalogue(path=path.resolve(), image_roots=roots)
    rows = _RowChecker(catalogue, FetchPolicy.from_settings(settings))
    try:
        with open_text(path) as text, csv_field_limit(settings.max_row_chars):
            for line, row in reader(Lines(text, settings.max_row_chars), catalogue):
                rows.add(line, row)
    except UnicodeError as exc:
        raise CatalogueError(not_decodable(path, exc)) from None
    except OSError as exc:
        raise CatalogueError(f"cannot read {path}: {exc.strerror or exc}") from None
    return catalogue


def rows_from_service(rows: Iterable[Any], settings: IngestSettings, origin: str = "HTTP") -> Catalogue:
    """Rows written by another service (the HTTP write routes) as a catalogue, under the same checks as a
    file's rows, and two more: a photo must be a URL (a caller cannot make visrec read a file of this
    machine), and a reserved field refuses that row, not all of them. `line` n is the n-th row."""
    catalogue = Catalogue(path=Path(origin))
    checker = _RowChecker(catalogue, FetchPolicy.from_settings(settings), over_http=True)
    for line, row in enumerate(rows, 1):
        checker.add(line, row if isinstance(row, dict) else RowError(line, "not a JSON object"))
    return catalogue


class _RowChecker:
    """Turns each parsed row into a product or a `RowError`; one row's failure, whatever it is, stays
    that row's."""

    def __init__(self, catalogue: Catalogue, policy: FetchPolicy, over_http: bool = False) -> None:
        self.catalogue, self.policy, self.over_http = catalogue, policy, over_http
        self.first_rows: dict[str, int] = {}  # product id → the line of its first row

    def add(self, line: int, row: dict[str, Any] | RowError) -> None:
        if isinstance(row, RowError):
            self.catalogue.errors.append(row)
            return
        try:
            error = self._check(line, row)
        except CatalogueError as exc:
            if not self.over_http:
                raise
            error = RowError(line, str(exc).split(": ", 1)[-1], _usable_id(row))
        except Exception as exc:  # containment: an unforeseen failure skips the row, never the catalogue
            error = RowError(line, f"cannot read the row ({type(exc).__name__}: {exc})", _usable_id(row))
        if error is not None:
            self.catalogue.errors.append(error)

    def _check(self, line: int, row: dict[str, Any]) -> RowError | None:
        catalogue = self.catalogue
        row = {key.strip(): value for key, value in row.items() if isinstance(key, str) and key.strip()}
        product_id = _usable_id(row)
        # An id's first row is its product's, valid or not: a later one is a duplicate, whatever became
        # of the first (taking the next valid one instead made the outcome depend on which check failed).
        first = self.first_rows.setdefault(product_id, line) if product_id is not None else line
        if first != line:
            where = (
                f"row {first} has it: this row is not written" if self.over_http else f"first on line {first}"
            )
            return RowError(line, f"duplicate id {product_id!r} ({where})", product_id)
        reserved = sorted(RESERVED_KEYS.intersection(row))
        if reserved and self.over_http:  # that row alone, in the write routes' words
            return RowError(line, reserved_field(reserved[0]), product_id)
        if reserved:
            raise CatalogueError(_reserved(catalogue.path, reserved[0], line))
        if product_id is None:
            return RowError(line, f"no usable id (a non-empty text of at most {MAX_ID_LENGTH} characters)")
        problem = value_problem(row) or (written_fields_problem(row) if self.over_http else None)
        if problem:
            return RowError(line, problem, product_id)
        try:
            product = Product.model_validate({**row, "id": product_id})
        except ValidationError as exc:
            return RowError(line, explain(exc), product_id)
        photos, refused = self._photos(product)
        if not photos:
            return RowError(line, "; ".join(refused), product_id)
        catalogue.photo_errors += [RowError(line, reason, product_id) for reason in refused]
        catalogue.lines[product.id] = line
        catalogue.photos[product.id] = photos
        catalogue.products.append(product)
        return None

    def _photos(self, product: Product) -> tuple[tuple[str, ...], list[str]]:
        """The product's photos that may be read (resolved), and why each other one is refused."""
        usable: list[str] = []
        refused: list[str] = []
        for photo in product.photos:
            if is_url(photo):
                problem = check_url(photo, self.policy)
                if problem:
                    refused.append(f"image URL refused: {problem}")
                else:
                    usable.append(photo)
                continue
            if self.over_http:
                refused.append("photos must be http(s) URLs over HTTP, not a file path")
                continue
            try:
                ref = self.catalogue.resolve(photo)
                outside = self.catalogue.escapes_roots(ref)
            except (OSError, ValueError) as exc:  # a NUL byte, a name too long for the file system
                refused.append(f"image path {photo!r} is not usable ({exc})")
                continue
            if outside:
                refused.append(
                    f"image {photo!r} is outside the catalogue's folder {self.catalogue.base_dir} "
                    "and the image roots (VISREC_INGEST__IMAGE_ROOTS)"
                )
            else:
                usable.append(ref)
        return tuple(dict.fromkeys(usable)), refused


def _usable_id(row: dict[str, Any]) -> str | None:
    """The row's product id as text, or None when there is none a product could have."""
    value = row.get("id")
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        return None
    value = value.strip()
    if not value or len(value) > MAX_ID_LENGTH or value_problem(value):
        return None
    return value


def written_fields_problem(fields: dict[str, Any]) -> str | None:
    """Why the fields of a product written over HTTP cannot be written (None: they can): every field
    has a name (not only white space), and every field other than the typed ones (`Product`'s) holds
    a value `written_value_problem` allows. The one rule of the write routes' models and batches."""
    for key, value in fields.items():
        if not key.strip():
            return "a field needs a name"
        if key == "price" and not (
            value is None or (isinstance(value, int | float) and not isinstance(value, bool))
        ):
            # A file's text is read (`visrec.numbers`); another service sends the number itself.
            return "field 'price': over HTTP a price is a JSON number (e.g. 19.99), not text or true/false"
        problem = None if key in Product.model_fields else written_value_problem(value)
        if problem:
            return f"field {key!r}: {problem}"
    return None


def reserved_field(name: str) -> str:
    """Why a product written over HTTP may not carry `name` (PUT, PATCH and batch rows alike)."""
    return f"{name!r} is a field visrec computes itself; name yours otherwise, e.g. 'shop_{name}'"


def _reserved(path: Path, column: str, line: int) -> str:
    return (
        f"{path}: column {column!r} (line {line}) is a field visrec computes itself; rename the column, "
        f"e.g. to 'shop_{column}' (reserved: {', '.join(sorted(RESERVED_KEYS))})"
    )


DELIMITERS = {",": "comma", ";": "semicolon", "\t": "tab"}  # as spreadsheets in many countries export


def _csv_rows(lines: Lines, catalogue: Catalogue) -> Iterator[tuple[int, dict[str, Any] | RowError]]:
    path = catalogue.path
    try:
        first = next(lines, "")
    except RowTooLong as exc:
        raise CatalogueError(f"{path}: the header line cannot be read: {exc}") from None
    # The delimiter is the one whose header has the columns visrec needs (the first, in DELIMITERS' order).
    headers = {d: _header(first, d) for d in DELIMITERS}
    missing = {d: _missing(columns) for d, columns in headers.items()}
    delimiter = next((d for d in DELIMITERS if not missing[d]), ",")
    if missing[delimiter]:
        raise CatalogueError(
            f"{path}: missing column(s) {missing[delimiter]}; found {headers[delimiter]} (the header was "
            f"split at each of {', '.join(DELIMITERS.values())}: none gives these columns)"
        )
    catalogue.delimiter = DELIMITERS[delimiter]
    columns = headers[delimiter]
    # strict: a stray quote is an error, not a field that swallows the rows after it (which would vanish).
    reader = csv.reader(lines, delimiter=delimiter, strict=True)
    repeated = sorted({c for c in columns if c and columns.count(c) > 1})
    if repeated:
        raise CatalogueError(f"{path}: column(s) {repeated} appear more than once")
    reserved = sorted(RESERVED_KEYS.intersection(columns))
    if reserved:
        raise CatalogueError(_reserved(path, reserved[0], 1))
    while True:
        start = lines.number + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except (csv.Error, RowTooLong) as exc:
            yield start, RowError(start, f"malformed CSV: {exc}")
            continue
        if not any(cell.strip() for cell in cells):  # a blank line, or a row of empty cells
            continue
        if len(cells) != len(columns):
            # The cells are shifted: no cell can be trusted, the id included.
            yield start, RowError(start, f"{len(cells)} cells for {len(columns)} columns")
            continue
        # Cells under an unnamed column (a trailing comma in the header) are dropped; blanks are missing.
        yield start, {c: v for c, v in zip(columns, cells, strict=True) if c and (v or c in REQUIRED_COLUMNS)}


def _header(line: str, delimiter: str) -> list[str]:
    """The column names of a header line split at `delimiter` (none where it is not valid CSV)."""
    try:
        return [name.strip() for name in next(csv.reader([line], delimiter=delimiter, strict=True), [])]
    except csv.Error:
        return []


def _missing(columns: list[str]) -> list[str]:
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if not any(c in columns for c in PHOTO_COLUMNS):
        missing.append(" or ".join(PHOTO_COLUMNS))
    return missing


def _jsonl_rows(lines: Lines, catalogue: Catalogue) -> Iterator[tuple[int, dict[str, Any] | RowError]]:
    while True:
        try:
            text = next(lines)
        except StopIteration:
            return
        except RowTooLong as exc:
            yield lines.number, RowError(lines.number, str(exc))
            continue
        if not text.strip():
            continue
        try:
            row = json.loads(text)  # NaN and Infinity are read (not JSON, but common): values check them
        except RecursionError:
            yield lines.number, RowError(lines.number, "not valid JSON: nested too deeply")
            continue
        except ValueError as exc:
            yield lines.number, RowError(lines.number, f"not valid JSON: {getattr(exc, 'msg', exc)}")
            continue
        if not isinstance(row, dict):
            yield lines.number, RowError(lines.number, "not a JSON object")
            continue
        yield lines.number, row


def explain(exc: ValidationError) -> str:
    """Pydantic's errors on one line: a field named with a newline or other control character (a junk
    key) is shown quoted and escaped, so no message breaks a terminal line or a log line."""

    def shown(part: object) -> str:
        return str(part) if str(part).isprintable() else json.dumps(str(part))

    return "; ".join(
        f"{'.'.join(map(shown, e['loc'])) or 'row'}: {e['msg'].removeprefix('Value error, ')}"
        for e in exc.errors()
    )
