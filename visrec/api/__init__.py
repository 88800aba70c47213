"""The HTTP service: "more like this" for other services. Thin routes over `visrec.query`.

The live index and its model come from `visrec.service` (loaded at start-up, switched by a reindex
or a rollback without a failed request); routes are plain `def`s, so FastAPI runs the CPU-bound work
(embedding, search) in its thread pool, off the event loop; `/healthz` answers from the loop itself.
Every request first passes `visrec.guard` (key, body limits as bytes arrive, load shedding, deadlines,
metrics). visrec's errors map to status codes in one handler: unknown product 404, bad query or image
422, upload too large 413, busy or index or model unavailable 503 with Retry-After. Every error body
carries the request id; a 5xx says what the caller can do, and the internals go to the log.
"""

from __future__ import annotations

import gc
import io
import logging
import math
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import torch
from fastapi import Depends, FastAPI, File, HTTPException, Query, Request, Response, UploadFile
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from visrec import __version__, query
from visrec.api.exposure import ExposureRefused, check_exposure
from visrec.api.models import (
    RETRY_AFTER,
    HitOut,
    Page,
    Product,
    Readiness,
    RecommendRequest,
    Results,
    errors,
)
from visrec.config import Settings
from visrec.errors import (
    CollectionMissing,
    ImageError,
    IndexUnavailable,
    InvalidQuery,
    ModelError,
    NotFound,
    VisrecError,
)
from visrec.guard import Guard, GuardSettings
from visrec.images import read_image_bytes
from visrec.index import Filters, Hit
from visrec.service import Service
from visrec.urls import is_url

__all__ = ["OPEN_PATHS", "ExposureRefused", "check_exposure", "create_app"]

log = logging.getLogger(__name__)
GALLERY = Path(__file__).parent.parent / "static" / "gallery.html"
# No API key for the probes (they must work without secrets) nor for the gallery's page shell, which
# holds no data: its scripts send the key with every call.
OPEN_PATHS = {"/healthz", "/readyz", "/"}
STATUS_OF: list[tuple[type[VisrecError], int]] = [
    (NotFound, 404),
    (InvalidQuery, 422),
    (ImageError, 422),
    (IndexUnavailable, 503),
    (CollectionMissing, 503),
    (ModelError, 503),
]
# What a caller is told of a 5xx: what it can do. The cause (store paths, server URLs, engine errors)
# goes to the log under the request id.
UNAVAILABLE: list[tuple[type[VisrecError], str]] = [
    (CollectionMissing, "no products are indexed yet (run `visrec sync`); retry later"),
    (ModelError, "photo search is unavailable: the model is not loaded; retry later"),
    (IndexUnavailable, "the index is unavailable; retry later"),
]


def _filters(
    category: Annotated[list[str], Query(description="any of")] = [],  # noqa: B006 - FastAPI copies it
    colour: Annotated[list[str], Query(description="any of")] = [],  # noqa: B006
    price_min: Annotated[float | None, Query(allow_inf_nan=False)] = None,
    price_max: Annotated[float | None, Query(allow_inf_nan=False)] = None,
) -> Filters:
    return query.make_filters(category, colour, price_min, price_max)


FilterDep = Annotated[Filters, Depends(_filters)]
K = Annotated[int, Query(ge=1, le=query.MAX_K)]
ColourWeight = Annotated[
    float, Query(ge=0, le=1, description="0: visual order; up to 1: prefer the query's own colour")
]


def create_app(settings: Settings, device: torch.device) -> FastAPI:
    """The FastAPI application; the model and index open when it starts."""
    service = Service(settings, device)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start()
        # What start-up made (torch, the model, every module: ~400k objects) lives as long as the process:
        # out of the collector's sight, a full collection no longer stops every thread, the event loop's
        # /healthz included, for ~0.3 s on a busy 2-core pod (measured under the saturation test).
        gc.collect()
        gc.freeze()
        yield
        gc.unfreeze()  # collectable again (an app made and dropped in a test process)
        service.close()

    app = FastAPI(
        title="visrec",
        version=__version__,
        lifespan=lifespan,
        description="Visually similar products, filtered by metadata.",
    )
    registry = CollectorRegistry()  # per app: no process-global state
    app.add_middleware(Guard, settings=_guard_settings(settings), registry=registry)

    def answer(request: Request, status: int, detail: Any, **extra: Any) -> JSONResponse:
        request_id = getattr(request.state, "request_id", None)
        headers = {"Retry-After": str(settings.api.retry_after_s)} if status == 503 else None
        return JSONResponse({"detail": detail, **extra, "request_id": request_id}, status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes the bad input, and a NaN from a JSON body cannot be written back
        # as JSON: the 422 became a 500.
        return answer(request, 422, _finite_json(jsonable_encoder(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return answer(request, exc.status_code, exc.detail)

    @app.exception_handler(VisrecError)
    async def visrec_error(request: Request, exc: VisrecError) -> JSONResponse:
        status = next((code for kind, code in STATUS_OF if isinstance(exc, kind)), 400)
        detail = str(exc)
        if status >= 500:
            log.warning("request %s: %s", getattr(request.state, "request_id", "-"), exc)
            detail = _unavailable(exc)
        return answer(request, status, detail, error=type(exc).__name__)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request %s failed", getattr(request.state, "request_id", "-"))
        return answer(request, 500, "internal error; the request id is in the server's log")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The process is up: answered on the event loop, whatever the worker threads are doing."""
        return {"status": "ok"}

    @app.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text"}, **errors(401)},
    )
    def metrics() -> Response:
        """Prometheus text: request counts, latency histograms, shed requests."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get(
        "/readyz",
        response_model=Readiness,
        responses={
            503: {"model": Readiness, "description": "not ready: `problems` says why", "headers": RETRY_AFTER}
        },
    )
    def readyz(response: Response) -> dict[str, Any]:
        """Ready when the model is loaded and the collection is reachable."""
        problems, model_version, points = [], None, None
        try:
            live = service.live()
            points = live.index.count()
            model_version = live.model().manifest.model_version
        except VisrecError as exc:  # open to everyone: what is wrong, not where (that is in the log)
            log.warning("not ready: %s", exc)
            problems.append(_unavailable(exc))
        if problems:
            response.status_code = 503
            response.headers["Retry-After"] = str(settings.api.retry_after_s)
        return {"ready": not problems, "model_version": model_version, "points": points, "problems": problems}

    @app.get("/", include_in_schema=False)
    def gallery() -> FileResponse:
        """The web gallery: pick a product or upload a photo, set filters, see its neighbours."""
        return FileResponse(GALLERY, media_type="text/html")

    @app.get("/products", response_model=Page, responses=errors(401, 422, 503))
    def products(
        filters: FilterDep,
        limit: Annotated[int, Query(ge=1, le=500)] = 24,
        after: Annotated[uuid.UUID | None, Query(description="the `next` of the previous page")] = None,
    ) -> Page:
        """Browse the indexed products, filtered, a page at a time."""
        # Cursors are point ids (UUIDs): anything else is a 422 here, not a store error (500).
        items, next_page = service.index().browse(filters, limit, None if after is None else str(after))
        return Page(
            products=[Product(product_id=i, payload=caller_payload(p)) for i, p in items],
            next=next_page,
        )

    @app.get(
        "/products/{product_id}/image",
        response_class=Response,
        responses={
            200: {"content": {"image/*": {}}, "description": "the photo"},
            **errors(401, 404, 422, 503),
        },
    )
    def product_image(product_id: str) -> Response:
        """The product's photo as indexed, served from here: a remote one is fetched through the same
        guard as at sync (never a redirect, which would carry the caller's key to the image host)."""
        found = service.index().get(product_id)
        if found is None:
            raise NotFound(f"product {product_id!r} is not in the index")
        ref = str(found[1].get("image", ""))  # written by sync, never taken from the request
        if is_url(ref):
            data = read_image_bytes(ref, service.fetch_limits, service.fetcher)  # ImageError: a 422
            media_type = _image_type(io.BytesIO(data))
            if media_type is None:
                raise HTTPException(404, f"the image of {product_id!r} is no longer an image")
            return Response(data, media_type=media_type)
        media_type = _image_type(ref) if Path(ref).is_absolute() and Path(ref).is_file() else None
        if media_type is None:
            raise HTTPException(404, f"the image of {product_id!r} is no longer on disk")
        return FileResponse(ref, media_type=media_type)

    @app.get("/products/{product_id}", response_model=Product, responses=errors(401, 404, 422, 503))
    def product(product_id: str) -> Product:
        found = service.index().get(product_id)
        if found is None:
            raise NotFound(f"product {product_id!r} is not in the index")
        return Product(product_id=product_id, payload=caller_payload(found[1]))

    @app.get("/products/{product_id}/similar", response_model=Results, responses=errors(401, 404, 422, 503))
    def similar(product_id: str, filters: FilterDep, k: K = 10, colour_weight: ColourWeight = 0.0) -> Results:
        """Products that look like this one, itself excluded."""
        return results(query.similar_to_product(service.index(), product_id, k, filters, colour_weight))

    @app.post("/search/image", response_model=Results, responses=errors(400, 401, 408, 413, 422, 503))
    def search_image(
        request: Request,
        image: Annotated[UploadFile, File(description="a product photo")],
        filters: FilterDep,
        k: K = 10,
        colour_weight: ColourWeight = 0.0,
    ) -> Results:
        """Products that look like an uploaded photo."""
        data = image.file.read(settings.api.max_upload_bytes + 1)
        if len(data) > settings.api.max_upload_bytes:
            raise HTTPException(413, f"upload larger than {settings.api.max_upload_bytes} bytes")
        live = service.live()  # one (index, model) pair, even if a reindex switches versions meanwhile
        return results(
            query.similar_to_image(live.index, live.model(), data, service.limits, k, filters, colour_weight)
        )

    @app.post("/recommend", response_model=Results, responses=errors(400, 401, 404, 408, 413, 422, 503))
    def recommend(body: RecommendRequest) -> Results:
        """Products like the positive ones and unlike the negative ones."""
        chosen = query.make_filters(body.category, body.colour, body.price_min, body.price_max)
        return results(query.recommend(service.index(), body.positive, body.negative, body.k, chosen))

    def caller_payload(payload: dict[str, Any]) -> dict[str, Any]:
        return query.caller_payload(payload, settings.api.public_fields)

    def results(hits: list[Hit]) -> Results:
        return Results(
            results=[
                HitOut(product_id=h.product_id, distance=h.distance, payload=caller_payload(h.payload))
                for h in hits
            ]
        )

    return app


def _unavailable(exc: VisrecError) -> str:
    return next((text for kind, text in UNAVAILABLE if isinstance(exc, kind)), "unavailable; retry later")


def _guard_settings(settings: Settings) -> GuardSettings:
    api = settings.api
    return GuardSettings(
        api_key=api.api_key.get_secret_value().encode() if api.api_key else None,
        open_paths=frozenset(OPEN_PATHS),
        upload_path="/search/image",
        max_upload_bytes=api.max_upload_bytes,
        max_body_bytes=api.max_body_bytes,
        body_timeout_s=api.body_timeout_s,
        request_timeout_s=api.request_timeout_s,
        max_heavy=api.max_heavy_requests,
        retry_after_s=api.retry_after_s,
        rate_per_s=api.rate_limit_per_s,
        rate_burst=api.rate_limit_burst,
    )


def _image_type(ref: str | io.BytesIO) -> str | None:
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


def _finite_json(value: Any) -> Any:
    """`value` with NaN and infinities as strings: JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _finite_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_json(item) for item in value]
    return value
