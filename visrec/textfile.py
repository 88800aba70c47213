"""Shop-exported text files, read defensively: the encoding told by a byte-order mark (UTF-8 without
one) and decoded strictly, lines bounded in length, and one clear error for a file in another encoding.
"""

from __future__ import annotations

import codecs
import csv
import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

# Byte-order marks, longest first (UTF-32 LE's starts with UTF-16 LE's); the codecs named consume them.
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


class RowTooLong(Exception):
    """A line over the limit: it was skipped whole, and reading goes on with the next one."""


class Lines:
    """The file's lines for a parser, numbered; a line over `limit` characters is read in bounded pieces,
    skipped, and raises `RowTooLong` (an iterator, not a generator, so that reading goes on after it)."""

    def __init__(self, text: IO[str], limit: int) -> None:
        self.text, self.limit, self.number = text, limit, 0

    def __iter__(self) -> Lines:
        return self

    def __next__(self) -> str:
        line = self.text.readline(self.limit + 1)
        if not line:
            raise StopIteration
        self.number += 1
        if len(line) > self.limit:
            while line and not line.endswith(("\n", "\r")):
                line = self.text.readline(self.limit)
            raise RowTooLong(f"line longer than {self.limit} characters")
        if self.number == 1 and "\0" in line:
            raise UnicodeError("NUL characters in line 1: UTF-16 or UTF-32 without a byte-order mark?")
        return line


@contextmanager
def open_text(path: Path) -> Iterator[IO[str]]:
    """The file as text, decoded strictly by its byte-order mark (UTF-8 without one)."""
    with path.open("rb") as raw:
        head = raw.read(4)
        raw.seek(0)
        encoding = next((name for bom, name in _BOMS if head.startswith(bom)), "utf-8")
        # newline="": lines keep their endings (CR, LF or CRLF), as the csv module wants.
        with io.TextIOWrapper(raw, encoding=encoding, errors="strict", newline="") as text:
            yield text


@contextmanager
def csv_field_limit(limit: int) -> Iterator[None]:
    """The csv module's field limit (process-wide, 128 Ki by default) as the row limit, while reading."""
    previous = csv.field_size_limit(limit)
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def not_decodable(path: Path, exc: UnicodeError) -> str:
    """The error for a file in another encoding, naming the first line that does not decode as UTF-8."""
    line = 0
    if isinstance(exc, UnicodeDecodeError):
        with path.open("rb") as raw:
            for line, data in enumerate(raw, start=1):  # noqa: B007 - the line is what we want
                try:
                    data.decode("utf-8")
                except UnicodeDecodeError:
                    break
    where = f" (line {line})" if line else ""
    return (
        f"{path}: not readable as UTF-8{where}: {exc}. Save the catalogue as UTF-8 "
        "(UTF-16 and UTF-32 are read when the file starts with a byte-order mark)"
    )
