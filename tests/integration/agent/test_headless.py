"""Headless agents (issue: surviving failures): an agent cut off from the store keeps
forwarding existing and new flows with its cached topology, and when the store returns it
catches up from its last revision, re-registers after its lease expired, re-publishes, and
converges with the others."""

from __future__ import annotations

import asyncio
import ipaddress

from hivenet.agent.agent import HostAgent
from hivenet.clock import ManualClock
from hivenet.datapath.memory import MemoryDatapath, MemoryUnderlay
from hivenet.model import Bridge, DeviceKind, Host, Port
from hivenet.model.types import mac_to_int
from hivenet.packets import build_arp_request, build_echo_request
from hivenet.store import open_store
from hivenet.store.keys import host_alive_key, mac_entry_key, port_active_key
from hivenet.store.topology import TopologyRepository
from tests.integration.common import pass_time, until_gone

from .flaky import FlakyStore
from .test_agents import HOSTS, eventually


def test_agents_forward_through_a_store_outage_and_converge_after() -> None:
    clock = ManualClock()  # leases: the agents' refreshes and the store's expiry

    async def scenario() -> None:
        store = open_store("memory://", clock=clock)
        repo = TopologyRepository(store)
        underlay = MemoryUnderlay()
        for host in ("h1", "h2"):
            await repo.create(Host(id=host, name=host))
        bridge = (await repo.create(Bridge(name="net1"))).obj

        async def vm(host: str, ifname: str, mac: str, ip: str) -> Port:
            port = Port(
                device_kind=DeviceKind.BRIDGE,
                device_id=bridge.id,
                host_id=host,
                interface_name=ifname,
                mac=mac,
                addresses=(ipaddress.ip_interface(ip),),
            )
            return (await repo.create(port)).obj

        vm1 = await vm("h1", "hnvm1", "02:00:00:00:00:01", "10.0.0.1/24")
        vm2 = await vm("h2", "hnvm2", "02:00:00:00:00:02", "10.0.0.2/24")
        vm3 = await vm("h2", "hnvm3", "02:00:00:00:00:03", "10.0.0.3/24")
        links = {h: FlakyStore(store) for h in ("h1", "h2")}
        datapaths = {h: MemoryDatapath(h, HOSTS[h], underlay) for h in ("h1", "h2")}
        agents = {
            h: HostAgent(
                links[h],
                datapaths[h],
                host_id=h,
                underlay_ip=HOSTS[h],  # type: ignore[arg-type]
                tunnel_zone_id="tz",
                lease_ttl=2,
                reconcile_interval=0.05,
                clock=clock,
            )
            for h in ("h1", "h2")
        }
        try:
            for agent in agents.values():
                await agent.start()
            ping = build_echo_request(
                eth_src=vm1.mac,
                eth_dst=vm2.mac,
                ip_src="10.0.0.1",
                ip_dst="10.0.0.2",
                identifier=1,
                sequence=1,
            )
            arp = build_arp_request(sender_mac=vm1.mac, sender_ip="10.0.0.1", target_ip="10.0.0.2")
            datapaths["h1"].receive(vm1.tunnel_key, arp)  # everyone learns vm1
            await eventually(
                lambda: agents["h2"].tables.mac_port(bridge.id, 0, mac_to_int(vm1.mac)) == vm1.id
            )
            datapaths["h1"].receive(vm1.tunnel_key, ping)
            datapaths["h2"].take(vm2.tunnel_key)
            datapaths["h2"].take(vm3.tunnel_key)

            # The store goes away for both agents for longer than their lease TTL.
            for link in links.values():
                link.partition()
            await asyncio.sleep(0.1)
            assert not agents["h1"].topology_mirror.connected
            # An existing flow still forwards...
            datapaths["h1"].receive(vm1.tunnel_key, ping)
            assert datapaths["h2"].take(vm2.tunnel_key) == [ping]
            # ...and so does a brand-new one (simulated on the cached topology; vm3 is learned
            # locally and its publication waits for the store).
            new_flow = build_echo_request(
                eth_src=vm3.mac,
                eth_dst=vm1.mac,
                ip_src="10.0.0.3",
                ip_dst="10.0.0.1",
                identifier=3,
                sequence=1,
            )
            datapaths["h2"].receive(vm3.tunnel_key, new_flow)
            assert datapaths["h1"].take(vm1.tunnel_key) == [new_flow]
            assert agents["h2"].pending_publications >= 1
            # Meanwhile the API keeps writing: a new VM port on h1.
            vm4 = await vm("h1", "hnvm4", "02:00:00:00:00:04", "10.0.0.4/24")
            await pass_time(clock, 3.0)  # both leases expire in the store: liveness keys vanish
            await until_gone(store, host_alive_key("h1"))

            for link in links.values():
                link.heal()
            # Time goes on: the lease loops find their leases gone, publish retries come due
            # (their back-off grew to a few seconds during the outage).
            await pass_time(clock, 6.0)
            # Catch up and converge: new lease, liveness and ports re-published, the change
            # made during the outage applied, vm3's MAC published and seen by h1.
            await eventually(lambda: vm4.id in agents["h1"].bound_ports, timeout=10)
            await eventually(
                lambda: all(a.pending_publications == 0 for a in agents.values()), timeout=10
            )
            for host, port in (("h1", vm1), ("h1", vm4), ("h2", vm2), ("h2", vm3)):
                assert await store.get(port_active_key(host, port.id)) is not None
                assert await store.get(host_alive_key(host)) is not None
            assert await store.get(mac_entry_key(bridge.id, 0, vm3.mac)) is not None
            await eventually(
                lambda: agents["h1"].tables.mac_port(bridge.id, 0, mac_to_int(vm3.mac)) == vm3.id,
                timeout=10,
            )
            await eventually(
                lambda: all(a.live_hosts == {"h1", "h2"} for a in agents.values()), timeout=10
            )
            assert agents["h1"].counters.lease_lost >= 1 and agents["h2"].counters.lease_lost >= 1
            datapaths["h1"].receive(vm1.tunnel_key, ping)
            assert datapaths["h2"].take(vm2.tunnel_key) == [ping]
        finally:
            for agent in agents.values():
                await agent.stop()
            await store.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))
