"""The HTTP API's public schema: request and response models, the error answers each route documents
(every error body is `ErrorOut`; 429 and 503 come with Retry-After), and the one place a product's
payload is cut down to what callers may see."""

from __future__ import annotations

import json
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from typing import Annotated, Any, cast

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.config import JsonDict
from pydantic_core import PydanticCustomError

from visrec import query
from visrec.catalogue import MAX_PHOTOS, written_fields_problem
from visrec.config import Settings
from visrec.errors import closest
from visrec.filters import CallerFilters
from visrec.index import Hit
from visrec.payload import RESERVED, for_callers, photos
from visrec.values import SCALARS, WHITESPACE


class ErrorOut(BaseModel):
    """The body of every error answer, the guard's own (401, 408, 413, busy 503) included."""

    detail: str = Field(description="What is wrong, as a sentence")
    problems: list[dict[str, Any]] | None = Field(
        default=None,
        description="for a request that does not match this schema (a 422 from validation): each problem "
        "found, with `type`, `loc` (where: `query`, `path`, `body`, then the name) and `msg`",
    )
    error: str | None = Field(
        default=None, description="visrec's kind of error, when visrec raised it (NotFound, ImageError, …)"
    )
    request_id: str = Field(description="this request's X-Request-ID, under which the server logs it")


class Figures(BaseModel):
    """Same-category retrieval figures of a collection version, as `visrec reindex`'s quality gate measured
    them: the share of each query product's 10 nearest products in its category (P@10), and mAP@10."""

    model_version: str
    p_at_10: float = Field(validation_alias="p@10")
    map_at_10: float = Field(validation_alias="map@10")


class Quality(Figures):
    queries: int = Field(description="how many query products")
    query_set: str = Field(
        description="`held-out`: products neither model was trained on; `sample`: a seeded sample of the "
        "indexed products"
    )
    measured_at: str
    compared_with: Figures | None = Field(
        default=None, description="the version it replaced, measured on the same query products"
    )


class Readiness(BaseModel):
    ready: bool
    model_version: str | None
    points: int | None
    quality: Quality | None = Field(
        default=None,
        description="the live version's figures; null where `visrec reindex` has not measured it",
    )
    problems: list[str] = Field(description="what is wrong, for anyone: the details are in the log")


# Error answers, documented per route in the OpenAPI schema.
ERRORS: dict[int, str] = {
    400: "the body cannot be parsed (a malformed multipart upload), or Content-Length is not a number",
    401: "missing or wrong X-API-Key (when the server has a key)",
    403: "a write without the write key (VISREC_API__WRITE_KEY), or writes are off on this service",
    404: "no such product",
    408: "the body took longer than `api.body_timeout_s` to arrive",
    413: "the body is larger than the limit",
    422: "a parameter, the body or the image is invalid",
    429: "over the client's rate limit (`api.rate_limit_per_s`, when set) or too many wrong keys from it "
    "(`api.auth_failure_per_s`): retry after Retry-After seconds",
    502: "the product's photo is remote and its image host did not deliver it (the cause is in the server's "
    "log, under the request id)",
    503: "busy (too many photo and similarity searches at once), the index or the model is unavailable, "
    "or the request took longer than `api.request_timeout_s`: retry after Retry-After seconds",
}
RETRY_AFTER = {
    "Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route answering `codes` besides its success (and 429: any keyed route may
    be rate limited)."""
    return {
        code: {
            "model": ErrorOut,
            "description": ERRORS[code],
            **({"headers": RETRY_AFTER} if code in (429, 503) else {}),
        }
        for code in (*codes, 429)
    }


class HitOut(BaseModel):
    product_id: str
    distance: float = Field(
        description="Euclidean distance on the embedding to the product's nearest photo; smaller is closer"
    )
    score: float = Field(
        description="what the answer is ranked by, smaller first: the distance, or with colour_weight, "
        "boost or decay the score they give it (docs/queries.md)"
    )
    matched_image: int = Field(
        description="which of the product's photos matched (0: the first): "
        "GET /products/{product_id}/images/{matched_image}"
    )
    photos: int = Field(description="how many photos the product has")
    payload: dict[str, Any]


EMPTY = (
    "why the answer is empty, when filters left nothing (each filter alone matches some product, so "
    "they match nothing together, or only the products asked about; or a range takes no value); "
    "else null. A filter that alone matches no product is a 422 naming what there is"
)


class Results(BaseModel):
    results: list[HitOut]
    note: str | None = Field(default=None, description=EMPTY)


class Product(BaseModel):
    product_id: str
    photos: int = Field(description="how many photos it has: GET /products/{product_id}/images/{0…photos-1}")
    payload: dict[str, Any]


class Page(BaseModel):
    products: list[Product]
    next: str | None = Field(description="pass as `after` for the next page; null at the end")
    note: str | None = Field(default=None, description=EMPTY + " (on a first page)")


def unknown_input(name: str, value: Any, known: Iterable[str], *, body: bool = False) -> str:
    """Why a query parameter or body field `name` is refused, with what was likely meant: the known
    name it misspells, else, where the route filters, the `where` condition on a product field."""
    known = set(known)
    said = f"unknown {'field' if body else 'parameter'} {name!r}"
    if guess := closest(name, known):
        return f"{said}: did you mean {guess!r}?"
    if "where" in known:
        clause = f"{name}={value if isinstance(value, str) else json.dumps(value)}"
        form = f'"where": [{json.dumps(clause)}]' if body else f"where={clause}"
        return f"{said}: to filter on a product field, send {form}"
    return f"{said}; known: {', '.join(sorted(known)) or 'none'}"


class CallerQuery(CallerFilters):
    """The filters as callers send them. An empty price range (price_min above price_max) matches
    nothing and the answer's note says so, as on the CLI (JSON Schema cannot order two parameters)."""

    price_min: float | None = Field(
        default=None, allow_inf_nan=False, description="at least; above price_max, nothing matches"
    )
    price_max: float | None = Field(
        default=None, allow_inf_nan=False, description="at most; below price_min, nothing matches"
    )


class _KnownFields(BaseModel):
    """A body of no other field than its model's (a misspelt one would otherwise be ignored, the answer
    silently unfiltered), each unknown one named with what was likely meant."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = [str(name) for name in data if name not in cls.model_fields]
            if unknown:
                said = [unknown_input(n, data[n], cls.model_fields, body=True) for n in unknown]
                raise PydanticCustomError("extra_forbidden", "{said}", {"said": "; ".join(said)})
        return data


class RecommendRequest(_KnownFields, CallerQuery, query.Rules):
    """The examples and `k`, and the filters and result rules as on every search route; no other field."""

    positive: list[str] = Field(min_length=1, max_length=100, description="e.g. the basket")
    negative: list[str] = Field(default=[], max_length=100, description="e.g. items skipped")
    k: int = Field(default=10, ge=1, le=query.MAX_K)


class SimilarRequest(_KnownFields, CallerQuery, query.Rules):
    """`GET /products/{product_id}/similar`'s parameters as a JSON body (an `exclude` list longer than a
    URL holds); no other field."""

    k: int = Field(default=10, ge=1, le=query.MAX_K)
    colour_weight: float = Field(
        default=0.0,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="0: visual order; up to 1: prefer its colour",
    )


def shown(payload: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """The part of a stored payload callers see: `api.public_fields`, never sync's bookkeeping."""
    return for_callers(payload, settings.api.public_fields)


def product_out(product_id: str, payload: dict[str, Any], settings: Settings) -> Product:
    return Product(product_id=product_id, photos=len(photos(payload)), payload=shown(payload, settings))


def results(hits: list[Hit], settings: Settings, note: str | None = None) -> Results:
    """The answer of every search route."""
    return Results(
        results=[
            HitOut(**h.to_dict(lambda payload: shown(payload, settings)), photos=len(photos(h.payload)))
            for h in hits
        ],
        note=note,
    )


URL = r"^[Hh][Tt][Tt][Pp][Ss]?://.+$"  # read alike by every regex dialect; the fetch guard says the rest
_SCALAR: list[dict[str, Any]] = [
    {"type": "string"},
    # Whole numbers (1e300 is one to JSON Schema) within 64 bits, and any other number (all below 2**53).
    # FastAPI writes the bounds as doubles (±2**63), which validators compare with integers beyond 64
    # bits lossily: the code's exact rule may refuse a number the schema's validator let through there.
    {"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1},
    {"type": "number", "not": {"type": "integer"}},
    {"type": "boolean"},
    {"type": "null"},
]


def _fields_schema(refused: AbstractSet[str]) -> JsonDict:
    """Any other field: `catalogue.written_fields_problem`'s rule, as JSON Schema says it: a text, a
    number within 64 bits, a boolean, null, a list of those; named with more than white space (the
    characters str.strip drops, listed: every regex dialect reads a class of plain characters alike);
    not one of `refused`."""
    schema = {
        "additionalProperties": {
            "anyOf": [*_SCALAR, {"type": "array", "items": {"anyOf": _SCALAR}}],
            "description": SCALARS,
        },
        "propertyNames": {"not": {"enum": sorted(refused)}, "pattern": f"[^{WHITESPACE}]"},
    }
    return cast(JsonDict, schema)


def _extra_problem(model: BaseModel) -> None:
    """The fields beyond the typed ones, under the catalogue's rule for written fields (422 with its
    message): pydantic keeps extra fields unchecked."""
    problem = written_fields_problem(model.model_extra or {})
    if problem:
        raise ValueError(problem)


class ProductRow(BaseModel):
    """A product as another service writes it: the fields and rules of a catalogue row (its id is the
    path's). Photos are http(s) URLs (`image`, or `images` for several: at least one); any other field
    (a text, a number, a list of them) is kept and can be filtered on; visrec's own fields are refused."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "anyOf": [{"required": ["image"]}, {"required": ["images"]}],
            **_fields_schema(RESERVED | {"id"}),
        },
    )

    image: str | None = Field(default=None, pattern=URL, max_length=4096, description="the photo's URL")
    images: list[Annotated[str, Field(pattern=URL, max_length=4096)]] | None = Field(
        default=None, min_length=1, max_length=MAX_PHOTOS, description="several photos' URLs, the first first"
    )
    category: str | None = None
    colour: str | None = None
    price: float | None = Field(default=None, ge=0, allow_inf_nan=False, strict=True)  # not "5", not true
    title: str | None = None

    @model_validator(mode="after")
    def _has_a_photo(self) -> ProductRow:
        if not self.image and not self.images:
            raise ValueError("no photo: give `image` or `images`")
        _extra_problem(self)
        return self


class ProductPatch(BaseModel):
    """Fields to change (JSON merge patch: null removes one); never the id, the photos or visrec's own."""

    model_config = ConfigDict(
        extra="allow", json_schema_extra=_fields_schema(RESERVED | {"id", "image", "images"})
    )

    category: str | None = None
    colour: str | None = None
    price: float | None = Field(default=None, ge=0, allow_inf_nan=False, strict=True)  # not "5", not true
    title: str | None = None

    @model_validator(mode="after")
    def _written_fields(self) -> ProductPatch:
        _extra_problem(self)
        return self


class WriteOut(BaseModel):
    product_id: str
    outcome: str = Field(
        description="`added`, `updated` (its photos changed: embedded), `metadata_updated` (payload "
        "rewritten, nothing embedded), `unchanged`, `deleted`, `absent`, or `error: why`"
    )


class BatchOut(BaseModel):
    results: list[WriteOut] = Field(description="one per row, in order")
