"""Octavia v2 compatible load-balancer API (`octavia_app()`, mounted at `/v2.0/lbaas`) over
HiveNet's own L4 load balancer.

Owns the translation between Octavia's resources and the native ones, and the HTTP side
(Octavia's `faultcode`/`faultstring` error shape, status codes, project scoping):
- loadbalancer <-> `LoadBalancer` on the router that has an interface on the VIP's network
  (its VIP address, network, subnet and port in `external_ids`); the VIP address is the fixed
  IP of a port on the VIP network (device_owner Octavia), deleted with the load balancer;
- listener <-> `Listener` (the load balancer's VIP address copied in);
- pool <-> `Pool` (a pool created with `listener_id` becomes that listener's default pool in
  the same transaction); algorithms: SOURCE_IP_PORT -> Maglev, SOURCE_IP, ROUND_ROBIN;
  LEAST_CONNECTIONS is refused (400) because agents do not share connection counts;
- member <-> `Member`, healthmonitor <-> `HealthMonitor` (PING, TCP, HTTP, UDP-CONNECT);
- `/loadbalancers/{id}/status` (the tree) and `/stats` from what the agents report.
Protocols: TCP and UDP; HTTP, HTTPS, TERMINATED_HTTPS, PROXY, SCTP are refused with a 400
that says HiveNet balances at L4. Every write request is ONE store transaction.
Must not keep state of its own.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Body, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from hivenet.api.lbstats import load_balancer_stats
from hivenet.api.neutron.common import (
    Caller,
    OpenStackError,
    OpenStackOptions,
    TokenResolver,
    bad_request,
    caller_of,
    collection_url,
    conflict,
    not_found,
    openstack_subapp,
    page_of,
    parse_list_query,
    scan,
    show_fields,
    visible_or_404,
    wrapped_body,
)
from hivenet.api.neutron.l3 import requested_fixed_ips
from hivenet.api.neutron.translate import (
    DESCRIPTION,
    DEVICE_OWNER,
    TAGS,
    FixedIpBody,
    Tag,
    with_external_ids,
)
from hivenet.model import (
    Bridge,
    DeviceKind,
    HealthMonitor,
    HealthMonitorType,
    LbAlgorithm,
    LbProtocol,
    Listener,
    LoadBalancer,
    Member,
    Pool,
    Port,
    SessionPersistence,
    TopologyObject,
)
from hivenet.model.subnet import Subnet
from hivenet.model.types import FixedIp
from hivenet.store.topology import TopologyRepository, TopologyTransaction

RepositorySource = Callable[[], Awaitable[TopologyRepository]]

VIP_ADDRESS = "octavia:vip_address"
VIP_NETWORK = "octavia:vip_network_id"
VIP_SUBNET = "octavia:vip_subnet_id"
VIP_PORT = "octavia:vip_port_id"
SUBNET = "octavia:subnet_id"
VIP_DEVICE_OWNER = "Octavia"

ALGORITHMS: dict[str, LbAlgorithm] = {
    "SOURCE_IP_PORT": LbAlgorithm.MAGLEV,
    "SOURCE_IP": LbAlgorithm.SOURCE_IP,
    "ROUND_ROBIN": LbAlgorithm.ROUND_ROBIN,
}
ALGORITHM_NAMES = {native: name for name, native in ALGORITHMS.items()}
REFUSED_ALGORITHMS = {
    "LEAST_CONNECTIONS": "agents do not share connection counts; use SOURCE_IP_PORT (Maglev)",
}
PROTOCOLS = {"TCP": LbProtocol.TCP, "UDP": LbProtocol.UDP}
MONITOR_TYPES = {
    "PING": HealthMonitorType.PING,
    "TCP": HealthMonitorType.TCP,
    "HTTP": HealthMonitorType.HTTP,
    "UDP-CONNECT": HealthMonitorType.UDP,
}
MONITOR_TYPE_NAMES = {native: name for name, native in MONITOR_TYPES.items()}
RESOURCE_OF_KIND = {
    "load_balancer": "load_balancer",
    "listener": "listener",
    "pool": "pool",
    "member": "member",
    "health_monitor": "health_monitor",
    "bridge": "network",
    "router": "router",
    "subnet": "subnet",
    "port": "port",
}


def octavia_error(error: OpenStackError) -> Response:
    kind = "Client" if error.status < 500 else "Server"
    # Octavia answers a create past a quota with 403 (Neutron: 409 OverQuota).
    status = 403 if error.error_type == "OverQuota" else error.status
    return JSONResponse(
        {"faultcode": kind, "faultstring": error.message, "debuginfo": None},
        status_code=status,
    )


# --------------------------------------------------------------------------------------------
# Request bodies


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, max_length=255)
    description: str | None = Field(default=None, max_length=255)
    project_id: str | None = Field(default=None, max_length=64)
    tenant_id: str | None = Field(default=None, max_length=64)
    admin_state_up: bool | None = None
    tags: list[Tag] | None = Field(default=None, max_length=50)

    def described(self, current: dict[str, str]) -> dict[str, str]:
        updates: dict[str, str | None] = {}
        if self.description is not None:
            updates[DESCRIPTION] = self.description or None
        if self.tags is not None:
            updates[TAGS] = json.dumps(sorted(set(self.tags))) if self.tags else None
        return with_external_ids(current, updates)


class LoadBalancerBody(_Body):
    vip_address: str | None = None
    vip_network_id: str | None = None
    vip_subnet_id: str | None = None
    vip_port_id: str | None = None
    provider: str | None = None
    flavor_id: str | None = None
    availability_zone: str | None = None


class ListenerBody(_Body):
    loadbalancer_id: str | None = None
    protocol: str | None = None
    protocol_port: int | None = Field(default=None, ge=1, le=65535)
    default_pool_id: str | None = None
    connection_limit: int | None = None
    allowed_cidrs: list[str] | None = None


class SessionPersistenceBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str
    cookie_name: str | None = None
    persistence_timeout: int | None = Field(default=None, ge=1, le=86400)
    persistence_granularity: str | None = None


class PoolBody(_Body):
    loadbalancer_id: str | None = None
    listener_id: str | None = None
    protocol: str | None = None
    lb_algorithm: str | None = None
    session_persistence: SessionPersistenceBody | None = None
    tls_enabled: bool | None = None


class MemberBody(_Body):
    address: str | None = None
    protocol_port: int | None = Field(default=None, ge=1, le=65535)
    weight: int | None = Field(default=None, ge=0, le=256)
    subnet_id: str | None = None
    monitor_address: str | None = None
    monitor_port: int | None = Field(default=None, ge=1, le=65535)
    backup: bool | None = None


class HealthMonitorBody(_Body):
    pool_id: str | None = None
    type: str | None = None
    delay: int | None = Field(default=None, ge=1, le=86400)
    timeout: int | None = Field(default=None, ge=1, le=86400)
    max_retries: int | None = Field(default=None, ge=1, le=10)
    max_retries_down: int | None = Field(default=None, ge=1, le=10)
    http_method: str | None = None
    url_path: str | None = None
    expected_codes: str | None = None


LoadBalancerRequest = wrapped_body("LoadBalancerRequest", "loadbalancer", LoadBalancerBody)
ListenerRequest = wrapped_body("ListenerRequest", "listener", ListenerBody)
PoolRequest = wrapped_body("PoolRequest", "pool", PoolBody)
MemberRequest = wrapped_body("MemberRequest", "member", MemberBody)
HealthMonitorRequest = wrapped_body("HealthMonitorRequest", "healthmonitor", HealthMonitorBody)


# --------------------------------------------------------------------------------------------
# Views


def _status(value: Any) -> str:
    return str(value.value).upper()


def _common(obj: TopologyObject) -> dict[str, Any]:
    tags = obj.external_ids.get(TAGS)
    return {
        "id": obj.id,
        "name": obj.name,
        "description": obj.external_ids.get(DESCRIPTION, ""),
        "project_id": obj.tenant_id,
        "tenant_id": obj.tenant_id,
        "tags": list(json.loads(tags)) if tags else [],
        "created_at": None,
        "updated_at": None,
    }


def _statuses(obj: LoadBalancer | Listener | Pool | Member | HealthMonitor) -> dict[str, Any]:
    return {
        "admin_state_up": obj.admin_state_up,
        "provisioning_status": _status(obj.provisioning_status),
        "operating_status": _status(obj.operating_status),
    }


def lb_view(lb: LoadBalancer, listeners: list[str], pools: list[str]) -> dict[str, Any]:
    ext = lb.external_ids
    return {
        **_common(lb),
        **_statuses(lb),
        "vip_address": ext.get(VIP_ADDRESS),
        "vip_network_id": ext.get(VIP_NETWORK),
        "vip_subnet_id": ext.get(VIP_SUBNET),
        "vip_port_id": ext.get(VIP_PORT),
        "vip_qos_policy_id": None,
        "provider": "hivenet",
        "flavor_id": None,
        "availability_zone": None,
        "listeners": [{"id": i} for i in sorted(listeners)],
        "pools": [{"id": i} for i in sorted(pools)],
    }


def listener_view(listener: Listener) -> dict[str, Any]:
    return {
        **_common(listener),
        **_statuses(listener),
        "protocol": listener.protocol.value.upper(),
        "protocol_port": listener.protocol_port,
        "loadbalancers": [{"id": listener.load_balancer_id}],
        "default_pool_id": listener.default_pool_id,
        "connection_limit": -1,
        "allowed_cidrs": [str(c) for c in listener.allowed_cidrs] or None,
        "insert_headers": {},
        "l7policies": [],
        "default_tls_container_ref": None,
        "sni_container_refs": [],
    }


def pool_view(
    pool: Pool, listeners: list[str], members: list[str], monitor: str | None
) -> dict[str, Any]:
    persistence = None
    if pool.session_persistence is SessionPersistence.SOURCE_IP:
        persistence = {
            "type": "SOURCE_IP",
            "cookie_name": None,
            "persistence_timeout": pool.persistence_timeout,
            "persistence_granularity": None,
        }
    return {
        **_common(pool),
        **_statuses(pool),
        "protocol": pool.protocol.value.upper(),
        "lb_algorithm": ALGORITHM_NAMES[pool.algorithm],
        "session_persistence": persistence,
        "loadbalancers": [{"id": pool.load_balancer_id}],
        "listeners": [{"id": i} for i in sorted(listeners)],
        "members": [{"id": i} for i in sorted(members)],
        "healthmonitor_id": monitor,
        "tls_enabled": False,
    }


def member_view(member: Member) -> dict[str, Any]:
    return {
        **_common(member),
        **_statuses(member),
        "address": str(member.address),
        "protocol_port": member.protocol_port,
        "weight": member.weight,
        "subnet_id": member.external_ids.get(SUBNET),
        "monitor_address": None if member.monitor_address is None else str(member.monitor_address),
        "monitor_port": member.monitor_port,
        "backup": False,
        "pool_id": member.pool_id,
    }


def monitor_view(monitor: HealthMonitor) -> dict[str, Any]:
    return {
        **_common(monitor),
        **_statuses(monitor),
        "type": MONITOR_TYPE_NAMES[monitor.type],
        "delay": monitor.delay,
        "timeout": monitor.timeout,
        "max_retries": monitor.max_retries,
        "max_retries_down": monitor.max_retries_down,
        "http_method": None if monitor.http_method is None else monitor.http_method.value,
        "url_path": monitor.url_path,
        "expected_codes": monitor.expected_codes,
        "pools": [{"id": monitor.pool_id}],
        "http_version": None,
        "domain_name": None,
    }


LB_ATTRS = frozenset(lb_view(LoadBalancer(id="x", router_id="x"), [], []))
LISTENER_ATTRS = frozenset(
    listener_view(
        Listener(id="x", load_balancer_id="x", vip_address="10.0.0.1", protocol_port=1)  # type: ignore[arg-type]
    )
)
POOL_ATTRS = frozenset(pool_view(Pool(id="x", load_balancer_id="x"), [], [], None))
MEMBER_ATTRS = frozenset(
    member_view(Member(id="x", pool_id="x", address="10.0.0.1", protocol_port=1))  # type: ignore[arg-type]
)
MONITOR_ATTRS = frozenset(
    monitor_view(HealthMonitor(id="x", pool_id="x", type=HealthMonitorType.TCP))
)


# --------------------------------------------------------------------------------------------
# Checks of request values


def _protocol(text: str | None) -> LbProtocol:
    if text is None:
        raise bad_request("protocol: required (TCP or UDP)")
    if text.upper() not in PROTOCOLS:
        raise bad_request(
            f"protocol={text!r} is not supported: HiveNet balances at L4 (TCP, UDP); "
            "an HTTP service works behind a TCP listener"
        )
    return PROTOCOLS[text.upper()]


def _algorithm(text: str | None) -> LbAlgorithm:
    if text is None:
        raise bad_request("lb_algorithm: required (SOURCE_IP_PORT, SOURCE_IP or ROUND_ROBIN)")
    if text in REFUSED_ALGORITHMS:
        raise bad_request(f"lb_algorithm={text!r} is not supported: {REFUSED_ALGORITHMS[text]}")
    if text not in ALGORITHMS:
        raise bad_request(
            f"lb_algorithm={text!r}: one of {', '.join(ALGORITHMS)} (LEAST_CONNECTIONS is refused)"
        )
    return ALGORITHMS[text]


def _persistence(body: SessionPersistenceBody | None) -> dict[str, Any]:
    if body is None:
        return {"session_persistence": SessionPersistence.NONE}
    if body.type != "SOURCE_IP":
        raise bad_request(
            f"session_persistence type={body.type!r} is not supported: only SOURCE_IP "
            "(cookies need an L7 balancer)"
        )
    fields: dict[str, Any] = {"session_persistence": SessionPersistence.SOURCE_IP}
    if body.persistence_timeout is not None:
        fields["persistence_timeout"] = body.persistence_timeout
    return fields


def _monitor_type(text: str | None) -> HealthMonitorType:
    if text is None:
        raise bad_request("type: required (PING, TCP, HTTP or UDP-CONNECT)")
    if text not in MONITOR_TYPES:
        raise bad_request(
            f"type={text!r} is not supported: one of {', '.join(MONITOR_TYPES)} "
            "(HTTPS, TLS-HELLO and SCTP are refused)"
        )
    return MONITOR_TYPES[text]


def _address(field: str, text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise bad_request(f"{field}={text!r}: not an IP address") from None


def _owner(caller: Caller, body: _Body) -> str:
    requested = body.project_id or body.tenant_id
    return caller.owner_for(requested)


def _no_change(body: _Body, *fields: str) -> None:
    for field in ("project_id", "tenant_id", *fields):
        if getattr(body, field, None) is not None:
            raise bad_request(f"{field}: cannot be changed")


async def router_of_network(txn: TopologyTransaction, network_id: str) -> str | None:
    """The router with an interface on the network (the one a VIP there must live on)."""
    for kind, port_id in await txn.referrers("bridge", network_id, "port"):
        if kind != "port":
            continue
        port = await txn.get(Port, port_id)
        if port is None or port.peer_id is None:
            continue
        peer = await txn.get(Port, port.peer_id)
        if peer is not None and peer.device_kind is DeviceKind.ROUTER:
            return peer.device_id
    return None


async def allocate_vip(
    txn: TopologyTransaction, caller: Caller, body: LoadBalancerBody
) -> tuple[str, str, str]:
    """(network id, VIP address, id of the port reserving it): the VIP's address is a fixed IP
    of a port on the VIP network (device_owner Octavia), allocated by IPAM when not given."""
    address = None if body.vip_address is None else _address("vip_address", body.vip_address)
    if body.vip_subnet_id is not None:
        subnet_id = body.vip_subnet_id
        subnet = visible_or_404(caller, await txn.get(Subnet, subnet_id), "subnet", subnet_id)
        if body.vip_network_id is not None and body.vip_network_id != subnet.bridge_id:
            raise bad_request(
                f"vip_network_id={body.vip_network_id!r}: subnet {subnet.id} is on network "
                f"{subnet.bridge_id}"
            )
        network_id = subnet.bridge_id
        entry = FixedIp(subnet_id=subnet.id, ip_address=address)
    elif body.vip_network_id is not None:
        network_id = body.vip_network_id
        network = visible_or_404(caller, await txn.get(Bridge, network_id), "network", network_id)
        entries = [FixedIpBody(ip_address=body.vip_address)] if body.vip_address else None
        fixed = await requested_fixed_ips(txn, network, entries)
        if not fixed:
            raise bad_request(f"vip_network_id={network_id!r}: the network has no subnet")
        entry = fixed[0]
    else:
        raise bad_request("vip_subnet_id or vip_network_id: one is required")
    port = await txn.create(
        Port(
            tenant_id=caller.owner_for(body.project_id or body.tenant_id),
            name=f"octavia-lb-vip-{body.name or ''}"[:255],
            device_kind=DeviceKind.BRIDGE,
            device_id=network_id,
            fixed_ips=(entry,),
            external_ids={DEVICE_OWNER: VIP_DEVICE_OWNER},
        )
    )
    vip = port.fixed_ips[0].ip_address
    return network_id, str(vip), port.id


VipAllocator = Callable[
    [TopologyTransaction, Caller, LoadBalancerBody], Awaitable[tuple[str, str, str]]
]


# --------------------------------------------------------------------------------------------


def octavia_app(
    options: OpenStackOptions,
    repository: RepositorySource,
    resolver: TokenResolver,
    vip_allocator: VipAllocator = allocate_vip,
) -> FastAPI:
    app = openstack_subapp(
        "HiveNet Octavia API",
        "Octavia v2 compatible L4 load balancing over HiveNet's topology.",
        octavia_error,
        RESOURCE_OF_KIND,
    )

    async def caller(request: Request) -> Caller:
        return await caller_of(request, options, resolver)

    async def transact(body: Callable[[TopologyTransaction], Awaitable[Any]], what: str) -> Any:
        return (await (await repository()).transaction(body, what))[0]

    async def visible(request: Request, cls: type[Any], object_id: str, resource: str) -> Any:
        who = await caller(request)
        from hivenet.store.topology import NotFoundError

        try:
            stored = await (await repository()).get(cls, object_id)
        except NotFoundError:
            raise not_found(resource, object_id) from None
        return visible_or_404(who, stored.obj, resource, object_id)

    async def lb_dict(lb: LoadBalancer) -> dict[str, Any]:
        snapshot = await scan(await repository(), [Listener, Pool])
        listeners = [x.id for x in snapshot.of(Listener) if x.load_balancer_id == lb.id]
        pools = [x.id for x in snapshot.of(Pool) if x.load_balancer_id == lb.id]
        return lb_view(lb, listeners, pools)

    async def pool_dict(pool: Pool) -> dict[str, Any]:
        snapshot = await scan(await repository(), [Listener, Member, HealthMonitor])
        return _pool_from(snapshot, pool)

    def _pool_from(snapshot: Any, pool: Pool) -> dict[str, Any]:
        listeners = [x.id for x in snapshot.of(Listener) if x.default_pool_id == pool.id]
        members = [x.id for x in snapshot.of(Member) if x.pool_id == pool.id]
        monitors = [x.id for x in snapshot.of(HealthMonitor) if x.pool_id == pool.id]
        return pool_view(pool, listeners, members, monitors[0] if monitors else None)

    # ---- load balancers

    @app.post("/loadbalancers", status_code=201)
    async def create_lb(request: Request, body: LoadBalancerRequest = Body(...)) -> JSONResponse:  # type: ignore[valid-type]
        who = await caller(request)
        spec: LoadBalancerBody = body.loadbalancer  # type: ignore[attr-defined]
        owner = _owner(who, spec)
        if spec.provider not in (None, "hivenet"):
            raise bad_request(f"provider={spec.provider!r}: the only provider is 'hivenet'")
        if spec.flavor_id or spec.availability_zone or spec.vip_port_id:
            raise bad_request(
                "flavor_id, availability_zone and vip_port_id are not supported; give "
                "vip_subnet_id or vip_network_id"
            )

        async def write(txn: TopologyTransaction) -> LoadBalancer:
            network_id, address, port_id = await vip_allocator(txn, who, spec)
            _address("vip_address", address)
            router_id = await router_of_network(txn, network_id)
            if router_id is None:
                raise bad_request(
                    f"vip_network_id={network_id!r}: HiveNet load balancers live on a router; "
                    "add an interface on this network to a router first"
                )
            ids = spec.described({}) | {VIP_ADDRESS: address, VIP_NETWORK: network_id}
            if spec.vip_subnet_id:
                ids[VIP_SUBNET] = spec.vip_subnet_id
            if port_id:
                ids[VIP_PORT] = port_id
            lb = LoadBalancer(
                name=spec.name or "",
                tenant_id=owner,
                router_id=router_id,
                admin_state_up=True if spec.admin_state_up is None else spec.admin_state_up,
                external_ids=ids,
            )
            return await txn.create(lb)

        lb = await transact(write, "create load balancer")
        return JSONResponse({"loadbalancer": await lb_dict(lb)}, status_code=201)

    @app.get("/loadbalancers")
    async def list_lbs(request: Request) -> JSONResponse:
        who = await caller(request)
        query = parse_list_query(request, LB_ATTRS)
        snapshot = await scan(await repository(), [LoadBalancer, Listener, Pool])
        items = [
            lb_view(
                lb,
                [x.id for x in snapshot.of(Listener) if x.load_balancer_id == lb.id],
                [x.id for x in snapshot.of(Pool) if x.load_balancer_id == lb.id],
            )
            for lb in snapshot.of(LoadBalancer)
            if who.sees(lb)
        ]
        return JSONResponse(page_of(items, query, "loadbalancers", collection_url(request)))

    @app.get("/loadbalancers/{lb_id}")
    async def show_lb(lb_id: str, request: Request) -> JSONResponse:
        lb = await visible(request, LoadBalancer, lb_id, "load_balancer")
        return JSONResponse({"loadbalancer": show_fields(request, await lb_dict(lb))})

    @app.put("/loadbalancers/{lb_id}")
    async def update_lb(
        lb_id: str,
        request: Request,
        body: LoadBalancerRequest = Body(...),  # type: ignore[valid-type]
    ) -> JSONResponse:
        who = await caller(request)
        spec: LoadBalancerBody = body.loadbalancer  # type: ignore[attr-defined]
        _no_change(
            spec,
            "vip_address",
            "vip_network_id",
            "vip_subnet_id",
            "vip_port_id",
            "provider",
            "flavor_id",
            "availability_zone",
        )
        lb = await _modify(who, LoadBalancer, lb_id, "load_balancer", spec, {})
        return JSONResponse({"loadbalancer": await lb_dict(lb)})

    async def _modify(
        who: Caller,
        cls: type[Any],
        object_id: str,
        resource: str,
        spec: _Body,
        updates: dict[str, Any],
    ) -> Any:
        def change(current: Any) -> Any:
            fields = {"external_ids": spec.described(current.external_ids), **updates}
            if spec.name is not None:
                fields["name"] = spec.name
            if spec.admin_state_up is not None:
                fields["admin_state_up"] = spec.admin_state_up
            return cls.model_validate({**current.model_dump(), **fields})

        stored = await (await repository()).modify(
            cls,
            object_id,
            change,
            precondition=lambda current: visible_or_404(who, current, resource, object_id),
        )
        return stored.obj

    @app.delete("/loadbalancers/{lb_id}", status_code=204)
    async def delete_lb(lb_id: str, request: Request) -> Response:
        who = await caller(request)
        cascade_text = request.query_params.get("cascade", "false").lower()
        if cascade_text not in ("true", "false"):
            raise bad_request(f"cascade={cascade_text!r}: true or false")

        async def write(txn: TopologyTransaction) -> None:
            lb = await txn.get(LoadBalancer, lb_id)
            visible_or_404(who, lb, "load_balancer", lb_id)
            if cascade_text != "true" and await txn.referrers("load_balancer", lb_id):
                raise conflict(
                    "InUse",
                    f"load balancer {lb_id} still has listeners or pools; delete them or "
                    "use cascade",
                )
            assert lb is not None
            port_id = lb.external_ids.get(VIP_PORT)
            await txn.delete(LoadBalancer, lb_id, cascade=True)
            if port_id and await txn.get(Port, port_id) is not None:
                await txn.delete(Port, port_id, cascade=True)

        await transact(write, f"delete load balancer {lb_id}")
        return Response(status_code=204)

    @app.get("/loadbalancers/{lb_id}/status")
    async def lb_status(lb_id: str, request: Request) -> JSONResponse:
        lb = await visible(request, LoadBalancer, lb_id, "load_balancer")
        snapshot = await scan(await repository(), [Listener, Pool, Member, HealthMonitor])

        def brief(obj: Any) -> dict[str, Any]:
            return {
                "id": obj.id,
                "name": obj.name,
                "provisioning_status": _status(obj.provisioning_status),
                "operating_status": _status(obj.operating_status),
            }

        def pool_tree(pool: Pool) -> dict[str, Any]:
            tree = brief(pool)
            tree["members"] = [
                {**brief(m), "address": str(m.address), "protocol_port": m.protocol_port}
                for m in snapshot.of(Member)
                if m.pool_id == pool.id
            ]
            monitors = [h for h in snapshot.of(HealthMonitor) if h.pool_id == pool.id]
            if monitors:
                tree["health_monitor"] = {
                    **brief(monitors[0]),
                    "type": MONITOR_TYPE_NAMES[monitors[0].type],
                }
            return tree

        pools = {p.id: p for p in snapshot.of(Pool) if p.load_balancer_id == lb.id}
        listeners = []
        for listener in snapshot.of(Listener):
            if listener.load_balancer_id != lb.id:
                continue
            tree = brief(listener)
            pool = pools.get(listener.default_pool_id or "")
            tree["pools"] = [pool_tree(pool)] if pool is not None else []
            listeners.append(tree)
        return JSONResponse({"statuses": {"loadbalancer": {**brief(lb), "listeners": listeners}}})

    @app.get("/loadbalancers/{lb_id}/stats")
    async def lb_stats(lb_id: str, request: Request) -> JSONResponse:
        await visible(request, LoadBalancer, lb_id, "load_balancer")
        stats = await load_balancer_stats(await repository(), lb_id)
        return JSONResponse(
            {
                "stats": {
                    "active_connections": stats.active_connections,
                    "bytes_in": stats.bytes_in,
                    "bytes_out": stats.bytes_out,
                    "request_errors": 0,
                    "total_connections": stats.total_connections,
                }
            }
        )

    # ---- listeners

    @app.post("/listeners", status_code=201)
    async def create_listener(request: Request, body: ListenerRequest = Body(...)) -> JSONResponse:  # type: ignore[valid-type]
        who = await caller(request)
        spec: ListenerBody = body.listener  # type: ignore[attr-defined]
        if not spec.loadbalancer_id:
            raise bad_request("loadbalancer_id: required")
        if spec.protocol_port is None:
            raise bad_request("protocol_port: required")
        if spec.connection_limit not in (None, -1):
            raise bad_request(
                f"connection_limit={spec.connection_limit}: not supported (only -1, unlimited)"
            )
        protocol = _protocol(spec.protocol)
        lb_id = spec.loadbalancer_id

        async def write(txn: TopologyTransaction) -> Listener:
            lb = await txn.get(LoadBalancer, lb_id)
            visible_or_404(who, lb, "load_balancer", lb_id)
            assert lb is not None
            if spec.default_pool_id is not None:
                visible_or_404(
                    who, await txn.get(Pool, spec.default_pool_id), "pool", spec.default_pool_id
                )
            for kind, other_id in await txn.referrers("load_balancer", lb_id, "listener"):
                other = await txn.get(Listener, other_id) if kind == "listener" else None
                if other is not None and (other.protocol, other.protocol_port) == (
                    protocol,
                    spec.protocol_port,
                ):
                    raise conflict(
                        "DuplicateListenerEntry",
                        f"another listener ({other.id}) on load balancer {lb_id} already uses "
                        f"{protocol.value.upper()} port {spec.protocol_port}",
                    )
            listener = Listener.model_validate(
                {
                    "name": spec.name or "",
                    "tenant_id": lb.tenant_id,
                    "load_balancer_id": lb_id,
                    "vip_address": lb.external_ids[VIP_ADDRESS],
                    "protocol": protocol,
                    "protocol_port": spec.protocol_port,
                    "default_pool_id": spec.default_pool_id,
                    "allowed_cidrs": spec.allowed_cidrs or (),
                    "admin_state_up": True if spec.admin_state_up is None else spec.admin_state_up,
                    "external_ids": spec.described({}),
                }
            )
            return await txn.create(listener)

        listener = await transact(write, "create listener")
        return JSONResponse({"listener": listener_view(listener)}, status_code=201)

    @app.get("/listeners")
    async def list_listeners(request: Request) -> JSONResponse:
        who = await caller(request)
        query = parse_list_query(request, LISTENER_ATTRS | {"loadbalancer_id"})
        lb_filter = query.filters.pop("loadbalancer_id", None)
        snapshot = await scan(await repository(), [Listener])
        items = [
            listener_view(x)
            for x in snapshot.of(Listener)
            if who.sees(x) and (lb_filter is None or x.load_balancer_id in lb_filter)
        ]
        return JSONResponse(page_of(items, query, "listeners", collection_url(request)))

    @app.get("/listeners/{listener_id}")
    async def show_listener(listener_id: str, request: Request) -> JSONResponse:
        listener = await visible(request, Listener, listener_id, "listener")
        return JSONResponse({"listener": show_fields(request, listener_view(listener))})

    @app.get("/listeners/{listener_id}/stats")
    async def listener_stats(listener_id: str, request: Request) -> JSONResponse:
        listener = await visible(request, Listener, listener_id, "listener")
        return await lb_stats(listener.load_balancer_id, request)

    @app.put("/listeners/{listener_id}")
    async def update_listener(
        listener_id: str,
        request: Request,
        body: ListenerRequest = Body(...),  # type: ignore[valid-type]
    ) -> JSONResponse:
        who = await caller(request)
        spec: ListenerBody = body.listener  # type: ignore[attr-defined]
        _no_change(spec, "loadbalancer_id", "protocol", "protocol_port")
        updates: dict[str, Any] = {}
        if "default_pool_id" in spec.model_fields_set:
            updates["default_pool_id"] = spec.default_pool_id
        if spec.allowed_cidrs is not None:
            updates["allowed_cidrs"] = spec.allowed_cidrs
        listener = await _modify(who, Listener, listener_id, "listener", spec, updates)
        return JSONResponse({"listener": listener_view(listener)})

    @app.delete("/listeners/{listener_id}", status_code=204)
    async def delete_listener(listener_id: str, request: Request) -> Response:
        who = await caller(request)

        async def write(txn: TopologyTransaction) -> None:
            visible_or_404(who, await txn.get(Listener, listener_id), "listener", listener_id)
            await txn.delete(Listener, listener_id)

        await transact(write, f"delete listener {listener_id}")
        return Response(status_code=204)

    # ---- pools

    @app.post("/pools", status_code=201)
    async def create_pool(request: Request, body: PoolRequest = Body(...)) -> JSONResponse:  # type: ignore[valid-type]
        who = await caller(request)
        spec: PoolBody = body.pool  # type: ignore[attr-defined]
        if not spec.loadbalancer_id and not spec.listener_id:
            raise bad_request("loadbalancer_id or listener_id: one is required")
        if spec.tls_enabled:
            raise bad_request("tls_enabled: not supported (HiveNet balances at L4)")
        protocol = _protocol(spec.protocol)
        algorithm = _algorithm(spec.lb_algorithm)
        persistence = _persistence(spec.session_persistence)

        async def write(txn: TopologyTransaction) -> Pool:
            listener = None
            lb_id = spec.loadbalancer_id
            if spec.listener_id:
                listener = await txn.get(Listener, spec.listener_id)
                visible_or_404(who, listener, "listener", spec.listener_id)
                assert listener is not None
                if lb_id and lb_id != listener.load_balancer_id:
                    raise bad_request(
                        f"loadbalancer_id={lb_id!r}: listener {listener.id} is on load "
                        f"balancer {listener.load_balancer_id}"
                    )
                if listener.default_pool_id is not None:
                    raise conflict(
                        "DuplicatePoolEntry",
                        f"listener {listener.id} already has default pool "
                        f"{listener.default_pool_id}",
                    )
                lb_id = listener.load_balancer_id
            assert lb_id is not None
            lb = await txn.get(LoadBalancer, lb_id)
            visible_or_404(who, lb, "load_balancer", lb_id)
            assert lb is not None
            pool = Pool.model_validate(
                {
                    "name": spec.name or "",
                    "tenant_id": lb.tenant_id,
                    "load_balancer_id": lb_id,
                    "protocol": protocol,
                    "ip_version": ipaddress.ip_address(lb.external_ids[VIP_ADDRESS]).version,
                    "algorithm": algorithm,
                    "admin_state_up": True if spec.admin_state_up is None else spec.admin_state_up,
                    "external_ids": spec.described({}),
                    **persistence,
                }
            )
            created = await txn.create(pool)
            if listener is not None:
                await txn.update(listener.model_copy(update={"default_pool_id": created.id}))
            return created

        pool = await transact(write, "create pool")
        return JSONResponse({"pool": await pool_dict(pool)}, status_code=201)

    @app.get("/pools")
    async def list_pools(request: Request) -> JSONResponse:
        who = await caller(request)
        query = parse_list_query(request, POOL_ATTRS | {"loadbalancer_id"})
        lb_filter = query.filters.pop("loadbalancer_id", None)
        snapshot = await scan(await repository(), [Pool, Listener, Member, HealthMonitor])
        items = [
            _pool_from(snapshot, pool)
            for pool in snapshot.of(Pool)
            if who.sees(pool) and (lb_filter is None or pool.load_balancer_id in lb_filter)
        ]
        return JSONResponse(page_of(items, query, "pools", collection_url(request)))

    @app.get("/pools/{pool_id}")
    async def show_pool(pool_id: str, request: Request) -> JSONResponse:
        pool = await visible(request, Pool, pool_id, "pool")
        return JSONResponse({"pool": show_fields(request, await pool_dict(pool))})

    @app.put("/pools/{pool_id}")
    async def update_pool(
        pool_id: str,
        request: Request,
        body: PoolRequest = Body(...),  # type: ignore[valid-type]
    ) -> JSONResponse:
        who = await caller(request)
        spec: PoolBody = body.pool  # type: ignore[attr-defined]
        _no_change(spec, "loadbalancer_id", "listener_id", "protocol")
        updates: dict[str, Any] = {}
        if spec.lb_algorithm is not None:
            updates["algorithm"] = _algorithm(spec.lb_algorithm)
        if "session_persistence" in spec.model_fields_set:
            updates.update(_persistence(spec.session_persistence))
        pool = await _modify(who, Pool, pool_id, "pool", spec, updates)
        return JSONResponse({"pool": await pool_dict(pool)})

    @app.delete("/pools/{pool_id}", status_code=204)
    async def delete_pool(pool_id: str, request: Request) -> Response:
        who = await caller(request)

        async def write(txn: TopologyTransaction) -> None:
            visible_or_404(who, await txn.get(Pool, pool_id), "pool", pool_id)
            # Octavia deletes a pool's members and monitor with it, and clears listeners'
            # default pool.
            await txn.delete(Pool, pool_id, cascade=True)

        await transact(write, f"delete pool {pool_id}")
        return Response(status_code=204)

    # ---- members

    @app.post("/pools/{pool_id}/members", status_code=201)
    async def create_member(
        pool_id: str,
        request: Request,
        body: MemberRequest = Body(...),  # type: ignore[valid-type]
    ) -> JSONResponse:
        who = await caller(request)
        spec: MemberBody = body.member  # type: ignore[attr-defined]
        if spec.address is None or spec.protocol_port is None:
            raise bad_request("address and protocol_port: required")
        if spec.backup:
            raise bad_request("backup: backup members are not supported")
        address = _address("address", spec.address)
        monitor_address = (
            None
            if spec.monitor_address is None
            else _address("monitor_address", spec.monitor_address)
        )
        ids = spec.described({})
        if spec.subnet_id:
            ids[SUBNET] = spec.subnet_id

        async def write(txn: TopologyTransaction) -> Member:
            pool = await txn.get(Pool, pool_id)
            visible_or_404(who, pool, "pool", pool_id)
            assert pool is not None
            for kind, other_id in await txn.referrers("pool", pool_id, "member"):
                other = await txn.get(Member, other_id) if kind == "member" else None
                if other is not None and (other.address, other.protocol_port) == (
                    address,
                    spec.protocol_port,
                ):
                    raise conflict(
                        "DuplicateMemberEntry",
                        f"member {other.id} of pool {pool_id} already has {address} port "
                        f"{spec.protocol_port}",
                    )
            member = Member.model_validate(
                {
                    "name": spec.name or "",
                    "tenant_id": pool.tenant_id,
                    "pool_id": pool_id,
                    "address": address,
                    "protocol_port": spec.protocol_port,
                    "weight": 1 if spec.weight is None else spec.weight,
                    "monitor_address": monitor_address,
                    "monitor_port": spec.monitor_port,
                    "admin_state_up": True if spec.admin_state_up is None else spec.admin_state_up,
                    "external_ids": ids,
                }
            )
            return await txn.create(member)

        member = await transact(write, "create member")
        return JSONResponse({"member": member_view(member)}, status_code=201)

    @app.get("/pools/{pool_id}/members")
    async def list_members(pool_id: str, request: Request) -> JSONResponse:
        who = await caller(request)
        await visible(request, Pool, pool_id, "pool")
        query = parse_list_query(request, MEMBER_ATTRS)
        snapshot = await scan(await repository(), [Member])
        items = [
            member_view(m) for m in snapshot.of(Member) if m.pool_id == pool_id and who.sees(m)
        ]
        return JSONResponse(page_of(items, query, "members", collection_url(request)))

    async def _member(request: Request, pool_id: str, member_id: str) -> Member:
        member: Member = await visible(request, Member, member_id, "member")
        if member.pool_id != pool_id:
            raise not_found("member", member_id)
        return member

    @app.get("/pools/{pool_id}/members/{member_id}")
    async def show_member(pool_id: str, member_id: str, request: Request) -> JSONResponse:
        member = await _member(request, pool_id, member_id)
        return JSONResponse({"member": show_fields(request, member_view(member))})

    @app.put("/pools/{pool_id}/members/{member_id}")
    async def update_member(
        pool_id: str,
        member_id: str,
        request: Request,
        body: MemberRequest = Body(...),  # type: ignore[valid-type]
    ) -> JSONResponse:
        who = await caller(request)
        spec: MemberBody = body.member  # type: ignore[attr-defined]
        _no_change(spec, "address", "protocol_port", "subnet_id")
        await _member(request, pool_id, member_id)
        if spec.backup:
            raise bad_request("backup: backup members are not supported")
        updates: dict[str, Any] = {}
        if spec.weight is not None:
            updates["weight"] = spec.weight
        if spec.monitor_address is not None:
            updates["monitor_address"] = _address("monitor_address", spec.monitor_address)
        if spec.monitor_port is not None:
            updates["monitor_port"] = spec.monitor_port
        member = await _modify(who, Member, member_id, "member", spec, updates)
        return JSONResponse({"member": member_view(member)})

    @app.delete("/pools/{pool_id}/members/{member_id}", status_code=204)
    async def delete_member(pool_id: str, member_id: str, request: Request) -> Response:
        who = await caller(request)

        async def write(txn: TopologyTransaction) -> None:
            member = await txn.get(Member, member_id)
            visible_or_404(who, member, "member", member_id)
            assert member is not None
            if member.pool_id != pool_id:
                raise not_found("member", member_id)
            await txn.delete(Member, member_id)

        await transact(write, f"delete member {member_id}")
        return Response(status_code=204)

    # ---- health monitors

    @app.post("/healthmonitors", status_code=201)
    async def create_monitor(
        request: Request,
        body: HealthMonitorRequest = Body(...),  # type: ignore[valid-type]
    ) -> JSONResponse:
        who = await caller(request)
        spec: HealthMonitorBody = body.healthmonitor  # type: ignore[attr-defined]
        if not spec.pool_id:
            raise bad_request("pool_id: required")
        if spec.delay is None or spec.timeout is None or spec.max_retries is None:
            raise bad_request("delay, timeout and max_retries: required")
        monitor_type = _monitor_type(spec.type)
        pool_id = spec.pool_id

        async def write(txn: TopologyTransaction) -> HealthMonitor:
            pool = await txn.get(Pool, pool_id)
            visible_or_404(who, pool, "pool", pool_id)
            assert pool is not None
            for kind, other_id in await txn.referrers("pool", pool_id, "health_monitor"):
                if kind == "health_monitor":
                    raise conflict(
                        "DuplicateHealthMonitor",
                        f"pool {pool_id} already has health monitor {other_id}",
                    )
            fields: dict[str, Any] = {
                "name": spec.name or "",
                "tenant_id": pool.tenant_id,
                "pool_id": pool_id,
                "type": monitor_type,
                "delay": spec.delay,
                "timeout": spec.timeout,
                "max_retries": spec.max_retries,
                "admin_state_up": True if spec.admin_state_up is None else spec.admin_state_up,
                "external_ids": spec.described({}),
            }
            for field in ("max_retries_down", "http_method", "url_path", "expected_codes"):
                value = getattr(spec, field)
                if value is not None:
                    fields[field] = value
            return await txn.create(HealthMonitor.model_validate(fields))

        monitor = await transact(write, "create health monitor")
        return JSONResponse({"healthmonitor": monitor_view(monitor)}, status_code=201)

    @app.get("/healthmonitors")
    async def list_monitors(request: Request) -> JSONResponse:
        who = await caller(request)
        query = parse_list_query(request, MONITOR_ATTRS | {"pool_id"})
        pool_filter = query.filters.pop("pool_id", None)
        snapshot = await scan(await repository(), [HealthMonitor])
        items = [
            monitor_view(h)
            for h in snapshot.of(HealthMonitor)
            if who.sees(h) and (pool_filter is None or h.pool_id in pool_filter)
        ]
        return JSONResponse(page_of(items, query, "healthmonitors", collection_url(request)))

    @app.get("/healthmonitors/{monitor_id}")
    async def show_monitor(monitor_id: str, request: Request) -> JSONResponse:
        monitor = await visible(request, HealthMonitor, monitor_id, "health_monitor")
        return JSONResponse({"healthmonitor": show_fields(request, monitor_view(monitor))})

    @app.put("/healthmonitors/{monitor_id}")
    async def update_monitor(
        monitor_id: str,
        request: Request,
        body: HealthMonitorRequest = Body(...),  # type: ignore[valid-type]
    ) -> JSONResponse:
        who = await caller(request)
        spec: HealthMonitorBody = body.healthmonitor  # type: ignore[attr-defined]
        _no_change(spec, "pool_id", "type")
        updates = {
            field: getattr(spec, field)
            for field in (
                "delay",
                "timeout",
                "max_retries",
                "max_retries_down",
                "http_method",
                "url_path",
                "expected_codes",
            )
            if getattr(spec, field) is not None
        }
        monitor = await _modify(who, HealthMonitor, monitor_id, "health_monitor", spec, updates)
        return JSONResponse({"healthmonitor": monitor_view(monitor)})

    @app.delete("/healthmonitors/{monitor_id}", status_code=204)
    async def delete_monitor(monitor_id: str, request: Request) -> Response:
        who = await caller(request)

        async def write(txn: TopologyTransaction) -> None:
            visible_or_404(
                who, await txn.get(HealthMonitor, monitor_id), "health_monitor", monitor_id
            )
            await txn.delete(HealthMonitor, monitor_id)

        await transact(write, f"delete health monitor {monitor_id}")
        return Response(status_code=204)

    return app
