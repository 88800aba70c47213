"""The routes for operators rather than client services: liveness, readiness, metrics; and which paths
need no key (the gallery's page, in `gallery`, is one)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from visrec.api.deps import MetricsDep, ServiceDep
from visrec.api.docs import PATHS as DOCS_PATHS
from visrec.api.errors import unavailable
from visrec.api.models import RETRY_AFTER, Readiness, errors
from visrec.errors import VisrecError
from visrec.evaluation import recorded

log = logging.getLogger(__name__)
# No API key for the probes (they must work without secrets), nor for what holds no data: the gallery's
# page shell and the API's docs and schema (their scripts, and the docs page's Authorize, send the key).
OPEN_PATHS = {"/healthz", "/readyz", "/", "/openapi.json"} | DOCS_PATHS

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up: answered on the event loop, whatever the worker threads are doing."""
    return {"status": "ok"}


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text"}, **errors(401)},
)
def metrics(registry: MetricsDep) -> Response:
    """Prometheus text: request counts, latency histograms, shed requests."""
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={
        503: {"model": Readiness, "description": "not ready: `problems` says why", "headers": RETRY_AFTER}
    },
)
def readyz(response: Response, service: ServiceDep) -> dict[str, Any]:
    """Ready when the model is loaded and the collection is reachable."""
    problems, model_version, points, quality = [], None, None, None
    try:
        with service.reading() as live:
            points = live.index.count()
            quality = recorded(live.index.metadata())
            model_version = live.model().manifest.model_version
    except VisrecError as exc:  # open to everyone: what is wrong, not where (that is in the log)
        log.warning("not ready: %s", exc)
        problems.append(unavailable(exc))
    if problems:
        response.status_code = 503
        response.headers["Retry-After"] = str(service.settings.api.retry_after_s)
    return {
        "ready": not problems,
        "model_version": model_version,
        "points": points,
        "quality": quality,
        "problems": problems,
    }
