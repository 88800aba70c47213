"""The HTTP service: "more like this" for other services. Thin routes over `visrec.query`.

The live index and its model come from `visrec.service` (loaded at start-up, switched by a reindex
or a rollback without a failed request); routes are plain `def`s, so FastAPI runs the CPU-bound work
(embedding, search) in its thread pool, off the event loop; `/healthz` answers from the loop itself.
Every request first passes `visrec.guard` (key, body limits as bytes arrive, load shedding, deadlines,
metrics), then `caching.Revalidation` (a 304 answered before routing); `errors` maps failures to
answers. This module only wires the app; the routes are in `ops` (probes, metrics), `gallery` (the web
page), `products`, `search` and `writes`, what they share in `deps`, the schema in `models`.
"""

from __future__ import annotations

import gc
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import Depends, FastAPI
from prometheus_client import CollectorRegistry

from visrec import __version__
from visrec.api import docs, gallery, ops, products, search, writes
from visrec.api.caching import Revalidation, settings_tag
from visrec.api.deps import known_parameters
from visrec.api.errors import add_handlers
from visrec.api.exposure import ExposureRefused, check_exposure
from visrec.api.ops import OPEN_PATHS
from visrec.config import Settings
from visrec.errors import InvalidSetting
from visrec.guard import Guard, GuardSettings
from visrec.jobs import READS, Job, Progress
from visrec.owner import OwnerChannel, StoreClaim
from visrec.product_writes import ProductWrites
from visrec.service import Service
from visrec.slots import Slots
from visrec.writer import Writer

__all__ = ["OPEN_PATHS", "ExposureRefused", "check_exposure", "create_app", "run"]


def run(settings: Settings, device: torch.device, announce: Callable[[str], None]) -> None:
    """This process as the service (`visrec serve`), until it is stopped; `announce` is given, once it
    answers, where it listens and what it lets through. Raises `ExposureRefused`, or `InvalidSetting`
    when the address cannot be listened on (a port in use)."""
    import uvicorn

    api = settings.api
    check_exposure(api)
    listening = _listen(api.host, api.port)
    # The embedded store is claimed before anything starts: a second service on it stops here, having
    # touched nothing.
    claim = None if settings.qdrant.url else StoreClaim(settings.qdrant)
    torch.set_num_threads(api.torch_threads)
    host, port = listening.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    app = create_app(settings, device, on_ready=lambda: announce(serving(settings, url)), claim=claim)
    config = uvicorn.Config(app, log_level="warning", limit_concurrency=api.max_connections)
    uvicorn.Server(config).run(sockets=[listening])


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to `host`:`port`, before anything starts: a port in use is a clear error, not a
    server log line after the model has loaded."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        listening = socket.socket(family, kind, proto)
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listening.bind(address)
    except OSError as exc:
        raise InvalidSetting(
            f"cannot listen on {host}:{port}: {exc.strerror or exc} (choose another with --port or "
            "VISREC_API__PORT)"
        ) from None
    return listening


def serving(settings: Settings, url: str) -> str:
    """What `visrec serve` says once it answers: where, and what it lets through."""
    api, qdrant = settings.api, settings.qdrant
    reads = (
        "need the key in X-API-Key"
        if api.api_key
        else "open to anyone who can reach this address (VISREC_API__API_KEY sets a key)"
    )
    writes = (
        "need the write key in X-API-Key" if api.write_key else "off (VISREC_API__WRITE_KEY turns them on)"
    )
    store = (
        f"the Qdrant server {qdrant.url}"
        if qdrant.url
        else f"{qdrant.path.absolute()} (owned by this service: visrec sync, reindex and rollback hand "
        "their jobs to it)"
    )
    return "\n".join(
        [
            f"visrec serves {url} (the API's docs: {url}/docs)",
            f"  reads: {reads}",
            f"  writes: {writes}",
            f"  store: {store}, collection {qdrant.collection!r}",
        ]
    )


def create_app(
    settings: Settings,
    device: torch.device,
    on_ready: Callable[[], None] | None = None,
    claim: StoreClaim | None = None,
) -> FastAPI:
    """The FastAPI application; the model and index open when it starts, then `on_ready` is called.
    `claim`: the embedded store, already claimed for it (else it claims the store when it starts)."""
    app = FastAPI(
        title="visrec",
        version=__version__,
        lifespan=_lifespan,
        docs_url=None,  # served by `docs`, with their scripts: not from a CDN
        redoc_url=None,
        description="Visually similar products, filtered by metadata.",
        dependencies=[Depends(known_parameters)],
    )
    # On the app, not in modules: each app (several in a test process) has its own service and metrics.
    app.state.service = Service(settings, device)
    app.state.metrics = CollectorRegistry()
    app.state.query_parameters = {}  # (path, method) → the query parameters it takes (`known_parameters`)
    app.state.settings_tag = settings_tag(settings)  # what settings and code add to every ETag
    app.state.on_ready = on_ready
    app.state.claim = claim
    api = settings.api
    app.state.slots = Slots(api.max_heavy_requests, api.queue_depth, api.queue_wait_s)
    # Added first, so inside the guard (the last added is outermost): a revalidation answered before
    # routing has passed the key, rate and body checks as every request does.
    app.add_middleware(Revalidation)
    app.add_middleware(
        Guard, settings=_guard_settings(settings), registry=app.state.metrics, slots=app.state.slots
    )
    add_handlers(app, writes.write_reason)
    # In the schema's order.
    for router in (ops.router, docs.router, gallery.router, writes.router, products.router, search.router):
        app.include_router(router)
    _declare_the_key(app)
    return app


def _declare_the_key(app: FastAPI) -> None:
    """The schema names the X-API-Key scheme on every route but the open ones (the guard checks the key,
    not a dependency FastAPI could see), so that the docs page's Authorize button sends it."""
    plain = app.openapi

    def with_the_key() -> dict[str, Any]:
        schema = plain()  # made once, then cached by FastAPI: this adds to it once
        schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
        if "APIKey" not in schemes:
            schemes["APIKey"] = {"type": "apiKey", "in": "header", "name": "X-API-Key"}
            for path, operations in schema.get("paths", {}).items():
                if path not in OPEN_PATHS:
                    for operation in operations.values():
                        operation["security"] = [{"APIKey": []}]
        return schema

    app.openapi = with_the_key  # type: ignore[method-assign]


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    service: Service = app.state.service
    # On the embedded store this service is the one writer: writing commands hand their jobs over.
    qdrant = service.settings.qdrant
    claim = None if qdrant.url else app.state.claim or StoreClaim(qdrant)  # before the store is opened
    service.start()
    writer = Writer(service, app.state.metrics)
    app.state.writes = ProductWrites(writer, app.state.metrics)

    def run_job(job: Job, progress: Progress) -> dict[str, Any]:
        """A handed-over command: a reading one beside the writer, a writing one through it."""
        return service.read(job, progress) if isinstance(job, READS) else writer.run(job, progress)

    photo_bytes = service.settings.ingest.max_image_bytes
    owner = None if claim is None else OwnerChannel(qdrant, claim, run_job, max_photo_bytes=photo_bytes)
    if owner is not None:
        owner.start()
    # What start-up made (torch, the model, every module: ~400k objects) lives as long as the process:
    # out of the collector's sight, a full collection no longer stops every thread, the event loop's
    # /healthz included, for ~0.3 s on a busy 2-core pod (measured under the saturation test).
    gc.collect()
    gc.freeze()
    if app.state.on_ready is not None:
        app.state.on_ready()
    yield
    gc.unfreeze()  # collectable again (an app made and dropped in a test process)
    if owner is not None:
        owner.close()
    writer.close()
    service.close()


def _guard_settings(settings: Settings) -> GuardSettings:
    api = settings.api
    return GuardSettings(
        api_key=api.api_key.get_secret_value().encode() if api.api_key else None,
        write_key=api.write_key.get_secret_value().encode() if api.write_key else None,
        open_paths=frozenset(OPEN_PATHS),
        upload_path=search.UPLOAD_PATH,
        max_upload_bytes=api.max_upload_bytes,
        max_body_bytes=api.max_body_bytes,
        body_timeout_s=api.body_timeout_s,
        request_timeout_s=api.request_timeout_s,
        retry_after_s=api.retry_after_s,
        rate_per_s=api.rate_limit_per_s,
        rate_burst=api.rate_limit_burst,
        auth_failure_per_s=api.auth_failure_per_s,
        auth_failure_burst=api.auth_failure_burst,
        is_write=writes.is_write,
    )
