"""`GET /v1/routers/{id}/uplinks`: a router's uplinks, their liveness and its learned routes.

Owns how the stored topology and the gateways' reports add up to one answer. An uplink is an
exterior port of the router (no peer) bound to a host. For each: the port's own fields
(host, interface, addresses), whether its host is alive (its agent's liveness key, on the
lease), and what that host's agent reports under
`/hivenet/v1/state/<host>/uplink_status/<port>` (agent/uplinks.py, a `model.bgp.UplinkReport`):
the link's operational state and each BGP session's state and prefix counts, listed for every
`bgp_peer` of the port (state null: no live report of it, e.g. the host is down or its BIRD
has not answered yet). A report counts only while its host's liveness key is present; one
that does not parse is skipped and logged. Learned routes: the router's routes with a
`learned_from`. Each list is read at one store revision, and the liveness keys and reports
of up to 50 uplinks in one txn (not the whole answer at one revision).

Auth and tenant scoping as for the stats: a caller who may not see the router gets 404, as
for an unknown id; ports, peers and routes are those the caller may see. Host liveness, link
and session states are infrastructure: for the cluster admin only (null for a project token,
docs/security.md). Must not write to the store nor know how agents probe or speak BGP.
"""

from __future__ import annotations

import logging
from typing import Any, TypeVar

import pydantic
from fastapi import APIRouter, Depends
from pydantic import BaseModel

from hivenet.api.auth import Principal, authenticate
from hivenet.api.errors import ErrorBody
from hivenet.api.resources import API_PREFIX, PLURALS, get_repository
from hivenet.api.tenancy import scope_of
from hivenet.model import BgpPeer, Port, Route, Router
from hivenet.model.bgp import UplinkReport
from hivenet.model.topology import TopologyObject
from hivenet.model.types import ObjectId
from hivenet.store.base import Get, KeyValue
from hivenet.store.keys import host_alive_key, uplink_status_key
from hivenet.store.topology import MAX_PAGE_SIZE, NotFoundError, ProjectScope, TopologyRepository

_log = logging.getLogger("hivenet.api")

# Uplinks read per store transaction (two gets each; etcd allows 128 operations per txn).
UPLINKS_PER_TXN = 50

_object_id_adapter: pydantic.TypeAdapter[str] = pydantic.TypeAdapter(ObjectId)
T = TypeVar("T", bound=TopologyObject)


class BgpSessionBody(BaseModel):
    """A bgp_peer of the uplink and its session as the gateway's BIRD last told."""

    peer_id: str
    peer_ip: str
    peer_as: int
    local_as: int
    admin_state_up: bool
    state: str | None  # Established, Active, Connect, ...; None: no live report
    received: int | None  # prefixes received from the peer
    advertised: int | None  # prefixes advertised to the peer


class UplinkBody(BaseModel):
    port_id: str
    host_id: str | None
    interface_name: str | None
    addresses: list[str]
    host_alive: bool | None  # None: not told (cluster admin only)
    link_up: bool | None  # None: no live report, the agent cannot see it, or not told
    bgp_peers: list[BgpSessionBody]


class LearnedRouteBody(BaseModel):
    route_id: str
    dst_prefix: str
    next_hop_gateway: str | None
    next_hop_port_id: str | None
    learned_from: str


class RouterUplinksBody(BaseModel):
    router_id: str
    uplinks: list[UplinkBody]
    learned_routes: list[LearnedRouteBody]


async def _all(
    repository: TopologyRepository, cls: type[T], scope: ProjectScope | None, **filters: str
) -> list[T]:
    objects: list[T] = []
    marker: str | None = None
    while True:
        page = await repository.list(
            cls, field_filters=filters, limit=MAX_PAGE_SIZE, marker=marker, scope=scope
        )
        objects.extend(item.obj for item in page.items)
        if page.next_marker is None or not page.items:
            return objects
        marker = page.next_marker


def _value(response: object) -> bytes | None:
    if isinstance(response, list) and response and isinstance(response[0], KeyValue):
        return response[0].value
    return None


async def _live_reports(
    repository: TopologyRepository, uplinks: list[tuple[str, str]]
) -> tuple[dict[str, bool], dict[str, UplinkReport]]:
    """For (port id, host id) pairs: (host id -> alive, port id -> its host's report while
    that host is alive)."""
    alive: dict[str, bool] = {}
    reports: dict[str, UplinkReport] = {}
    for start in range(0, len(uplinks), UPLINKS_PER_TXN):
        chunk = uplinks[start : start + UPLINKS_PER_TXN]
        operations = []
        for port_id, host_id in chunk:
            operations.append(Get(host_alive_key(host_id)))
            operations.append(Get(uplink_status_key(host_id, port_id)))
        result = await repository.store.txn([], operations)
        for index, (port_id, host_id) in enumerate(chunk):
            alive[host_id] = _value(result.responses[2 * index]) is not None
            value = _value(result.responses[2 * index + 1])
            if not alive[host_id] or value is None:
                continue
            try:
                reports[port_id] = UplinkReport.model_validate_json(value)
            except pydantic.ValidationError as exc:
                _log.warning("skipping host %s's report of uplink %s: %s", host_id, port_id, exc)
    return alive, reports


def _session(peer: BgpPeer, report: UplinkReport | None) -> BgpSessionBody:
    session = report.bgp.get(peer.id) if report is not None else None
    return BgpSessionBody(
        peer_id=peer.id,
        peer_ip=str(peer.peer_ip),
        peer_as=peer.peer_as,
        local_as=peer.local_as,
        admin_state_up=peer.admin_state_up,
        state=session.state if session is not None else None,
        received=session.received if session is not None else None,
        advertised=session.advertised if session is not None else None,
    )


async def router_uplinks(
    repository: TopologyRepository, principal: Principal, router_id: str
) -> RouterUplinksBody:
    """The answer for a router the caller may see (NotFoundError otherwise)."""
    try:
        checked = _object_id_adapter.validate_python(router_id)
    except pydantic.ValidationError:
        raise NotFoundError(Router.KIND, router_id) from None
    stored = await repository.get(Router, checked)
    if not principal.may_access(stored.obj.tenant_id):
        raise NotFoundError(Router.KIND, checked)
    scope = scope_of(principal)
    ports = await _all(repository, Port, scope, device_id=checked)
    uplinks = [port for port in ports if port.peer_id is None and port.host_id]
    alive: dict[str, bool] = {}
    reports: dict[str, UplinkReport] = {}
    if principal.is_admin:
        alive, reports = await _live_reports(
            repository, [(port.id, port.host_id or "") for port in uplinks]
        )
    bodies = []
    for port in uplinks:
        report = reports.get(port.id)
        peers = await _all(repository, BgpPeer, scope, port_id=port.id)
        bodies.append(
            UplinkBody(
                port_id=port.id,
                host_id=port.host_id,
                interface_name=port.interface_name,
                addresses=[str(address) for address in port.addresses],
                host_alive=alive.get(port.host_id or "") if principal.is_admin else None,
                link_up=report.link_up if report is not None else None,
                bgp_peers=[_session(peer, report) for peer in peers],
            )
        )
    routes = await _all(repository, Route, scope, router_id=checked)
    learned = [
        LearnedRouteBody(
            route_id=route.id,
            dst_prefix=str(route.dst_prefix),
            next_hop_gateway=str(route.next_hop_gateway) if route.next_hop_gateway else None,
            next_hop_port_id=route.next_hop_port_id,
            learned_from=route.learned_from,
        )
        for route in routes
        if route.learned_from is not None
    ]
    return RouterUplinksBody(router_id=checked, uplinks=bodies, learned_routes=learned)


_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in {
        401: "missing or invalid bearer token",
        404: "no such router",
        500: "store corrupt",
        503: "store unavailable (locked); retry",
    }.items()
}


def uplinks_router() -> APIRouter:
    plural = PLURALS[Router.KIND]
    router = APIRouter(prefix=f"{API_PREFIX}/{plural}", tags=[plural], responses=_RESPONSES)

    @router.get(
        "/{router_id}/uplinks",
        response_model=RouterUplinksBody,
        operation_id="get_router_uplinks",
        summary="A router's uplinks (host, link, BGP sessions) and its learned routes",
    )
    async def get_uplinks(
        router_id: str,
        principal: Principal = Depends(authenticate),
        repository: TopologyRepository = Depends(get_repository),
    ) -> RouterUplinksBody:
        return await router_uplinks(repository, principal, router_id)

    return router
