"""`LbCloud`: real `HostAgent`s on five hosts (one store, the strict memory datapath per host, a
memory underlay, one manual clock for leases, loops, flow state and health timing, a fake prober whose answers
the test sets) around one load balancer:

    c1 (h4, 10.0.1.10) --+                                   +-- m1 (h1, 10.0.2.11)
    c2 (h5, 10.0.1.11) --+-- front --[.1  r1  .1]-- back ----+-- m2 (h2, 10.0.2.12)
      VIP 10.0.1.100 on the clients' subnet                  +-- m3 (h3, 10.0.2.13)

Listener web (TCP 80 -> pool web, members on 8080, weights given by the test, an optional TCP
health monitor) and dns (UDP 53 -> pool dns, members on 5353, source-IP persistence).
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hivenet.agent.agent import HostAgent
from hivenet.agent.health import HealthPlumbing, ProbeTarget
from hivenet.clock import ManualClock
from hivenet.datapath.memory import MemoryDatapath
from hivenet.model import (
    Bridge,
    DeviceKind,
    HealthMonitor,
    Listener,
    LoadBalancer,
    Member,
    Pool,
    Port,
    Router,
)
from hivenet.packets import (
    build_arp_request,
    build_tcp_segment,
    build_udp_datagram,
    extract_flow_match,
)
from hivenet.packets.flowmatch import FlowMatch
from tests.integration import common
from tests.integration.common import AgentCloud, open_agent_cloud
from tests.integration.common import eventually as eventually  # re-exported for the tests

HOSTS = {f"h{n}": f"192.0.2.{n}" for n in range(1, 6)}
VIP = "10.0.1.100"
VM_IPS = {
    "c1": "10.0.1.10",
    "c2": "10.0.1.11",
    "m1": "10.0.2.11",
    "m2": "10.0.2.12",
    "m3": "10.0.2.13",
}
VM_HOSTS = {"c1": "h4", "c2": "h5", "m1": "h1", "m2": "h2", "m3": "h3"}
GATEWAYS = {"c1": "10.0.1.1", "c2": "10.0.1.1", "m1": "10.0.2.1", "m2": "10.0.2.1"}
GATEWAYS |= {"m3": "10.0.2.1"}
WEB_PORT, DNS_PORT = 8080, 5353
SYN, SYN_ACK, ACK = 0x02, 0x12, 0x10


def ip(text: str) -> int:
    return int(ipaddress.ip_address(text))


def member_of(address: int) -> str | None:
    return next((vm for vm, a in VM_IPS.items() if vm.startswith("m") and ip(a) == address), None)


class FakeProber:
    """Answers probes from `down` (member VM names whose service is stopped) and records
    which host probed which member."""

    def __init__(self, host_id: str, down: set[str], log: list[tuple[str, str]]) -> None:
        self.host_id = host_id
        self.down = down
        self.log = log

    def can_probe(self, target: ProbeTarget) -> bool:
        return True

    async def probe(self, target: ProbeTarget) -> bool:
        vm = member_of(ip(target.address))
        self.log.append((self.host_id, target.member_id))
        return vm not in self.down


@dataclass(kw_only=True)
class LbCloud(AgentCloud):
    state_root: Path
    clock: ManualClock = field(default_factory=ManualClock)
    router_macs: dict[str, str] = field(default_factory=dict)
    down: set[str] = field(default_factory=set)
    probe_log: list[tuple[str, str]] = field(default_factory=list)

    async def start_agent(self, host_id: str, plumbing: HealthPlumbing | None = None) -> HostAgent:
        """With `plumbing`, the agent probes through its own health ports (`OverlayProbing`)
        over that fake kernel side; else through a `FakeProber`."""
        datapath = MemoryDatapath(host_id, HOSTS[host_id], self.underlay, clock=self.clock)
        prober = None if plumbing else FakeProber(host_id, self.down, self.probe_log)

        def fast_health_and_small_vip_tables(agent: HostAgent) -> None:
            agent.health.tick_interval = 0.02
            if agent.overlay_probing is not None:
                agent.overlay_probing.reconcile_interval = 0.02
            agent.topology.vips.table_size = 4099

        return await self.start_host_agent(
            host_id,
            datapath,
            fast_health_and_small_vip_tables,
            clock=self.clock,
            state_dir=self.state_root / host_id,
            health_prober=prober,
            overlay_health_probes=plumbing is not None,
            health_plumbing=plumbing,
        )

    async def advance(self, seconds: float, step: float = 0.5) -> None:
        """Let `seconds` pass on the manual clock, in steps, giving the health loops time to
        run the probes that fall due."""
        remaining = seconds
        while remaining > 1e-9:
            delta = min(step, remaining)
            self.clock.advance(delta)
            remaining -= delta
            await asyncio.sleep(0.08)

    # ---------------------------------------------------------------- traffic

    def send(self, vm: str, frame: bytes) -> None:
        self.datapaths[VM_HOSTS[vm]].receive(self.ports[vm].tunnel_key, frame)

    def received(self, vm: str) -> list[FlowMatch]:
        port = self.ports[vm]
        return [
            extract_flow_match(f, 0) for f in self.datapaths[VM_HOSTS[vm]].take(port.tunnel_key)
        ]

    def drops(self, host_id: str) -> dict[str, int]:
        return dict(self.agents[host_id].pipeline.stats.drops)

    async def announce(self, vm: str, target: str | None = None) -> None:
        """`vm` ARPs for its gateway (or `target`): the router learns it and answers."""
        port = self.ports[vm]
        self.send(
            vm,
            build_arp_request(
                sender_mac=port.mac, sender_ip=VM_IPS[vm], target_ip=target or GATEWAYS[vm]
            ),
        )
        replies = self.received(vm)
        assert replies and replies[-1].arp_op == 2, f"no ARP reply for {vm}"
        mac = replies[-1].arp_sha
        self.router_macs[vm] = ":".join(f"{(mac >> s) & 0xFF:02x}" for s in range(40, -1, -8))

    def client_tcp(self, client: str, sport: int, flags: int = SYN) -> bytes:
        return build_tcp_segment(
            eth_src=self.ports[client].mac,
            eth_dst=self.router_macs[client],
            ip_src=VM_IPS[client],
            ip_dst=VIP,
            src_port=sport,
            dst_port=80,
            flags=flags,
        )

    def client_udp(self, client: str, sport: int) -> bytes:
        return build_udp_datagram(
            eth_src=self.ports[client].mac,
            eth_dst=self.router_macs[client],
            ip_src=VM_IPS[client],
            ip_dst=VIP,
            src_port=sport,
            dst_port=53,
        )

    def member_tcp(self, member: str, client: str, sport: int, flags: int = SYN_ACK) -> bytes:
        return build_tcp_segment(
            eth_src=self.ports[member].mac,
            eth_dst=self.router_macs[member],
            ip_src=VM_IPS[member],
            ip_dst=VM_IPS[client],
            src_port=WEB_PORT,
            dst_port=sport,
            flags=flags,
        )

    def member_vip_tcp(self, member: str, sport: int) -> bytes:
        """A SYN from a member to the VIP (through its gateway)."""
        return build_tcp_segment(
            eth_src=self.ports[member].mac,
            eth_dst=self.router_macs[member],
            ip_src=VM_IPS[member],
            ip_dst=VIP,
            src_port=sport,
            dst_port=80,
            flags=SYN,
        )

    def member_reply_to_router(self, member: str, dport: int) -> bytes:
        """A member's SYN-ACK to a hairpinned client (seen as the router's address)."""
        return build_tcp_segment(
            eth_src=self.ports[member].mac,
            eth_dst=self.router_macs[member],
            ip_src=VM_IPS[member],
            ip_dst="10.0.2.1",
            src_port=WEB_PORT,
            dst_port=dport,
            flags=SYN_ACK,
        )

    def arrivals(self) -> dict[str, list[FlowMatch]]:
        """What each member on a live host received since the last look."""
        return {vm: self.received(vm) for vm in ("m1", "m2", "m3") if VM_HOSTS[vm] in self.agents}


async def build(
    c: LbCloud,
    *,
    weights: dict[str, int] | None = None,
    monitor: dict[str, Any] | None = None,
    plumbing: Callable[[str], HealthPlumbing] | None = None,
) -> None:
    repo = c.repo
    await repo.create(Router(id="r1", name="r1"))
    for bridge_id, cidr, n in (("front", "10.0.1.1/24", 1), ("back", "10.0.2.1/24", 2)):
        await repo.create(Bridge(id=bridge_id, name=bridge_id))
        await repo.create(
            Port(
                id=f"r1-{bridge_id}",
                device_kind=DeviceKind.ROUTER,
                device_id="r1",
                addresses=(ipaddress.ip_interface(cidr),),
                mac=f"02:00:00:00:ff:{n:02x}",
            )
        )
        await repo.create(
            Port(device_kind=DeviceKind.BRIDGE, device_id=bridge_id, peer_id=f"r1-{bridge_id}")
        )
    for n, vm in enumerate(VM_IPS, 1):
        port = Port(
            id=vm,
            device_kind=DeviceKind.BRIDGE,
            device_id="front" if vm.startswith("c") else "back",
            host_id=VM_HOSTS[vm],
            interface_name=f"hn{vm}",
            mac=f"02:00:00:00:00:{n:02x}",
            addresses=(ipaddress.ip_interface(f"{VM_IPS[vm]}/24"),),
        )
        c.ports[vm] = (await repo.create(port)).obj
    await repo.create(LoadBalancer(id="lb1", router_id="r1"))
    await repo.create(Pool(id="web", load_balancer_id="lb1"))
    await repo.create(
        Pool(
            id="dns",
            load_balancer_id="lb1",
            protocol="udp",
            session_persistence="source_ip",
            persistence_timeout=60,
        )
    )
    for listener_id, protocol, port_number, pool_id in (
        ("web-80", "tcp", 80, "web"),
        ("dns-53", "udp", 53, "dns"),
    ):
        await repo.create(
            Listener(
                id=listener_id,
                load_balancer_id="lb1",
                vip_address=ipaddress.ip_address(VIP),
                protocol=protocol,
                protocol_port=port_number,
                default_pool_id=pool_id,
            )
        )
    for vm, weight in (weights or {"m1": 1, "m2": 1, "m3": 1}).items():
        await repo.create(
            Member(
                id=f"web-{vm}",
                pool_id="web",
                address=ipaddress.ip_address(VM_IPS[vm]),
                protocol_port=WEB_PORT,
                weight=weight,
            )
        )
        await repo.create(
            Member(
                id=f"dns-{vm}",
                pool_id="dns",
                address=ipaddress.ip_address(VM_IPS[vm]),
                protocol_port=DNS_PORT,
            )
        )
    if monitor is not None:
        await repo.create(HealthMonitor(id="web-hm", pool_id="web", type="tcp", **monitor))
    for host_id in HOSTS:
        await c.start_agent(host_id, None if plumbing is None else plumbing(host_id))
    await c.synced()
    for vm in VM_IPS:
        await c.announce(vm)
    for client in ("c1", "c2"):
        await c.announce(client, VIP)  # on the VIP's subnet: the router answers for it
    await c.synced()
    for vm in VM_IPS:
        c.received(vm)


@asynccontextmanager
async def lb_cloud(state_root: Path) -> AsyncIterator[LbCloud]:
    async with open_agent_cloud(
        "memory://",
        LbCloud,
        HOSTS,
        clock=ManualClock(),  # the agents' loops and leases, the store's expiry, flow state
        vm_hosts=VM_HOSTS,
        state_root=state_root,
    ) as c:
        yield c


def run(coro: Coroutine[Any, Any, None]) -> None:
    """A load-balancer scenario gets 60 s (health timing makes it slower than the others)."""
    common.run(coro, timeout=60)
