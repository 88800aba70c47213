"""The `where` rule (visrec/filters.py), alone: how FIELD=VALUE is read and what a stored value must be to
match it. The engines' side of the same rule is checked against `Where.matches` in tests/test_index.py."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from visrec.errors import InvalidFilter
from visrec.filters import MAX_WHERE, MAX_WHERE_CHARS, WHERE_PATTERN, CallerFilters, Filters, Where
from visrec.payload import HIDDEN_FROM_CALLERS


@pytest.mark.parametrize(
    ("clause", "parsed"),
    [
        ("brand=acme", Where("brand", "acme")),
        (" brand \t= acme ", Where("brand", "acme")),
        ("note=a=b", Where("note", "a=b")),  # the first '=' splits
        ("title=red circle 0", Where("title", "red circle 0")),
        ("brand=", Where("brand", "")),
        ("price=10..50", Where("price", "10..50", 10, 50, is_range=True)),
        ("price = 10 .. 50", Where("price", "10 .. 50", 10, 50, is_range=True)),
        ("price=..50", Where("price", "..50", None, 50, is_range=True)),
        ("price=-1.5e1..", Where("price", "-1.5e1..", -15, None, is_range=True)),
        ("sku=A..B", Where("sku", "A..B")),  # no numbers: text
        ("sku=..", Where("sku", "..")),
        ("price=1e999..2", Where("price", "1e999..2")),  # beyond a double: no number, text
        ("price=01..2", Where("price", "01..2")),  # not JSON's spelling of a number: text
    ],
)
def test_where_is_field_equals_value_or_a_range(clause: str, parsed: Where) -> None:
    assert Where.parse(clause) == parsed


@pytest.mark.parametrize("clause", ["brand", "=acme", " =acme", "\t=x", "", 'say "hi"=x', "a\\b=x"])
def test_where_without_a_field_is_refused(clause: str) -> None:
    with pytest.raises(InvalidFilter, match="where takes FIELD=VALUE or FIELD=LOW..HIGH"):
        Where.parse(clause)
    with pytest.raises(InvalidFilter, match="FIELD=VALUE"):
        Filters.parse(where=[clause])


def test_where_is_bounded_in_number_and_length() -> None:
    with pytest.raises(InvalidFilter, match=f"at most {MAX_WHERE}"):
        Filters.parse(where=[f"f{i}=1" for i in range(MAX_WHERE + 1)])
    with pytest.raises(InvalidFilter, match=f"at most {MAX_WHERE_CHARS} characters"):
        Filters.parse(where=["f=" + "x" * MAX_WHERE_CHARS])


@pytest.mark.parametrize(
    ("clause", "matching", "not_matching"),
    [
        # A CSV's text and a JSON boolean alike; the text is compared exactly.
        ("in_stock=true", ["true", True, ["x", True]], ["True", "TRUE", 1, "yes", None, False]),
        ("in_stock=false", ["false", False], [0, "False", None]),
        ("in_stock=True", ["True"], [True, "true"]),  # not JSON's spelling: text only
        # A number as text or as a number, integer or float alike.
        ("size=42", ["42", 42, 42.0, [41, 42]], ["42.0", "042", 43, True, "forty-two"]),
        ("size=42.0", ["42.0", 42, 42.0], ["42"]),
        ("size=-1e2", ["-1e2", -100], ["-100"]),
        ("size=042", ["042"], [42]),
        ("brand=acme", ["acme", ["acme", "b"]], ["Acme", " acme", "acme ", ["acmex"]]),
        ("brand=", [""], [None, " "]),
        # A range takes numbers only, ends included.
        ("price=10..50", [10, 50, 10.5, [1, 20]], [9.99, 50.01, "20", True, None]),
        ("price=..5", [-3, 5], [5.5, "1"]),
        ("price=5..", [5, 1e300], [4]),
        ("price=50..10", [], [10, 30, 50]),  # an inverted range takes nothing
    ],
)
def test_what_a_where_matches(clause: str, matching: list[Any], not_matching: list[Any]) -> None:
    where = Where.parse(clause)
    assert [value for value in matching if not where.matches(value)] == []
    assert [value for value in not_matching if where.matches(value)] == []


def test_a_where_matches_only_the_kinds_its_field_holds() -> None:
    """With the kinds the index recorded for the field, the engines get the readings of those kinds
    only (each served by the field's payload index); a field never recorded gets every reading."""
    from visrec.filters import OneOf, Range

    where = Where.parse("in_stock=true")
    assert where.condition() == OneOf("in_stock", ("true", True))
    assert where.condition(frozenset({"text"})) == OneOf("in_stock", ("true",))
    assert where.condition(frozenset({"bool"})) == OneOf("in_stock", (True,))
    assert where.condition(frozenset({"number"})) == OneOf("in_stock", ("true", True))  # none: all
    assert Where.parse("size=42").condition(frozenset({"number"})) == OneOf("size", (42.0,))
    assert Where.parse("size=1..2").condition(frozenset({"text"})) == Range("size", 1, 2)
    assert Filters.parse(where=["a=1"]).needs_scan()  # kinds unknown
    assert not Filters.parse(where=["a=1"]).model_copy(update={"where_kinds": {"a": {"text"}}}).needs_scan()
    assert (
        Filters.parse(where=["a=1"]).model_copy(update={"where_kinds": {"a": {"text", "bool"}}}).needs_scan()
    )


_FIELDS = st.sampled_from(
    ["brand", "image", "images", "product_id", "a b", "a.b", "\ufeffx", "x\n", "=", "", 'say "hi"', "a\\b"]
)
_VALUES = st.text(max_size=8) | st.sampled_from(["true", "1..2", "..", "-0.5", "x=y"])


@given(
    st.one_of(
        st.text(max_size=30),
        st.from_regex(WHERE_PATTERN),
        st.builds("{}{}={}".format, st.sampled_from(["", " ", "\t", "\n"]), _FIELDS, _VALUES),
    )
)
def test_the_schemas_where_pattern_is_the_rule(clause: str) -> None:
    """The schema's pattern for one `where`, read as JSON Schema reads it (ECMAScript regular
    expressions, by the validator Schemathesis uses), accepts exactly the conditions callers may send:
    those `CallerFilters` takes, on fields callers may be shown."""
    jsonschema_rs = pytest.importorskip("jsonschema_rs")
    schema = {"type": "string", "maxLength": MAX_WHERE_CHARS, "pattern": WHERE_PATTERN}
    valid = jsonschema_rs.validator_for(schema).is_valid(clause)
    try:
        accepted = Where.parse(CallerFilters(where=[clause]).where[0]).field not in HIDDEN_FROM_CALLERS
    except ValueError:
        accepted = False
    assert valid == accepted, repr(clause)
