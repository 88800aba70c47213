"""Prices as shops in many countries write them: `19,99`, `€25`, `1.234,50 EUR`, `$1,299.00`.

A price given as text is read when it can mean one number only; otherwise its row is refused with a
reason that says how to write it. The rule (docs/catalogue.md):
- a currency sign (any Unicode currency symbol) or a three-letter code (`EUR`, `usd`) before or after
  the number is dropped: a catalogue holds one currency, the shop's;
- spaces, no-break spaces and apostrophes between groups of three digits separate thousands;
- with both `.` and `,`, the last one is the decimal mark and the other separates thousands;
- with one of them only: several of it separate thousands (`1,234,567`); a single `.` is the decimal
  mark; a single `,` is the decimal mark unless exactly three digits follow it, which is ambiguous
  (`1,234` is 1.234 in Germany and 1234 in the US) and refused.
"""

from __future__ import annotations

import re
import unicodedata

_CODE = re.compile(r"^([A-Za-z]{3})\s*(.*)$|^(.*?)\s*([A-Za-z]{3})$")
_GROUPED = re.compile(r"^\d{1,3}(?:[ \u00a0\u202f'’]\d{3})+(?:[.,]\d+)?$")
_PLAIN = re.compile(r"^(?:\d+(?:\.\d*)?|\.\d+)$")
HOW = "write it as digits with a dot for the decimals, e.g. 1234.50"


def read_price(text: str) -> float:
    """The number a price written as text means; raises ValueError saying why it cannot be read."""
    number = _without_currency(text.strip())
    sign = 1.0
    if number[:1] in ("-", "+"):  # a negative one is read, then refused by the price's own check
        sign, number = (-1.0 if number[0] == "-" else 1.0), _without_currency(number[1:].strip())
    if _GROUPED.fullmatch(number):
        number = re.sub(r"[ \u00a0\u202f'’]", "", number)
    dots, commas = number.count("."), number.count(",")
    if dots and commas:
        decimal, thousands = (".", ",") if number.rfind(".") > number.rfind(",") else (",", ".")
        whole, _, decimals = number.rpartition(decimal)
        if number.count(decimal) > 1 or not _thousands(whole, thousands):
            raise ValueError(f"{text!r} is not a price: {HOW}")
        number = f"{whole.replace(thousands, '')}.{decimals}"
    elif dots > 1 or commas > 1:
        mark = "." if dots else ","
        if not _thousands(number, mark):
            raise ValueError(f"{text!r} is not a price: {HOW}")
        number = number.replace(mark, "")
    elif commas:
        whole, _, decimals = number.partition(",")
        if len(decimals) == 3:
            raise ValueError(
                f"{text!r} is ambiguous (a decimal comma, or a thousands separator?): write "
                f"{whole}.{decimals} or {whole}{decimals}"
            )
        number = f"{whole}.{decimals}"
    if not _PLAIN.fullmatch(number):
        raise ValueError(f"{text!r} is not a price: {HOW}")
    return sign * float(number)


def _without_currency(text: str) -> str:
    """`text` without one currency sign or three-letter code before or after the number."""
    if text[:1] and unicodedata.category(text[0]) == "Sc":
        return text[1:].strip()
    if text[-1:] and unicodedata.category(text[-1]) == "Sc":
        return text[:-1].strip()
    match = _CODE.fullmatch(text)
    if match:
        return (match[2] if match[1] else match[3]).strip()
    return text


def _thousands(whole: str, mark: str) -> bool:
    """Whether `whole` is digits grouped by threes with `mark` (`1,234,567`)."""
    return re.fullmatch(rf"\d{{1,3}}(?:{re.escape(mark)}\d{{3}})+", whole) is not None
