"""The product catalogue: CSV or JSONL rows validated into `Product` records.

A bad row is reported with its line number and skipped (a local image path must resolve inside the
catalogue's folder or a configured image root); only a problem with the file as a whole (missing,
unknown format, no `id`/`image` column) raises `CatalogueError`.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from visrec.errors import CatalogueError

REQUIRED_COLUMNS = ("id", "image")
# Payload keys visrec writes itself; a catalogue column must not overwrite them.
RESERVED_KEYS = frozenset({"product_id", "content_hash", "model_version"})


class Product(BaseModel):
    """One catalogue row. Columns beyond the known ones are kept (as `extra`) for the payload."""

    model_config = ConfigDict(extra="allow", str_strip_whitespace=True, frozen=True)

    id: str = Field(min_length=1, max_length=256)
    image: str = Field(min_length=1, max_length=4096)
    category: str | None = None
    colour: str | None = None
    price: float | None = Field(default=None, ge=0, allow_inf_nan=False)  # NaN said "not >= 0"
    title: str | None = None

    @field_validator("category", "colour", "title", "price", mode="before")
    @classmethod
    def _blank_is_missing(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @property
    def is_remote(self) -> bool:
        return self.image.startswith(("http://", "https://"))

    def metadata(self) -> dict[str, Any]:
        """Every field but `id`, blanks dropped: what goes into the index payload."""
        return {k: v for k, v in self.model_dump(exclude={"id"}).items() if v is not None}


@dataclass(frozen=True)
class RowError:
    """A row that was skipped: where it is and why."""

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

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def image_ref(self, product: Product) -> str:
        """The image as an absolute path or a URL: relative paths are relative to the catalogue file."""
        if product.is_remote:
            return product.image
        return str((self.base_dir / product.image).resolve())

    def escapes_roots(self, product: Product) -> bool:
        """Whether a local image path resolves outside the catalogue's folder and the image roots (through
        `..`, an absolute path or a symlink): such a row is refused, so a catalogue cannot make visrec
        read, index and serve an arbitrary file of the machine."""
        if product.is_remote:
            return False
        image = Path(self.image_ref(product))
        return not any(image.is_relative_to(root) for root in (self.base_dir, *self.image_roots))

    def content_hash(self, product: Product) -> str:
        """sha256 of the image bytes and the metadata: a change to either makes the product 'changed'.

        A remote image is identified by its URL (fetching every image on every sync would defeat the
        point of an incremental sync): publish a changed photo under a new URL.
        """
        digest = hashlib.sha256()
        digest.update(json.dumps(product.metadata(), sort_keys=True, default=str).encode())
        if product.is_remote:
            digest.update(product.image.encode())
        else:
            try:
                digest.update(Path(self.image_ref(product)).read_bytes())
            except OSError:
                digest.update(b"\0unreadable")  # decoding will fail and record why
        return digest.hexdigest()


def read_catalogue(path: Path, image_roots: Sequence[Path] = ()) -> Catalogue:
    """Read and validate a `.csv` or `.jsonl` catalogue whose local images lie in its own folder or
    under one of `image_roots`.

    Returns the valid products in file order and the skipped rows. Raises `CatalogueError` when the
    file is missing, of an unknown format, or lacks a required column.
    """
    if not path.is_file():
        raise CatalogueError(f"catalogue not found: {path}")
    readers = {".csv": _csv_rows, ".jsonl": _jsonl_rows, ".ndjson": _jsonl_rows}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise CatalogueError(f"unknown catalogue format {path.suffix!r}: use .csv or .jsonl")

    roots = tuple(root.resolve() for root in image_roots)
    catalogue = Catalogue(path=path.resolve(), image_roots=roots)
    first_line_of: dict[str, int] = {}
    for line, row in reader(path):
        if isinstance(row, RowError):
            catalogue.errors.append(row)
            continue
        product_id = str(row.get("id") or "").strip() or None
        clash = RESERVED_KEYS.intersection(row)
        if clash:
            catalogue.errors.append(RowError(line, f"reserved column(s) {sorted(clash)}", product_id))
            continue
        try:
            product = Product.model_validate(row)
        except ValidationError as exc:
            catalogue.errors.append(RowError(line, _explain(exc), product_id))
            continue
        if catalogue.escapes_roots(product):
            message = (
                f"image {product.image!r} is outside the catalogue's folder {catalogue.base_dir} "
                "and the image roots (VISREC_INGEST__IMAGE_ROOTS)"
            )
            catalogue.errors.append(RowError(line, message, product.id))
            continue
        if product.id in first_line_of:
            message = f"duplicate id {product.id!r} (first on line {first_line_of[product.id]})"
            catalogue.errors.append(RowError(line, message, product.id))
            continue
        first_line_of[product.id] = line
        catalogue.products.append(product)
    return catalogue


def _csv_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | RowError]]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise CatalogueError(f"{path}: missing column(s) {missing}; found {reader.fieldnames}")
        for row in reader:
            if None in row:  # more cells than header columns
                yield reader.line_num, RowError(reader.line_num, "more cells than columns", row.get("id"))
            elif any(v is None for v in row.values()):
                yield reader.line_num, RowError(reader.line_num, "fewer cells than columns", row.get("id"))
            else:
                yield reader.line_num, {k: v for k, v in row.items() if v != "" or k in REQUIRED_COLUMNS}


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | RowError]]:
    with path.open(encoding="utf-8") as f:
        for line_no, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                yield line_no, RowError(line_no, f"not valid JSON: {exc.msg}")
                continue
            if not isinstance(row, dict):
                yield line_no, RowError(line_no, "not a JSON object")
                continue
            if isinstance(row.get("id"), int):
                row["id"] = str(row["id"])
            yield line_no, row


def _explain(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'row'}: {e['msg']}" for e in exc.errors())
