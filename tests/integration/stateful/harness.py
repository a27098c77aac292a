"""`StatefulCloud`: real `HostAgent`s (one store, the strict memory datapath per host, a memory
underlay, a manual clock, a state dir per host) around a small provider topology, so the
stateful tests read as "VM sends, outside host answers, assert what arrives":

    vm1 (h1, 10.0.0.11) --+                              +-- out-a (h3, 203.0.113.100)
    vm2 (h2, 10.0.0.12) --+-- net --[10.0.0.1  r1  .1]-- ext-a (203.0.113.0/24)
                                           [198.51.100.1]-- ext-b --- out-b (h4, 198.51.100.100)

r1 SNATs 10.0.0.0/24 leaving through the ext-a uplink to 203.0.113.2 (ports 1024-65535,
leased in 64-port blocks through the store); its inbound chain reverses it. The outside
hosts are VM ports (their agents are the gateways' agents).
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from hivenet.agent.agent import HostAgent
from hivenet.datapath.memory import MemoryDatapath, MemoryUnderlay
from hivenet.model import (
    TOPOLOGY_PREFIX,
    Bridge,
    Chain,
    DeviceKind,
    Host,
    NatTarget,
    Port,
    PortGroup,
    Router,
    Rule,
    RuleAction,
)
from hivenet.packets import build_arp_request, extract_flow_match
from hivenet.packets.flowmatch import FlowMatch
from hivenet.store import open_store
from hivenet.store.base import Store
from hivenet.store.keys import TABLES_PREFIX
from hivenet.store.topology import TopologyRepository

HOSTS = {"h1": "192.0.2.1", "h2": "192.0.2.2", "h3": "192.0.2.3", "h4": "192.0.2.4"}
SNAT_IP = "203.0.113.2"
OUT_A_IP = "203.0.113.100"
OUT_B_IP = "198.51.100.100"
VM_IPS = {"vm1": "10.0.0.11", "vm2": "10.0.0.12", "out-a": OUT_A_IP, "out-b": OUT_B_IP}
GATEWAYS = {"vm1": "10.0.0.1", "vm2": "10.0.0.1", "out-a": "203.0.113.1", "out-b": "198.51.100.1"}
VM_HOSTS = {"vm1": "h1", "vm2": "h2", "out-a": "h3", "out-b": "h4"}


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


@dataclass
class StatefulCloud:
    store: Store
    repo: TopologyRepository
    underlay: MemoryUnderlay
    state_root: Path
    clock: ManualClock = field(default_factory=ManualClock)
    agents: dict[str, HostAgent] = field(default_factory=dict)
    datapaths: dict[str, MemoryDatapath] = field(default_factory=dict)
    ports: dict[str, Port] = field(default_factory=dict)
    router_macs: dict[str, str] = field(default_factory=dict)  # vm -> its gateway's MAC
    objects: dict[str, object] = field(default_factory=dict)

    # ---------------------------------------------------------------- agents

    async def start_agent(self, host_id: str) -> HostAgent:
        if host_id in self.datapaths:
            self.underlay.detach(HOSTS[host_id])
        datapath = MemoryDatapath(host_id, HOSTS[host_id], self.underlay, clock=self.clock)
        agent = HostAgent(
            self.store,
            datapath,
            host_id=host_id,
            underlay_ip=HOSTS[host_id],
            tunnel_zone_id="tz",
            lease_ttl=2,
            reconcile_interval=0.05,
            clock=self.clock,
            state_dir=self.state_root / host_id,
        )
        await agent.start()
        self.agents[host_id] = agent
        self.datapaths[host_id] = datapath
        return agent

    async def kill_agent(self, host_id: str) -> None:
        """As close to kill -9 as one process allows: no graceful lease revoke, no journal
        compaction, the datapath (and its flows) gone with the process."""
        agent = self.agents.pop(host_id)
        await agent.stop(graceful=False)
        self.underlay.detach(HOSTS[host_id])
        del self.datapaths[host_id]

    async def synced(self) -> None:
        async def last_change(prefix: str) -> int:
            kvs = (await self.store.range(prefix)).kvs
            return max((kv.mod_revision for kv in kvs), default=0)

        await eventually(lambda: all(a.pending_publications == 0 for a in self.agents.values()))
        topology_rev = await last_change(TOPOLOGY_PREFIX)
        tables_rev = await last_change(TABLES_PREFIX)
        await eventually(
            lambda: (
                all(a.topology_mirror.revision >= topology_rev for a in self.agents.values())
                and all(a.tables_mirror.revision >= tables_rev for a in self.agents.values())
            )
        )
        await eventually(
            lambda: all(
                self.datapaths[VM_HOSTS[vm]].is_bound(port.tunnel_key)
                for vm, port in self.ports.items()
                if VM_HOSTS[vm] in self.datapaths
            )
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

    async def tick(self, seconds: float = 0.0) -> None:
        """Advance the clock and run every agent's flow-state timer once."""
        self.clock.now += seconds
        for host_id, agent in self.agents.items():
            self.datapaths[host_id].expire_flows()
            agent.flowstate.tick(self.clock.now)


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
    await repo.create(
        Rule(
            chain_id=outbound.id,
            action=RuleAction.SNAT,
            position=10,
            nw_src=ipaddress.ip_network("10.0.0.0/24"),
            out_port_ids=("r1-ext-a",),
            nat_targets=(
                NatTarget(
                    address_from=ipaddress.ip_address(SNAT_IP),
                    address_to=ipaddress.ip_address(SNAT_IP),
                    port_from=1024,
                    port_to=65535,
                ),
            ),
        )
    )
    extra = vm_port_fields or {}
    for n, (vm, bridge) in enumerate(
        (("vm1", net), ("vm2", net), ("out-a", ext_a), ("out-b", ext_b)), 1
    ):
        groups = (uplinks.id,) if vm.startswith("out") else ()
        port = Port(
            id=vm,
            device_kind=DeviceKind.BRIDGE,
            device_id=bridge.id,
            host_id=VM_HOSTS[vm],
            interface_name=f"hn{vm.replace('-', '')}",
            mac=f"02:00:00:00:00:{n:02x}",
            addresses=(ipaddress.ip_interface(f"{VM_IPS[vm]}/24"),),
            port_group_ids=groups,
            **extra.get(vm, {}),  # type: ignore[arg-type]
        )
        c.ports[vm] = (await repo.create(port)).obj


@asynccontextmanager
async def stateful_cloud(store_url: str, state_root: Path) -> AsyncIterator[StatefulCloud]:
    store = open_store(store_url)
    repo = TopologyRepository(store)
    for host_id in HOSTS:
        await repo.create(Host(id=host_id, name=host_id))
    c = StatefulCloud(store, repo, MemoryUnderlay(), state_root)
    try:
        yield c
    finally:
        for agent in list(c.agents.values()):
            await agent.stop()
        await store.close()


def run(coro: object) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))  # type: ignore[arg-type]
