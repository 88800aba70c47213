"""visrec's `Filters` as a qdrant-edge filter (the embedded engine's conditions on payload fields)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, assert_never

import numpy as np
import qdrant_edge as qe

from visrec.filters import AnyOf, Condition, Equals, Filters, OneOf, Range
from visrec.index.points import payload_key, point_id


def edge_filter(filters: Filters, exclude: Sequence[str]) -> qe.Filter | None:
    must: list[Any] = [_condition(c) for c in filters.conditions()]
    must_not: list[Any] = [qe.HasIdCondition({point_id(p) for p in exclude})] if exclude else []
    return qe.Filter(must=must, must_not=must_not) if must or must_not else None


def _condition(condition: Condition) -> qe.FieldCondition | qe.Filter:
    match condition:
        case AnyOf(field, values):
            return qe.FieldCondition(key=payload_key(field), match=qe.MatchAny(any=list(values)))
        case Range(field, gte, lte):
            return qe.FieldCondition(key=payload_key(field), range=qe.RangeFloat(gte=gte, lte=lte))
        case Equals(field, value):
            return qe.FieldCondition(key=payload_key(field), match=_match(value))
        case OneOf(field, values):
            each = [_one(field, value) for value in values]
            return each[0] if len(each) == 1 else qe.Filter(should=list(each))
        case _:
            assert_never(condition)


def _one(field: str, value: str | bool | float) -> qe.FieldCondition:
    """A number matches as a point range: integers and floats alike (a match would take one kind)."""
    if isinstance(value, str | bool):
        return qe.FieldCondition(key=payload_key(field), match=_match(value))
    return qe.FieldCondition(key=payload_key(field), range=qe.RangeFloat(gte=value, lte=value))


def _match(value: str | int | bool) -> qe.MatchValue:
    """The binding reads a Python bool as the integer 1 or 0 (bool is an int): `true` then matched the
    number 1, never a stored true. numpy's bool is no int, and it reads as a boolean."""
    return qe.MatchValue(np.bool_(value) if isinstance(value, bool) else value)  # type: ignore[arg-type]
