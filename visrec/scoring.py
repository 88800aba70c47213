"""The shop's preferences as one score: boosts on numeric or boolean payload fields and a decay on a date
field, composed with the closeness a query ranks by (docs/queries.md, "Boost and decay", works an example).

    score = closeness × 2 ^ clip(Σ min(age / SCALE, 64) − Σ clip(WEIGHT × value, ±10⁹), −1000, 1000)

`closeness` is the distance (or, with a colour re-rank, its blend); smaller ranks first. A boost of
WEIGHT 1 on a field holding 1 halves a product's score: it ranks as if half as far. A product SCALE
older counts twice as far. Multiplying keeps the score unit-free (embeddings of any scale), weight 0
is the plain order (2⁰ = 1), and the score only falls as a boosted value rises: the order is monotone in
each value. The clips keep every score finite (a 100-year-old product, a price of 1e300).

Values: a boolean is 1 or 0; a number is itself; text counts as the boolean (`true`/`false`, any case)
or the number (JSON's spelling) it spells, as CSV columns are all text (one too large for a float is
infinitely large); anything else, or a missing field, is 0. A date is ISO 8601 text (`2024-05-01`,
`2024-05-01T09:30:00+02:00`; no zone: UTC); a missing or unreadable date is as old as the decay counts
(64 SCALEs), a future one is new (age 0).
Ages are measured from the start of the current time bucket, a hundredth of SCALE (`bucket`): an answer
stays the same within it, which is what lets a cache keep it (its ETag names the bucket).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import numpy as np

from visrec.index import Hit

MAX_AGE = 64.0  # SCALEs: an older (or undated) product counts as this old
MAX_EXPONENT = 1000.0  # 2^±1000 × any distance stays a finite, normal double
MAX_TERM = 1e9  # a boost's WEIGHT × value is bounded to this (a text number may be too large for a float)
BUCKETS = 100  # time buckets a SCALE: the decay's clock ticks once a bucket
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
# A duration: a positive decimal and a unit (30d, 12h, 1.5w); the rule `DURATION_PATTERN` states.
_DURATION = re.compile(r"([0-9]{1,6}(?:\.[0-9]{1,6})?)[ \t]*([smhdw])")
DURATION_PATTERN = r"(?=[0-9.]*[1-9])[0-9]{1,6}(?:\.[0-9]{1,6})?[ \t]*[smhdw]"


def duration_s(text: str) -> float | None:
    """Seconds of a duration `<number><unit>` (unit s, m, h, d or w; e.g. `30d`), or None if `text` is
    not one or is zero."""
    found = _DURATION.fullmatch(text.strip())
    if not found:
        return None
    seconds = float(found.group(1)) * _UNITS[found.group(2)]
    return seconds if seconds > 0 else None


def value_of(value: Any) -> float:
    """What a payload value counts as in a boost (the module's docstring says the rule). A number too
    large for a float counts as infinitely large, never as 0: a value that rises never counts less."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int):
        return float(value) if abs(value) < 2**1023 else (math.inf if value > 0 else -math.inf)
    if isinstance(value, float):
        return 0.0 if math.isnan(value) else value
    if isinstance(value, str):
        return _short_text_value(value) if len(value) <= 64 else _text_value(value)
    return 0.0


@lru_cache(maxsize=4096)
def _short_text_value(text: str) -> float:
    """A catalogue's short text values repeat ("true", a CSV's prices): each is read once (long ones,
    which could hold much memory here, each time)."""
    return _text_value(text)


def _text_value(text: str) -> float:
    text = text.strip()
    if text.lower() in ("true", "false"):
        return float(text.lower() == "true")
    if _NUMBER.fullmatch(text):
        return float(text)  # "1e999" is inf
    return 0.0


def timestamp_of(value: Any) -> float | None:
    """Seconds since the epoch of an ISO 8601 date or date-time (no zone: UTC); None if it is not one."""
    if not isinstance(value, str) or not 8 <= len(value.strip()) <= 40:
        return None
    return _timestamp(value.strip())


@lru_cache(maxsize=4096)  # dates repeat across a catalogue: each is parsed once
def _timestamp(text: str) -> float | None:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def bucket(now: float, scale_s: float) -> int:
    """The time bucket `now` falls in, for a decay over `scale_s`: its clock (and an ETag) ticks once a
    bucket."""
    return math.floor(now / (scale_s / BUCKETS))


def origin(now: float, scale_s: float) -> float:
    """The moment ages are measured from: the start of `now`'s bucket."""
    return bucket(now, scale_s) * (scale_s / BUCKETS)


def exponents(
    payloads: Sequence[Mapping[str, Any]],
    boosts: Mapping[str, float],
    decays: Mapping[str, float],
    now: float,
) -> np.ndarray:
    """Each payload's exponent, the power of 2 its closeness is multiplied by (`boosts`: field → weight;
    `decays`: field → SCALE in seconds), as one array: only reading the values is a Python loop (a pool
    of 100 cost a few hundred microseconds as one loop a product)."""
    total = np.zeros(len(payloads))
    for field, scale in decays.items():
        stamps = np.array([timestamp_of(p.get(field)) for p in payloads], dtype=np.float64)  # None: nan
        ages = np.minimum(np.maximum(origin(now, scale) - stamps, 0.0) / scale, MAX_AGE)
        total += np.where(np.isnan(stamps), MAX_AGE, ages)
    for field, weight in boosts.items():
        # Each term bounded before they are summed: a bound is monotone, so the exponent stays monotone in
        # every value (an infinite term replaced after the fact could count less than a finite one).
        values = np.array([value_of(p.get(field)) for p in payloads], dtype=np.float64)
        with np.errstate(over="ignore"):  # a product past float's range is infinite, then bounded
            total -= np.minimum(np.maximum(weight * values, -MAX_TERM), MAX_TERM)
    return np.minimum(np.maximum(total, -MAX_EXPONENT), MAX_EXPONENT)


def rescore(
    hits: Sequence[Hit], boosts: Mapping[str, float], decays: Mapping[str, float], now: float
) -> list[Hit]:
    """`hits` ordered by the score above, each carrying it. Their closeness is the score a colour
    re-rank gave them, else their distance. Ties (products equally close, as at distance 0, where every
    score is 0) go to the smaller exponent (the more boosted, the newer), then the closer, then the
    product id: the order stays monotone in each value."""
    if not hits:
        return []
    closeness = np.array([h.distance if h.score is None else h.score for h in hits], dtype=np.float64)
    power = exponents([h.payload for h in hits], boosts, decays, now)
    scores = closeness * np.exp2(power)
    order = np.lexsort((np.array([h.product_id for h in hits]), closeness, power, scores))  # last key first
    return [  # made whole, not by dataclasses.replace (several times slower a hit)
        Hit(hits[i].product_id, hits[i].distance, hits[i].payload, hits[i].matched, float(scores[i]))
        for i in order.tolist()
    ]
