"""The HiveNet REST API server: `create_app()` (the FastAPI app) and `run_server()` (uvicorn).

Owns the app's lifecycle: the admin token file and the store are set up in the lifespan, and
the store is reopened on demand when it could not be opened (locked: 503, corrupt: 500 until
fixed), so a server started next to a busy or broken database still answers with the reason.
Routes live in `resources.py` (collections), `tokens.py` (project tokens), `quotas.py`
(per-project quotas) and here
(`/v1/health`); errors in `errors.py`; auth in `auth.py` and `tenancy.py`; the request body
limit in `bodylimit.py`; the per-client rate limit in `ratelimit.py`; TLS file checks in `tls.py`. Must not contain topology rules (see
`store/topology.py`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from pydantic import BaseModel

from hivenet.api import DEFAULT_MAX_BODY_BYTES
from hivenet.api.auth import ADMIN, TokenRegistry, load_or_create_admin_token
from hivenet.api.bodylimit import BodyLimitMiddleware
from hivenet.api.errors import ErrorBody, install_error_handlers
from hivenet.api.hoststats import hoststats_router
from hivenet.api.lbstats import lbstats_router
from hivenet.api.metrics import install_metrics
from hivenet.api.neutron import OpenStackOptions, mount_openstack
from hivenet.api.quotas import quotas_router
from hivenet.api.ratelimit import RateLimit, RateLimitMiddleware
from hivenet.api.resources import API_PREFIX, topology_routers
from hivenet.api.tls import check_server_files
from hivenet.api.tokens import resolve_project_token, tokens_router
from hivenet.api.traces import traces_router
from hivenet.api.ui import install_ui
from hivenet.api.uplinks import uplinks_router
from hivenet.store import open_store, redact_store_url
from hivenet.store.base import Store, StoreCorruptError, StoreUnavailableError
from hivenet.store.topology import TopologyRepository

_log = logging.getLogger("hivenet.api")


class StoreHolder:
    """The app's store, opened lazily: a failed open is retried by the next request."""

    def __init__(self, store_url: str, options: Mapping[str, Any]) -> None:
        self.store_url = store_url
        self._options = dict(options)
        self._store: Store | None = None
        self._repository: TopologyRepository | None = None
        self._lock = asyncio.Lock()

    async def repository(self) -> TopologyRepository:
        if self._repository is not None:
            return self._repository
        async with self._lock:
            if self._repository is None:
                # Opening a file store may wait for another process's lock: off the loop.
                store = await asyncio.to_thread(open_store, self.store_url, **self._options)
                self._store = store
                self._repository = TopologyRepository(store)
            return self._repository

    async def store(self) -> Store:
        return (await self.repository()).store

    async def close(self) -> None:
        store, self._store, self._repository = self._store, None, None
        if store is not None:
            await store.close()


class Health(BaseModel):
    status: str
    revision: int


def create_app(
    store_url: str,
    state_dir: Path,
    *,
    store_options: Mapping[str, Any] | None = None,
    openstack: OpenStackOptions | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    rate_limit: RateLimit | None = None,
) -> FastAPI:
    """The API app. The store (`open_store(store_url, **store_options)`) and the admin token
    (`<state_dir>/admin-token`) are set up when the app starts (its lifespan). The Neutron
    and Octavia APIs (`/v2.0`) are served from the same store (`api/neutron/`). A request
    body over `max_body_bytes` is refused with 413 on every path, those APIs' included; a
    client over `rate_limit` (None: no limit; `hivenet serve` sets one) with 429."""
    state_dir = Path(state_dir)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        admin_token = load_or_create_admin_token(state_dir)
        app.state.tokens = TokenRegistry({admin_token: ADMIN})
        holder = StoreHolder(store_url, store_options or {})
        app.state.store_holder = holder
        try:
            await holder.repository()
        except (StoreUnavailableError, StoreCorruptError) as exc:
            # Keep serving: every request answers with the reason until the store opens.
            _log.error("store %s cannot be opened yet: %s", redact_store_url(store_url), exc)
        try:
            yield
        finally:
            await holder.close()

    app = FastAPI(
        title="HiveNet API",
        version="1",
        description="Native HiveNet REST API: topology objects under /v1.",
        lifespan=lifespan,
        redoc_url=None,
        separate_input_output_schemas=False,
    )
    install_error_handlers(app)
    install_metrics(app)
    app.state.project_tokens = resolve_project_token

    @app.get(
        f"{API_PREFIX}/health",
        response_model=Health,
        tags=["health"],
        operation_id="health",
        responses={500: {"model": ErrorBody}, 503: {"model": ErrorBody}},
    )
    async def health(request: Request) -> Health:
        """No auth. 200 with the store revision when the store answers."""
        store = await request.app.state.store_holder.store()
        return Health(status="ok", revision=await store.current_revision())

    for router in topology_routers():
        app.include_router(router)
    app.include_router(lbstats_router())
    app.include_router(hoststats_router())
    app.include_router(uplinks_router())
    app.include_router(traces_router())
    app.include_router(tokens_router())
    app.include_router(quotas_router())
    install_ui(app)
    mount_openstack(app, openstack or OpenStackOptions())
    # Added last, so outermost of the app's own middleware: the limit holds before metrics,
    # routing and the mounted Neutron/Octavia apps see the request.
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=max_body_bytes)
    if rate_limit is not None and rate_limit.enabled:
        # Outermost: a client over its rate costs no body read, no token lookup.
        app.add_middleware(RateLimitMiddleware, limit=rate_limit)
    return app


def run_server(
    store_url: str,
    host: str,
    port: int,
    state_dir: Path,
    *,
    log_level: str = "info",
    openstack: OpenStackOptions | None = None,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    rate_limit: RateLimit | None = None,
) -> None:
    """Serve the API with uvicorn until interrupted; over HTTPS when `tls_cert` and `tls_key`
    (PEM files, checked first: `hivenet.api.tls.TlsFileError` names the file at fault)."""
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("tls_cert and tls_key go together: give both or neither")
    if tls_cert is not None and tls_key is not None:
        check_server_files(tls_cert, tls_key)
    uvicorn.run(
        create_app(
            store_url,
            Path(state_dir),
            openstack=openstack,
            max_body_bytes=max_body_bytes,
            rate_limit=rate_limit,
        ),
        host=host,
        port=port,
        log_level=log_level,
        proxy_headers=False,
        ssl_certfile=tls_cert,
        ssl_keyfile=tls_key,
    )
