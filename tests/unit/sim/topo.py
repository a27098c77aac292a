"""Test helpers: a terse builder for topologies (model objects) and frames, shared by the
simulation unit tests, the megaflow property test and the multi-host harness."""

from __future__ import annotations

import ipaddress
from typing import Any

from hivenet.model import (
    Bridge,
    Chain,
    DeviceKind,
    Port,
    Route,
    Router,
    RouteType,
    Rule,
    RuleAction,
    TopologyObject,
    TunnelZone,
    TunnelZoneMember,
)
from hivenet.model.types import int_to_mac, mac_to_int
from hivenet.packets import (
    build_arp_request,
    build_echo_request,
    build_tcp_segment,
    build_udp_datagram,
    extract_flow_match,
)
from hivenet.packets.flowmatch import FlowMatch
from hivenet.sim import MemoryTables, SimContext, SimulationResult, TopologyView, simulate


def mac(n: int) -> str:
    """A distinct locally administered unicast MAC per small int."""
    return int_to_mac((0x02 << 40) | n)


class Topo:
    """Collects model objects; `view()` compiles them."""

    def __init__(self) -> None:
        self.objects: list[TopologyObject] = []
        self.ports: dict[str, Port] = {}
        self._next_key = 1

    def add(self, obj: TopologyObject) -> Any:
        self.objects.append(obj)
        if isinstance(obj, Port):
            self.ports[obj.id] = obj
        return obj

    def key(self) -> int:
        self._next_key += 1
        return self._next_key

    def bridge(self, bridge_id: str, **kw: Any) -> Bridge:
        return self.add(Bridge(id=bridge_id, name=bridge_id, **kw))

    def router(self, router_id: str, **kw: Any) -> Router:
        return self.add(Router(id=router_id, name=router_id, **kw))

    def vm_port(
        self,
        bridge_id: str,
        port_id: str,
        host: str | None = "h1",
        *,
        mac_n: int = 0,
        addresses: tuple[str, ...] = (),
        **kw: Any,
    ) -> Port:
        return self.add(
            Port(
                id=port_id,
                name=port_id,
                device_kind=DeviceKind.BRIDGE,
                device_id=bridge_id,
                mac=mac(mac_n) if mac_n else mac(self._next_key + 1000),
                addresses=tuple(ipaddress.ip_interface(a) for a in addresses),
                host_id=host,
                interface_name=f"hn-{port_id}"[:15] if host else None,
                tunnel_key=self.key(),
                **kw,
            )
        )

    def router_port(self, router_id: str, port_id: str, *addresses: str, **kw: Any) -> Port:
        return self.add(
            Port(
                id=port_id,
                name=port_id,
                device_kind=DeviceKind.ROUTER,
                device_id=router_id,
                mac=kw.pop("mac", mac(self._next_key + 2000)),
                addresses=tuple(ipaddress.ip_interface(a) for a in addresses),
                tunnel_key=self.key(),
                **kw,
            )
        )

    def link(
        self, bridge_id: str, router_id: str, *addresses: str, vlan_id: int | None = None
    ) -> tuple[Port, Port]:
        """An interior link: a bridge port peered with a router port holding `addresses`."""
        bridge_port_id = f"{bridge_id}-{router_id}"
        router_port_id = f"{router_id}-{bridge_id}"
        router_port = self.router_port(
            router_id, router_port_id, *addresses, peer_id=bridge_port_id
        )
        bridge_port = self.add(
            Port(
                id=bridge_port_id,
                device_kind=DeviceKind.BRIDGE,
                device_id=bridge_id,
                peer_id=router_port_id,
                vlan_id=vlan_id,
                tunnel_key=self.key(),
            )
        )
        return bridge_port, router_port

    def route(
        self, router_id: str, dst: str, port_id: str | None = None, gw: str | None = None, **kw: Any
    ) -> Route:
        return self.add(
            Route(
                router_id=router_id,
                dst_prefix=ipaddress.ip_network(dst),
                next_hop_port_id=port_id,
                next_hop_gateway=ipaddress.ip_address(gw) if gw else None,
                **kw,
            )
        )

    def special_route(self, router_id: str, dst: str, kind: RouteType, **kw: Any) -> Route:
        return self.add(
            Route(router_id=router_id, dst_prefix=ipaddress.ip_network(dst), type=kind, **kw)
        )

    def chain(self, chain_id: str) -> Chain:
        return self.add(Chain(id=chain_id, name=chain_id))

    def rule(self, chain_id: str, action: RuleAction | str, position: int = 100, **kw: Any) -> Rule:
        return self.add(Rule(chain_id=chain_id, action=RuleAction(action), position=position, **kw))

    def zone(self, members: dict[str, str]) -> TunnelZone:
        return self.add(
            TunnelZone(
                id="tz",
                members=tuple(
                    TunnelZoneMember(host_id=h, underlay_ip=ipaddress.ip_address(ip))
                    for h, ip in members.items()
                ),
            )
        )

    def view(self) -> TopologyView:
        return TopologyView.from_objects(self.objects)


class Sim:
    """One host's simulation context over a view and in-memory tables."""

    def __init__(
        self, view: TopologyView, host: str = "h1", tables: MemoryTables | None = None
    ) -> None:
        self.view = view
        self.tables = tables if tables is not None else MemoryTables()
        self.ctx = SimContext(topology=view, tables=self.tables, local_host_id=host)

    def run(
        self, frame: bytes, port_id: str, now: float = 0.0, *, learn: bool = True
    ) -> SimulationResult:
        result = simulate(frame, port_id, self.ctx, now)
        if learn:
            for entry in result.learned:
                self.tables.learn(entry)
        return result


def port_mac(topo: Topo, port_id: str) -> int:
    return mac_to_int(topo.ports[port_id].mac)


def udp(
    src_mac: int | str,
    dst_mac: int | str,
    src: str,
    dst: str,
    sport: int = 1000,
    dport: int = 53,
    **kw: Any,
) -> bytes:
    return build_udp_datagram(**_addresses(src_mac, dst_mac, src, dst, sport, dport), **kw)


def tcp(
    src_mac: int | str,
    dst_mac: int | str,
    src: str,
    dst: str,
    sport: int = 40000,
    dport: int = 80,
    **kw: Any,
) -> bytes:
    return build_tcp_segment(**_addresses(src_mac, dst_mac, src, dst, sport, dport), **kw)


def _addresses(
    src_mac: int | str, dst_mac: int | str, src: str, dst: str, sport: int, dport: int
) -> dict[str, Any]:
    """The builders' address and port arguments, named."""
    return {
        "eth_src": src_mac,
        "eth_dst": dst_mac,
        "ip_src": src,
        "ip_dst": dst,
        "src_port": sport,
        "dst_port": dport,
    }


def ping(src_mac: int | str, dst_mac: int | str, src: str, dst: str, **kw: Any) -> bytes:
    return build_echo_request(
        eth_src=src_mac, eth_dst=dst_mac, ip_src=src, ip_dst=dst, identifier=7, sequence=1, **kw
    )


def arp_who_has(src_mac: int | str, src: str, target: str) -> bytes:
    return build_arp_request(sender_mac=src_mac, sender_ip=src, target_ip=target)


def match_of(frame: bytes) -> FlowMatch:
    return extract_flow_match(frame, 0)
