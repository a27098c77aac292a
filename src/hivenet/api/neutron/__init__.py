"""Neutron v2.0 compatible API over HiveNet's topology (`/v2.0`), the versions document at
`GET /` that OpenStack clients discover it (and Octavia's `/v2.0/lbaas`) by, and the project
lookup of `/identity/v3` (`identity.py`).

`mount_openstack(app, options)` is the one entry point `hivenet.api.app` calls. Must not hold
state of its own: everything is in the app's store, reached through `TopologyRepository`.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from hivenet.api.auth import TokenRegistry
from hivenet.api.neutron.common import HiveNetTokens, OpenStackOptions, caller_of
from hivenet.api.neutron.identity import IDENTITY_PATH, identity_app
from hivenet.api.neutron.routes import neutron_app, version_entry
from hivenet.store.base import Store
from hivenet.store.topology import TopologyRepository

__all__ = ["OpenStackOptions", "mount_openstack"]


def mount_openstack(app: FastAPI, options: OpenStackOptions) -> None:
    """Serve Neutron at /v2.0 and Octavia at /v2.0/lbaas from the same store as /v1."""
    from hivenet.api.octavia import octavia_app

    async def repository() -> TopologyRepository:
        found: TopologyRepository = await app.state.store_holder.repository()
        return found

    def tokens() -> TokenRegistry:
        registry: TokenRegistry = app.state.tokens
        return registry

    async def store() -> Store:
        return (await repository()).store

    @app.get("/", include_in_schema=False)
    async def versions(request: Request) -> JSONResponse:
        """The versions document: keystoneauth discovery finds v2.0 here for the `network`
        and `load-balancer` services alike."""
        return JSONResponse({"versions": [version_entry(str(request.base_url))]})

    resolver = options.resolver or HiveNetTokens(tokens, store)
    app.mount("/v2.0/lbaas", octavia_app(options, repository, resolver))
    app.mount(IDENTITY_PATH, identity_app(lambda request: caller_of(request, options, resolver)))
    app.mount("/v2.0", neutron_app(options, repository, resolver))
