"""The Neutron v2.0 HTTP API (`neutron_app()`, mounted at `/v2.0`): networks, ports, routers,
security groups and rules, tags, extensions, quotas (`quotas.py`).

Owns the HTTP side: status codes, the NeutronError shape, which objects a caller sees (its
project's; the admin sees all), and that every write request is ONE
`TopologyRepository.transaction`. What a Neutron object is in native terms lives in
`translate.py`; list conventions and auth in `common.py`. Must not touch store keys beyond
the active-port state it reads.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Body, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from hivenet.api.neutron import l3
from hivenet.api.neutron import translate as tr
from hivenet.api.neutron.common import (
    Caller,
    OpenStackError,
    OpenStackOptions,
    Snapshot,
    TokenResolver,
    bad_request,
    caller_of,
    collection_url,
    conflict,
    not_found,
    openstack_subapp,
    owned_or_error,
    page_of,
    parse_list_query,
    port_is_active,
    scan,
    show_fields,
    visible_or_404,
    wrapped_body,
)
from hivenet.api.neutron.quotas import add_quota_routes
from hivenet.model import (
    Bridge,
    DeviceKind,
    FloatingIp,
    Host,
    Port,
    Router,
    SecurityGroup,
    SecurityGroupRule,
    TopologyObject,
)
from hivenet.model.subnet import Subnet
from hivenet.store.base import Store
from hivenet.store.topology import TopologyRepository, TopologyTransaction

RepositorySource = Callable[[], Awaitable[TopologyRepository]]

# Native kind -> the Neutron resource name used in errors.
RESOURCE_OF_KIND = {
    "bridge": "network",
    "port": "port",
    "router": "router",
    "security_group": "security_group",
    "security_group_rule": "security_group_rule",
    "floating_ip": "floatingip",
    "subnet": "subnet",
    "host": "host",
}

EXTENSIONS: list[dict[str, str]] = [
    {"alias": "external-net", "name": "Neutron external network"},
    {"alias": "router", "name": "Neutron L3 Router"},
    {"alias": "ext-gw-mode", "name": "Neutron L3 Configurable external gateway mode"},
    {"alias": "security-group", "name": "security-group"},
    {"alias": "port-security", "name": "Port Security"},
    {"alias": "allowed-address-pairs", "name": "Allowed Address Pairs"},
    {"alias": "binding", "name": "Port Binding"},
    {"alias": "net-mtu", "name": "Network MTU"},
    {"alias": "standard-attr-description", "name": "standard-attr-description"},
    {"alias": "standard-attr-revisions", "name": "Resource revision numbers"},
    {"alias": "standard-attr-tag", "name": "Tag support for resources"},
    {"alias": "tag-creation", "name": "Tag support for resources during creation"},
    {"alias": "project-id", "name": "project_id field enabled"},
    {"alias": "sorting", "name": "Sorting support"},
    {"alias": "pagination", "name": "Pagination support"},
    {"alias": "fields", "name": "Fields support"},
    {"alias": "quotas", "name": "Quota management support"},
    {"alias": "quota_details", "name": "Quota details extension"},
]


def neutron_error(error: OpenStackError) -> Response:
    return JSONResponse(
        {"NeutronError": {"type": error.error_type, "message": error.message, "detail": ""}},
        status_code=error.status,
    )


NetworkRequest = wrapped_body("NetworkRequest", "network", tr.NetworkBody)
PortRequest = wrapped_body("PortRequest", "port", tr.PortBody)
RouterRequest = wrapped_body("RouterRequest", "router", tr.RouterBody)
SecurityGroupRequest = wrapped_body("SecurityGroupRequest", "security_group", tr.SecurityGroupBody)
RuleRequest = wrapped_body(
    "SecurityGroupRuleRequest", "security_group_rule", tr.SecurityGroupRuleBody
)
SubnetRequest = wrapped_body("SubnetRequest", "subnet", tr.SubnetBody)
FloatingIpRequest = wrapped_body("FloatingIpRequest", "floatingip", tr.FloatingIpBody)


class TagsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tags: list[tr.Tag]


class Neutron:
    """The request handlers' shared context."""

    def __init__(
        self, options: OpenStackOptions, repository: RepositorySource, resolver: TokenResolver
    ):
        self.options = options
        self.repository = repository
        self.resolver = resolver

    async def caller(self, request: Request) -> Caller:
        return await caller_of(request, self.options, self.resolver)

    # ---- reads

    async def visible(
        self,
        caller: Caller,
        cls: type[Any],
        object_id: str,
        resource: str,
        shared: Callable[[Any], bool] | None = None,
    ) -> tuple[Any, int]:
        """The object and its revision if the caller may read it (its own, or `shared`)."""
        repository = await self.repository()
        from hivenet.store.topology import NotFoundError

        try:
            stored = await repository.get(cls, object_id)
        except NotFoundError:
            raise not_found(resource, object_id) from None
        if not caller.sees(stored.obj) and not (shared is not None and shared(stored.obj)):
            raise not_found(resource, object_id)
        return stored.obj, stored.mod_revision

    async def subnet_readable(self, caller: Caller, subnet: Subnet) -> bool:
        """A subnet another project may read: one on an external or a shared network."""
        from hivenet.store.topology import NotFoundError

        try:
            bridge = (await (await self.repository()).get(Bridge, subnet.bridge_id)).obj
        except NotFoundError:
            return False
        return tr.network_visible(caller, bridge)

    async def subnet_id_readable(self, caller: Caller, subnet_id: str) -> bool:
        """`subnet_readable` by id (False when there is no such subnet)."""
        from hivenet.store.topology import NotFoundError

        try:
            subnet = (await (await self.repository()).get(Subnet, subnet_id)).obj
        except NotFoundError:
            return False
        return await self.subnet_readable(caller, subnet)

    async def read(self, body: Callable[[TopologyTransaction], Awaitable[Any]]) -> Any:
        """`body`'s result from a read-only transaction (one consistent view)."""
        return (await self.transact(body, "read"))[0]

    async def network_dict(self, bridge: Bridge, revision: int) -> dict[str, Any]:
        async def subnets(txn: TopologyTransaction) -> list[str]:
            return [s.id for s in await l3.network_subnets(txn, bridge.id)]

        return tr.network_view(bridge, revision, await self.read(subnets))

    async def port_dict(self, port: Port, revision: int) -> dict[str, Any]:
        async def peer_of(txn: TopologyTransaction) -> tuple[Port | None, bool]:
            peer = await txn.get(Port, port.peer_id) if port.peer_id else None
            if peer is None:
                return None, False
            router = await txn.get(Router, peer.device_id)
            return peer, router is not None and l3.is_gateway_port(router, peer)

        peer, gateway = await self.read(peer_of)
        repository = await self.repository()
        active = port.host_id is not None and await port_is_active(
            repository, port.host_id, port.id
        )
        return tr.port_view(
            port,
            revision,
            active=active,
            fixed_ips=l3.fixed_ips_view(peer or port),
            router_peer=peer,
            gateway=gateway,
        )

    def port_from_snapshot(self, snapshot: Snapshot, port: Port) -> dict[str, Any]:
        peer = snapshot.get(Port, port.peer_id) if port.peer_id else None
        router = snapshot.get(Router, peer.device_id) if peer is not None else None
        active = port.host_id is not None and (port.host_id, port.id) in snapshot.active_ports
        return tr.port_view(
            port,
            snapshot.revisions.get(port.id, 0),
            active=active,
            fixed_ips=l3.fixed_ips_view(peer or port),
            router_peer=peer,
            gateway=router is not None and peer is not None and l3.is_gateway_port(router, peer),
        )

    async def router_dict(self, router: Router, revision: int) -> dict[str, Any]:
        gateway = await self.read(lambda txn: l3.gateway_info(txn, router))
        return tr.router_view(router, revision, gateway)

    def router_from_snapshot(self, snapshot: Snapshot, router: Router) -> dict[str, Any]:
        gateway = None
        port_id = router.external_ids.get(l3.GATEWAY_PORT)
        port = snapshot.get(Port, port_id) if port_id else None
        if port is not None:
            peer = snapshot.get(Port, port.peer_id) if port.peer_id else None
            gateway = l3.gateway_view(router, port, peer)
        return tr.router_view(router, snapshot.revisions[router.id], gateway)

    async def security_group_dict(self, group: SecurityGroup, revision: int) -> dict[str, Any]:
        snapshot = await scan(await self.repository(), [SecurityGroupRule])
        rules = [
            tr.rule_view(rule, snapshot.revisions[rule.id])
            for rule in snapshot.of(SecurityGroupRule)
            if rule.security_group_id == group.id
        ]
        return tr.security_group_view(group, revision, rules)

    async def transact(self, body: Callable[[TopologyTransaction], Awaitable[Any]], what: str):
        repository = await self.repository()
        return await repository.transaction(body, what)


async def ensure_default_security_group(txn: TopologyTransaction, project_id: str) -> str:
    """The project's default group, created with Neutron's default rules if missing."""
    group, rules = tr.default_security_group(project_id)
    if await txn.get(SecurityGroup, group.id) is None:
        await txn.create(group)
        for rule in rules:
            await txn.create(rule)
    return group.id


def neutron_app(
    options: OpenStackOptions,
    repository: RepositorySource,
    resolver: TokenResolver,
) -> FastAPI:
    app = openstack_subapp(
        "HiveNet Neutron API",
        "Neutron v2.0 compatible networking API over HiveNet's topology.",
        neutron_error,
        RESOURCE_OF_KIND,
    )
    ctx = Neutron(options, repository, resolver)

    @app.get("/", include_in_schema=False)
    @app.get("", include_in_schema=False)
    async def resources(request: Request) -> JSONResponse:
        base = str(request.base_url).rstrip("/") + "/v2.0"
        collections = [
            "networks",
            "subnets",
            "ports",
            "routers",
            "floatingips",
            "security-groups",
            "security-group-rules",
        ]
        return JSONResponse(
            {
                "resources": [
                    {
                        "name": name.rstrip("s").replace("-", "_"),
                        "collection": name,
                        "links": [{"href": f"{base}/{name}", "rel": "self"}],
                    }
                    for name in collections
                ],
                # keystoneauth reads this to accept `/v2.0` itself as a versioned endpoint.
                "version": version_entry(str(request.base_url)),
            }
        )

    @app.get("/extensions")
    async def list_extensions(request: Request) -> JSONResponse:
        await ctx.caller(request)
        return JSONResponse({"extensions": [_extension(e) for e in EXTENSIONS]})

    @app.get("/extensions/{alias}")
    async def show_extension(alias: str, request: Request) -> JSONResponse:
        await ctx.caller(request)
        for extension in EXTENSIONS:
            if extension["alias"] == alias:
                return JSONResponse({"extension": _extension(extension)})
        raise OpenStackError(404, "ExtensionNotFound", f"extension {alias!r} is not supported")

    async def store_of() -> Store:
        return (await ctx.repository()).store

    add_quota_routes(app, ctx.caller, store_of)

    # ---- networks

    @app.post("/networks", status_code=201)
    async def create_network(request: Request, body: NetworkRequest = Body(...)) -> JSONResponse:  # type: ignore[valid-type]
        caller = await ctx.caller(request)
        spec: tr.NetworkBody = body.network  # type: ignore[attr-defined]
        _check_network_infrastructure(caller, spec, None)
        bridge = Bridge(
            name=spec.name or "",
            tenant_id=caller.owner_for(_owner(spec)),
            admin_state_up=True if spec.admin_state_up is None else spec.admin_state_up,
            mtu=spec.mtu,
            shared=bool(spec.shared),
            external_ids=_network_ids(spec, {}),
        )
        repository = await ctx.repository()
        stored = await repository.create(bridge)
        view = await ctx.network_dict(stored.obj, stored.mod_revision)
        return JSONResponse({"network": view}, status_code=201)

    @app.get("/networks")
    async def list_networks(request: Request) -> JSONResponse:
        caller = await ctx.caller(request)
        query = parse_list_query(request, tr.NETWORK_ATTRIBUTES)
        snapshot = await scan(await ctx.repository(), [Bridge, Subnet])
        subnets: dict[str, list[str]] = {}
        for subnet in snapshot.of(Subnet):
            subnets.setdefault(subnet.bridge_id, []).append(subnet.id)
        items = [
            tr.network_view(bridge, snapshot.revisions[bridge.id], subnets.get(bridge.id, []))
            for bridge in snapshot.of(Bridge)
            if tr.network_visible(caller, bridge)
        ]
        return JSONResponse(page_of(items, query, "networks", collection_url(request)))

    @app.get("/networks/{network_id}")
    async def show_network(network_id: str, request: Request) -> JSONResponse:
        caller = await ctx.caller(request)
        bridge, revision = await ctx.visible(
            caller, Bridge, network_id, "network", shared=lambda b: tr.network_visible(caller, b)
        )
        return JSONResponse(
            {"network": show_fields(request, await ctx.network_dict(bridge, revision))}
        )

    @app.put("/networks/{network_id}")
    async def update_network(
        network_id: str,
        request: Request,
        body: NetworkRequest = Body(...),  # type: ignore[valid-type]
    ) -> JSONResponse:
        caller = await ctx.caller(request)
        spec: tr.NetworkBody = body.network  # type: ignore[attr-defined]
        _no_owner_change(spec)

        def change(current: Bridge) -> Bridge:
            _check_network_infrastructure(caller, spec, current)
            updates: dict[str, Any] = {"external_ids": _network_ids(spec, current.external_ids)}
            if spec.shared is not None:
                updates["shared"] = spec.shared
            if spec.name is not None:
                updates["name"] = spec.name
            if spec.admin_state_up is not None:
                updates["admin_state_up"] = spec.admin_state_up
            if spec.mtu is not None:
                updates["mtu"] = spec.mtu
            return Bridge.model_validate({**current.model_dump(), **updates})

        repository = await ctx.repository()
        stored = await repository.modify(
            Bridge,
            network_id,
            change,
            precondition=lambda current: owned_or_error(
                caller, current, "network", network_id, tr.network_visible(caller, current)
            ),
            expected_revision=_if_match(request),
        )
        return JSONResponse({"network": await ctx.network_dict(stored.obj, stored.mod_revision)})

    @app.delete("/networks/{network_id}", status_code=204)
    async def delete_network(network_id: str, request: Request) -> Response:
        caller = await ctx.caller(request)

        async def body(txn: TopologyTransaction) -> None:
            bridge = await txn.get(Bridge, network_id)
            owned_or_error(
                caller,
                bridge,
                "network",
                network_id,
                bool(bridge and tr.network_visible(caller, bridge)),
            )
            for kind, referrer_id in await txn.referrers("bridge", network_id, "port"):
                if kind == "port":
                    raise conflict(
                        "NetworkInUse",
                        f"Unable to complete operation on network {network_id}: "
                        f"there are one or more ports still in use on the network "
                        f"(port {referrer_id})",
                    )
            await txn.delete(Bridge, network_id, cascade=True)  # its subnets go with it

        await ctx.transact(body, f"delete network {network_id}")
        return Response(status_code=204)

    # ---- ports

    @app.post("/ports", status_code=201)
    async def create_port(request: Request, body: PortRequest = Body(...)) -> JSONResponse:  # type: ignore[valid-type]
        caller = await ctx.caller(request)
        spec: tr.PortBody = body.port  # type: ignore[attr-defined]
        if not spec.network_id:
            raise bad_request("network_id: required to create a port")
        network_id = spec.network_id
        owner = caller.owner_for(_owner(spec))

        async def write(txn: TopologyTransaction) -> Port:
            bridge = await txn.get(Bridge, network_id)
            if bridge is None or not tr.network_attachable(caller, bridge):
                raise not_found("network", network_id)
            port_security = (
                tr.network_port_security(bridge)
                if spec.port_security_enabled is None
                else spec.port_security_enabled
            )
            groups = await _port_groups(txn, caller, owner, spec.security_groups, port_security)
            fields: dict[str, Any] = {
                "name": spec.name or "",
                "tenant_id": owner,
                "device_kind": DeviceKind.BRIDGE,
                "device_id": network_id,
                "admin_state_up": True if spec.admin_state_up is None else spec.admin_state_up,
                "port_security_enabled": port_security,
                "security_group_ids": groups,
                "allowed_address_pairs": _pairs(spec),
                "external_ids": _port_ids(spec, {}),
                "fixed_ips": await l3.requested_fixed_ips(txn, bridge, spec.fixed_ips),
            }
            if spec.mac_address is not None:
                fields["mac"] = spec.mac_address
            port = Port.model_validate(fields)
            port = await _bind(txn, caller, port, spec)
            return await txn.create(port)

        port, revision = await ctx.transact(write, "create port")
        return JSONResponse({"port": await ctx.port_dict(port, revision)}, status_code=201)

    @app.get("/ports")
    async def list_ports(request: Request) -> JSONResponse:
        caller = await ctx.caller(request)
        query = parse_list_query(request, tr.PORT_ATTRIBUTES)
        fixed_filters = _fixed_ip_filters(query.filters.pop("fixed_ips", []))
        snapshot = await scan(await ctx.repository(), [Port, Router], state=True)
        items = [
            ctx.port_from_snapshot(snapshot, port)
            for port in snapshot.of(Port)
            if port.device_kind is DeviceKind.BRIDGE and caller.sees(port)
        ]
        return JSONResponse(
            page_of(
                items,
                query,
                "ports",
                collection_url(request),
                extra_filters=lambda item: all(
                    any(f.get(key) == value for f in item["fixed_ips"])
                    for key, value in fixed_filters
                ),
            )
        )

    @app.get("/ports/{port_id}")
    async def show_port(port_id: str, request: Request) -> JSONResponse:
        caller = await ctx.caller(request)
        port, revision = await ctx.visible(caller, Port, port_id, "port")
        if port.device_kind is not DeviceKind.BRIDGE:
            raise not_found("port", port_id)
        return JSONResponse({"port": show_fields(request, await ctx.port_dict(port, revision))})

    @app.put("/ports/{port_id}")
    async def update_port(
        port_id: str,
        request: Request,
        body: PortRequest = Body(...),  # type: ignore[valid-type]
    ) -> JSONResponse:
        caller = await ctx.caller(request)
        spec: tr.PortBody = body.port  # type: ignore[attr-defined]
        _no_owner_change(spec)
        for field in ("network_id", "mac_address"):
            if getattr(spec, field) is not None:
                raise bad_request(f"{field}: cannot be changed on an existing port")
        expected = _if_match(request)

        async def write(txn: TopologyTransaction) -> Port:
            current = await txn.get(Port, port_id)
            visible_or_404(caller, current, "port", port_id)
            assert current is not None
            if current.device_kind is not DeviceKind.BRIDGE:
                raise not_found("port", port_id)
            if expected is not None and expected != txn.revision_of(Port, port_id):
                raise OpenStackError(
                    412,
                    "RevisionNumberConstraintFailed",
                    f"revision_number {expected} does not match the current "
                    f"{txn.revision_of(Port, port_id)}",
                )
            port_security = (
                current.port_security_enabled
                if spec.port_security_enabled is None
                else spec.port_security_enabled
            )
            if spec.security_groups is not None or spec.port_security_enabled is not None:
                wanted = (
                    spec.security_groups
                    if spec.security_groups is not None
                    else (list(current.security_group_ids) if port_security else [])
                )
                groups = await _port_groups(txn, caller, current.tenant_id, wanted, port_security)
            else:
                groups = current.security_group_ids
            updates: dict[str, Any] = {
                "port_security_enabled": port_security,
                "security_group_ids": groups,
                "external_ids": _port_ids(spec, current.external_ids),
            }
            if not port_security and spec.allowed_address_pairs is None:
                updates["allowed_address_pairs"] = ()
            if spec.allowed_address_pairs is not None:
                updates["allowed_address_pairs"] = _pairs(spec)
            if spec.fixed_ips is not None:
                if current.peer_id is not None:
                    raise bad_request("fixed_ips: a router interface's address is the router's")
                bridge = await txn.require(Bridge, current.device_id)
                updates["fixed_ips"] = await l3.requested_fixed_ips(txn, bridge, spec.fixed_ips)
                updates["addresses"] = ()  # the store mirrors the fixed IPs in again
            if spec.name is not None:
                updates["name"] = spec.name
            if spec.admin_state_up is not None:
                updates["admin_state_up"] = spec.admin_state_up
            port = Port.model_validate({**current.model_dump(), **updates})
            if spec.binding_host_id is not None or spec.binding_profile is not None:
                port = await _bind(txn, caller, port, spec)
            return await txn.update(port)

        port, revision = await ctx.transact(write, f"update port {port_id}")
        if revision is None:
            revision = (await (await ctx.repository()).get(Port, port_id)).mod_revision
        return JSONResponse({"port": await ctx.port_dict(port, revision)})

    @app.delete("/ports/{port_id}", status_code=204)
    async def delete_port(port_id: str, request: Request) -> Response:
        caller = await ctx.caller(request)

        async def write(txn: TopologyTransaction) -> None:
            port = await txn.get(Port, port_id)
            visible_or_404(caller, port, "port", port_id)
            assert port is not None
            if port.device_kind is not DeviceKind.BRIDGE:
                raise not_found("port", port_id)
            if port.peer_id is not None:
                raise conflict(
                    "PortInUse",
                    f"port {port_id} is a router interface: remove it with remove_router_interface",
                )
            if port.external_ids.get(tr.DEVICE_OWNER) == tr.DEVICE_OWNER_FLOATINGIP:
                raise conflict(
                    "PortInUse", f"port {port_id} holds a floating IP: delete the floating IP"
                )
            # Its floating IPs are disassociated (not left translating to a freed address).
            for _kind, fip_id in await txn.referrers("port", port_id, "floating_ip"):
                await txn.delete(FloatingIp, fip_id)
            await txn.delete(Port, port_id, cascade=True)

        await ctx.transact(write, f"delete port {port_id}")
        return Response(status_code=204)

    # ---- routers

    @app.post("/routers", status_code=201)
    async def create_router(request: Request, body: RouterRequest = Body(...)) -> JSONResponse:  # type: ignore[valid-type]
        caller = await ctx.caller(request)
        spec: tr.RouterBody = body.router  # type: ignore[attr-defined]
        router = Router(
            name=spec.name or "",
            tenant_id=caller.owner_for(_owner(spec)),
            admin_state_up=True if spec.admin_state_up is None else spec.admin_state_up,
            external_ids=spec.described({}),
        )

        async def write(txn: TopologyTransaction) -> Router:
            created = await txn.create(router)
            if spec.external_gateway_info is not None:
                created = await l3.set_gateway(txn, caller, created, spec.external_gateway_info)
            return created

        created, revision = await ctx.transact(write, "create router")
        return JSONResponse({"router": await ctx.router_dict(created, revision)}, status_code=201)

    @app.get("/routers")
    async def list_routers(request: Request) -> JSONResponse:
        caller = await ctx.caller(request)
        query = parse_list_query(request, tr.ROUTER_ATTRIBUTES)
        snapshot = await scan(await ctx.repository(), [Router, Port])
        items = [
            ctx.router_from_snapshot(snapshot, router)
            for router in snapshot.of(Router)
            if caller.sees(router)
        ]
        return JSONResponse(page_of(items, query, "routers", collection_url(request)))

    @app.get("/routers/{router_id}")
    async def show_router(router_id: str, request: Request) -> JSONResponse:
        caller = await ctx.caller(request)
        router, revision = await ctx.visible(caller, Router, router_id, "router")
        return JSONResponse(
            {"router": show_fields(request, await ctx.router_dict(router, revision))}
        )

    @app.put("/routers/{router_id}")
    async def update_router(
        router_id: str,
        request: Request,
        body: RouterRequest = Body(...),  # type: ignore[valid-type]
    ) -> JSONResponse:
        caller = await ctx.caller(request)
        spec: tr.RouterBody = body.router  # type: ignore[attr-defined]
        _no_owner_change(spec)
        expected = _if_match(request)

        async def write(txn: TopologyTransaction) -> Router:
            current = await txn.get(Router, router_id)
            visible_or_404(caller, current, "router", router_id)
            assert current is not None
            if expected is not None and expected != txn.revision_of(Router, router_id):
                raise OpenStackError(
                    412, "RevisionNumberConstraintFailed", f"revision_number {expected} is stale"
                )
            updates: dict[str, Any] = {"external_ids": spec.described(current.external_ids)}
            if spec.name is not None:
                updates["name"] = spec.name
            if spec.admin_state_up is not None:
                updates["admin_state_up"] = spec.admin_state_up
            router = await txn.update(Router.model_validate({**current.model_dump(), **updates}))
            if "external_gateway_info" in spec.model_fields_set:
                router = await l3.set_gateway(txn, caller, router, spec.external_gateway_info)
            return router

        router, _revision = await ctx.transact(write, f"update router {router_id}")
        stored = await (await ctx.repository()).get(Router, router.id)
        return JSONResponse({"router": await ctx.router_dict(stored.obj, stored.mod_revision)})

    @app.delete("/routers/{router_id}", status_code=204)
    async def delete_router(router_id: str, request: Request) -> Response:
        caller = await ctx.caller(request)

        async def write(txn: TopologyTransaction) -> None:
            router = await txn.get(Router, router_id)
            visible_or_404(caller, router, "router", router_id)
            assert router is not None
            for port in await l3.interface_ports(txn, router):
                raise conflict(
                    "RouterInUse",
                    f"router {router_id} still has an interface (port {port.peer_id}); "
                    "remove its interfaces first",
                )
            router = await l3.clear_gateway(txn, router)
            await txn.delete(Router, router_id, cascade=True)

        await ctx.transact(write, f"delete router {router_id}")
        return Response(status_code=204)

    # ---- subnets

    @app.post("/subnets", status_code=201)
    async def create_subnet(request: Request, body: SubnetRequest = Body(...)) -> JSONResponse:  # type: ignore[valid-type]
        caller = await ctx.caller(request)
        spec: tr.SubnetBody = body.subnet  # type: ignore[attr-defined]
        if not spec.network_id or not spec.cidr:
            raise bad_request("network_id and cidr: required to create a subnet")
        network_id = spec.network_id
        fields = spec.native_fields()
        import ipaddress

        try:
            version = ipaddress.ip_network(spec.cidr, strict=False).version
        except ValueError:
            raise bad_request(f"cidr={spec.cidr!r}: not an IP network") from None
        if spec.ip_version is not None and spec.ip_version != version:
            raise bad_request(f"ip_version={spec.ip_version}: cidr {spec.cidr} is IPv{version}")

        async def write(txn: TopologyTransaction) -> Subnet:
            bridge = await txn.get(Bridge, network_id)
            owned_or_error(
                caller,
                bridge,
                "network",
                network_id,
                bool(bridge and tr.network_visible(caller, bridge)),
            )
            assert bridge is not None
            owner = caller.owner_for(_owner(spec))
            subnet = Subnet.model_validate(
                {
                    **fields,
                    "tenant_id": owner,
                    "bridge_id": network_id,
                    "external_ids": spec.described({}),
                }
            )
            return await txn.create(subnet)

        subnet, revision = await ctx.transact(write, "create subnet")
        return JSONResponse({"subnet": tr.subnet_view(subnet, revision)}, status_code=201)

    @app.get("/subnets")
    async def list_subnets(request: Request) -> JSONResponse:
        caller = await ctx.caller(request)
        query = parse_list_query(request, tr.SUBNET_ATTRIBUTES)
        snapshot = await scan(await ctx.repository(), [Subnet, Bridge])
        readable = {b.id for b in snapshot.of(Bridge) if tr.network_visible(caller, b)}
        items = [
            tr.subnet_view(subnet, snapshot.revisions[subnet.id])
            for subnet in snapshot.of(Subnet)
            if caller.sees(subnet) or subnet.bridge_id in readable
        ]
        return JSONResponse(page_of(items, query, "subnets", collection_url(request)))

    @app.get("/subnets/{subnet_id}")
    async def show_subnet(subnet_id: str, request: Request) -> JSONResponse:
        caller = await ctx.caller(request)
        repository = await ctx.repository()

        stored = await repository.get(Subnet, subnet_id)
        if not caller.sees(stored.obj) and not await ctx.subnet_readable(caller, stored.obj):
            raise not_found("subnet", subnet_id)
        subnet, revision = stored.obj, stored.mod_revision
        return JSONResponse({"subnet": show_fields(request, tr.subnet_view(subnet, revision))})

    @app.put("/subnets/{subnet_id}")
    async def update_subnet(
        subnet_id: str,
        request: Request,
        body: SubnetRequest = Body(...),  # type: ignore[valid-type]
    ) -> JSONResponse:
        caller = await ctx.caller(request)
        spec: tr.SubnetBody = body.subnet  # type: ignore[attr-defined]
        _no_owner_change(spec)
        for field in ("network_id", "cidr", "ip_version"):
            if getattr(spec, field) is not None:
                raise bad_request(f"{field}: cannot be changed on an existing subnet")

        def change(current: Subnet) -> Subnet:
            fields = {
                **current.model_dump(),
                **spec.native_fields(),
                "external_ids": spec.described(current.external_ids),
            }
            return Subnet.model_validate(fields)

        repository = await ctx.repository()
        readable = await ctx.subnet_id_readable(caller, subnet_id)
        stored = await repository.modify(
            Subnet,
            subnet_id,
            change,
            precondition=lambda current: owned_or_error(
                caller, current, "subnet", subnet_id, readable
            ),
            expected_revision=_if_match(request),
        )
        return JSONResponse({"subnet": tr.subnet_view(stored.obj, stored.mod_revision)})

    @app.delete("/subnets/{subnet_id}", status_code=204)
    async def delete_subnet(subnet_id: str, request: Request) -> Response:
        caller = await ctx.caller(request)

        readable = await ctx.subnet_id_readable(caller, subnet_id)

        async def write(txn: TopologyTransaction) -> None:
            owned_or_error(caller, await txn.get(Subnet, subnet_id), "subnet", subnet_id, readable)
            for kind, referrer_id in await txn.referrers("subnet", subnet_id, "port"):
                if kind == "port":
                    raise conflict(
                        "SubnetInUse",
                        f"Unable to complete operation on subnet {subnet_id}: one or more "
                        f"ports have an IP allocation from this subnet (port {referrer_id})",
                    )
            await txn.delete(Subnet, subnet_id)

        await ctx.transact(write, f"delete subnet {subnet_id}")
        return Response(status_code=204)

    # ---- router interfaces

    @app.put("/routers/{router_id}/add_router_interface")
    async def add_router_interface(
        router_id: str, request: Request, body: tr.InterfaceBody = Body(...)
    ) -> JSONResponse:
        caller = await ctx.caller(request)
        info, _ = await ctx.transact(
            lambda txn: l3.add_interface(txn, caller, router_id, body.subnet_id, body.port_id),
            f"add interface to router {router_id}",
        )
        return JSONResponse(info)

    @app.put("/routers/{router_id}/remove_router_interface")
    async def remove_router_interface(
        router_id: str, request: Request, body: tr.InterfaceBody = Body(...)
    ) -> JSONResponse:
        caller = await ctx.caller(request)
        info, _ = await ctx.transact(
            lambda txn: l3.remove_interface(txn, caller, router_id, body.subnet_id, body.port_id),
            f"remove interface from router {router_id}",
        )
        return JSONResponse(info)

    # ---- floating IPs

    async def floating_dict(fip_port: Port, revision: int) -> dict[str, Any]:
        native = await ctx.read(lambda txn: txn.get(FloatingIp, fip_port.id))
        return l3.floating_view(fip_port, native, revision)

    def is_floating_port(port: Port | None) -> bool:
        return port is not None and port.external_ids.get(tr.DEVICE_OWNER) == (
            tr.DEVICE_OWNER_FLOATINGIP
        )

    @app.post("/floatingips", status_code=201)
    async def create_floatingip(
        request: Request,
        body: FloatingIpRequest = Body(...),  # type: ignore[valid-type]
    ) -> JSONResponse:
        caller = await ctx.caller(request)
        spec: tr.FloatingIpBody = body.floatingip  # type: ignore[attr-defined]
        if not spec.floating_network_id:
            raise bad_request("floating_network_id: required")
        network_id = spec.floating_network_id
        owner = caller.owner_for(_owner(spec))

        async def write(txn: TopologyTransaction) -> Port:
            network = await txn.get(Bridge, network_id)
            if network is None or not tr.network_visible(caller, network):
                raise not_found("network", network_id)
            if not tr.is_external(network):
                raise bad_request(
                    f"floating_network_id={network_id!r}: not a router:external network"
                )
            entry = tr.FixedIpBody(subnet_id=spec.subnet_id, ip_address=spec.floating_ip_address)
            wanted = await l3.requested_fixed_ips(
                txn,
                network,
                [entry] if spec.subnet_id or spec.floating_ip_address else None,
            )
            wanted = tuple(f for f in wanted if f.ip_address is None or f.ip_address.version == 4)
            if not wanted:
                raise bad_request(f"floating_network_id={network_id!r}: no IPv4 subnet")
            fip_port = await txn.create(
                Port(
                    tenant_id=owner,
                    device_kind=DeviceKind.BRIDGE,
                    device_id=network_id,
                    fixed_ips=wanted[:1],
                    external_ids=tr.with_external_ids(
                        spec.described({}), {tr.DEVICE_OWNER: tr.DEVICE_OWNER_FLOATINGIP}
                    ),
                )
            )
            fip_port = fip_port.model_copy(
                update={"external_ids": {**fip_port.external_ids, tr.DEVICE_ID: fip_port.id}}
            )
            fip_port = await txn.update(fip_port)
            if spec.port_id:
                await l3.associate(
                    txn, caller, fip_port.id, fip_port, spec.port_id, spec.fixed_ip_address
                )
            return fip_port

        fip_port, revision = await ctx.transact(write, "create floating IP")
        return JSONResponse(
            {"floatingip": await floating_dict(fip_port, revision)}, status_code=201
        )

    @app.get("/floatingips")
    async def list_floatingips(request: Request) -> JSONResponse:
        caller = await ctx.caller(request)
        query = parse_list_query(request, l3.FLOATING_ATTRIBUTES)
        snapshot = await scan(await ctx.repository(), [Port, FloatingIp])
        items = [
            l3.floating_view(port, snapshot.get(FloatingIp, port.id), snapshot.revisions[port.id])
            for port in snapshot.of(Port)
            if is_floating_port(port) and caller.sees(port)
        ]
        return JSONResponse(page_of(items, query, "floatingips", collection_url(request)))

    async def floating_port(caller: Caller, fip_id: str) -> tuple[Port, int]:
        port, revision = await ctx.visible(caller, Port, fip_id, "floatingip")
        if not is_floating_port(port):
            raise not_found("floatingip", fip_id)
        return port, revision

    @app.get("/floatingips/{fip_id}")
    async def show_floatingip(fip_id: str, request: Request) -> JSONResponse:
        caller = await ctx.caller(request)
        port, revision = await floating_port(caller, fip_id)
        return JSONResponse(
            {"floatingip": show_fields(request, await floating_dict(port, revision))}
        )

    @app.put("/floatingips/{fip_id}")
    async def update_floatingip(
        fip_id: str,
        request: Request,
        body: FloatingIpRequest = Body(...),  # type: ignore[valid-type]
    ) -> JSONResponse:
        caller = await ctx.caller(request)
        spec: tr.FloatingIpBody = body.floatingip  # type: ignore[attr-defined]
        _no_owner_change(spec)
        for field in ("floating_network_id", "floating_ip_address", "subnet_id"):
            if getattr(spec, field) is not None:
                raise bad_request(f"{field}: cannot be changed on an existing floating IP")

        async def write(txn: TopologyTransaction) -> Port:
            fip_port = await txn.get(Port, fip_id)
            visible_or_404(caller, fip_port, "floatingip", fip_id)
            assert fip_port is not None
            if not is_floating_port(fip_port):
                raise not_found("floatingip", fip_id)
            if spec.description is not None or spec.tags is not None:
                fip_port = await txn.update(
                    fip_port.model_copy(
                        update={"external_ids": spec.described(fip_port.external_ids)}
                    )
                )
            if "port_id" in spec.model_fields_set:
                await l3.associate(
                    txn, caller, fip_id, fip_port, spec.port_id, spec.fixed_ip_address
                )
            return fip_port

        await ctx.transact(write, f"update floating IP {fip_id}")
        port, revision = await floating_port(caller, fip_id)
        return JSONResponse({"floatingip": await floating_dict(port, revision)})

    @app.delete("/floatingips/{fip_id}", status_code=204)
    async def delete_floatingip(fip_id: str, request: Request) -> Response:
        caller = await ctx.caller(request)

        async def write(txn: TopologyTransaction) -> None:
            fip_port = await txn.get(Port, fip_id)
            visible_or_404(caller, fip_port, "floatingip", fip_id)
            if not is_floating_port(fip_port):
                raise not_found("floatingip", fip_id)
            if await txn.get(FloatingIp, fip_id) is not None:
                await txn.delete(FloatingIp, fip_id)
            await txn.delete(Port, fip_id, cascade=True)

        await ctx.transact(write, f"delete floating IP {fip_id}")
        return Response(status_code=204)

    # ---- security groups

    @app.post("/security-groups", status_code=201)
    async def create_security_group(
        request: Request,
        body: SecurityGroupRequest = Body(...),  # type: ignore[valid-type]
    ) -> JSONResponse:
        caller = await ctx.caller(request)
        spec: tr.SecurityGroupBody = body.security_group  # type: ignore[attr-defined]
        owner = caller.owner_for(_owner(spec))
        if spec.name == tr.DEFAULT_SG_NAME:
            raise conflict("SecurityGroupDefaultAlreadyExists", "the name 'default' is reserved")
        group_ids = spec.described({})
        group_ids.pop(tr.DESCRIPTION, None)  # a security group has a native description
        group = SecurityGroup(
            name=spec.name or "",
            tenant_id=owner,
            description=spec.description or "",
            external_ids=group_ids,
        )
        egress = [
            SecurityGroupRule(
                tenant_id=owner,
                security_group_id=group.id,
                direction=tr.Direction.EGRESS,
                ethertype=ethertype,
            )
            for ethertype in (tr.EtherType.IPV4, tr.EtherType.IPV6)
        ]

        async def write(txn: TopologyTransaction) -> SecurityGroup:
            await ensure_default_security_group(txn, owner)
            created = await txn.create(group)
            for rule in egress:
                await txn.create(rule)
            return created

        created, revision = await ctx.transact(write, "create security group")
        return JSONResponse(
            {"security_group": await ctx.security_group_dict(created, revision)}, status_code=201
        )

    @app.get("/security-groups")
    async def list_security_groups(request: Request) -> JSONResponse:
        caller = await ctx.caller(request)
        query = parse_list_query(request, tr.SECURITY_GROUP_ATTRIBUTES)
        await ctx.transact(
            lambda txn: ensure_default_security_group(txn, caller.project_id),
            "default security group",
        )
        snapshot = await scan(await ctx.repository(), [SecurityGroup, SecurityGroupRule])
        rules: dict[str, list[dict[str, Any]]] = {}
        for rule in snapshot.of(SecurityGroupRule):
            rules.setdefault(rule.security_group_id, []).append(
                tr.rule_view(rule, snapshot.revisions[rule.id])
            )
        items = [
            tr.security_group_view(group, snapshot.revisions[group.id], rules.get(group.id, []))
            for group in snapshot.of(SecurityGroup)
            if caller.sees(group)
        ]
        return JSONResponse(page_of(items, query, "security_groups", collection_url(request)))

    @app.get("/security-groups/{group_id}")
    async def show_security_group(group_id: str, request: Request) -> JSONResponse:
        caller = await ctx.caller(request)
        group, revision = await ctx.visible(caller, SecurityGroup, group_id, "security_group")
        view = await ctx.security_group_dict(group, revision)
        return JSONResponse({"security_group": show_fields(request, view)})

    @app.put("/security-groups/{group_id}")
    async def update_security_group(
        group_id: str,
        request: Request,
        body: SecurityGroupRequest = Body(...),  # type: ignore[valid-type]
    ) -> JSONResponse:
        caller = await ctx.caller(request)
        spec: tr.SecurityGroupBody = body.security_group  # type: ignore[attr-defined]
        _no_owner_change(spec)

        def change(current: SecurityGroup) -> SecurityGroup:
            if current.name == tr.DEFAULT_SG_NAME and spec.name not in (None, tr.DEFAULT_SG_NAME):
                raise bad_request("the default security group cannot be renamed")
            updates: dict[str, Any] = {}
            if spec.name is not None:
                updates["name"] = spec.name
            if spec.description is not None:
                updates["description"] = spec.description
            if spec.tags is not None:
                updates["external_ids"] = spec.described(current.external_ids)
            return SecurityGroup.model_validate({**current.model_dump(), **updates})

        stored = await (await ctx.repository()).modify(
            SecurityGroup,
            group_id,
            change,
            precondition=lambda current: visible_or_404(
                caller, current, "security_group", group_id
            ),
            expected_revision=_if_match(request),
        )
        view = await ctx.security_group_dict(stored.obj, stored.mod_revision)
        return JSONResponse({"security_group": view})

    @app.delete("/security-groups/{group_id}", status_code=204)
    async def delete_security_group(group_id: str, request: Request) -> Response:
        caller = await ctx.caller(request)

        async def write(txn: TopologyTransaction) -> None:
            group = await txn.get(SecurityGroup, group_id)
            visible_or_404(caller, group, "security_group", group_id)
            assert group is not None
            if group.id == tr.default_security_group_id(group.tenant_id):
                raise conflict(
                    "SecurityGroupCannotRemoveDefault",
                    "Removing default security group not allowed",
                )
            for kind, referrer_id in await txn.referrers("security_group", group_id):
                if kind == "port":
                    raise conflict(
                        "SecurityGroupInUse",
                        f"security group {group_id} is in use by port {referrer_id}",
                    )
            await txn.delete(SecurityGroup, group_id, cascade=True)

        await ctx.transact(write, f"delete security group {group_id}")
        return Response(status_code=204)

    # ---- security group rules

    @app.post("/security-group-rules", status_code=201)
    async def create_rule(request: Request, body: RuleRequest = Body(...)) -> JSONResponse:  # type: ignore[valid-type]
        caller = await ctx.caller(request)
        spec: tr.SecurityGroupRuleBody = body.security_group_rule  # type: ignore[attr-defined]
        if not spec.security_group_id:
            raise bad_request("security_group_id: required")
        if spec.direction is None:
            raise bad_request("direction: required, 'ingress' or 'egress'")
        group_id = spec.security_group_id
        try:
            protocol = spec.protocol_number()
        except ValueError as exc:
            raise bad_request(str(exc)) from None
        external_ids = spec.described({})
        if spec.protocol not in (None, ""):
            external_ids[tr.PROTOCOL] = str(spec.protocol)
        remote_prefix = spec.remote_ip_prefix
        if remote_prefix is not None:
            import ipaddress

            try:
                network = ipaddress.ip_network(remote_prefix, strict=False)
            except ValueError:
                raise bad_request(f"remote_ip_prefix={remote_prefix!r}: not an IP prefix") from None
            remote_prefix = str(network)

        async def write(txn: TopologyTransaction) -> SecurityGroupRule:
            group = await txn.get(SecurityGroup, group_id)
            visible_or_404(caller, group, "security_group", group_id)
            assert group is not None
            if spec.remote_group_id is not None:
                remote = await txn.get(SecurityGroup, spec.remote_group_id)
                visible_or_404(caller, remote, "security_group", spec.remote_group_id)
            rule = SecurityGroupRule.model_validate(
                {
                    "tenant_id": group.tenant_id,
                    "security_group_id": group_id,
                    "direction": spec.direction,
                    "ethertype": spec.ethertype,
                    "protocol": protocol,
                    "port_range_min": spec.port_range_min,
                    "port_range_max": spec.port_range_max,
                    "remote_ip_prefix": remote_prefix,
                    "remote_group_id": spec.remote_group_id,
                    "external_ids": external_ids,
                }
            )
            key = tr.rule_key(rule)
            for kind, referrer_id in await txn.referrers(
                "security_group", group_id, "security_group_rule"
            ):
                if kind != "security_group_rule":
                    continue
                existing = await txn.get(SecurityGroupRule, referrer_id)
                if existing is not None and tr.rule_key(existing) == key:
                    raise conflict(
                        "SecurityGroupRuleExists",
                        f"Security group rule already exists. Rule id is {existing.id}.",
                    )
            return await txn.create(rule)

        rule, revision = await ctx.transact(write, "create security group rule")
        return JSONResponse({"security_group_rule": tr.rule_view(rule, revision)}, status_code=201)

    @app.get("/security-group-rules")
    async def list_rules(request: Request) -> JSONResponse:
        caller = await ctx.caller(request)
        query = parse_list_query(request, tr.RULE_ATTRIBUTES)
        snapshot = await scan(await ctx.repository(), [SecurityGroupRule])
        items = [
            tr.rule_view(rule, snapshot.revisions[rule.id])
            for rule in snapshot.of(SecurityGroupRule)
            if caller.sees(rule)
        ]
        return JSONResponse(page_of(items, query, "security_group_rules", collection_url(request)))

    @app.get("/security-group-rules/{rule_id}")
    async def show_rule(rule_id: str, request: Request) -> JSONResponse:
        caller = await ctx.caller(request)
        rule, revision = await ctx.visible(
            caller, SecurityGroupRule, rule_id, "security_group_rule"
        )
        return JSONResponse(
            {"security_group_rule": show_fields(request, tr.rule_view(rule, revision))}
        )

    @app.delete("/security-group-rules/{rule_id}", status_code=204)
    async def delete_rule(rule_id: str, request: Request) -> Response:
        caller = await ctx.caller(request)

        async def write(txn: TopologyTransaction) -> None:
            rule = await txn.get(SecurityGroupRule, rule_id)
            visible_or_404(caller, rule, "security_group_rule", rule_id)
            await txn.delete(SecurityGroupRule, rule_id)

        await ctx.transact(write, f"delete security group rule {rule_id}")
        return Response(status_code=204)

    # ---- tags (standard-attr-tag)

    tagged: dict[str, tuple[type[TopologyObject], str]] = {
        "networks": (Bridge, "network"),
        "ports": (Port, "port"),
        "routers": (Router, "router"),
        "security-groups": (SecurityGroup, "security_group"),
        "subnets": (Subnet, "subnet"),
        "floatingips": (Port, "floatingip"),
    }

    async def change_tags(
        request: Request, collection: str, object_id: str, edit: Callable[[list[str]], list[str]]
    ) -> list[str]:
        if collection not in tagged:
            raise OpenStackError(404, "HTTPNotFound", f"{collection} have no tags")
        caller = await ctx.caller(request)
        cls, resource = tagged[collection]

        def change(current: Any) -> Any:
            tags = edit(tr._tags(current))
            if len(tags) > 50 or any(not 1 <= len(t) <= 60 for t in tags):
                raise bad_request(f"tags={tags!r}: at most 50 tags of 1-60 characters")
            ids = tr.with_external_ids(
                current.external_ids, {tr.TAGS: tr.tags_text(tags) if tags else None}
            )
            return type(current).model_validate({**current.model_dump(), "external_ids": ids})

        stored = await (await ctx.repository()).modify(
            cls,
            object_id,
            change,
            precondition=lambda current: visible_or_404(caller, current, resource, object_id),
        )
        return tr._tags(stored.obj)

    @app.put("/{collection}/{object_id}/tags")
    async def replace_tags(
        collection: str, object_id: str, request: Request, body: TagsRequest = Body(...)
    ) -> JSONResponse:
        tags = await change_tags(request, collection, object_id, lambda _old: list(body.tags))
        return JSONResponse({"tags": tags})

    @app.delete("/{collection}/{object_id}/tags", status_code=204)
    async def delete_tags(collection: str, object_id: str, request: Request) -> Response:
        await change_tags(request, collection, object_id, lambda _old: [])
        return Response(status_code=204)

    @app.get("/{collection}/{object_id}/tags")
    async def get_tags(collection: str, object_id: str, request: Request) -> JSONResponse:
        tags = await change_tags(request, collection, object_id, lambda old: old)
        return JSONResponse({"tags": tags})

    @app.put("/{collection}/{object_id}/tags/{tag}", status_code=201)
    async def add_tag(collection: str, object_id: str, tag: str, request: Request) -> Response:
        await change_tags(request, collection, object_id, lambda old: [*old, tag])
        return Response(status_code=201)

    @app.delete("/{collection}/{object_id}/tags/{tag}", status_code=204)
    async def remove_tag(collection: str, object_id: str, tag: str, request: Request) -> Response:
        def drop(old: list[str]) -> list[str]:
            if tag not in old:
                raise OpenStackError(404, "TagNotFound", f"tag {tag!r} could not be found")
            return [t for t in old if t != tag]

        await change_tags(request, collection, object_id, drop)
        return Response(status_code=204)

    return app


def version_entry(root_url: str) -> dict[str, Any]:
    return {
        "id": "v2.0",
        "status": "CURRENT",
        "min_version": "",
        "max_version": "",
        "updated": "2024-01-01T00:00:00Z",
        "links": [{"href": root_url.rstrip("/") + "/v2.0/", "rel": "self"}],
    }


def _extension(extension: dict[str, str]) -> dict[str, Any]:
    return {
        "alias": extension["alias"],
        "name": extension["name"],
        "description": extension["name"],
        "updated": "2024-01-01T00:00:00-00:00",
        "links": [],
    }


def _owner(spec: tr._Body) -> str | None:
    try:
        return spec.owner()
    except ValueError as exc:
        raise bad_request(str(exc)) from None


def _no_owner_change(spec: tr._Body) -> None:
    if spec.tenant_id is not None or spec.project_id is not None:
        raise bad_request("tenant_id/project_id: cannot be changed")


def _if_match(request: Request) -> int | None:
    """`If-Match: revision_number=N` (Neutron's compare-and-swap)."""
    header = request.headers.get("if-match")
    if header is None:
        return None
    text = header.strip()
    if not text.startswith("revision_number="):
        raise bad_request(f"If-Match={header!r}: expected 'revision_number=<n>'")
    number = text.removeprefix("revision_number=")
    if not number.isdigit() or not number.isascii():
        raise bad_request(f"If-Match={header!r}: revision_number is not a number")
    return int(number)


def _check_network_infrastructure(
    caller: Caller, spec: tr.NetworkBody, current: Bridge | None
) -> None:
    """`shared` and `router:external` open a network to every project: cluster admin only
    (403 naming the attribute when a project token sets or changes one)."""
    shared = False if current is None else current.shared
    external = False if current is None else tr.is_external(current)
    if spec.shared is not None and spec.shared != shared:
        caller.require_infrastructure("shared", spec.shared)
    if spec.router_external is not None and spec.router_external != external:
        caller.require_infrastructure("router:external", spec.router_external)


def _network_ids(spec: tr.NetworkBody, current: dict[str, str]) -> dict[str, str]:
    updates: dict[str, str | None] = {}
    if spec.router_external is not None:
        updates[tr.EXTERNAL] = "true" if spec.router_external else None
    if spec.port_security_enabled is not None:
        updates[tr.PORT_SECURITY] = None if spec.port_security_enabled else "false"
    return tr.with_external_ids(spec.described(current), updates)


def _fixed_ip_filters(values: list[str]) -> list[tuple[str, str]]:
    """`fixed_ips=ip_address=10.0.0.5` / `fixed_ips=subnet_id=...` as (key, value) pairs."""
    pairs = []
    for value in values:
        key, sep, wanted = value.partition("=")
        if not sep or key not in ("ip_address", "subnet_id", "ip_address_substr"):
            raise bad_request(
                f"fixed_ips={value!r}: expected ip_address=<address> or subnet_id=<id>"
            )
        pairs.append((key, wanted))
    return pairs


def _port_ids(spec: tr.PortBody, current: dict[str, str]) -> dict[str, str]:
    updates: dict[str, str | None] = {}
    if spec.device_id is not None:
        updates[tr.DEVICE_ID] = spec.device_id or None
    if spec.device_owner is not None:
        updates[tr.DEVICE_OWNER] = spec.device_owner or None
    if spec.binding_profile is not None:
        updates[tr.BINDING_PROFILE] = (
            json.dumps(spec.binding_profile) if spec.binding_profile else None
        )
    return tr.with_external_ids(spec.described(current), updates)


def _pairs(spec: tr.PortBody) -> tuple[Any, ...]:
    if not spec.allowed_address_pairs:
        return ()
    try:
        return tr.address_pairs(spec.allowed_address_pairs)
    except ValueError as exc:
        raise bad_request(str(exc)) from None


async def _port_groups(
    txn: TopologyTransaction,
    caller: Caller,
    owner: str,
    requested: list[str] | None,
    port_security: bool,
) -> tuple[str, ...]:
    if requested is None:
        if not port_security:
            return ()
        return (await ensure_default_security_group(txn, owner),)
    if requested and not port_security:
        raise conflict(
            "PortSecurityAndIPRequiredForSecurityGroups",
            "security_groups need port_security_enabled=true on the port",
        )
    groups: list[str] = []
    for group_id in requested:
        if group_id == tr.default_security_group_id(owner):
            await ensure_default_security_group(txn, owner)
        group = await txn.get(SecurityGroup, group_id)
        visible_or_404(caller, group, "security_group", group_id)
        if group_id not in groups:
            groups.append(group_id)
    return tuple(groups)


async def _bind(txn: TopologyTransaction, caller: Caller, port: Port, spec: tr.PortBody) -> Port:
    """Bind as Nova does: binding:host_id names the host, the interface is Nova's tap name
    unless binding:profile names one; an empty host_id unbinds. A host binding is the
    cluster admin's (as on /v1, and as Neutron's default policy has it)."""
    if spec.binding_host_id is not None:
        caller.require_infrastructure("binding:host_id", spec.binding_host_id)
    if spec.binding_profile is not None:
        caller.require_infrastructure("binding:profile", spec.binding_profile)
    host_id = spec.binding_host_id if spec.binding_host_id is not None else port.host_id
    if not host_id:
        return port.model_copy(update={"host_id": None, "interface_name": None})
    if port.peer_id is not None:
        raise bad_request("binding:host_id: a router interface port cannot be bound")
    host = await txn.get(Host, host_id)
    if host is None:
        raise bad_request(
            f"binding:host_id={host_id!r}: no HiveNet host with that id (is its agent running?)"
        )
    profile = json.loads(port.external_ids.get(tr.BINDING_PROFILE, "{}"))
    interface = tr.binding_interface(port.id, profile)
    return Port.model_validate(
        {**port.model_dump(), "host_id": host_id, "interface_name": interface}
    )
