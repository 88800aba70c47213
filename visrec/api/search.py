"""Searching by example: an uploaded photo, or a set of products to be like and unlike."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, HTTPException, Request, UploadFile

from visrec import query
from visrec.api.deps import (
    ColourWeight,
    FilterDep,
    K,
    RulesDep,
    ServiceDep,
    check_caps,
    check_filters,
    heavy,
    shown_to_callers,
)
from visrec.api.errors import UploadRejected
from visrec.api.models import RecommendRequest, Results, errors, results
from visrec.errors import ImageError
from visrec.filters import Filters

router = APIRouter()
UPLOAD_PATH = "/search/image"  # the one route whose body may be a photo (the guard's larger limit)


@router.post(UPLOAD_PATH, response_model=Results, responses=errors(400, 401, 408, 413, 422, 503))
async def search_image(
    request: Request,
    service: ServiceDep,
    image: Annotated[UploadFile, File(description="a product photo")],
    filters: FilterDep,
    rules: RulesDep,
    k: K = 10,
    colour_weight: ColourWeight = 0.0,
) -> Results:
    """Products that look like an uploaded photo."""
    limit = service.settings.api.max_upload_bytes
    bounds = query.Bounds.from_settings(service.settings.api)
    check_filters(filters, service, colour_weight)
    shown = shown_to_callers(service)

    def work() -> Results:
        data = image.file.read(limit + 1)
        if len(data) > limit:
            raise HTTPException(413, f"upload larger than {limit} bytes")
        # One (index, model) pair, held open, even if a reindex switches versions meanwhile.
        with service.reading() as live:
            try:
                hits = query.similar_to_image(
                    live.index,
                    live.model(),
                    data,
                    service.limits,
                    k,
                    filters,
                    colour_weight,
                    rules,
                    bounds,
                    shown,
                )
            except ImageError as exc:  # decoding the caller's own bytes: the message may be shown
                raise UploadRejected(str(exc)) from exc
            note = None if hits else query.why_empty(live.index, filters)
        return results(hits, service.settings, note)

    return await heavy(request, work)


@router.post("/recommend", response_model=Results, responses=errors(400, 401, 404, 408, 413, 422, 503))
async def recommend(body: RecommendRequest, request: Request, service: ServiceDep) -> Results:
    """Products like the positive ones and unlike the negative ones."""
    rules = check_caps(query.Rules.of(body), service)
    filters = check_filters(Filters.of(body), service)
    bounds = query.Bounds.from_settings(service.settings.api)
    shown = shown_to_callers(service)

    def work() -> Results:
        with service.reading() as live:
            hits = query.recommend(
                live.index, body.positive, body.negative, body.k, filters, rules, bounds, shown
            )
            note = None if hits else query.why_empty(live.index, filters, [*body.positive, *body.negative])
        return results(hits, service.settings, note)

    return await heavy(request, work)
