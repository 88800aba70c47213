"""The HTTP service: "more like this" for other services. Thin routes over `visrec.query`.

The live index and its model come from `visrec.service` (loaded at start-up, switched by a reindex
or a rollback without a failed request); routes are plain `def`s, so FastAPI runs the CPU-bound work
(embedding, search) in its thread pool, off the event loop. visrec's errors map to status codes in
one handler: unknown product 404, bad query or image 422, upload too large 413, index or model
unavailable 503 with Retry-After.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import torch
from fastapi import Depends, FastAPI, File, HTTPException, Query, Request, Response, UploadFile
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, Field

from visrec import __version__, query
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
from visrec.index import Filters, Hit
from visrec.service import Service

log = logging.getLogger(__name__)
GALLERY = Path(__file__).with_name("static") / "gallery.html"
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


class HitOut(BaseModel):
    product_id: str
    distance: float = Field(description="Euclidean distance on the embedding; smaller is closer")
    payload: dict[str, Any]


class Results(BaseModel):
    results: list[HitOut]


class Product(BaseModel):
    product_id: str
    payload: dict[str, Any]


class Page(BaseModel):
    products: list[Product]
    next: str | None = Field(description="pass as `after` for the next page; null at the end")


class RecommendRequest(BaseModel):
    positive: list[str] = Field(min_length=1, max_length=100, description="e.g. the basket")
    negative: list[str] = Field(default=[], max_length=100, description="e.g. items skipped")
    k: int = Field(default=10, ge=1, le=query.MAX_K)
    category: list[str] = []
    colour: list[str] = []
    # Not NaN/inf: a NaN bound made qdrant-edge panic (a BaseException no handler catches).
    price_min: float | None = Field(default=None, allow_inf_nan=False)
    price_max: float | None = Field(default=None, allow_inf_nan=False)


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
        yield
        service.close()

    app = FastAPI(
        title="visrec",
        version=__version__,
        lifespan=lifespan,
        description="Visually similar products, filtered by metadata.",
    )
    _instrument(app, settings)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes the bad input, and a NaN from a JSON body cannot be written back
        # as JSON: the 422 became a 500.
        return JSONResponse({"detail": _finite_json(jsonable_encoder(exc.errors()))}, 422)

    @app.exception_handler(VisrecError)
    async def visrec_error(request: Request, exc: VisrecError) -> JSONResponse:
        status = next((code for kind, code in STATUS_OF if isinstance(exc, kind)), 400)
        headers = {"Retry-After": str(settings.api.retry_after_s)} if status == 503 else None
        return JSONResponse({"detail": str(exc), "error": type(exc).__name__}, status, headers=headers)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz(response: Response) -> dict[str, Any]:
        """Ready when the model is loaded and the collection is reachable."""
        problems, model_version, points = [], None, None
        try:
            live = service.live()
            points = live.index.count()
            model_version = live.model().manifest.model_version
        except VisrecError as exc:
            problems.append(str(exc))
        if problems:
            response.status_code = 503
            response.headers["Retry-After"] = str(settings.api.retry_after_s)
        return {"ready": not problems, "model_version": model_version, "points": points, "problems": problems}

    @app.get("/", include_in_schema=False)
    def gallery() -> FileResponse:
        """The web gallery: pick a product or upload a photo, set filters, see its neighbours."""
        return FileResponse(GALLERY, media_type="text/html")

    @app.get("/products", response_model=Page)
    def products(
        filters: FilterDep,
        limit: Annotated[int, Query(ge=1, le=500)] = 24,
        after: Annotated[uuid.UUID | None, Query(description="the `next` of the previous page")] = None,
    ) -> Page:
        """Browse the indexed products, filtered, a page at a time."""
        # Cursors are point ids (UUIDs): anything else is a 422 here, not a store error (500).
        items, next_page = service.index().browse(filters, limit, None if after is None else str(after))
        return Page(
            products=[Product(product_id=i, payload=query.public_payload(p)) for i, p in items],
            next=next_page,
        )

    @app.get("/products/{product_id}/image", response_model=None)
    def product_image(product_id: str) -> Response:
        """The product's photo as indexed (a redirect for a remote one)."""
        found = service.index().get(product_id)
        if found is None:
            raise NotFound(f"product {product_id!r} is not in the index")
        ref = str(found[1].get("image", ""))  # written by sync, never taken from the request
        if ref.startswith(("http://", "https://")):
            return RedirectResponse(ref)
        media_type = _image_type(ref)
        if media_type is None:
            raise HTTPException(404, f"the image of {product_id!r} is no longer on disk")
        return FileResponse(ref, media_type=media_type)

    @app.get("/products/{product_id}", response_model=Product)
    def product(product_id: str) -> Product:
        found = service.index().get(product_id)
        if found is None:
            raise NotFound(f"product {product_id!r} is not in the index")
        return Product(product_id=product_id, payload=query.public_payload(found[1]))

    @app.get("/products/{product_id}/similar", response_model=Results)
    def similar(product_id: str, filters: FilterDep, k: K = 10, colour_weight: ColourWeight = 0.0) -> Results:
        """Products that look like this one, itself excluded."""
        return _results(query.similar_to_product(service.index(), product_id, k, filters, colour_weight))

    @app.post("/search/image", response_model=Results)
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
        return _results(
            query.similar_to_image(live.index, live.model(), data, service.limits, k, filters, colour_weight)
        )

    @app.post("/recommend", response_model=Results)
    def recommend(body: RecommendRequest) -> Results:
        """Products like the positive ones and unlike the negative ones."""
        chosen = query.make_filters(body.category, body.colour, body.price_min, body.price_max)
        return _results(query.recommend(service.index(), body.positive, body.negative, body.k, chosen))

    return app


def _instrument(app: FastAPI, settings: Settings) -> None:
    """API-key check, upload-size check and Prometheus metrics, as one middleware; /metrics."""
    registry = CollectorRegistry()  # per app: no process-global state
    requests = Counter("visrec_requests", "HTTP requests", ["method", "route", "status"], registry=registry)
    latency = Histogram(
        "visrec_request_seconds",
        "HTTP request latency",
        ["route"],
        registry=registry,
        buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
    )
    api_key = settings.api.api_key.get_secret_value() if settings.api.api_key else None
    max_body = settings.api.max_upload_bytes + 64 * 1024  # room for the multipart envelope

    @app.middleware("http")
    async def guard_and_measure(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        started = time.perf_counter()
        if (
            api_key
            and request.url.path not in OPEN_PATHS
            and not secrets.compare_digest(request.headers.get("x-api-key", ""), api_key)
        ):
            response: Response = JSONResponse({"detail": "missing or wrong X-API-Key"}, 401)
        elif (length := _content_length(request)) is None:
            response = JSONResponse({"detail": "Content-Length is not a number of bytes"}, 400)
        elif length > max_body:
            response = JSONResponse(
                {"detail": f"body larger than {settings.api.max_upload_bytes} bytes"}, 413
            )
        else:
            response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "unmatched")
        requests.labels(request.method, route, str(response.status_code)).inc()
        latency.labels(route).observe(time.perf_counter() - started)
        return response

    @app.get("/metrics")
    def metrics() -> Response:
        """Prometheus text: request counts and latency histograms."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def _image_type(ref: str) -> str | None:
    """The media type of the image file at `ref`, or None if it is missing or not an image.

    Sync only indexes files inside a catalogue's folder that decoded as images; checking the header
    again here means a payload changed in the store itself (a shared server) cannot make the API
    serve any other file, a key or /etc/passwd, and a file swapped on disk is not served either.
    """
    if not Path(ref).is_absolute() or not Path(ref).is_file():
        return None
    try:
        with Image.open(ref) as image:  # reads the header only
            return Image.MIME.get(image.format or "")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def _content_length(request: Request) -> int | None:
    """The declared body size (0 when none), or None when the header is not a plain number."""
    text = request.headers.get("content-length", "0").strip() or "0"
    return int(text) if text.isascii() and text.isdigit() else None


def _finite_json(value: Any) -> Any:
    """`value` with NaN and infinities as strings: JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _finite_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_json(item) for item in value]
    return value


def _results(hits: list[Hit]) -> Results:
    return Results(
        results=[
            HitOut(product_id=h.product_id, distance=h.distance, payload=query.public_payload(h.payload))
            for h in hits
        ]
    )
