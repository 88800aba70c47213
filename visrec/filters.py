"""Metadata filters: the one model of what a hit must meet, and the typed conditions backends map.

`CallerFilters` holds what another service may set (the HTTP query parameters and the recommend body
are built from it); `Filters` adds exact matches on any payload field, which only the operator's CLI
and visrec itself set: over HTTP they would let a caller probe fields it is not shown (server paths,
bookkeeping).

`where` (FIELD=VALUE, the CLI's `--where` and the HTTP `where=`) is parsed and matched here, once
(`Where`): a value is text, and matches the same text; spelt as a JSON literal (`true`, `false`, a
number) it also matches that boolean or number, so a CSV's text `true` and a JSON `true` both match
`in_stock=true`, and `size=42` matches "42" and 42. `LOW..HIGH` (either end may be left out) is a
range, and matches numbers only. Text is compared exactly, case and inner spaces included.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
)

from visrec.errors import InvalidFilter
from visrec.payload import HIDDEN_FROM_CALLERS, Kind

PayloadValue = str | int | bool
MAX_WHERE = 10  # conditions a request may send
MAX_WHERE_CHARS = 256  # one FIELD=VALUE
MAX_VALUES = 100  # values of category (or colour) a request may list
# JSON's spelling of a number: the only one a `where` value is read as a number in.
_NUMBER = r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
# FIELD=VALUE: blanks (space, tab) around either are dropped; FIELD has no '=' (nor a character no
# engine can address: `payload.UNADDRESSABLE`) and is not blank.
_CLAUSE = re.compile(r'[ \t]*([^=" \\\t\r\n\f\v][^="\\]*?)[ \t]*=[ \t]*(.*?)[ \t]*', re.DOTALL)
_BETWEEN = re.compile(rf"({_NUMBER})?[ \t]*\.\.[ \t]*({_NUMBER})?")
# The same rule as JSON Schema states it (only characters every regex dialect reads alike), without the
# fields callers are never shown: a request the schema allows is refused only for what the data says.
_HIDDEN = "|".join(sorted(HIDDEN_FROM_CALLERS))
WHERE_PATTERN = rf'^[ \t]*(?!(?:{_HIDDEN})[ \t]*=)[^=" \\\t\r\n\f\v][^="\\]*='


@dataclass(frozen=True)
class AnyOf:
    field: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class Range:
    field: str
    gte: float | None
    lte: float | None


@dataclass(frozen=True)
class Equals:
    field: str
    value: PayloadValue


@dataclass(frozen=True)
class OneOf:
    """The field holds one of `values`: a text, a boolean, or a number (matched as such whether stored
    as an integer or a float)."""

    field: str
    values: tuple[str | bool | float, ...]


Condition = AnyOf | Range | Equals | OneOf


def _kind(value: str | bool | float) -> Kind:
    return "bool" if isinstance(value, bool) else "text" if isinstance(value, str) else "number"


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class Where:
    """One `where` condition, FIELD=VALUE or FIELD=LOW..HIGH (the module's docstring says the rule)."""

    field: str
    text: str  # the value as written
    low: float | None = None
    high: float | None = None
    is_range: bool = False

    @classmethod
    def parse(cls, clause: str) -> Where:
        """Raises `InvalidFilter` for anything but FIELD=VALUE."""
        found = _CLAUSE.fullmatch(clause)
        if not found:
            raise InvalidFilter(
                f"where takes FIELD=VALUE or FIELD=LOW..HIGH (FIELD without '\"' or '\\'), got {clause!r}"
            )
        field, text = found.groups()
        between = _BETWEEN.fullmatch(text)
        if between and any(between.groups()):
            low, high = (None if b is None else float(b) for b in between.groups())
            # A bound beyond a double (1e999) is no number: the value is text, as anything else.
            if all(b is None or math.isfinite(b) for b in (low, high)):
                return cls(field, text, low, high, is_range=True)
        return cls(field, text)

    def readings(self) -> tuple[str | bool | float, ...]:
        """What an equality matches: the text, and the JSON literal it spells, if any."""
        if self.text in ("true", "false"):
            return (self.text, self.text == "true")
        if re.fullmatch(_NUMBER, self.text) and math.isfinite(number := float(self.text)):
            return (self.text, number)
        return (self.text,)

    def matches(self, value: Any) -> bool:
        """Whether a stored value meets this condition (a list: any of its items), as the engines do."""
        if isinstance(value, list):
            return any(self.matches(item) for item in value if not isinstance(item, list))
        if self.is_range:
            return (
                _number(value)
                and (self.low is None or value >= self.low)
                and (self.high is None or value <= self.high)
            )
        return any(
            value == reading
            and isinstance(value, bool) == isinstance(reading, bool)
            and isinstance(value, str) == isinstance(reading, str)
            for reading in self.readings()
        )

    def condition(self, kinds: frozenset[Kind] | None = None) -> Condition:
        """The engines' condition; with the `kinds` of value the field holds, only readings of those
        kinds (each then served by the field's payload index)."""
        if self.is_range:
            return Range(self.field, self.low, self.high)
        readings = self.readings()
        if kinds:
            readings = tuple(r for r in readings if _kind(r) in kinds) or readings
        return OneOf(self.field, readings)

    def __str__(self) -> str:
        return f"{self.field}={self.text}"


@dataclass(frozen=True)
class Part:
    """One condition alone (each value of an any-of list is one): a misspelt one matches no product."""

    field: str
    said: str  # as the asker wrote it
    alone: Filters  # the filters of this condition alone
    met_by: Callable[[Any], bool]  # whether a stored value of `field` meets it
    value: str | None = None  # the value looked for (None: a range)
    inverted: bool = False  # a range whose low end is above its high end: it takes nothing


class CallerFilters(BaseModel):
    """Metadata conditions, all of which a hit must meet. Empty lists mean 'any'. NaN and ±inf are
    refused here, whoever builds the filters: a NaN bound made qdrant-edge panic (a BaseException that no
    handler catches)."""

    model_config = ConfigDict(frozen=True)

    category: list[str] = Field(default=[], max_length=MAX_VALUES, description="any of")
    colour: list[str] = Field(default=[], max_length=MAX_VALUES, description="any of")
    price_min: float | None = Field(default=None, allow_inf_nan=False)
    price_max: float | None = Field(default=None, allow_inf_nan=False)
    # The pattern is for the schema; `_where_parse` checks the same rule and says what is wrong.
    where: list[
        Annotated[
            str,
            WithJsonSchema({"type": "string", "maxLength": MAX_WHERE_CHARS, "pattern": WHERE_PATTERN}),
        ]
    ] = Field(
        default=[],
        max_length=MAX_WHERE,
        description="FIELD=VALUE (repeat: all must hold), on any field callers are shown: the same text, "
        "or, for true, false or a number, also that boolean or number (in_stock=true, size=42); "
        "FIELD=LOW..HIGH (either end may be left out: price=10..50, price=..50) is a range of numbers",
    )

    @field_validator("category", "colour")
    @classmethod
    def _blank_is_absent(cls, values: list[str]) -> list[str]:
        return [value for value in values if value]

    @field_validator("where")
    @classmethod
    def _where_parse(cls, clauses: list[str]) -> list[str]:
        for clause in clauses:
            if len(clause) > MAX_WHERE_CHARS:
                raise ValueError(f"a where condition has at most {MAX_WHERE_CHARS} characters")
            try:
                Where.parse(clause)
            except InvalidFilter as exc:
                raise ValueError(str(exc)) from None
        return clauses

    @property
    def clauses(self) -> list[Where]:
        """The `where` conditions, parsed."""
        return [Where.parse(clause) for clause in self.where]


def _named(error: Any) -> str:
    """One validation error, named by its field (as the option and the parameter are) unless it says it."""
    message = str(error["msg"]).removeprefix("Value error, ")
    field = str(error["loc"][0]) if error["loc"] else ""
    return message if message.startswith(field) else f"{field}: {message}"


class Filters(CallerFilters):
    equals: dict[str, PayloadValue] = {}  # exact match on any payload field
    numbers_in: list[str] = []  # fields that must hold a number, any (did a range miss, or the field?)
    # The kinds of value each `where` field holds, as the index recorded them (`VectorIndex.field_kinds`):
    # a value is then matched as those kinds only, each served by the field's payload index.
    where_kinds: Mapping[str, frozenset[Kind]] = {}

    @classmethod
    def parse(cls, **fields: Any) -> Filters:
        """Validated filters; raises `InvalidFilter` with the reason."""
        try:
            return cls(**fields)
        except ValidationError as exc:
            raise InvalidFilter("; ".join(_named(e) for e in exc.errors())) from exc

    @classmethod
    def of(cls, chosen: CallerFilters) -> Filters:
        """What a caller chose (already validated: a query model, the recommend body), as filters."""
        return cls.model_construct(**{name: getattr(chosen, name) for name in CallerFilters.model_fields})

    def conditions(self) -> list[Condition]:
        """The filters as backend-neutral conditions; each backend maps them to its own classes."""
        out: list[Condition] = []
        if self.category:
            out.append(AnyOf("category", tuple(self.category)))
        if self.colour:
            out.append(AnyOf("colour", tuple(self.colour)))
        if self.price_min is not None or self.price_max is not None:
            out.append(Range("price", self.price_min, self.price_max))
        out += [Equals(key, value) for key, value in self.equals.items()]
        out += [Range(field, None, None) for field in self.numbers_in]
        out += [where.condition(self.where_kinds.get(where.field)) for where in self.clauses]
        return out

    def needs_scan(self) -> bool:
        """Whether a search must scan every point: a `where` field whose values' kind no single payload
        index covers (never recorded, or of several kinds), where the HNSW graph alone could miss hits."""
        return any(len(self.where_kinds.get(where.field, ())) != 1 for where in self.clauses)

    def parts(self) -> list[Part]:
        """Each condition alone, to tell a misspelt one (it matches no product) from conditions that
        only together match nothing."""
        parts = [
            Part(field, f"{field} {value!r}", Filters(**{field: [value]}), _holds(value), value)
            for field in ("category", "colour")
            for value in dict.fromkeys(getattr(self, field))
        ]
        if self.price_min is not None or self.price_max is not None:
            low, high = self.price_min, self.price_max
            price = Filters.model_construct(price_min=low, price_max=high)
            said = f"price {_between(low, high)}"
            within = Where("price", "", low, high, is_range=True)
            parts.append(Part("price", said, price, within.matches, inverted=_inverted(low, high)))
        for where in dict.fromkeys(self.clauses):
            alone = Filters.model_construct(where=[str(where)])
            value = None if where.is_range else where.text
            inverted = _inverted(where.low, where.high)
            parts.append(Part(where.field, str(where), alone, where.matches, value, inverted))
        return parts


def _holds(wanted: str) -> Callable[[Any], bool]:
    """An any-of value's test: the field is that text, or a list holding it."""
    return lambda value: value == wanted or (isinstance(value, list) and wanted in value)


def _inverted(low: float | None, high: float | None) -> bool:
    return low is not None and high is not None and low > high


def _between(low: float | None, high: float | None) -> str:
    return f"{'' if low is None else f'{low:g}'}..{'' if high is None else f'{high:g}'}"
