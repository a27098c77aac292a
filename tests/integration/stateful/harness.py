"""`StatefulCloud`: real `HostAgent`s (one store, the strict memory datapath per host, a memory
underlay, one manual clock for leases, loops and flow state, a state dir per host) around a
small provider topology, so the stateful tests read as "VM sends, outside host answers, assert
what arrives":

    vm1 (h1, 10.0.0.11) --+                              +-- out-a (h3, 203.0.113.100)
    vm2 (h2, 10.0.0.12) --+-- net --[10.0.0.1  r1  .1]-- ext-a (203.0.113.0/24)
                                           [198.51.100.1]-- ext-b --- out-b (h4, 198.51.100.100)

r1 SNATs 10.0.0.0/24 leaving through the ext-a uplink to 203.0.113.2 (ports 1024-65535,
leased in 64-port blocks through the store); its inbound chain reverses it. The outside
hosts are VM ports (their agents are the gateways' agents).
"""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from hivenet.agent.agent import HostAgent
from hivenet.clock import ManualClock
from hivenet.datapath.memory import MemoryDatapath
from hivenet.model import (
    Bridge,
    Chain,
    DeviceKind,
    NatTarget,
    Port,
    PortGroup,
    Router,
    Rule,
    RuleAction,
)
from hivenet.packets import build_arp_request, build_tcp_segment, extract_flow_match
from hivenet.packets.flowmatch import FlowMatch
from tests.integration.common import AgentCloud, open_agent_cloud, pass_time
from tests.integration.common import eventually as eventually  # re-exported for the tests
from tests.integration.common import run as run  # re-exported: 30 s per scenario

HOSTS = {"h1": "192.0.2.1", "h2": "192.0.2.2", "h3": "192.0.2.3", "h4": "192.0.2.4"}
SNAT_IP = "203.0.113.2"
OUT_A_IP = "203.0.113.100"
OUT_B_IP = "198.51.100.100"
VM_IPS = {"vm1": "10.0.0.11", "vm2": "10.0.0.12", "out-a": OUT_A_IP, "out-b": OUT_B_IP}
GATEWAYS = {"vm1": "10.0.0.1", "vm2": "10.0.0.1", "out-a": "203.0.113.1", "out-b": "198.51.100.1"}
VM_HOSTS = {"vm1": "h1", "vm2": "h2", "out-a": "h3", "out-b": "h4"}
SYN, ACK = 0x02, 0x10
# Leases on the manual clock: long enough that `tick` can move time in steps of half of it
# (each step lets every agent refresh its lease) and still cross a NAT timeout quickly.
LEASE_TTL = 30


@dataclass(kw_only=True)
class StatefulCloud(AgentCloud):
    state_root: Path
    clock: ManualClock = field(default_factory=ManualClock)
    router_macs: dict[str, str] = field(default_factory=dict)  # vm -> its gateway's MAC
    objects: dict[str, object] = field(default_factory=dict)

    # ---------------------------------------------------------------- agents

    async def start_agent(self, host_id: str) -> HostAgent:
        if host_id in self.datapaths:
            self.underlay.detach(HOSTS[host_id])
        datapath = MemoryDatapath(host_id, HOSTS[host_id], self.underlay, clock=self.clock)
        return await self.start_host_agent(
            host_id,
            datapath,
            clock=self.clock,
            lease_ttl=LEASE_TTL,
            state_dir=self.state_root / host_id,
        )

    # ---------------------------------------------------------------- traffic

    def send(self, vm: str, frame: bytes) -> None:
        port = self.ports[vm]
        self.datapaths[VM_HOSTS[vm]].receive(port.tunnel_key, frame)

    def received(self, vm: str) -> list[FlowMatch]:
        return [extract_flow_match(f, 0) for f in self.received_frames(vm)]

    def received_frames(self, vm: str) -> list[bytes]:
        port = self.ports[vm]
        return self.datapaths[VM_HOSTS[vm]].take(port.tunnel_key)

    def drops(self, host_id: str) -> dict[str, int]:
        return dict(self.agents[host_id].pipeline.stats.drops)

    async def announce(self, vm: str) -> None:
        """`vm` ARPs for its gateway: the router learns it, the VM learns the router's MAC."""
        port = self.ports[vm]
        arp = build_arp_request(sender_mac=port.mac, sender_ip=VM_IPS[vm], target_ip=GATEWAYS[vm])
        self.send(vm, arp)
        replies = self.received(vm)
        assert replies and replies[-1].arp_op == 2, f"no ARP reply for {vm}"
        mac = replies[-1].arp_sha
        self.router_macs[vm] = ":".join(f"{(mac >> s) & 0xFF:02x}" for s in range(40, -1, -8))

    async def start_all(self) -> None:
        """Start every host's agent, let each VM announce itself, and drain the flooded ARP
        of the others (call after `build_provider` and any extra topology)."""
        for host in HOSTS:
            await self.start_agent(host)
        await self.synced()
        for vm in VM_HOSTS:
            await self.announce(vm)
        await self.synced()
        for vm in VM_HOSTS:
            self.received(vm)

    def vm_tcp(self, vm: str, dst: str, sport: int, dport: int = 80, flags: int = SYN) -> bytes:
        """A TCP segment `vm` sends to `dst` through its gateway."""
        return build_tcp_segment(
            eth_src=self.ports[vm].mac,
            eth_dst=self.router_macs[vm],
            ip_src=VM_IPS[vm],
            ip_dst=dst,
            src_port=sport,
            dst_port=dport,
            flags=flags,
        )

    async def tick(self, seconds: float = 0.0) -> None:
        """Let `seconds` pass on the clock (in steps: the agents keep their leases) and run
        every agent's flow-state timer once."""
        await pass_time(self.clock, seconds, step=LEASE_TTL / 2)
        for host_id, agent in self.agents.items():
            self.datapaths[host_id].expire_flows()
            agent.flowstate.tick(self.clock.now)


def snat_rule(chain_id: str, position: int, uplink_id: str, address: str) -> Rule:
    """SNAT of 10.0.0.0/24 leaving through `uplink_id` to `address`, ports 1024-65535."""
    return Rule(
        chain_id=chain_id,
        action=RuleAction.SNAT,
        position=position,
        nw_src=ipaddress.ip_network("10.0.0.0/24"),
        out_port_ids=(uplink_id,),
        nat_targets=(
            NatTarget(
                address_from=ipaddress.ip_address(address),
                address_to=ipaddress.ip_address(address),
                port_from=1024,
                port_to=65535,
            ),
        ),
    )


async def build_provider(
    c: StatefulCloud,
    *,
    vm_port_fields: dict[str, dict[str, object]] | None = None,
    stateful_uplinks: bool = True,
) -> None:
    repo = c.repo
    net = (await repo.create(Bridge(id="net", name="net"))).obj
    ext_a = (await repo.create(Bridge(id="ext-a", name="ext-a"))).obj
    ext_b = (await repo.create(Bridge(id="ext-b", name="ext-b"))).obj
    inbound = (await repo.create(Chain(id="r1-in", name="r1 prerouting"))).obj
    outbound = (await repo.create(Chain(id="r1-out", name="r1 postrouting"))).obj
    router = (
        await repo.create(
            Router(id="r1", name="r1", inbound_chain_id=inbound.id, outbound_chain_id=outbound.id)
        )
    ).obj
    uplinks = (await repo.create(PortGroup(id="uplinks", stateful=stateful_uplinks))).obj
    for bridge, cidr, port_id in (
        (net, "10.0.0.1/24", "r1-net"),
        (ext_a, "203.0.113.1/24", "r1-ext-a"),
        (ext_b, "198.51.100.1/24", "r1-ext-b"),
    ):
        await repo.create(
            Port(
                id=port_id,
                device_kind=DeviceKind.ROUTER,
                device_id=router.id,
                addresses=(ipaddress.ip_interface(cidr),),
                mac=f"02:00:00:00:ff:{len(c.objects) + 1:02x}",
            )
        )
        c.objects[port_id] = port_id
        await repo.create(Port(device_kind=DeviceKind.BRIDGE, device_id=bridge.id, peer_id=port_id))
    await repo.create(Rule(chain_id=inbound.id, action=RuleAction.REV_SNAT, position=10))
    await repo.create(snat_rule(outbound.id, 10, "r1-ext-a", SNAT_IP))
    extra = vm_port_fields or {}
    for n, (vm, bridge) in enumerate(
        (("vm1", net), ("vm2", net), ("out-a", ext_a), ("out-b", ext_b)), 1
    ):
        groups = (uplinks.id,) if vm.startswith("out") else ()
        # out-a/out-b stand for upstream routers (any source address): no port security.
        fields = {"port_security_enabled": not vm.startswith("out"), **extra.get(vm, {})}
        port = Port(
            id=vm,
            device_kind=DeviceKind.BRIDGE,
            device_id=bridge.id,
            host_id=VM_HOSTS[vm],
            interface_name=f"hn{vm.replace('-', '')}",
            mac=f"02:00:00:00:00:{n:02x}",
            addresses=(ipaddress.ip_interface(f"{VM_IPS[vm]}/24"),),
            port_group_ids=groups,
            **fields,  # type: ignore[arg-type]
        )
        c.ports[vm] = (await repo.create(port)).obj


@asynccontextmanager
async def stateful_cloud(store_url: str, state_root: Path) -> AsyncIterator[StatefulCloud]:
    async with open_agent_cloud(
        store_url,
        StatefulCloud,
        HOSTS,
        clock=ManualClock(),  # the agents' loops and leases, the store's expiry, flow state
        vm_hosts=VM_HOSTS,
        state_root=state_root,
    ) as c:
        yield c
