"""Browsing the index and one product at a time: its payload, its photo, the products that look like it.

Every id the catalogue takes is reachable: `{product_id:path}` lets an id hold '/' (send it encoded,
%2F, or plain where the rest of the path is unambiguous), and the routes with a suffix (`/similar`,
`/image`, `/images/{n}`) are matched before the plain one (see `deps.ProductId`)."""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import Iterator
from pathlib import Path as FilePath
from typing import Annotated, Any, BinaryIO

from fastapi import APIRouter, HTTPException, Path, Query, Request, Response
from fastapi.responses import StreamingResponse
from PIL import Image

from visrec import query
from visrec.api.caching import cached
from visrec.api.caching import headers as cache_headers
from visrec.api.deps import (
    ColourWeight,
    FilterDep,
    K,
    ProductId,
    RulesDep,
    ServiceDep,
    check_caps,
    check_filters,
    heavy,
    shown_to_callers,
)
from visrec.api.errors import hidden
from visrec.api.models import Page, Product, Results, SimilarRequest, errors, product_out, results
from visrec.catalogue import MAX_PHOTOS
from visrec.errors import ImageError
from visrec.filters import Filters
from visrec.images import ANY_FOLDER, open_local, read_image_bytes
from visrec.live import Live
from visrec.payload import photos
from visrec.service import Service
from visrec.urls import is_url

router = APIRouter()
CURSOR = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"


# Every GET answer below carries an ETag and is answered 304 for If-None-Match (`caching`).
CACHED: dict[int | str, dict[str, Any]] = {
    304: {"description": "not modified: the answer the request's If-None-Match names still holds"}
}


@router.get("/products", response_model=Page, responses={**errors(401, 422, 503), **CACHED})
def products(
    request: Request,
    response: Response,
    service: ServiceDep,
    filters: FilterDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 24,
    after: Annotated[str | None, Query(pattern=CURSOR, description="the `next` of the previous page")] = None,
) -> Page | Response:
    """Browse the indexed products, filtered, a page at a time."""
    # Cursors are point ids (UUIDs, as `next` writes them): anything else is a 422 here, not a store error
    # (500). A pattern, not pydantic's UUID, which also takes forms the schema's `uuid` format refuses.
    cursor = None if after is None else str(uuid.UUID(after))
    with service.reading() as live:
        tag, unchanged = cached(request, service.settings, live)
        if unchanged is not None:
            return unchanged
        items, next_page = query.browse(live.index, filters, limit, cursor, shown_to_callers(service))
        note = None if items or cursor else query.why_empty(live.index, filters)
    response.headers.update(cache_headers(service.settings, tag))
    return Page(
        products=[product_out(i, p, service.settings) for i, p in items],
        next=next_page,
        note=note,
    )


PHOTO_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {"content": {"image/*": {}}, "description": "the photo"},
    **errors(401, 404, 422, 502, 503),
}


def _photo(product_id: str, n: int, service: ServiceDep, request: Request) -> Response:
    """A photo as indexed, served from here: a remote one is fetched through the same guard as at sync
    (never a redirect, which would carry the caller's key to the image host). Why one cannot be served
    goes to the log: the answer never names its URL (a signed URL's token) or its path."""
    with service.reading() as live:  # written by sync, never the request's
        refs = photos(query.indexed(live.index, product_id)[1])
    if n >= len(refs):
        raise HTTPException(404, f"product {product_id!r} has {len(refs)} photo(s); there is no photo {n}")
    ref = str(refs[n])
    gone = f"photo {n} of product {product_id!r} is not available"
    if is_url(ref):
        try:
            data = read_image_bytes(ref, service.fetch_limits, service.fetcher)
        except ImageError as exc:
            raise hidden(request, exc, 502, f"{gone}: its image host did not deliver it") from None
        media_type = _image_type(io.BytesIO(data))
        if media_type is None:
            raise hidden(request, ImageError(f"{ref}: not an image"), 502, f"{gone}: not an image") from None
        return Response(data, media_type=media_type)
    try:
        # Without following any link (the stored path was resolved when the catalogue was read: a link
        # now is a file swapped since), checked where it is opened, not before. The catalogue's own
        # folder is not known here: any folder, no link on the way.
        file = open_local(ref, ANY_FOLDER) if FilePath(ref).is_absolute() else None
    except ImageError as exc:
        raise hidden(request, exc, 404, gone) from None
    media_type = _image_type(file) if file is not None else None
    if file is None or media_type is None:
        if file is not None:
            file.close()
        raise hidden(request, ImageError(f"{ref}: not an image"), 404, gone)
    file.seek(0)
    size = os.fstat(file.fileno()).st_size
    return StreamingResponse(_chunks(file), media_type=media_type, headers={"Content-Length": str(size)})


def _chunks(file: BinaryIO, size: int = 256 * 1024) -> Iterator[bytes]:
    """The open file in pieces, closed at the end (sent after the work's slot is given back)."""
    with file:
        while piece := file.read(size):
            yield piece


@router.get(
    "/products/{product_id:path}/similar",
    response_model=Results,
    responses={**errors(401, 404, 422, 503), **CACHED},
)
async def similar(
    product_id: ProductId,
    request: Request,
    response: Response,
    service: ServiceDep,
    filters: FilterDep,
    rules: RulesDep,
    k: K = 10,
    colour_weight: ColourWeight = 0.0,
) -> Results | Response:
    """Products that look like this one (any of its photos), itself excluded. A list of ids to exclude
    too long for a URL goes in the body of the POST form."""
    check_filters(filters, service, colour_weight)

    def work() -> Results | Response:
        with service.reading() as live:
            tag, unchanged = cached(request, service.settings, live, rules)
            if unchanged is not None:  # no search
                return unchanged
            answer = similar_answer(live, service, product_id, filters, rules, k, colour_weight)
        response.headers.update(cache_headers(service.settings, tag))
        return answer

    return await heavy(request, work)


@router.post(
    "/products/{product_id:path}/similar",
    response_model=Results,
    responses=errors(400, 401, 404, 408, 413, 422, 503),
)
async def similar_by_body(
    product_id: ProductId, body: SimilarRequest, request: Request, service: ServiceDep
) -> Results:
    """`GET …/similar` with its parameters in a JSON body: for an `exclude` list (a cart, what was seen)
    longer than a URL holds. Not cached (a POST)."""
    rules = check_caps(query.Rules.of(body), service)
    filters = check_filters(Filters.of(body), service, body.colour_weight)

    def work() -> Results:
        with service.reading() as live:
            return similar_answer(live, service, product_id, filters, rules, body.k, body.colour_weight)

    return await heavy(request, work)


# After /similar: "…/images/similar" is similar-to "…/images" on GET as on POST, not photo "similar".
@router.get("/products/{product_id:path}/image", response_class=Response, responses=PHOTO_RESPONSES)
async def product_image(product_id: ProductId, service: ServiceDep, request: Request) -> Response:
    """The product's first photo (as `/images/0`)."""
    return await heavy(request, lambda: _photo(product_id, 0, service, request))


@router.get("/products/{product_id:path}/images/{n}", response_class=Response, responses=PHOTO_RESPONSES)
async def product_photo(
    product_id: ProductId, n: Annotated[int, Path(ge=0, lt=MAX_PHOTOS)], service: ServiceDep, request: Request
) -> Response:
    """The product's photo number `n` (0: the first; a hit's `matched_image`)."""
    return await heavy(request, lambda: _photo(product_id, n, service, request))


def similar_answer(
    live: Live,
    service: Service,
    product_id: str,
    filters: Filters,
    rules: query.Rules,
    k: int,
    colour_weight: float,
) -> Results:
    bounds = query.Bounds.from_settings(service.settings.api)
    shown = shown_to_callers(service)
    hits = query.similar_to_product(live.index, product_id, k, filters, colour_weight, rules, bounds, shown)
    note = None if hits else query.why_empty(live.index, filters, [product_id, *rules.exclude])
    return results(hits, service.settings, note)


@router.get(
    "/products/{product_id:path}",
    response_model=Product,
    responses={**errors(401, 404, 422, 503), **CACHED},
)
def product(
    product_id: ProductId, request: Request, response: Response, service: ServiceDep
) -> Product | Response:
    with service.reading() as live:
        tag, unchanged = cached(request, service.settings, live)
        if unchanged is not None:
            return unchanged
        payload = query.indexed(live.index, product_id)[1]
    response.headers.update(cache_headers(service.settings, tag))
    return product_out(product_id, payload, service.settings)


def _image_type(ref: BinaryIO) -> str | None:
    """The media type of the image at `ref` (a file or bytes), or None if it is not an image.

    Sync only indexes files inside a catalogue's folder that decoded as images; checking the header
    again here means a payload changed in the store itself (a shared server) cannot make the API
    serve any other file, a key or /etc/passwd, and a file swapped on disk is not served either.
    """
    try:
        with Image.open(ref) as image:  # reads the header only
            return Image.MIME.get(image.format or "")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
