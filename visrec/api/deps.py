"""What routes take besides their own parameters, as FastAPI dependencies: the app's service (kept on
`app.state`, one per app, so routes are module-level functions rather than closures over it), the
product filters shared by browsing and search, and the bounds of `k` and of the colour weight."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query, Request
from prometheus_client import CollectorRegistry

from visrec import query
from visrec.filters import CallerFilters, Filters
from visrec.service import Service


def service_of(request: Request) -> Service:
    """The service `create_app` made for the app serving `request` (for code outside a route's signature,
    such as the exception handlers)."""
    service: Service = request.app.state.service
    return service


async def get_service(request: Request) -> Service:
    # async: resolved on the event loop; a plain def would cost every request a thread-pool hop.
    return service_of(request)


async def get_metrics(request: Request) -> CollectorRegistry:
    registry: CollectorRegistry = request.app.state.metrics
    return registry


def get_filters(chosen: Annotated[CallerFilters, Query()]) -> Filters:
    """The filters as query parameters: one per field of `CallerFilters`, validated there."""
    return Filters.of(chosen)


ServiceDep = Annotated[Service, Depends(get_service)]
MetricsDep = Annotated[CollectorRegistry, Depends(get_metrics)]
FilterDep = Annotated[Filters, Depends(get_filters)]
K = Annotated[int, Query(ge=1, le=query.MAX_K)]
ColourWeight = Annotated[
    float, Query(ge=0, le=1, description="0: visual order; up to 1: prefer the query's own colour")
]
