"""Metadata filters: the one model of what a hit must meet, and the typed conditions backends map.

`CallerFilters` holds what another service may set (the HTTP query parameters and the recommend body
are built from it); `Filters` adds exact matches on any payload field, which only the operator's CLI
sets: over HTTP they would let a caller probe fields it is not shown (server paths, bookkeeping).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from visrec.errors import InvalidFilter

PayloadValue = str | int | bool


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


Condition = AnyOf | Range | Equals


class CallerFilters(BaseModel):
    """Metadata conditions, all of which a hit must meet. Empty lists mean 'any'. NaN and ±inf are
    refused here, whoever builds the filters: a NaN bound made qdrant-edge panic (a BaseException that no
    handler catches)."""

    model_config = ConfigDict(frozen=True)

    category: list[str] = Field(default=[], description="any of")
    colour: list[str] = Field(default=[], description="any of")
    price_min: float | None = Field(default=None, allow_inf_nan=False)
    price_max: float | None = Field(default=None, allow_inf_nan=False)

    @field_validator("category", "colour")
    @classmethod
    def _blank_is_absent(cls, values: list[str]) -> list[str]:
        return [value for value in values if value]

    @model_validator(mode="after")
    def _sane_range(self) -> CallerFilters:
        if self.price_min is not None and self.price_max is not None and self.price_min > self.price_max:
            raise ValueError(f"price_min {self.price_min} is above price_max {self.price_max}")
        return self


class Filters(CallerFilters):
    equals: dict[str, PayloadValue] = {}  # exact match on any payload field

    @classmethod
    def parse(cls, **fields: Any) -> Filters:
        """Validated filters; raises `InvalidFilter` with the reason."""
        try:
            return cls(**fields)
        except ValidationError as exc:
            raise InvalidFilter(
                "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
            ) from exc

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
        return out


def parse_equals(pairs: list[str]) -> dict[str, str]:
    """`["brand=acme", …]` → `{"brand": "acme"}`; raises `InvalidFilter` for a pair without '='."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InvalidFilter(f"expected FIELD=VALUE, got {pair!r}")
        out[key.strip()] = value.strip()
    return out
