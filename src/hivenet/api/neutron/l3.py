"""Neutron's subnets, router interfaces, router gateways (with SNAT) and floating IPs in native
terms, each operation inside the caller's one `TopologyTransaction`.

Owns the mapping:
- subnet <-> `Subnet` on the network's bridge; a port's fixed_ips are the native port's;
- router interface = a router port holding the subnet's gateway address (as its fixed IP)
  linked to a bridge port on the subnet's network (that bridge port is the Neutron port,
  device_owner network:router_interface);
- router gateway = the same pair on an external network (device_owner network:router_gateway)
  named in the router's `external_ids`, a default route via the external subnet's gateway,
  and with enable_snat the router's SNAT chains: reverse SNAT inbound, one SNAT rule per
  interface subnet leaving through the gateway port (`sync_snat` keeps them in step);
- floating IP = a port on the external network holding the floating address (its fixed IP,
  device_owner network:floatingip) whose id is the floating IP's id, plus, while associated,
  a native `FloatingIp` with that same id on the router that joins the external network and
  the fixed port's network.
Must not do HTTP: `routes.py` calls these and renders the results.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from hivenet.api.neutron import translate as tr
from hivenet.api.neutron.common import (
    Caller,
    OpenStackError,
    bad_request,
    conflict,
    not_found,
    visible_or_404,
)
from hivenet.model import (
    Bridge,
    Chain,
    DeviceKind,
    FloatingIp,
    NatTarget,
    Port,
    Route,
    Router,
    Rule,
    RuleAction,
)
from hivenet.model.subnet import Subnet
from hivenet.model.types import FixedIp
from hivenet.store.topology import TopologyTransaction

GATEWAY_PORT = "neutron:gw_port_id"
ENABLE_SNAT = "neutron:enable_snat"
SNAT_PORT_FIRST = 1024
SNAT_PORT_LAST = 65535
SNAT_POSITION = 10
DEFAULT_V4 = ipaddress.IPv4Network("0.0.0.0/0")


def is_gateway_port(router: Router, port: Port) -> bool:
    return router.external_ids.get(GATEWAY_PORT) == port.id


def nat_chain_ids(router_id: str) -> tuple[str, str]:
    return tr.derived_id("nat-in", router_id), tr.derived_id("nat-out", router_id)


async def router_ports(txn: TopologyTransaction, router_id: str) -> list[Port]:
    ports = []
    for kind, port_id in await txn.referrers("router", router_id, "port"):
        if kind == "port":
            port = await txn.get(Port, port_id)
            if port is not None and port.device_kind is DeviceKind.ROUTER:
                ports.append(port)
    return ports


async def interface_ports(txn: TopologyTransaction, router: Router) -> list[Port]:
    """The router's interface ports (not its gateway port)."""
    gateway = router.external_ids.get(GATEWAY_PORT)
    return [p for p in await router_ports(txn, router.id) if p.id != gateway and p.fixed_ips]


# --------------------------------------------------------------------------------------------
# fixed IPs


async def requested_fixed_ips(
    txn: TopologyTransaction,
    bridge: Bridge,
    entries: Sequence[tr.FixedIpBody] | None,
) -> tuple[FixedIp, ...]:
    """The native fixed IPs a Neutron request asks for: entries by subnet and/or address (an
    address alone finds its subnet on the network); none given: one address from the first
    subnet of each IP version that has pools."""
    subnets = await network_subnets(txn, bridge.id)
    if entries is None:
        chosen: dict[int, Subnet] = {}
        for subnet in sorted(subnets, key=lambda s: (s.cidr.version, str(s.cidr))):
            if subnet.allocation_pools and subnet.cidr.version not in chosen:
                chosen[subnet.cidr.version] = subnet
        return tuple(FixedIp(subnet_id=s.id) for s in chosen.values())
    out: list[FixedIp] = []
    for entry in entries:
        address = None
        if entry.ip_address is not None:
            try:
                address = ipaddress.ip_address(entry.ip_address)
            except ValueError:
                raise bad_request(
                    f"fixed_ips ip_address={entry.ip_address!r}: not an IP address"
                ) from None
        if entry.subnet_id is not None:
            if entry.subnet_id not in {s.id for s in subnets}:
                raise bad_request(
                    f"fixed_ips subnet_id={entry.subnet_id!r}: no such subnet on network "
                    f"{bridge.id}"
                )
            out.append(FixedIp(subnet_id=entry.subnet_id, ip_address=address))
            continue
        if address is None:
            raise bad_request("fixed_ips: each entry needs subnet_id or ip_address")
        holder = next((s for s in subnets if address in s.cidr), None)
        if holder is None:
            raise bad_request(
                f"fixed_ips ip_address={address}: on no subnet of network {bridge.id}"
            )
        out.append(FixedIp(subnet_id=holder.id, ip_address=address))
    return tuple(out)


async def network_subnets(txn: TopologyTransaction, bridge_id: str) -> list[Subnet]:
    found = []
    for kind, subnet_id in await txn.referrers("bridge", bridge_id, "subnet"):
        if kind == "subnet":
            subnet = await txn.get(Subnet, subnet_id)
            if subnet is not None:
                found.append(subnet)
    return found


def fixed_ips_view(port: Port) -> list[dict[str, str]]:
    return [{"subnet_id": f.subnet_id, "ip_address": str(f.ip_address)} for f in port.fixed_ips]


# --------------------------------------------------------------------------------------------
# router interfaces


async def add_interface(
    txn: TopologyTransaction,
    caller: Caller,
    router_id: str,
    subnet_id: str | None,
    port_id: str | None,
) -> dict[str, Any]:
    router = visible_or_404(caller, await txn.get(Router, router_id), "router", router_id)
    if (subnet_id is None) == (port_id is None):
        raise bad_request("add_router_interface: give exactly one of subnet_id and port_id")
    existing = await interface_ports(txn, router)
    if subnet_id is not None:
        subnet = visible_or_404(caller, await txn.get(Subnet, subnet_id), "subnet", subnet_id)
        if subnet.gateway_ip is None:
            raise bad_request(
                f"subnet_id={subnet_id!r}: the subnet has no gateway_ip for the router"
            )
        fixed: tuple[FixedIp, ...] = (FixedIp(subnet_id=subnet.id, ip_address=subnet.gateway_ip),)
        network_id = subnet.bridge_id
        bridge_port: Port | None = None
    else:
        assert port_id is not None
        bridge_port = visible_or_404(caller, await txn.get(Port, port_id), "port", port_id)
        if bridge_port.device_kind is not DeviceKind.BRIDGE:
            raise not_found("port", port_id)
        if bridge_port.peer_id is not None or bridge_port.host_id is not None:
            raise conflict("PortInUse", f"port {port_id} is in use (bound or linked)")
        if not bridge_port.fixed_ips:
            raise bad_request(f"port_id={port_id!r}: the port has no fixed IP for the router")
        fixed = bridge_port.fixed_ips
        network_id = bridge_port.device_id
    taken = {f.subnet_id for p in existing for f in p.fixed_ips}
    for entry in fixed:
        if entry.subnet_id in taken:
            raise OpenStackError(
                400,
                "BadRequest",
                f"router {router_id} already has an interface on subnet {entry.subnet_id}",
            )
    if bridge_port is not None:
        # The address moves from the Neutron port to the router port it is linked to.
        bridge_port = await txn.update(
            Port.model_validate(
                {
                    **bridge_port.model_dump(),
                    "fixed_ips": (),
                    "addresses": (),
                    "port_security_enabled": False,
                    "security_group_ids": (),
                    "allowed_address_pairs": (),
                }
            )
        )
    router_port = await txn.create(
        Port(
            tenant_id=router.tenant_id,
            name=f"{router.name or router.id}-interface",
            device_kind=DeviceKind.ROUTER,
            device_id=router.id,
            fixed_ips=fixed,
            peer_id=bridge_port.id if bridge_port is not None else None,
        )
    )
    if bridge_port is None:
        bridge_port = await txn.create(
            Port(
                tenant_id=router.tenant_id,
                device_kind=DeviceKind.BRIDGE,
                device_id=network_id,
                peer_id=router_port.id,
            )
        )
    await sync_snat(txn, router)
    return _interface_info(router, bridge_port, network_id, router_port.fixed_ips)


async def remove_interface(
    txn: TopologyTransaction,
    caller: Caller,
    router_id: str,
    subnet_id: str | None,
    port_id: str | None,
) -> dict[str, Any]:
    router = visible_or_404(caller, await txn.get(Router, router_id), "router", router_id)
    if subnet_id is None and port_id is None:
        raise bad_request("remove_router_interface: give subnet_id or port_id")
    for router_port in await interface_ports(txn, router):
        if router_port.peer_id is None:
            continue
        on_subnet = subnet_id is None or subnet_id in {f.subnet_id for f in router_port.fixed_ips}
        if not on_subnet or (port_id is not None and router_port.peer_id != port_id):
            continue
        bridge_port = await txn.get(Port, router_port.peer_id)
        network_id = bridge_port.device_id if bridge_port is not None else ""
        info = _interface_info(router, bridge_port, network_id, router_port.fixed_ips)
        await txn.delete(Port, router_port.id, cascade=True)
        if bridge_port is not None:
            await txn.delete(Port, bridge_port.id, cascade=True)
        await sync_snat(txn, router)
        return info
    what = f"subnet {subnet_id}" if subnet_id is not None else f"port {port_id}"
    raise OpenStackError(
        404, "RouterInterfaceNotFound", f"router {router_id} has no interface on {what}"
    )


def _interface_info(
    router: Router, bridge_port: Port | None, network_id: str, fixed: Sequence[FixedIp]
) -> dict[str, Any]:
    subnet_ids = [f.subnet_id for f in fixed]
    return {
        "id": router.id,
        "tenant_id": router.tenant_id,
        "project_id": router.tenant_id,
        "network_id": network_id,
        "port_id": bridge_port.id if bridge_port is not None else None,
        "subnet_id": subnet_ids[0] if subnet_ids else None,
        "subnet_ids": subnet_ids,
    }


# --------------------------------------------------------------------------------------------
# gateway and SNAT


async def gateway_info(txn: TopologyTransaction, router: Router) -> dict[str, Any] | None:
    port_id = router.external_ids.get(GATEWAY_PORT)
    if port_id is None:
        return None
    port = await txn.get(Port, port_id)
    if port is None or port.peer_id is None:
        return None
    peer = await txn.get(Port, port.peer_id)
    return gateway_view(router, port, peer)


def gateway_view(router: Router, port: Port, peer: Port | None) -> dict[str, Any]:
    return {
        "network_id": peer.device_id if peer is not None else None,
        "enable_snat": router.external_ids.get(ENABLE_SNAT, "true") == "true",
        "external_fixed_ips": fixed_ips_view(port),
    }


async def set_gateway(
    txn: TopologyTransaction, caller: Caller, router: Router, spec: tr.GatewayBody | None
) -> Router:
    """Replace the router's gateway by `spec` (None: remove it); returns the router. Set
    again on the same network without external_fixed_ips, it keeps its address."""
    previous = await gateway_info(txn, router)
    if (
        spec is not None
        and previous is not None
        and spec.network_id == previous["network_id"]
        and spec.external_fixed_ips is None
    ):
        spec = spec.model_copy(
            update={
                "external_fixed_ips": [
                    tr.FixedIpBody(**fixed) for fixed in previous["external_fixed_ips"]
                ]
            }
        )
    router = await clear_gateway(txn, router)
    if spec is None or spec.network_id is None:
        if spec is not None and spec.model_fields_set - {"network_id"}:
            raise bad_request("external_gateway_info: network_id is required")
        return router
    network = await txn.get(Bridge, spec.network_id)
    if network is None or not tr.network_visible(caller, network):
        raise not_found("network", spec.network_id)
    if not tr.is_external(network):
        raise bad_request(
            f"external_gateway_info network_id={spec.network_id!r}: not a router:external network"
        )
    wanted = await requested_fixed_ips(txn, network, spec.external_fixed_ips)
    wanted = tuple(f for f in wanted if _is_v4_subnet(f))
    if not wanted:
        raise bad_request(
            f"external_gateway_info: network {spec.network_id} has no IPv4 subnet to take an "
            "address from"
        )
    subnets = {s.id: s for s in await network_subnets(txn, network.id)}
    gateway_port = await txn.create(
        Port(
            tenant_id=router.tenant_id,
            name=f"{router.name or router.id}-gateway",
            device_kind=DeviceKind.ROUTER,
            device_id=router.id,
            fixed_ips=wanted[:1],
        )
    )
    await txn.create(
        Port(
            tenant_id=router.tenant_id,
            device_kind=DeviceKind.BRIDGE,
            device_id=network.id,
            peer_id=gateway_port.id,
        )
    )
    subnet = subnets[gateway_port.fixed_ips[0].subnet_id]
    if subnet.gateway_ip is not None:
        await txn.create(
            Route(
                id=tr.derived_id("default-route", router.id),
                tenant_id=router.tenant_id,
                router_id=router.id,
                dst_prefix=DEFAULT_V4,
                next_hop_port_id=gateway_port.id,
                next_hop_gateway=subnet.gateway_ip,
            )
        )
    ids = tr.with_external_ids(
        router.external_ids,
        {GATEWAY_PORT: gateway_port.id, ENABLE_SNAT: "true" if spec.enable_snat else "false"},
    )
    inbound, outbound = nat_chain_ids(router.id)
    updates: dict[str, Any] = {"external_ids": ids}
    if spec.enable_snat:
        for chain_id, field, label in (
            (inbound, "inbound_chain_id", "reverse SNAT"),
            (outbound, "outbound_chain_id", "SNAT"),
        ):
            current = getattr(router, field)
            if current not in (None, chain_id):
                raise conflict(
                    "RouterChainInUse",
                    f"router {router.id} already has {field}={current} (set natively); "
                    "enable_snat needs it",
                )
            if await txn.get(Chain, chain_id) is None:
                await txn.create(
                    Chain(id=chain_id, tenant_id=router.tenant_id, name=f"{router.id} {label}")
                )
            updates[field] = chain_id
        await txn.create(
            Rule(
                id=tr.derived_id("rev-snat", router.id),
                tenant_id=router.tenant_id,
                chain_id=inbound,
                position=SNAT_POSITION,
                action=RuleAction.REV_SNAT,
            )
        )
    router = await txn.update(Router.model_validate({**router.model_dump(), **updates}))
    await sync_snat(txn, router)
    return router


def _is_v4_subnet(fixed: FixedIp) -> bool:
    return fixed.ip_address is None or fixed.ip_address.version == 4


async def clear_gateway(txn: TopologyTransaction, router: Router) -> Router:
    port_id = router.external_ids.get(GATEWAY_PORT)
    for kind, referrer_id in await txn.referrers("router", router.id, "floating_ip"):
        if kind == "floating_ip" and port_id is not None:
            raise conflict(
                "RouterExternalGatewayInUseByFloatingIp",
                f"router {router.id}'s gateway is used by floating IP {referrer_id}",
            )
    if port_id is not None:
        port = await txn.get(Port, port_id)
        if port is not None:
            peer_id = port.peer_id
            await txn.delete(Port, port_id, cascade=True)  # its default route goes with it
            if peer_id is not None and await txn.get(Port, peer_id) is not None:
                await txn.delete(Port, peer_id, cascade=True)
    inbound, outbound = nat_chain_ids(router.id)
    updates: dict[str, Any] = {
        "external_ids": tr.with_external_ids(
            router.external_ids, {GATEWAY_PORT: None, ENABLE_SNAT: None}
        )
    }
    if router.inbound_chain_id == inbound:
        updates["inbound_chain_id"] = None
    if router.outbound_chain_id == outbound:
        updates["outbound_chain_id"] = None
    router = await txn.update(Router.model_validate({**router.model_dump(), **updates}))
    for chain_id in (inbound, outbound):
        if await txn.get(Chain, chain_id) is not None:
            await txn.delete(Chain, chain_id, cascade=True)
    return router


async def sync_snat(txn: TopologyTransaction, router: Router) -> None:
    """One SNAT rule per interface subnet while the router has a gateway with enable_snat;
    none otherwise."""
    _inbound, outbound = nat_chain_ids(router.id)
    if await txn.get(Chain, outbound) is None:
        return
    wanted: dict[str, Rule] = {}
    gateway_id = router.external_ids.get(GATEWAY_PORT)
    gateway = None if gateway_id is None else await txn.get(Port, gateway_id)
    if gateway is not None and router.external_ids.get(ENABLE_SNAT) == "true":
        address = gateway.fixed_ips[0].ip_address
        assert address is not None
        for port in await interface_ports(txn, router):
            for fixed in port.fixed_ips:
                subnet = await txn.get(Subnet, fixed.subnet_id)
                if subnet is None or subnet.cidr.version != address.version:
                    continue
                rule_id = tr.derived_id("snat", router.id, subnet.id)
                wanted[rule_id] = Rule(
                    id=rule_id,
                    tenant_id=router.tenant_id,
                    chain_id=outbound,
                    position=SNAT_POSITION,
                    action=RuleAction.SNAT,
                    nw_src=subnet.cidr,
                    out_port_ids=(gateway.id,),
                    nat_targets=(
                        NatTarget(
                            address_from=address,
                            address_to=address,
                            port_from=SNAT_PORT_FIRST,
                            port_to=SNAT_PORT_LAST,
                        ),
                    ),
                )
    for kind, rule_id in await txn.referrers("chain", outbound, "rule"):
        if kind == "rule" and rule_id not in wanted:
            await txn.delete(Rule, rule_id)
    for rule_id, rule in wanted.items():
        existing = await txn.get(Rule, rule_id)
        if existing is None:
            await txn.create(rule)
        elif existing != rule:
            await txn.update(rule)


# --------------------------------------------------------------------------------------------
# floating IPs


async def floating_router(txn: TopologyTransaction, external_network: str, port: Port) -> str:
    """The router with a gateway on `external_network` and an interface on `port`'s network."""
    subnets = {f.subnet_id for f in port.fixed_ips}
    for kind, candidate_id in await txn.referrers("bridge", port.device_id, "port"):
        if kind != "port":
            continue
        bridge_port = await txn.get(Port, candidate_id)
        if bridge_port is None or bridge_port.peer_id is None:
            continue
        router_port = await txn.get(Port, bridge_port.peer_id)
        if router_port is None or router_port.device_kind is not DeviceKind.ROUTER:
            continue
        if not subnets & {f.subnet_id for f in router_port.fixed_ips}:
            continue
        router = await txn.get(Router, router_port.device_id)
        if router is None:
            continue
        info = await gateway_info(txn, router)
        if info is not None and info["network_id"] == external_network:
            return router.id
    raise OpenStackError(
        404,
        "ExternalGatewayForFloatingIPNotFound",
        f"no router joins external network {external_network} and the network of port "
        f"{port.id}; add a router interface and gateway first",
    )


async def associate(
    txn: TopologyTransaction,
    caller: Caller,
    fip_id: str,
    fip_port: Port,
    port_id: str | None,
    fixed_address: str | None,
) -> FloatingIp | None:
    """Point the floating IP at `port_id` (None: disassociate); the native FloatingIp."""
    current = await txn.get(FloatingIp, fip_id)
    if port_id is None:
        if current is not None:
            await txn.delete(FloatingIp, fip_id)
        return None
    port = visible_or_404(caller, await txn.get(Port, port_id), "port", port_id)
    if not port.fixed_ips:
        raise bad_request(f"port_id={port_id!r}: the port has no fixed IP to map to")
    if fixed_address is None:
        fixed = next(
            (f.ip_address for f in port.fixed_ips if f.ip_address and f.ip_address.version == 4),
            None,
        )
        if fixed is None:
            raise bad_request(f"port_id={port_id!r}: the port has no IPv4 fixed IP")
    else:
        try:
            fixed = ipaddress.ip_address(fixed_address)
        except ValueError:
            raise bad_request(f"fixed_ip_address={fixed_address!r}: not an IP address") from None
        if fixed not in {f.ip_address for f in port.fixed_ips}:
            raise bad_request(f"fixed_ip_address={fixed}: not an address of port {port_id}")
    address = fip_port.fixed_ips[0].ip_address
    assert address is not None
    router_id = await floating_router(txn, fip_port.device_id, port)
    for kind, other_id in await txn.referrers("port", port_id, "floating_ip"):
        other = await txn.get(FloatingIp, other_id) if kind == "floating_ip" else None
        if other is not None and other.id != fip_id and other.fixed_ip_address == fixed:
            raise conflict(
                "FloatingIPPortAlreadyAssociated",
                f"fixed IP {fixed} of port {port_id} already has floating IP "
                f"{other.floating_ip_address}",
            )
    native = FloatingIp(
        id=fip_id,
        tenant_id=fip_port.tenant_id,
        floating_ip_address=address,
        router_id=router_id,
        port_id=port_id,
        fixed_ip_address=fixed,
    )
    if current is None:
        return await txn.create(native)
    return await txn.update(native)


def floating_view(fip_port: Port, native: FloatingIp | None, revision: int) -> dict[str, Any]:
    view = tr.common_fields(fip_port, revision)  # the floating IP's id is its port's
    view.update(
        {
            "floating_ip_address": str(fip_port.fixed_ips[0].ip_address)
            if fip_port.fixed_ips
            else None,
            "floating_network_id": fip_port.device_id,
            "router_id": native.router_id if native is not None else None,
            "port_id": native.port_id if native is not None else None,
            "fixed_ip_address": (
                str(native.fixed_ip_address)
                if native is not None and native.fixed_ip_address is not None
                else None
            ),
            "status": "ACTIVE" if native is not None and native.port_id else "DOWN",
        }
    )
    return view


FLOATING_ATTRIBUTES = frozenset(
    floating_view(Port(id="x", device_kind=DeviceKind.BRIDGE, device_id="x"), None, 0)
)
