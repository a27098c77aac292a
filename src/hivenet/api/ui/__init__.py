"""The live topology page: `GET /ui` (a static page, its script and the vendored graph
library under `/ui/static/`) and `GET /v1/graph`, the data it draws.

The page (static/index.html, static/app.js) draws the caller's topology with Cytoscape.js
(vendored at build time by `make install` into static/vendor/, never fetched from a CDN),
refreshes live state and counters every few seconds, and draws a trace's path
(`POST /v1/traces`). The token comes from the URL fragment (`/ui#token=...`, never sent to
the server in a URL) or a prompt, and is kept in the browser's session storage.

`GET /v1/graph`: nodes (bridges, routers, exterior ports as VMs or gateway uplinks, hosts, load
balancers) with their live state (host live, port bound) and counters (summed host stats),
and edges (port to device, interior links between devices, VM to host, load balancer to
router), scoped to the caller's tenant (hosts only for the admin). Must not write anything.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from hivenet.api.auth import Principal, authenticate
from hivenet.api.hoststats import live_host_reports
from hivenet.api.resources import API_PREFIX, get_repository
from hivenet.model import Bridge, DeviceKind, Host, Port, Router
from hivenet.model.loadbalancer import LoadBalancer
from hivenet.model.topology import TopologyObject
from hivenet.store.keys import STATE_PREFIX, parse_state_key
from hivenet.store.topology import MAX_PAGE_SIZE, TopologyRepository

STATIC_DIR = Path(str(resources.files(__name__) / "static"))
VENDORED_LIBRARY = STATIC_DIR / "vendor" / "cytoscape.min.js"


async def _all(repository: TopologyRepository, cls: type[TopologyObject]) -> list[Any]:
    objects: list[Any] = []
    marker: str | None = None
    while True:
        page = await repository.list(cls, limit=MAX_PAGE_SIZE, marker=marker)
        objects.extend(item.obj for item in page.items)
        if page.next_marker is None or not page.items:
            return objects
        marker = page.next_marker


async def _live_state(repository: TopologyRepository) -> tuple[set[str], set[str]]:
    """(live hosts, ports some live host has bound)."""
    alive: set[str] = set()
    bound: set[str] = set()
    start_after: str | None = None
    while True:
        page = await repository.store.range(STATE_PREFIX, limit=1000, start_after=start_after)
        for kv in page.kvs:
            try:
                host_id, kind, object_id = parse_state_key(kv.key)
            except ValueError:
                continue
            if kind == "host" and object_id == host_id:
                alive.add(host_id)
            elif kind == "port":
                bound.add(object_id)
        if not page.more or not page.kvs:
            return alive, bound
        start_after = page.kvs[-1].key


def _exterior_kind(port: Port) -> str:
    """A port bound on a host is a VM's, or a gateway uplink when it is a router's."""
    if not port.host_id:
        return "port"
    return "gateway" if port.device_kind == DeviceKind.ROUTER else "vm"


async def topology_graph(repository: TopologyRepository, principal: Principal) -> dict[str, Any]:
    def visible(obj: TopologyObject) -> bool:
        return principal.may_access(obj.tenant_id)

    bridges = [b for b in await _all(repository, Bridge) if visible(b)]
    routers = [r for r in await _all(repository, Router) if visible(r)]
    ports = [p for p in await _all(repository, Port) if visible(p)]
    lbs = [lb for lb in await _all(repository, LoadBalancer) if visible(lb)]
    alive, bound = await _live_state(repository)
    reports = await live_host_reports(repository)
    counters: dict[str, dict[str, int]] = {}
    for report in reports.values():
        for port_id, port_counters in report.ports.items():
            total = counters.setdefault(port_id, {})
            for name, value in port_counters.model_dump().items():
                total[name] = total.get(name, 0) + value
        for device_id, device in report.devices.items():
            total = counters.setdefault(device_id, {})
            for name in ("packets", "bytes"):
                total[name] = total.get(name, 0) + int(device.get(name, 0))
    nodes: list[dict[str, Any]] = []
    edges: list[dict[str, Any]] = []
    devices = {obj.id for obj in (*bridges, *routers)}
    for kind, objects in (("bridge", bridges), ("router", routers)):
        for obj in objects:
            nodes.append(
                {
                    "id": obj.id,
                    "kind": kind,
                    "label": obj.name or obj.id[:8],
                    "state": "up" if obj.admin_state_up else "admin-down",
                    "counters": counters.get(obj.id, {}),
                }
            )
    by_id = {port.id: port for port in ports}
    hosts_used: set[str] = set()
    for port in ports:
        if port.peer_id:
            peer = by_id.get(port.peer_id)
            if peer is not None and port.id < peer.id and port.device_id in devices:
                edges.append(
                    {
                        "id": f"link:{port.id}",
                        "source": port.device_id,
                        "target": peer.device_id,
                        "kind": "link",
                        "ports": [port.id, peer.id],
                    }
                )
            continue
        addresses = ", ".join(str(address.ip) for address in port.addresses)
        label = port.name or addresses or port.id[:8]
        state = (
            "admin-down" if not port.admin_state_up else "bound" if port.id in bound else "unbound"
        )
        nodes.append(
            {
                "id": port.id,
                "kind": _exterior_kind(port),
                "label": label,
                "state": state,
                "host": port.host_id,
                "addresses": addresses,
                "mac": port.mac,
                "counters": counters.get(port.id, {}),
            }
        )
        edges.append(
            {"id": f"attach:{port.id}", "source": port.id, "target": port.device_id, "kind": "port"}
        )
        if port.host_id:
            hosts_used.add(port.host_id)
            edges.append(
                {
                    "id": f"runs:{port.id}",
                    "source": port.id,
                    "target": f"host:{port.host_id}",
                    "kind": "host",
                }
            )
    host_ids = set(hosts_used)
    if principal.is_admin:
        host_ids |= {host.id for host in await _all(repository, Host)}
    for host_id in sorted(host_ids):
        nodes.append(
            {
                "id": f"host:{host_id}",
                "kind": "host",
                "label": host_id,
                "state": "live" if host_id in alive else "down",
                "counters": {},
            }
        )
    for lb in lbs:
        nodes.append(
            {
                "id": lb.id,
                "kind": "load_balancer",
                "label": lb.name or lb.id[:8],
                "state": str(getattr(lb, "operating_status", "")),
                "counters": {},
            }
        )
        if lb.router_id in devices:
            edges.append(
                {"id": f"lb:{lb.id}", "source": lb.id, "target": lb.router_id, "kind": "lb"}
            )
    return {"nodes": nodes, "edges": edges, "revision": await repository.store.current_revision()}


def install_ui(app: FastAPI) -> None:
    """`GET /ui`, `/ui/static/...` and `GET /v1/graph`."""
    router = APIRouter()

    @router.get("/ui", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @router.get(f"{API_PREFIX}/graph", tags=["ui"], operation_id="get_graph")
    async def graph(
        principal: Principal = Depends(authenticate),
        repository: TopologyRepository = Depends(get_repository),
    ) -> dict[str, Any]:
        """The caller's topology as a graph with live state and counters (the page's data)."""
        return await topology_graph(repository, principal)

    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=STATIC_DIR), name="ui-static")
