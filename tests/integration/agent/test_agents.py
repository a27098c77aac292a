"""Several real `HostAgent`s in one process: one real store backend, the strict memory
datapath per host, a memory underlay between them. Topology goes in through the repository
(as the API writes it); assertions are about what each VM interface receives."""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import logging
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path

import pytest

from hivenet.agent.agent import HostAgent
from hivenet.clock import ManualClock
from hivenet.datapath.memory import MemoryDatapath
from hivenet.model import Bridge, Chain, DeviceKind, Port, Router, Rule, RuleAction, topology_key
from hivenet.model.types import int_to_mac, mac_to_int
from hivenet.packets import (
    build_arp_reply,
    build_arp_request,
    build_echo_request,
    extract_flow_match,
)
from hivenet.packets.flowmatch import ETH_TYPE_ARP, IP_PROTO_ICMP
from hivenet.store.base import LeaseNotFoundError
from hivenet.store.keys import host_alive_key, port_active_key
from hivenet.store.topology import TopologyRepository
from tests.integration.common import AgentCloud, eventually, open_agent_cloud, pass_time, run

HOSTS = {"h1": "192.0.2.1", "h2": "192.0.2.2", "h3": "192.0.2.3"}


@dataclass(kw_only=True)
class Cloud(AgentCloud):
    clock: ManualClock | None = None  # when set: the agents' and the store's lease clock

    async def start_agent(self, host_id: str) -> HostAgent:
        if host_id in self.datapaths:
            self.underlay.detach(HOSTS[host_id])
        datapath = MemoryDatapath(host_id, HOSTS[host_id], self.underlay)
        if self.clock is None:
            return await self.start_host_agent(host_id, datapath)
        return await self.start_host_agent(host_id, datapath, clock=self.clock)


def cloud(store_url: str, clock: ManualClock | None = None) -> AbstractAsyncContextManager[Cloud]:
    return open_agent_cloud(store_url, Cloud, HOSTS, clock=clock)


@pytest.fixture(params=["memory", "sqlite-file"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return "memory://" if request.param == "memory" else f"sqlite:///{tmp_path}/state.db"


async def vm_port(
    repo: TopologyRepository, device: Bridge, host: str, ifname: str, mac: str, ip: str
) -> Port:
    port = Port(
        device_kind=DeviceKind.BRIDGE,
        device_id=device.id,
        host_id=host,
        interface_name=ifname,
        mac=mac,
        addresses=(ipaddress.ip_interface(ip),),
    )
    return (await repo.create(port)).obj


async def one_vm_per_host(c: Cloud) -> tuple[Bridge, tuple[Port, ...]]:
    """Bridge net1 with VM hnvm<n> (10.0.0.<n>/24) on each host h<n>, every agent started
    and synced."""
    bridge = (await c.repo.create(Bridge(name="net1"))).obj
    vms = []
    for n, host in enumerate(HOSTS, 1):
        mac, address = f"02:00:00:00:00:{n:02x}", f"10.0.0.{n}/24"
        vms.append(await vm_port(c.repo, bridge, host, f"hnvm{n}", mac, address))
    for host in HOSTS:
        await c.start_agent(host)
    await c.synced()
    return bridge, tuple(vms)


def received(cloud: Cloud, host: str, port: Port) -> list[bytes]:
    return cloud.datapaths[host].take(port.tunnel_key)


def test_bridge_across_three_hosts_learns_floods_and_publishes(store_url: str) -> None:
    async def scenario() -> None:
        async with cloud(store_url) as c:
            bridge, (vm1, vm2, vm3) = await one_vm_per_host(c)
            # Each agent bound exactly its own port and published that it owns it.
            assert c.agents["h1"].bound_ports.keys() == {vm1.id}
            assert c.agents["h2"].bound_ports.keys() == {vm2.id}
            await eventually(lambda: c.agents["h3"].bound_ports.keys() == {vm3.id})
            assert await c.store.get(port_active_key("h2", vm2.id)) is not None
            assert await c.store.get(host_alive_key("h3")) is not None

            # Broadcast ARP from vm1 reaches vm2 and vm3 (other hosts) and not vm1 itself.
            arp = build_arp_request(sender_mac=vm1.mac, sender_ip="10.0.0.1", target_ip="10.0.0.2")
            c.datapaths["h1"].receive(vm1.tunnel_key, arp)
            assert received(c, "h2", vm2) == [arp]
            assert received(c, "h3", vm3) == [arp]
            assert received(c, "h1", vm1) == []

            # vm1's MAC was learned on h1 and published: every agent's replica has it.
            await c.synced()
            for agent in c.agents.values():
                assert agent.tables.mac_port(bridge.id, 0, 0x020000000001) == vm1.id

            # Unicast vm2 -> vm1 goes straight to vm1 only; a repeat hits the installed flow.
            ping = build_echo_request(
                eth_src=vm2.mac,
                eth_dst=vm1.mac,
                ip_src="10.0.0.2",
                ip_dst="10.0.0.1",
                identifier=7,
                sequence=1,
            )
            c.datapaths["h2"].receive(vm2.tunnel_key, ping)
            assert received(c, "h1", vm1) == [ping]
            assert received(c, "h3", vm3) == []
            upcalls = c.agents["h2"].pipeline.stats.upcalls
            c.datapaths["h2"].receive(vm2.tunnel_key, ping)
            assert received(c, "h1", vm1) == [ping]
            assert c.agents["h2"].pipeline.stats.upcalls == upcalls  # served by the flow

    run(scenario())


async def routed_cloud(c: Cloud) -> tuple[Port, Port, Router, Port]:
    net_a = (await c.repo.create(Bridge(name="net-a"))).obj
    net_b = (await c.repo.create(Bridge(name="net-b"))).obj
    router = (await c.repo.create(Router(name="r1"))).obj
    router_ports = []
    for net, cidr in ((net_a, "10.0.1.1/24"), (net_b, "10.0.2.1/24")):
        rport = (
            await c.repo.create(
                Port(
                    device_kind=DeviceKind.ROUTER,
                    device_id=router.id,
                    addresses=(ipaddress.ip_interface(cidr),),
                )
            )
        ).obj
        await c.repo.create(Port(device_kind=DeviceKind.BRIDGE, device_id=net.id, peer_id=rport.id))
        router_ports.append(rport)
    router_port_b = router_ports[1]
    vm1 = await vm_port(c.repo, net_a, "h1", "hnvm1", "02:00:00:00:01:01", "10.0.1.10/24")
    vm2 = await vm_port(c.repo, net_b, "h2", "hnvm2", "02:00:00:00:02:02", "10.0.2.20/24")
    return vm1, vm2, router, router_port_b


def _router_mac_for(c: Cloud, vm: Port, gateway: str, host: str) -> str:
    """vm ARPs for its gateway; returns the MAC the router answered with."""
    arp = build_arp_request(sender_mac=vm.mac, sender_ip=str(vm.addresses[0].ip), target_ip=gateway)
    c.datapaths[host].receive(vm.tunnel_key, arp)
    replies = received(c, host, vm)
    assert len(replies) == 1, replies
    reply = extract_flow_match(replies[0], 0)
    assert reply.eth_type == ETH_TYPE_ARP and reply.arp_op == 2
    assert reply.arp_spa == int(ipaddress.ip_address(gateway))
    return int_to_mac(reply.arp_sha)


def test_ping_across_router_and_hosts_then_port_down_stops_it(store_url: str) -> None:
    async def scenario() -> None:
        async with cloud(store_url) as c:
            vm1, vm2, _router, router_port_b = await routed_cloud(c)
            for host in ("h1", "h2"):
                await c.start_agent(host)
            await c.synced()
            gw_mac = _router_mac_for(c, vm1, "10.0.1.1", "h1")

            def ping(seq: int) -> bytes:
                return build_echo_request(
                    eth_src=vm1.mac,
                    eth_dst=gw_mac,
                    ip_src="10.0.1.10",
                    ip_dst="10.0.2.20",
                    identifier=9,
                    sequence=seq,
                )

            # First packet: the router does not know vm2's MAC and ARPs for it on net-b.
            c.datapaths["h1"].receive(vm1.tunnel_key, ping(1))
            arp_requests = received(c, "h2", vm2)
            assert len(arp_requests) == 1
            request = extract_flow_match(arp_requests[0], 0)
            assert request.arp_op == 1 and request.arp_tpa == int(ipaddress.ip_address("10.0.2.20"))
            assert request.eth_src == mac_to_int(router_port_b.mac)
            # vm2 answers; the router learns it (shared table), then the ping goes through.
            reply = build_arp_reply(
                sender_mac=vm2.mac,
                sender_ip="10.0.2.20",
                target_mac=router_port_b.mac,
                target_ip="10.0.2.1",
            )
            c.datapaths["h2"].receive(vm2.tunnel_key, reply)
            await c.synced()
            c.datapaths["h1"].receive(vm1.tunnel_key, ping(2))
            delivered = received(c, "h2", vm2)
            assert len(delivered) == 1
            frame = extract_flow_match(delivered[0], 0)
            assert frame.ip_proto == IP_PROTO_ICMP and frame.icmp_type == 8
            assert frame.ip_ttl == 63  # decremented once by the router
            assert frame.eth_src == mac_to_int(router_port_b.mac)
            assert frame.eth_dst == mac_to_int(vm2.mac)

            # Admin-down vm2's port through the store: within the watch, traffic stops.
            await c.repo.modify(
                Port, vm2.id, lambda p: p.model_copy(update={"admin_state_up": False})
            )
            await c.synced()
            c.datapaths["h1"].receive(vm1.tunnel_key, ping(3))
            assert received(c, "h2", vm2) == []
            # Restored: it flows again.
            await c.repo.modify(
                Port, vm2.id, lambda p: p.model_copy(update={"admin_state_up": True})
            )
            await c.synced()
            c.datapaths["h1"].receive(vm1.tunnel_key, ping(4))
            assert len(received(c, "h2", vm2)) == 1

    run(scenario())


def test_agent_restart_rebinds_and_traffic_resumes(store_url: str) -> None:
    clock = ManualClock()

    async def scenario() -> None:
        async with cloud(store_url, clock) as c:
            bridge = (await c.repo.create(Bridge(name="net1"))).obj
            vm1 = await vm_port(c.repo, bridge, "h1", "hnvm1", "02:00:00:00:00:01", "10.0.0.1/24")
            vm2 = await vm_port(c.repo, bridge, "h2", "hnvm2", "02:00:00:00:00:02", "10.0.0.2/24")
            await c.start_agent("h1")
            await c.start_agent("h2")
            await c.synced()
            frame = build_echo_request(
                eth_src=vm1.mac,
                eth_dst=vm2.mac,
                ip_src="10.0.0.1",
                ip_dst="10.0.0.2",
                identifier=1,
                sequence=1,
            )
            c.datapaths["h1"].receive(vm1.tunnel_key, frame)
            assert received(c, "h2", vm2) == [frame]
            h1_flows = len(c.datapaths["h1"].flows())
            # h2's agent dies without a goodbye (no lease revoke) and comes back.
            old_lease = c.agents["h2"].lease_id
            await c.agents["h2"].stop(graceful=False)
            del c.agents["h2"]
            await c.start_agent("h2")
            await c.synced()
            assert c.agents["h2"].bound_ports.keys() == {vm2.id}
            assert len(c.datapaths["h1"].flows()) == h1_flows  # other hosts keep their flows
            c.datapaths["h1"].receive(vm1.tunnel_key, frame)
            assert received(c, "h2", vm2) == [frame]
            # Its old lease expires (ttl 2 s); what it re-published under the new one stays.
            await pass_time(clock, 3.5)
            with pytest.raises(LeaseNotFoundError):
                await c.store.lease_keepalive(old_lease)
            assert await c.store.get(port_active_key("h2", vm2.id)) is not None
            assert await c.store.get(host_alive_key("h2")) is not None

    run(scenario())


def test_same_events_twice_give_the_same_view(store_url: str) -> None:
    """Convergence (STYLE.md 7): replaying the watch stream changes nothing."""

    async def scenario() -> None:
        async with cloud(store_url) as c:
            await routed_cloud(c)
            agent = await c.start_agent("h1")
            await c.synced()
            before = {k: dict(v) for k, v in agent.topology.objects.items()}
            for key, value in list(agent.topology_mirror.values.items()):
                agent._on_topology_change(key, value, agent.revision)
            assert {k: dict(v) for k, v in agent.topology.objects.items()} == before
            assert agent.counters.bad_store_values == 0

    run(scenario())


def test_dead_host_ports_go_down_everywhere_within_the_lease_ttl(store_url: str) -> None:
    async def scenario() -> None:
        async with cloud(store_url) as c:
            bridge, (vm1, vm2, vm3) = await one_vm_per_host(c)
            await eventually(lambda: all(len(a.live_hosts) == 3 for a in c.agents.values()))
            # vm3 talks, so every host learns its MAC (published under h3's lease).
            arp = build_arp_request(sender_mac=vm3.mac, sender_ip="10.0.0.3", target_ip="10.0.0.1")
            c.datapaths["h3"].receive(vm3.tunnel_key, arp)
            assert received(c, "h2", vm2) == [arp] and received(c, "h1", vm1) == [arp]
            await c.synced()
            assert c.agents["h1"].tables.mac_port(bridge.id, 0, mac_to_int(vm3.mac)) == vm3.id
            to_vm3 = build_echo_request(
                eth_src=vm1.mac,
                eth_dst=vm3.mac,
                ip_src="10.0.0.1",
                ip_dst="10.0.0.3",
                identifier=3,
                sequence=1,
            )
            to_vm2 = build_echo_request(
                eth_src=vm1.mac,
                eth_dst=vm2.mac,
                ip_src="10.0.0.1",
                ip_dst="10.0.0.2",
                identifier=2,
                sequence=1,
            )
            c.datapaths["h1"].receive(vm1.tunnel_key, to_vm3)
            c.datapaths["h1"].receive(vm1.tunnel_key, to_vm2)
            assert received(c, "h3", vm3)[0] == to_vm3  # (to_vm2 is flooded: vm2 is unknown)
            assert received(c, "h2", vm2) == [to_vm2]

            # h3 dies without a goodbye (kill -9): nothing is revoked, its lease (2 s) expires.
            started = asyncio.get_running_loop().time()
            await c.agents.pop("h3").stop(graceful=False)
            await eventually(
                lambda: (
                    "h3" not in c.agents["h1"].live_hosts and "h3" not in c.agents["h2"].live_hosts
                ),
                timeout=6,
            )
            assert asyncio.get_running_loop().time() - started < 2 + 1.5  # TTL + check slack
            # Its learned MAC vanished with its lease, and h1 now drops towards its ports.
            await eventually(
                lambda: c.agents["h1"].tables.mac_port(bridge.id, 0, mac_to_int(vm3.mac)) is None
            )
            assert "h3" in c.agents["h1"].topology.down_hosts
            c.underlay.detach(HOSTS["h3"])  # the dead host no longer answers on the underlay
            arp_again = build_arp_request(
                sender_mac=vm1.mac, sender_ip="10.0.0.1", target_ip="10.0.0.3"
            )
            c.datapaths["h1"].receive(vm1.tunnel_key, arp_again)  # flood: vm2 yes, vm3 no
            # (the strict memory underlay would raise on a tunnel to the detached host)
            last = c.agents["h1"].pipeline.last_result
            assert last is not None and "egress_host_down" in last.format_trace()
            assert received(c, "h2", vm2) == [arp_again]
            # Traffic between the survivors was never disturbed.
            c.datapaths["h1"].receive(vm1.tunnel_key, to_vm2)
            assert received(c, "h2", vm2) == [to_vm2]

    run(scenario())


def test_a_value_whose_id_differs_from_its_key_is_refused(store_url: str) -> None:
    async def scenario() -> None:
        async with cloud(store_url) as c:
            agent = await c.start_agent("h1")
            await c.store.put("/hivenet/v1/topology/bridge/b1", b'{"name": "no id"}')
            await c.store.put(
                "/hivenet/v1/topology/bridge/b2", Bridge(id="b3").model_dump_json().encode()
            )
            await eventually(lambda: agent.counters.bad_store_values == 2)
            assert agent.topology.all("bridge") == []

    run(scenario())


def test_bad_values_in_the_loaded_snapshot_are_counted_and_left_out(
    store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """At start-up (one snapshot, each key parsed once): a key of no kind, a value whose id
    differs from its key and a value no model accepts are counted and logged by key; the rest
    loads."""

    async def scenario() -> None:
        async with cloud(store_url) as c:
            await c.repo.create(Bridge(id="good"))
            await c.store.put("/hivenet/v1/topology/nokind/x", b"{}")
            await c.store.put(
                "/hivenet/v1/topology/bridge/b2", Bridge(id="b3").model_dump_json().encode()
            )
            await c.store.put("/hivenet/v1/topology/port/p9", b'{"id":"p9","device_kind":7}')
            with caplog.at_level(logging.ERROR):
                agent = await c.start_agent("h1")
            assert agent.counters.bad_store_values == 3
            assert [b.id for b in agent.topology.all("bridge")] == ["good"]
            assert agent.topology.ports == {}
            for key in ("nokind/x", "bridge/b2", "port/p9"):
                assert f"/hivenet/v1/topology/{key}" in caplog.text
            assert "does not match the key" in caplog.text

    run(scenario())


def test_chains_load_undecoded_and_a_later_change_or_bad_value_is_seen_on_lookup(
    store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Start-up keeps stored chains and rules undecoded until a chain is looked up
    (bench/startup.py): a rule changed after the load is in the chain when it is compiled, and
    a bad stored rule is reported then by key and field, as at load, without a crash."""

    async def scenario() -> None:
        async with cloud(store_url) as c:
            chain = (await c.repo.create(Chain(name="sg"))).obj
            used = (await c.repo.create(Chain(name="used"))).obj
            rule = (
                await c.repo.create(Rule(chain_id=chain.id, action=RuleAction.ACCEPT, position=1))
            ).obj
            await c.repo.create(Rule(chain_id=used.id, action=RuleAction.ACCEPT, position=1))
            bad_key = topology_key("rule", "rbad")
            await c.store.put(
                bad_key, b'{"id":"rbad","chain_id":"%s","action":"nope"}' % (chain.id.encode())
            )
            agent = await c.start_agent("h1")
            await c.synced()
            assert agent.topology.loaded("rule") == []  # nothing decoded yet
            assert agent.counters.bad_store_values == 0
            assert [r.action for r in agent.topology.chains[used.id].rules] == [RuleAction.ACCEPT]
            # A change to a rule of a chain not compiled yet, and to one of a chain in use.
            await c.repo.modify(Rule, rule.id, lambda r: r.model_copy(update={"position": 2}))
            used_rule = agent.topology.chains[used.id].rules[0].rule
            await c.repo.modify(
                Rule, used_rule.id, lambda r: r.model_copy(update={"action": RuleAction.DROP})
            )
            await c.synced()
            await eventually(
                lambda: agent.topology.chains[used.id].rules[0].action is RuleAction.DROP
            )
            with caplog.at_level(logging.ERROR):
                rules = agent.topology.chains[chain.id].rules
            assert [(r.id, r.rule.position) for r in rules] == [(rule.id, 2)]
            assert agent.counters.bad_store_values == 1
            assert bad_key in caplog.text and "action" in caplog.text

    run(scenario())


@pytest.mark.parametrize("enabled_before", [True, False])
def test_start_holds_the_cyclic_gc_off_while_it_reads_and_loads_the_store(
    store_url: str, monkeypatch: pytest.MonkeyPatch, enabled_before: bool
) -> None:
    """The store read and the first load run without the cyclic GC (every collection would
    walk the growing heap again); start() leaves it as the caller had it."""

    async def scenario() -> None:
        async with cloud(store_url) as c:
            await c.repo.create(Bridge(id="b1"))
            seen: list[bool] = []
            store_range = c.store.range

            async def spying_range(*args: object, **kwargs: object) -> object:
                seen.append(gc.isenabled())
                return await store_range(*args, **kwargs)  # type: ignore[arg-type]

            monkeypatch.setattr(c.store, "range", spying_range)
            (gc.enable if enabled_before else gc.disable)()
            try:
                agent = await c.start_agent("h1")
                assert gc.isenabled() is enabled_before
            finally:
                gc.enable()
            assert seen and not any(seen)
            assert [b.id for b in agent.topology.all("bridge")] == ["b1"]

    run(scenario())
