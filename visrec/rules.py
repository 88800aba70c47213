"""Result rules: which of an over-fetched set of neighbours a query answers, and in what order. `exclude`
(ids never returned: the cart), boosts and a date decay (the shop's preferences, scored by
`visrec.scoring`), diversity (maximal marginal relevance) and caps per field value (at most N per brand);
what diversity and caps choose stays in the pool's order (by distance, or by score)."""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from functools import lru_cache
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, field_validator

from visrec.catalogue import MAX_ID_LENGTH
from visrec.errors import InvalidQuery
from visrec.index import Hit, VectorIndex
from visrec.payload import HIDDEN_FROM_CALLERS
from visrec.scoring import DURATION_PATTERN, duration_s, rescore

MAX_K = 1000
MAX_CAPS = 5
MAX_BOOSTS = 5  # boost fields a query may weigh
MAX_DECAYS = 2  # date fields a query may decay by
MAX_EXCLUDE = 1000  # ids a query may exclude (the recommend body, or the similar route's POST form)
MAX_WEIGHT = 100  # |WEIGHT| of a boost: 2^100 already outranks any distance
# A cap, FIELD=N, as the schema states it: the same rule `Rules` checks (a field callers may see, at most
# N = MAX_K): a request the schema allows is never refused for its caps.
_HIDDEN = "|".join(sorted(HIDDEN_FROM_CALLERS))
# Only characters every regular-expression dialect reads alike (JSON Schema's is ECMAScript's, whose \s
# is not Python's).
CAP_PATTERN = (
    rf"^[ \t]*(?!(?:{_HIDDEN})[ \t]*=)[^= \t\r\n\f\v][^=]*="
    r"[ \t]*0*(?:[1-9][0-9]{0,2}|1000)[ \t]*$"  # N from 1 to MAX_K
)
_CAP = re.compile(r"[ \t]*([^= \t\r\n\f\v][^=]*?)[ \t]*=[ \t]*([0-9]+)[ \t]*")  # whole: fullmatch
_FIELD = rf"^[ \t]*(?!(?:{_HIDDEN})[ \t]*=)[^= \t\r\n\f\v][^=]*=[ \t]*"
# A boost, FIELD=WEIGHT: a decimal (no exponent, no nan or inf) with |WEIGHT| <= MAX_WEIGHT.
BOOST_PATTERN = _FIELD + r"[-+]?(?:0*100(?:\.0+)?|0*[0-9]{1,2}(?:\.[0-9]+)?)[ \t]*$"
DECAY_PATTERN = _FIELD + DURATION_PATTERN + r"[ \t]*$"
_PAIR = re.compile(r"[ \t]*([^= \t\r\n\f\v][^=]*?)[ \t]*=[ \t]*(.*?)[ \t]*", re.DOTALL)


class Rules(BaseModel):
    """How results are chosen among the nearest products. The defaults choose the nearest k."""

    model_config = ConfigDict(frozen=True)

    diversity: float = Field(
        default=0.0,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="0: nearest first; up to 1: prefer products unlike those already chosen (MMR)",
    )
    # The pattern is for the schema; `_caps_parse` checks the same rule and says what is wrong.
    max_per: list[Annotated[str, WithJsonSchema({"type": "string", "pattern": CAP_PATTERN})]] = Field(
        default=[],
        max_length=MAX_CAPS,
        description=f"FIELD=N: at most N results with the same value of FIELD (e.g. brand=2); N from 1 to "
        f"{MAX_K}; FIELD a payload field callers are shown (api.public_fields, when set, narrows them)",
    )

    exclude: list[Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH)]] = Field(
        default=[],
        max_length=MAX_EXCLUDE,
        description=f"product ids never returned (the cart, what was seen); at most {MAX_EXCLUDE}: "
        "a list longer than a URL holds goes in a body (POST /products/{product_id}/similar, /recommend)",
    )
    boost: list[Annotated[str, WithJsonSchema({"type": "string", "pattern": BOOST_PATTERN})]] = Field(
        default=[],
        max_length=MAX_BOOSTS,
        description=f"FIELD=WEIGHT: rank products by a numeric or boolean field too (e.g. in_stock=1: an "
        f"in-stock product ranks as if half as far); WEIGHT from -{MAX_WEIGHT} to {MAX_WEIGHT}; true "
        "counts 1, false or a missing value 0, text as the number or boolean it spells (docs/queries.md)",
    )
    decay: list[Annotated[str, WithJsonSchema({"type": "string", "pattern": DECAY_PATTERN})]] = Field(
        default=[],
        max_length=MAX_DECAYS,
        description="FIELD=SCALE: newer first by an ISO 8601 date field; a product SCALE older (e.g. "
        "30d; units s, m, h, d, w) ranks as if twice as far (docs/queries.md)",
    )

    @field_validator("boost")
    @classmethod
    def _boosts_parse(cls, boosts: list[str]) -> list[str]:
        for boost in boosts:
            _, weight = _pair(boost, "FIELD=WEIGHT")
            if _weight(weight) is None:
                raise ValueError(
                    f"takes FIELD=WEIGHT, WEIGHT a number from -{MAX_WEIGHT} to {MAX_WEIGHT}, got {boost!r}"
                )
        return boosts

    @field_validator("decay")
    @classmethod
    def _decays_parse(cls, decays: list[str]) -> list[str]:
        for decay in decays:
            _, scale = _pair(decay, "FIELD=SCALE")
            if duration_s(scale) is None:
                raise ValueError(
                    f"takes FIELD=SCALE with SCALE a duration above 0 such as 30d (units s, m, h, d, w), "
                    f"got {decay!r}"
                )
        return decays

    @field_validator("max_per")
    @classmethod
    def _caps_parse(cls, caps: list[str]) -> list[str]:
        for cap in caps:
            found = _CAP.fullmatch(cap)
            if not found or not 1 <= int(found.group(2)) <= MAX_K:
                raise ValueError(f"takes FIELD=N with 1 <= N <= {MAX_K}, got {cap!r}")
            if found.group(1) in HIDDEN_FROM_CALLERS:
                raise ValueError(f"cannot cap {found.group(1)!r}: not a product field")
        return caps

    @property
    def caps(self) -> dict[str, int]:
        return {m.group(1): int(m.group(2)) for cap in self.max_per if (m := _CAP.fullmatch(cap))}

    @property
    def boosts(self) -> dict[str, float]:
        """field → weight (the last of a field given twice); weights of 0 are left out."""
        return dict(_boosts(tuple(self.boost)))

    @property
    def decays(self) -> dict[str, float]:
        """field → SCALE in seconds."""
        return dict(_decays(tuple(self.decay)))

    @property
    def scores(self) -> bool:
        """Whether the order is more than the closeness: a boost or a decay re-scores the pool."""
        return bool(self.boosts or self.decays)

    @property
    def read_fields(self) -> list[str]:
        """The payload fields these rules read of each hit."""
        return list(dict.fromkeys([*self.caps, *self.boosts, *self.decays]))

    @property
    def active(self) -> bool:
        """Whether the rules choose among an over-fetched pool (`exclude` is the search's own:
        `visrec.index.exclusion`)."""
        return bool(self.diversity or self.max_per or self.scores)

    @classmethod
    def of(cls, chosen: BaseModel) -> Rules:
        """The rules a caller chose in a larger, already validated model (the recommend body)."""
        return cls.model_construct(**{name: getattr(chosen, name) for name in Rules.model_fields})

    @classmethod
    def parse(cls, **fields: Any) -> Rules:
        """Validated rules; raises `InvalidQuery` with the reason."""
        try:
            return cls(**fields)
        except ValidationError as exc:
            raise InvalidQuery(
                "; ".join(
                    f"{e['loc'][0] if e['loc'] else 'rules'}: {e['msg'].removeprefix('Value error, ')}"
                    for e in exc.errors()
                )
            ) from exc


NEAREST = Rules()


def _pair(text: str, form: str) -> tuple[str, str]:
    found = _PAIR.fullmatch(text)
    if not found:
        raise ValueError(f"takes {form}, got {text!r}")
    if found.group(1) in HIDDEN_FROM_CALLERS:
        raise ValueError(f"cannot use {found.group(1)!r}: not a product field")
    return found.group(1), found.group(2)


def _split(text: str) -> tuple[str, str]:
    found = _PAIR.fullmatch(text)
    return (found.group(1), found.group(2)) if found else ("", "")


# Parsed once per distinct text: a query asks for its rules' boosts and decays several times.
@lru_cache(maxsize=1024)
def _boosts(boosts: tuple[str, ...]) -> tuple[tuple[str, float], ...]:
    weights = {field: _weight(weight) for field, weight in map(_split, boosts)}
    return tuple((field, weight) for field, weight in weights.items() if weight)


@lru_cache(maxsize=1024)
def _decays(decays: tuple[str, ...]) -> tuple[tuple[str, float], ...]:
    return tuple({field: duration_s(scale) or 1.0 for field, scale in map(_split, decays)}.items())


def _weight(text: str) -> float | None:
    """A boost's WEIGHT as a number, or None if it is not a decimal within ±MAX_WEIGHT."""
    if not re.fullmatch(r"[-+]?[0-9]+(?:\.[0-9]+)?", text):
        return None
    number = float(text)
    return number if abs(number) <= MAX_WEIGHT else None


def ranked(pool: list[Hit], rules: Rules, now: float | None = None) -> list[Hit]:
    """`pool` in the order the rules' boosts and decays give (`visrec.scoring`), each hit carrying its
    score; as it is without them. `now`: the clock (the current time)."""
    boosts, decays = rules.boosts, rules.decays  # (each parses the rules' text)
    if not boosts and not decays:
        return pool
    return rescore(pool, boosts, decays, time.time() if now is None else now)


def choose(index: VectorIndex, pool: list[Hit], query: np.ndarray, k: int, rules: Rules) -> list[Hit]:
    """Up to k hits of `pool` that keep `rules`, in the pool's order (by distance, or the colour
    re-rank's).

    Caps skip a hit whose field value already has its N (a hit without the field is never capped).
    Diversity picks, each time, the hit maximising (1 - d) * relevance + d * novelty, where relevance
    is minus its distance to the query and novelty its distance to the nearest hit chosen so far
    (between the photos that matched), both over the pool's largest distance to the query (maximal
    marginal relevance, Carbonell & Goldstein 1998; d = `rules.diversity`, 0 keeps the preference
    order). The distances between the pool's matched photos are one matrix product, and each pick is
    a few array operations: O(pool² · dim + k · pool) in all, not a Python loop over k × pool.
    """
    caps = rules.caps
    d = rules.diversity
    if not caps and not d:  # nothing to choose: the pool's first k
        return pool[:k]
    keys = [_cap_keys(hit, caps) for hit in pool]
    holders: dict[tuple[str, str], list[int]] = {}
    for i, hit_keys in enumerate(keys):
        for key in hit_keys:
            holders.setdefault(key, []).append(i)
    counts: Counter[tuple[str, str]] = Counter()
    available = np.ones(len(pool), dtype=bool)
    if d:  # relevance is what the pool is ordered by: the score a boost or a re-rank gave, else distance
        scored = rules.scores
        distance = np.array(
            [hit.score if scored and hit.score is not None else hit.distance for hit in pool],
            dtype=np.float64,
        )
        scale = float(distance.max(initial=0.0)) or 1.0
        between = _matched_distances(index, pool)
        novelty = np.full(len(pool), np.inf)
    chosen: list[int] = []
    while len(chosen) < k:
        candidates = np.flatnonzero(available)
        if not candidates.size:
            break
        pick = int(candidates[0])
        if d and chosen:
            score = -(1 - d) * distance[candidates] / scale + d * novelty[candidates] / scale
            pick = int(candidates[int(np.argmax(score))])
        chosen.append(pick)
        available[pick] = False
        for key in keys[pick]:
            counts[key] += 1
            if counts[key] >= caps[key[0]]:
                available[holders[key]] = False
        if d:
            novelty = np.minimum(novelty, between[pick])
    return [pool[i] for i in sorted(chosen)]


def _matched_distances(index: VectorIndex, pool: list[Hit]) -> np.ndarray:
    """Euclidean distances between the pool's hits, each by the photo that matched (pool × pool). A hit
    whose vectors are gone (deleted meanwhile) is at distance 0 from all: diversity never prefers it."""
    photos = index.vectors([hit.product_id for hit in pool])
    found = [hit.product_id in photos for hit in pool]
    dim = next((v.shape[-1] for v in photos.values()), 1)
    matched = np.zeros((len(pool), dim), dtype=np.float32)
    for i, hit in enumerate(pool):
        if found[i]:
            vectors = np.atleast_2d(photos[hit.product_id])
            matched[i] = vectors[min(hit.matched, len(vectors) - 1)]
    squared = (matched * matched).sum(1)
    between = np.sqrt(np.maximum(squared[:, None] + squared[None, :] - 2 * (matched @ matched.T), 0.0))
    missing = ~np.array(found, dtype=bool)
    between[missing, :] = 0.0
    between[:, missing] = 0.0
    return between


def _cap_keys(hit: Hit, caps: dict[str, int]) -> list[tuple[str, str]]:
    """The (field, value) pairs of `hit` that caps count; lists and objects compare by their JSON."""
    return [
        (field, json.dumps(hit.payload[field], sort_keys=True, default=str))
        for field in caps
        if hit.payload.get(field) is not None
    ]
