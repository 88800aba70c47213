"""A feed's class held in memory and searched exactly by matrix products (`visrec neighbours`).

A class is the products a feed lists against each other: those meeting its filters and sharing one
product's `--same` values (the whole filtered catalogue without `--same`), read through the engine's own
filter, so it holds exactly what a search with that filter considers. Every product of a class is
searched against every photo of it, so reading the class once and computing its distances a block of
queries at a time (one float32 matrix product, all cores) costs a fraction of an HNSW search a product,
and is exact: at 100,000 products in 10 classes, ~0.1 ms a product against ~3 ms of the engine's CPU.

Distances are chosen in float32, on vectors less the class's mean (smaller norms, smaller error), and
then made exact: the products nearest by the matrix product are
measured again (float32 differences summed in float64: no cancellation, unlike |q|² + |c|² - 2q·c),
and a row is redone deeper unless every product left out is provably further than the last one kept
(the float32 error bound below). Answers are ordered by (distance,
product id), each at its nearest photo, as `VectorIndex.search_batch` answers (whose place this takes
for the requests that name this class's filters; any other request goes to the engine).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from visrec.filters import Filters
from visrec.index import Hit, SearchRequest, VectorIndex
from visrec.index.points import payload_key
from visrec.payload import photos

Photos = Callable[[Sequence[dict[str, Any]]], dict[str, np.ndarray]]  # a page's payloads → their photos
MATRIX_BYTES = 1 << 30  # classes' photo vectors held (float32, twice); a larger class goes to the engine
BLOCK_BYTES = 64 << 20  # the distances of one block of queries
PAGE = 1024  # products read from the engine a call
EXTRA = 16  # products measured again beyond those asked for: what float32 rounding may have misplaced
_UNIT = 2.0**-24  # float32's unit roundoff


def _gamma(dim: int) -> float:
    """|fl(x·y) - x·y| <= gamma |x||y| for a float32 sum of `dim` products, in any order (Higham)."""
    return (dim + 2) * _UNIT / (1 - (dim + 2) * _UNIT)


def _error(dim: int, query: np.ndarray, largest: float) -> np.ndarray:
    """How far a row's float32 |c|² - 2q·c plus its |q|² (float64) may lie from the exact squared
    distance of the vectors before centring, for centred norms |q| = `query` and |c| <= `largest`:
    `_gamma` bounds |c|²'s and q·c's sums, one more rounding the sum of the two; centring moved each
    vector by at most one float32 rounding of it. Doubled for the margin a row is checked with."""
    gamma = _gamma(dim)
    product = (gamma + _UNIT) * (1 + gamma) * (largest**2 + 2 * query * largest)
    centring = 3 * _UNIT * (query + largest) ** 2
    wide = (dim + 4) * 2.0**-53 * (query + largest) ** 2  # |q|² summed, and added, in float64
    return 2 * (product + centring + wide)


@dataclass
class ClassMatrix:
    """A class's products in point-id order (`ids`, `payloads`), the rows of their photos (`rows`,
    float32) and which rows are whose (`start[p]:start[p + 1]`)."""

    filters: Filters
    index: VectorIndex
    ids: list[str]
    payloads: list[dict[str, Any]]
    rows: np.ndarray
    start: np.ndarray

    def __post_init__(self) -> None:
        self._rows = torch.from_numpy(self.rows)
        # The product runs on the rows less their mean: distances are the same, norms smaller, and so is
        # float32's error, which grows with them (a shop's embeddings share a large common part). Any
        # float32 vector near the mean does: every vector moves by it alike.
        mean = self.rows.mean(0, dtype=np.float64) if len(self.rows) else np.zeros(self.rows.shape[1])
        self._mean = torch.from_numpy(mean.astype(np.float32))
        self._centred = self._centre(self.rows)
        self._squared = (self._centred * self._centred).sum(1)
        # float32's sum is at most gamma below the exact |c|² (`_error`): the bound holds the largest norm
        most = float(self._squared.max()) if len(self.rows) else 0.0
        self._largest = math.sqrt(most / (1 - _gamma(self.rows.shape[1])))
        self._payloads_shown: dict[tuple[str, ...] | None, list[dict[str, Any]]] = {}
        self._position = {product_id: i for i, product_id in enumerate(self.ids)}
        self._id_rank = np.argsort(np.argsort(np.array(self.ids, dtype=object), kind="stable"))
        # Which photo matched is said where the payload lists several, as the engine's hits say it
        # (`VectorIndex.search`): a product of several vectors and no list of them matched photo 0.
        self._several = [len(photos(payload)) > 1 for payload in self.payloads]
        photos_of = np.diff(self.start)
        self._owner = (
            None if (photos_of == 1).all() else torch.from_numpy(np.repeat(np.arange(len(self)), photos_of))
        )

    @classmethod
    def load(
        cls,
        index: VectorIndex,
        filters: Filters,
        fields: Sequence[str],
        budget: int | None = None,
        photos: Photos | None = None,
    ) -> ClassMatrix | None:
        """The class of `filters` with `fields` of each payload, or None if it is empty or its photos
        pass `budget` bytes (`MATRIX_BYTES`; then the engine searches it). Its photos come from
        `photos` (given the page's payloads), the engine's by default."""
        budget = MATRIX_BYTES if budget is None else budget
        ids: list[str] = []
        payloads: list[dict[str, Any]] = []
        blocks: list[np.ndarray] = []
        held = 0
        read = photos or (lambda payloads: index.vectors([str(p["product_id"]) for p in payloads]))
        for page in _pages(index.all_payloads(filters, [payload_key(name) for name in fields])):
            vectors = read(page)
            for payload in page:
                product_id = str(payload["product_id"])
                if product_id not in vectors:  # deleted between the two reads
                    continue
                rows = np.atleast_2d(vectors[product_id]).astype(np.float32, copy=False)
                held += 2 * rows.nbytes  # as read, and centred
                if held > budget:
                    return None
                ids.append(product_id)
                payloads.append(payload)
                blocks.append(rows)
        if not blocks:
            return None
        start = np.concatenate([[0], np.cumsum([len(b) for b in blocks])]).astype(np.int64)
        return cls(filters, index, ids, payloads, np.concatenate(blocks), start)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        """The memory its photos take (as read, and centred)."""
        return self.rows.nbytes + self._centred.numel() * 4

    def vectors(self, product_ids: Sequence[str]) -> dict[str, np.ndarray]:
        """`VectorIndex.vectors`, from memory for this class's products."""
        held = {
            p: self.rows[self.start[i] : self.start[i + 1]]
            for p in product_ids
            if (i := self._position.get(p)) is not None
        }
        others = [p for p in product_ids if p not in held]
        return {**held, **(self.index.vectors(others) if others else {})}

    def search_batch(self, requests: Sequence[SearchRequest], exact: bool = False) -> list[list[Hit]]:
        """`VectorIndex.search_batch`'s answers: this class's for the requests with its filters (exact
        either way), the engine's for any other."""
        found: dict[int, list[Hit]] = {}
        mine = [i for i, r in enumerate(requests) if r.filters == self.filters]
        others = sorted(set(range(len(requests))) - set(mine))
        if others:
            answers = self.index.search_batch([requests[i] for i in others], exact)
            found.update(zip(others, answers, strict=True))
        block = max(1, BLOCK_BYTES // (4 * len(self.rows)))
        for begin in range(0, len(mine), block):
            part = mine[begin : begin + block]
            found.update(zip(part, self._nearest([requests[i] for i in part]), strict=True))
        return [found[i] for i in range(len(requests))]

    def _nearest(self, requests: Sequence[SearchRequest]) -> list[list[Hit]]:
        """Each request's nearest products of the class, exactly (see the module's doc)."""
        queries = np.stack([np.asarray(r.vector, np.float32).reshape(-1) for r in requests])
        centred = self._centre(queries)
        scores = self._scores(centred)
        for row, request in enumerate(requests):
            gone = [self._position[p] for p in request.exclude if p in self._position]
            if gone:
                scores[row, gone] = torch.inf
        own = (centred.double() ** 2).sum(1).numpy()  # what a row's scores lack of its squared distances
        bounds = _error(self.rows.shape[1], np.sqrt(own), self._largest) - own
        answers: dict[int, list[Hit]] = {}
        pending = list(range(len(requests)))
        depth = max(r.k for r in requests) + EXTRA
        while pending:
            rows = torch.tensor(pending)
            sure = self._ranked(queries[pending], scores[rows], bounds[pending], depth, requests, pending)
            answers.update(sure)
            pending = [i for i in pending if i not in sure]  # a row whose cut float32 could misplace
            depth *= 4
        return [answers[i] for i in range(len(requests))]

    def _scores(self, queries: torch.Tensor) -> torch.Tensor:
        """|c|² - 2q·c, float32, of each query q to each product's nearest photo c: its squared distance
        but for |q|², which orders no row (one fused matrix product: a whole pass over the block
        less)."""
        per_row = torch.addmm(self._squared[None, :], queries, self._centred.T, beta=1.0, alpha=-2.0)
        if self._owner is None:
            return per_row
        per_product = torch.full((len(queries), len(self)), torch.inf)
        return per_product.scatter_reduce(1, self._owner.expand_as(per_row), per_row, "amin")

    def _ranked(
        self,
        queries: np.ndarray,
        scores: torch.Tensor,
        bounds: np.ndarray,
        depth: int,
        requests: Sequence[SearchRequest],
        which: list[int],
    ) -> dict[int, list[Hit]]:
        """The rows whose nearest k (by exact distance, then product id) lie among their `depth`
        nearest by float32 for sure: every product further down is further than the k-th by more than
        float32 can misplace it (`bounds`: that error, less the |q|² the scores lack)."""
        depth = min(depth, len(self))
        taken = min(len(self), depth + 1)
        values, order = torch.topk(scores, taken, dim=1, largest=False, sorted=True)
        picked = order[:, :depth].numpy()
        distance, matched = self._exact(queries, picked)
        distance[~np.isfinite(values[:, :depth].numpy())] = np.inf
        ranking = np.lexsort((self._id_rank[picked], distance), axis=-1)
        order_of = np.take_along_axis(picked, ranking, axis=1).tolist()
        distance_of = np.take_along_axis(distance, ranking, axis=1).astype(np.float64).tolist()
        matched_of = np.take_along_axis(matched, ranking, axis=1).tolist()
        beyond = values[:, depth].numpy() - bounds if taken > depth else None
        sure: dict[int, list[Hit]] = {}
        for row, i in enumerate(which):
            k = requests[i].k
            distances = distance_of[row]
            kept = min(k, sum(1 for d in distances[:k] if d != np.inf))
            # A product left out must be further than the next float32 distance after the k-th: at the
            # k-th's own, it would tie with it, and ties go by id.
            last = float(np.nextafter(np.float32(distances[kept - 1]), np.float32(np.inf))) ** 2
            if beyond is not None and beyond[row] <= (last if kept == k else np.inf):
                continue
            shown = self._shown(requests[i].fields)
            sure[i] = [
                Hit(self.ids[p], distance, shown[p], photo if self._several[p] else 0)
                for p, distance, photo in zip(order_of[row][:kept], distances, matched_of[row], strict=False)
            ]
        return sure

    def _centre(self, vectors: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(vectors) - self._mean  # one float32 rounding of each difference

    def _shown(self, fields: Sequence[str] | None) -> list[dict[str, Any]]:
        """Each product's payload as a hit carries it (`fields` of it, None for one without), made once
        for the class: every request of a feed asks the same fields, and nothing changes a hit's."""
        key = None if fields is None else tuple(fields)
        if key not in self._payloads_shown:
            self._payloads_shown[key] = [
                payload if key is None else {name: payload.get(name) for name in key}
                for payload in self.payloads
            ]
        return self._payloads_shown[key]

    def _exact(self, queries: np.ndarray, picked: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The distance of each query to each of its picked products' nearest photo, as the engine
        gives distances (float32: products whose distances round alike tie, and ties go by id), and
        which photo that is (the first of equally near ones)."""
        first = self.start[picked]
        photos = self.start[picked + 1] - first
        most = int(photos.max())
        rows = first[..., None] + np.minimum(np.arange(most), photos[..., None] - 1)  # (q, depth, most)
        squared = np.empty(rows.shape)
        chunk = max(1, (1 << 20) // (8 * rows[0].size * self.rows.shape[1]))  # held in cache
        for begin in range(0, len(queries), chunk):
            near = np.take(self.rows, rows[begin : begin + chunk], axis=0)
            near -= queries[begin : begin + chunk, None, None, :]
            # float32 differences, summed in float64: no cancellation, unlike the matrix product
            wide = near.astype(np.float64)
            squared[begin : begin + chunk] = np.einsum("qdpx,qdpx->qdp", wide, wide)
        squared[np.arange(most) >= photos[..., None]] = np.inf
        distance = np.sqrt(squared).astype(np.float32)
        return distance.min(-1), distance.argmin(-1)


class Classes:
    """Searches routed by their filters: those of a class named in `whole` to that class held in memory
    (read on first use, its photos from `photos`; the least recently used let go past `MATRIX_BYTES`
    in all), any other to the engine. A delta searches so, in the arithmetic of the full feed it
    mends."""

    def __init__(
        self,
        index: VectorIndex,
        fields: Sequence[str],
        whole: Sequence[Filters],
        photos: Photos | None = None,
    ) -> None:
        self.index = index
        self.fields = list(fields)
        self.photos = photos
        self._whole = {filters.model_dump_json() for filters in whole}
        self._held: OrderedDict[str, ClassMatrix | None] = OrderedDict()
        self._bytes = 0

    def vectors(self, product_ids: Sequence[str]) -> dict[str, np.ndarray]:
        return self.index.vectors(product_ids)

    def search_batch(self, requests: Sequence[SearchRequest], exact: bool = False) -> list[list[Hit]]:
        by_filters: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            by_filters.setdefault(request.filters.model_dump_json(), []).append(i)
        found: dict[int, list[Hit]] = {}
        for key, members in by_filters.items():
            matrix = self._matrix(key, requests[members[0]].filters) if key in self._whole else None
            searcher: VectorIndex | ClassMatrix = self.index if matrix is None else matrix
            found.update(
                zip(members, searcher.search_batch([requests[i] for i in members], exact), strict=True)
            )
        return [found[i] for i in range(len(requests))]

    def _matrix(self, key: str, filters: Filters) -> ClassMatrix | None:
        if key in self._held:
            self._held.move_to_end(key)
            return self._held[key]
        matrix = self._held[key] = ClassMatrix.load(self.index, filters, self.fields, photos=self.photos)
        self._bytes += 0 if matrix is None else matrix.nbytes
        while self._bytes > MATRIX_BYTES and len(self._held) > 1:
            _, dropped = self._held.popitem(last=False)
            self._bytes -= 0 if dropped is None else dropped.nbytes
        return matrix


def _pages(payloads: Iterator[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    page: list[dict[str, Any]] = []
    for payload in payloads:
        page.append(payload)
        if len(page) == PAGE:
            yield page
            page = []
    if page:
        yield page
