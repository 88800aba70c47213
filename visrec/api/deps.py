"""What routes take besides their own parameters, as FastAPI dependencies: the app's service (kept on
`app.state`, one per app, so routes are module-level functions rather than closures over it), the
product filters shared by browsing and search, the result rules (diversity, caps), the bounds of
`k` and of the colour weight, and `heavy`, which runs a route's work under its heavy slot."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, TypeVar
from urllib.parse import unquote

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from prometheus_client import CollectorRegistry

from visrec import query
from visrec.api.models import CallerQuery, unknown_input
from visrec.errors import InvalidQuery
from visrec.filters import Filters
from visrec.payload import HIDDEN_FROM_CALLERS
from visrec.service import Service
from visrec.slots import BUSY, Slots

T = TypeVar("T")


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


async def heavy(request: Request, work: Callable[[], T]) -> T:
    """`work()` in a worker thread under a heavy slot (after a short wait in the queue when all are
    taken, else 503 busy), which it holds until it returns, even past the request's deadline: slots count
    running work."""
    slots: Slots = request.app.state.slots
    done = await slots.run(lambda: (work(),))  # a tuple: None means no slot, not a None result
    if done is None:
        raise HTTPException(503, BUSY)
    return done[0]


def get_filters(chosen: Annotated[CallerQuery, Query()], request: Request) -> Filters:
    """The filters as query parameters: one per field of `CallerQuery`, validated there."""
    return check_filters(Filters.of(chosen), service_of(request))


# The payload fields callers may see for the colour re-rank to be allowed: it ranks by the extracted
# colour, whose public forms these are.
COLOUR_SHOWN = ("colour_extracted", "colour_rgb")


def _hidden(field: str, service: Service) -> bool:
    public = service.settings.api.public_fields
    return public is not None and field not in public


def shown_to_callers(service: Service) -> query.Shown:
    """The fields callers are shown: what a message may name."""
    return lambda field: field not in HIDDEN_FROM_CALLERS and not _hidden(field, service)


def check_filters(filters: Filters, service: Service, colour_weight: float = 0.0) -> Filters:
    """Filters (and the colour re-rank) only on fields callers are shown: filtering on a field they
    cannot see would let them probe its values, one query at a time. Raises `InvalidQuery`."""
    used = [field for field in ("category", "colour") if getattr(filters, field)]
    used += ["price"] if filters.price_min is not None or filters.price_max is not None else []
    used += [where.field for where in filters.clauses]
    shown = shown_to_callers(service)
    hidden = [field for field in used if not shown(field)]
    if hidden:
        raise InvalidQuery(f"cannot filter on {hidden[0]!r}: not a field this service shows")
    if colour_weight and all(_hidden(field, service) for field in COLOUR_SHOWN):
        raise InvalidQuery("colour_weight ranks by the product's colour, which this service does not show")
    return filters


def check_caps(rules: query.Rules, service: Service) -> query.Rules:
    """Caps, boosts and decays only on fields callers are shown: grouping or ordering results by a
    field they cannot see would tell them its values."""
    for name, fields in (("max_per", rules.caps), ("boost", rules.boosts), ("decay", rules.decays)):
        hidden = [field for field in fields if _hidden(field, service)]
        if hidden:
            raise InvalidQuery(f"{name} cannot use {hidden[0]!r}: not a field this service shows")
    return rules


# The probes answer whatever query they carry: a load balancer may add a cache-buster.
LENIENT = frozenset({"/healthz", "/readyz"})


async def known_parameters(request: Request) -> None:
    """Refuse (422) a query parameter the route does not take, naming the one it likely misspells (or,
    on a route that filters, the `where` condition meant): ignored, `?categroy=shirt` answered
    unfiltered. The routes are those of the published schema (the gallery page's own URL is not one)."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute) or not route.include_in_schema or route.path in LENIENT:
        return
    known = _query_parameters(request.app, route, request.method)
    unknown = [name for name in dict.fromkeys(request.query_params.keys()) if name not in known]
    if unknown:
        raise RequestValidationError(
            [
                {
                    "type": "extra_forbidden",
                    "loc": ("query", name),
                    "msg": unknown_input(name, request.query_params[name], known),
                    "input": request.query_params[name],
                }
                for name in unknown
            ]
        )


def _query_parameters(app: FastAPI, route: APIRoute, method: str) -> frozenset[str]:
    """The query parameters the schema publishes for `route` (worked out once per route and method)."""
    cache: dict[tuple[str, str], frozenset[str]] = app.state.query_parameters
    key = (route.path_format, "get" if method == "HEAD" else method.lower())
    if key not in cache:
        operation = app.openapi()["paths"].get(key[0], {}).get(key[1], {})
        cache[key] = frozenset(p["name"] for p in operation.get("parameters", []) if p["in"] == "query")
    return cache[key]


def get_rules(chosen: Annotated[query.Rules, Query()], request: Request) -> query.Rules:
    """Diversity and caps as query parameters (`max_per` repeated for several fields)."""
    return check_caps(chosen, service_of(request))


async def product_id_of(
    product_id: Annotated[
        str,
        Path(description="the catalogue's id, percent-encoded as one path segment ('/' as %2F, '%' as %25)"),
    ],
) -> str:
    """The product id of a `/products/{product_id:path}…` route. The guard leaves an encoded '/' and '%'
    encoded in the path it routes on (`guard.routing_path`), so that a '/' inside an id is not taken for
    the path's own: decoded here, once."""
    return unquote(product_id)


ProductId = Annotated[str, Depends(product_id_of)]
ServiceDep = Annotated[Service, Depends(get_service)]
MetricsDep = Annotated[CollectorRegistry, Depends(get_metrics)]
FilterDep = Annotated[Filters, Depends(get_filters)]
RulesDep = Annotated[query.Rules, Depends(get_rules)]
K = Annotated[int, Query(ge=1, le=query.MAX_K)]
ColourWeight = Annotated[
    float, Query(ge=0, le=1, description="0: visual order; up to 1: prefer the query's own colour")
]
