"""Prices as shops write them (`visrec.numbers`): the number a written price means, with the oracle
written from the value (formatted in each country's way here, not by the code under test)."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from visrec.numbers import read_price

CENTS = st.integers(min_value=0, max_value=10**11)


def grouped(whole: int, separator: str) -> str:
    """`whole` with its digits grouped by threes, written digit by digit (not with str.format's rules)."""
    digits = str(whole)
    groups: list[str] = []
    while digits:
        groups.insert(0, digits[-3:])
        digits = digits[:-3]
    return separator.join(groups)


# (thousands separator, decimal mark) as shops in the US/UK, Germany, France, Switzerland write them
STYLES = [(",", "."), (".", ","), ("\u00a0", ","), (" ", ","), ("'", "."), ("\u202f", ",")]
CURRENCIES = ["", "€", "$", "£", "¥", "₹", "EUR", "usd", "CHF"]


@given(
    cents=CENTS,
    style=st.sampled_from(STYLES),
    currency=st.sampled_from(CURRENCIES),
    before=st.booleans(),
    space=st.sampled_from(["", " "]),
)
def test_a_price_written_as_a_shop_writes_it_means_its_value(
    cents: int, style: tuple[str, str], currency: str, before: bool, space: str
) -> None:
    thousands, mark = style
    number = f"{grouped(cents // 100, thousands)}{mark}{cents % 100:02d}"
    text = f"{currency}{space}{number}" if before else f"{number}{space}{currency}"
    assert Decimal(str(read_price(text))) == Decimal(cents) / 100


@given(whole=st.integers(0, 999), decimals=st.integers(0, 99))
def test_a_decimal_comma_with_one_or_two_decimals(whole: int, decimals: int) -> None:
    for shown in (str(decimals), f"{decimals:02d}"):
        assert read_price(f"{whole},{shown}") == float(f"{whole}.{shown}")


@given(whole=st.integers(0, 999), decimals=st.integers(0, 999))
def test_a_lone_comma_before_three_digits_is_refused_as_ambiguous(whole: int, decimals: int) -> None:
    """`1,234` is 1.234 in Germany and 1234 in the US: the row is refused, with both ways to write it."""
    with pytest.raises(
        ValueError, match=rf"ambiguous.*write {whole}\.{decimals:03d} or {whole}{decimals:03d}"
    ):
        read_price(f"{whole},{decimals:03d}")


@pytest.mark.parametrize(
    "text",
    ["NaN", "inf", "Infinity", "1e3", "abc", "12 34", "1.2.3", "1,23,4", "1.234,5,6", "€", "--5", "5-"],
)
def test_what_is_not_a_price_says_how_to_write_one(text: str) -> None:
    with pytest.raises(ValueError, match="price|ambiguous"):
        read_price(text)


@given(st.text(max_size=20))
def test_any_text_is_a_finite_number_or_a_value_error(text: str) -> None:
    try:
        value = read_price(text)
    except ValueError:
        return
    assert value == value and abs(value) != float("inf")
