"""A one-view load-balancer world for the pure tests: the simulation plus real flow-state
tables, committed and rolled back as the agent does (`FlowStateSync.finish`), and a megaflow
table invalidated by tag as the datapath is.

    c1 (h4, 10.0.1.10) --+                                   +-- m1 (h1, 10.0.2.11)
    c2 (h5, 10.0.1.11) --+-- front --[.1  r1  .1]-- back ----+-- m2 (h2, 10.0.2.12)
      VIP 10.0.1.100 (tcp 80 -> web:8080, udp 53 -> dns:5353)  +-- m3 (h3, 10.0.2.13)
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from hivenet.flows.actions import Output, SetField, Tunnel
from hivenet.flows.table import FlowTable
from hivenet.flowstate import (
    ConntrackTable,
    FlowStateTransaction,
    NatRange,
    NatTable,
    PortBlockAllocator,
    nat_reply_tag,
    nat_tag,
)
from hivenet.model import HealthMonitor, Listener, LoadBalancer, Member, Pool
from hivenet.model.types import mac_to_int
from hivenet.packets import extract_flow_match
from hivenet.sim import MemoryTables, SimContext, SimulationResult, TopologyView, simulate
from hivenet.sim.stateful import TransactionHook, connection_tags
from hivenet.sim.tables import LearnedMac, LearnedNeighbour
from tests.unit.sim.topo import Topo, mac

VIP = "10.0.1.100"
ROUTER_FRONT_IP, ROUTER_BACK_IP = "10.0.1.1", "10.0.2.1"
HOSTS = {"h1": "192.0.2.1", "h2": "192.0.2.2", "h3": "192.0.2.3", "h4": "192.0.2.4"}
HOSTS |= {"h5": "192.0.2.5"}
CLIENTS = {"c1": ("10.0.1.10", "h4", 1), "c2": ("10.0.1.11", "h5", 2)}
MEMBERS = {
    "m1": ("10.0.2.11", "h1", 11),
    "m2": ("10.0.2.12", "h2", 12),
    "m3": ("10.0.2.13", "h3", 13),
    "m4": ("10.0.2.14", "h1", 14),
}
ROUTER_MACS = {"r1-front": mac(201), "r1-back": mac(202)}
WEB_PORT, DNS_PORT = 8080, 5353
TABLE_SIZE = 4099


def ip(text: str) -> int:
    return int(ipaddress.ip_address(text))


def lb_objects(
    weights: dict[str, int] | None = None,
    *,
    persistence: bool = True,
    monitor: bool = False,
) -> list[Any]:
    """Load balancer lb1 on r1: TCP listener web (VIP:80 -> pool web, members m1-m3 on
    8080, `weights`) and UDP listener dns (VIP:53 -> pool dns, m1-m3 on 5353, source-IP
    persistence unless told otherwise)."""
    weights = weights or {"m1": 1, "m2": 1, "m3": 1}
    objects: list[Any] = [
        LoadBalancer(id="lb1", router_id="r1"),
        Pool(id="web", load_balancer_id="lb1"),
        Pool(
            id="dns",
            load_balancer_id="lb1",
            protocol="udp",
            session_persistence="source_ip" if persistence else "none",
            persistence_timeout=60,
        ),
        Listener(
            id="web-80",
            load_balancer_id="lb1",
            vip_address=ipaddress.ip_address(VIP),
            protocol_port=80,
            default_pool_id="web",
        ),
        Listener(
            id="dns-53",
            load_balancer_id="lb1",
            vip_address=ipaddress.ip_address(VIP),
            protocol="udp",
            protocol_port=53,
            default_pool_id="dns",
        ),
    ]
    for member_id, weight in weights.items():
        address = MEMBERS[member_id][0]
        objects.append(
            Member(
                id=f"web-{member_id}",
                pool_id="web",
                address=ipaddress.ip_address(address),
                protocol_port=WEB_PORT,
                weight=weight,
            )
        )
    for member_id in ("m1", "m2", "m3"):
        objects.append(
            Member(
                id=f"dns-{member_id}",
                pool_id="dns",
                address=ipaddress.ip_address(MEMBERS[member_id][0]),
                protocol_port=DNS_PORT,
            )
        )
    if monitor:
        objects.append(HealthMonitor(id="web-hm", pool_id="web", type="tcp", delay=2, timeout=1))
    return objects


def topology(lb: list[Any] | None = None) -> Topo:
    topo = Topo()
    topo.bridge("front")
    topo.bridge("back")
    topo.router("r1")
    for bridge, router_port, cidr in (
        ("front", "r1-front", f"{ROUTER_FRONT_IP}/24"),
        ("back", "r1-back", f"{ROUTER_BACK_IP}/24"),
    ):
        _, link = topo.link(bridge, "r1", cidr)
        topo.objects.remove(link)
        topo.ports[router_port] = topo.add(
            link.model_copy(update={"id": router_port, "mac": ROUTER_MACS[router_port]})
        )
    for name, (address, host, n) in CLIENTS.items():
        topo.vm_port("front", name, host, mac_n=n, addresses=(f"{address}/24",))
    for name, (address, host, n) in MEMBERS.items():
        topo.vm_port("back", name, host, mac_n=n, addresses=(f"{address}/24",))
    topo.zone(HOSTS)
    for obj in lb if lb is not None else lb_objects():
        topo.add(obj)
    return topo


@dataclass
class LbWorld:
    """The view, shared tables, flow state and one megaflow table; `send` plays the agent."""

    view: TopologyView
    tables: MemoryTables = field(default_factory=MemoryTables)
    allocator: PortBlockAllocator = field(default_factory=PortBlockAllocator)
    flows: FlowTable = field(default_factory=FlowTable)
    now: float = 100.0

    def __post_init__(self) -> None:
        self.view.vips.table_size = TABLE_SIZE
        self.conntrack = ConntrackTable()
        self.nat = NatTable(self.allocator)
        for router_ip in (ROUTER_FRONT_IP, ROUTER_BACK_IP):
            self.allocator.claim_all(NatRange.parse(router_ip, router_ip, 1024, 2047))
        for name, (address, _host, n) in {**CLIENTS, **MEMBERS}.items():
            bridge = "front" if name in CLIENTS else "back"
            self.tables.learn(LearnedMac(bridge, 0, mac_to_int(mac(n)), name))
            self.tables.learn(LearnedNeighbour("r1", 4, ip(address), mac_to_int(mac(n))))

    @classmethod
    def build(cls, lb: list[Any] | None = None) -> LbWorld:
        return cls(topology(lb).view())

    def host_of(self, port_id: str) -> str:
        return (CLIENTS | MEMBERS)[port_id][1]

    def send(self, sender: str, frame: bytes, *, use_cache: bool = True) -> SimulationResult:
        """Simulate `frame` from port `sender` on its host, commit or roll back the flow
        state, invalidate and install as the agent does. A cached flow answers first."""
        view = self.view
        port = view.ports[sender]
        match = extract_flow_match(frame, port.tunnel_key)
        hook = TransactionHook(FlowStateTransaction(self.conntrack, self.nat))
        context = SimContext(
            topology=view, tables=self.tables, local_host_id=self.host_of(sender), flow_state=hook
        )
        result = simulate(frame, sender, context, self.now, match=match)
        cached = self.flows.lookup(match, self.now) if use_cache else None
        if cached is not None:
            hook.transaction.rollback()
            assert cached.actions == result.actions, result.format_trace()
            return result
        if result.is_drop or not hook.record.used:
            hook.transaction.rollback()
        else:
            committed = hook.transaction.commit(self.now)
            tags: set[str] = set()
            for zone, key, _ in hook.record.opened:
                tags |= connection_tags(zone, key)
            for binding in committed.nat_bindings:
                tags |= {
                    nat_tag(binding),
                    nat_reply_tag(binding.zone, binding.kind, binding.translated),
                }
            self.flows.invalidate(tags)
        if result.install:
            self.flows.install(
                result.masked_match,
                result.mask,
                result.actions,
                result.tags,
                self.now,
                idle_timeout=result.idle_timeout,
            )
        return result

    def apply(self, obj: Any) -> None:
        self.flows.invalidate(self.view.apply(obj))

    def remove(self, kind: str, object_id: str) -> None:
        self.flows.invalidate(self.view.remove(kind, object_id))

    def set_observed(self, member_id: str, status: Any) -> None:
        self.flows.invalidate(self.view.vips.set_observed(member_id, status))


def rewritten(result: SimulationResult) -> dict[str, int]:
    """The header rewrites of a result's actions (field -> last value set)."""
    return {a.field: a.value for a in result.actions if isinstance(a, SetField)}


def member_reached(result: SimulationResult) -> str | None:
    """Which member (m1..m4) a result sends the packet to (by translated address), if any."""
    if not any(isinstance(a, Output | Tunnel) for a in result.actions):
        return None
    address = rewritten(result).get("ip_dst")
    return next((name for name, (a, _, _) in MEMBERS.items() if ip(a) == address), None)
