"""What a product's field may hold: the values a catalogue row may give (any JSON the index can store),
and the narrower ones a product written over HTTP may (its schema, `api.models`, says the same)."""

from __future__ import annotations

import math
from typing import Any

MAX_DEPTH = 8  # nesting of a JSON value in a row; deeper is reported, not stored
_INT64 = 2**63


def value_problem(value: Any, depth: int = 0) -> str | None:
    """What makes a row's value unfit for the index payload (None if nothing): text that is not valid
    Unicode, numbers that are not finite or beyond 64 bits, nesting deeper than `MAX_DEPTH`."""
    if depth > MAX_DEPTH:
        return f"a value nested deeper than {MAX_DEPTH} levels"
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            return "text that is not valid Unicode (a lone surrogate escape)"
    elif isinstance(value, float) and not math.isfinite(value):
        return f"a number that is not finite ({value})"
    elif isinstance(value, int) and not -_INT64 <= value < _INT64:
        return "an integer beyond 64 bits"
    elif isinstance(value, dict):
        for key, item in value.items():
            problem = value_problem(key, depth + 1) or value_problem(item, depth + 1)
            if problem:
                return problem
    elif isinstance(value, list):
        return next((p for item in value if (p := value_problem(item, depth + 1))), None)
    return None


# A field written over HTTP: its schema (`api.models`) says the same, in JSON Schema's words.
WHITESPACE = "".join(
    chr(c) for c in (*range(9, 14), *range(28, 33), 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B))
)
WHITESPACE += "\u2028\u2029\u202f\u205f\u3000"  # what str.strip drops (str.isspace), the test checks
SCALARS = "a text, a number, a boolean, null, or a list of those"


def written_value_problem(value: Any) -> str | None:
    """What makes a field's value unfit for a product written over HTTP (None if nothing): it must be
    a text, a number within 64 bits, a boolean, null, or a list of those — what the schema allows. Not
    an object or a list of lists: a catalogue file may nest them, but the write routes' schema refuses
    them, and the code must refuse what the schema says is refused."""
    if isinstance(value, list):
        return next((f"in its list: {p}" for item in value if (p := _scalar_problem(item))), None)
    return _scalar_problem(value)


def _scalar_problem(value: Any) -> str | None:
    if value is None or isinstance(value, bool | str):
        return value_problem(value)  # text that is not valid Unicode
    if isinstance(value, int) and -_INT64 <= value < _INT64:
        return None
    if isinstance(value, float) and (-_INT64 <= value < _INT64 or not math.isfinite(value)):
        return value_problem(value)  # not finite
    if isinstance(value, int | float):
        return "a number beyond 64 bits (from -2**63 to 2**63 - 1)"
    return f"an object or a list in a list: a field holds {SCALARS}"
