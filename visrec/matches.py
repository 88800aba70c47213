"""No answer is silently empty: a condition that alone matches no product (a misspelt category, colour,
field or value) is `NoMatch`, naming what there is (the engine's facet counts); conditions that each
match but together match nothing give an empty answer, and `why_empty` says which case it is."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from visrec.errors import NoMatch, closest
from visrec.filters import Part
from visrec.index import Filters, VectorIndex
from visrec.payload import HIDDEN_FROM_CALLERS, HIDDEN_FROM_OPERATORS

FACET_SHOWN = 10  # values a NoMatch message lists, the most frequent first
Shown = Callable[[str], bool]  # which payload fields the asker may see: messages name no other


def to_operators(field: str) -> bool:
    """The CLI's audience: every field but sync's bookkeeping."""
    return field not in HIDDEN_FROM_OPERATORS


def check_matches(
    index: VectorIndex, filters: Filters, found: Sequence[dict[str, Any]], shown: Shown = to_operators
) -> None:
    """Raise `NoMatch` for the first condition of `filters` that alone matches no product. `found` are
    payloads the filters let through (an answer's): a condition one of them meets needs no count, so an
    answer that is not empty costs a count only for the any-of values none of its products hold. A range
    that takes no number is no mistake (nothing costs that little): a range on a field that holds no
    number is."""
    for part in filters.parts():
        if any(part.met_by(payload.get(part.field)) for payload in found) or index.count(part.alone):
            continue
        if part.value is None and index.count(Filters(numbers_in=[part.field])):
            continue
        raise NoMatch(_no_match(index, part, shown))


def _no_match(index: VectorIndex, part: Part, shown: Shown) -> str:
    """What there is instead of `part`: the field's values (the engine's facet counts), or the fields
    there are."""
    kinds = index.field_kinds()
    said = f"no product has {part.said}"
    if part.field not in kinds:
        return f"{said}: {_unknown_field(part.field, kinds, shown)}"
    held = kinds[part.field]
    if part.value is None:  # a range
        if held <= {"number"}:
            return f"{said}: no product has a number in {part.field}"
        listed = _listed(index, part)
        return f"{said}: a range matches numbers only, and {part.field} holds {_kinds(held)}{listed}"
    if held == {"number"}:
        return f"{said} ({part.field} holds numbers: a range is {part.field}=LOW..HIGH)"
    return f"{said}{_listed(index, part)}"


def check_caps(
    index: VectorIndex, fields: Iterable[str], found: Sequence[dict[str, Any]], shown: Shown = to_operators
) -> None:
    """Raise `NoMatch` for a cap (`--max-per FIELD=N`) on a field no product has: it would cap nothing,
    silently (a misspelt field). `found`: payloads of the answer, which settle most fields at no cost."""
    for field in fields:
        if any(field in payload for payload in found):
            continue
        kinds = index.field_kinds()
        if field not in kinds:
            raise NoMatch(f"cannot cap by {field}: {_unknown_field(field, kinds, _ruled(shown))}")
        values = index.facet(field, 1)  # (kinds are recorded for good: products may have lost the field)
        if values is not None and not any(count for _, count in values):
            raise NoMatch(f"cannot cap by {field}: no product has a {field} now")


def check_scored(
    index: VectorIndex,
    boosts: Iterable[str],
    decays: Iterable[str],
    shown: Shown = to_operators,
    found: Sequence[dict[str, Any]] = (),
) -> None:
    """Raise `NoMatch` for a boost or a decay on a field no product was ever written with (a misspelt
    field would weigh nothing, silently), or a decay on a field that holds no text (dates are ISO 8601
    text). `found`: payloads of the answer, which settle most fields at no cost (a field one holds is
    written; text there is text); the others cost one look at the recorded field kinds, no search."""
    fields = [("boost", field) for field in boosts] + [("decay", field) for field in decays]
    kinds: Mapping[str, frozenset[str]] | None = None
    for rule, field in fields:
        if shown(field) and any(
            field in payload and (rule == "boost" or isinstance(payload[field], str)) for payload in found
        ):
            continue
        kinds = index.field_kinds() if kinds is None else kinds
        if field not in kinds or not shown(field):
            raise NoMatch(f"cannot {rule} by {field}: {_unknown_field(field, kinds, _ruled(shown))}")
        if rule == "decay" and "text" not in kinds[field]:
            raise NoMatch(
                f"cannot decay by {field}: it holds {_kinds(kinds[field])}, not dates (ISO 8601 text)"
            )


def _ruled(shown: Shown) -> Shown:
    """The fields a rule (a cap, a boost, a decay) may name: those shown, but for visrec's own (the rules
    refuse them: `rules.Rules`), so that no list offers one."""
    return lambda field: shown(field) and field not in HIDDEN_FROM_CALLERS


def _unknown_field(field: str, kinds: Mapping[str, object], shown: Shown) -> str:
    fields = sorted(f for f in kinds if shown(f))
    guess = closest(field, fields)
    hint = f" (did you mean {guess!r}?)" if guess else ""
    return f"no field {field!r} is known{hint}; fields: {', '.join(fields)}"


def _kinds(held: frozenset[str]) -> str:
    return " and ".join({"text": "text", "bool": "booleans", "number": "numbers"}[k] for k in sorted(held))


def _listed(index: VectorIndex, part: Part) -> str:
    """The field's most frequent values and their counts, and the one `part` may misspell."""
    values = index.facet(part.field, FACET_SHOWN + 1)
    if values is None:  # several kinds: no one index counts them
        return f" ({part.field} holds {_kinds(index.field_kinds()[part.field])})"
    values = [(value, count) for value, count in values if count]  # (the engine may list a gone value)
    if not values:
        return f"; no product has a {part.field} now"
    shown = [json.dumps(v) if isinstance(v, bool) else v for v, _ in values]
    listed = ", ".join(f"{v} ({n})" for v, (_, n) in zip(shown[:FACET_SHOWN], values, strict=False))
    more = ", …" if len(values) > FACET_SHOWN else ""
    guess = closest(part.value, shown) if part.value is not None else None
    hint = f" (did you mean {guess!r}?)" if guess is not None and guess != part.value else ""
    return f"{hint}; {part.field} has {listed}{more}"


def why_empty(index: VectorIndex, filters: Filters, exclude: Sequence[str] = ()) -> str | None:
    """Why an answer under `filters` (without the `exclude` products) is empty; None without filters.
    Call it after `check_matches` passed: each condition alone matches some product."""
    parts = filters.parts()
    if not parts:
        return None
    for part in parts:
        if part.inverted:
            return f"{part.said} takes nothing: its low end is above its high end"
        if part.value is None and not index.count(part.alone):
            return f"no product has {part.said}"
    if exclude and index.count(filters):
        return "only the products asked about meet these filters"
    return "each filter matches some product, but no product meets them all together"
