"""`GET /metrics`: the API server's Prometheus exposition (`install_metrics(app)`).

Owns the server's own metrics: requests by method, route template and status, their latency,
and the store revision. No auth (as Prometheus scrapes): nothing here names a tenant's object.

Bounded label sets: `route` is the path template of the matched route (`/v1/ports/{object_id}`,
never the id) or `unmatched`; `method` is one of the HTTP methods the API serves or `other`;
`status` is the response code (a few dozen values at most). The registry is per app, so
several apps in one process (tests) do not share counters.
Must not read topology objects nor count anything agents count (agent/metrics.py does).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from hivenet.store.base import StoreError

KNOWN_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
METRICS_PATH = "/metrics"


def _route_template(request: Request) -> str:
    """The matched route's path template (the router records the route in the scope)."""
    route = request.scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


def install_metrics(app: FastAPI) -> CollectorRegistry:
    """Count every request and serve `GET /metrics`; returns the app's registry."""
    registry = CollectorRegistry(auto_describe=True)
    requests = Counter(
        "hivenet_api_requests",
        "API requests by method, route template and status",
        ["method", "route", "status"],
        registry=registry,
    )
    latency = Histogram(
        "hivenet_api_request_seconds",
        "API request latency by method and route template",
        ["method", "route"],
        registry=registry,
        buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
    )
    revision = Gauge(
        "hivenet_api_store_revision", "The store revision last seen", registry=registry
    )

    @app.middleware("http")
    async def count_requests(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        method = request.method if request.method in KNOWN_METHODS else "other"
        route = _route_template(request)
        requests.labels(method, route, str(response.status_code)).inc()
        latency.labels(method, route).observe(time.perf_counter() - started)
        return response

    @app.get(METRICS_PATH, include_in_schema=False)
    async def metrics(request: Request) -> Response:
        holder = request.app.state.store_holder
        with contextlib.suppress(StoreError):  # answer even when the store does not
            store = await holder.store()
            revision.set(await store.current_revision())
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return registry
