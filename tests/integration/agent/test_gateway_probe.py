"""Fast gateway liveness between real in-process agents (memory datapath and underlay, a
fake clock): a gateway that stops answering probes leaves the other agents' ECMP set well
within 1 s while its store lease is still alive, and comes back after the recovery count."""

from __future__ import annotations

import ipaddress

from hivenet.clock import ManualClock
from hivenet.datapath.memory import MemoryDatapath
from hivenet.model import DeviceKind, Port, Route, Router
from hivenet.sim.routing import flow_hash
from tests.integration.agent.test_agents import HOSTS, cloud, store_url  # noqa: F401
from tests.integration.common import pass_time, run


def test_a_gateway_that_stops_answering_probes_leaves_ecmp_within_a_second(
    store_url: str,  # noqa: F811
) -> None:
    clock = ManualClock()

    async def scenario() -> None:
        async with cloud(store_url, clock) as c:
            router = (await c.repo.create(Router(name="edge"))).obj
            uplinks = {}
            for n, host in ((2, "h2"), (3, "h3")):
                port = Port(
                    device_kind=DeviceKind.ROUTER,
                    device_id=router.id,
                    host_id=host,
                    interface_name=f"hnup{n}",
                    addresses=(ipaddress.ip_interface(f"203.0.113.{n}/24"),),
                )
                uplinks[host] = (await c.repo.create(port)).obj
                route = Route(
                    router_id=router.id,
                    dst_prefix=ipaddress.ip_network("0.0.0.0/0"),
                    next_hop_port_id=uplinks[host].id,
                    next_hop_gateway=ipaddress.ip_address("203.0.113.254"),
                )
                await c.repo.create(route)
            for host in HOSTS:
                await c.start_agent(host)
            await c.synced()
            h1 = c.agents["h1"]

            def live_uplinks() -> set[str]:
                """The hosts h1's router would send flows to (ECMP over live next hops)."""
                table = h1.topology.routers[router.id].routes_v4
                group = table.lookup(int(ipaddress.IPv4Address("8.8.8.8")), 0)
                assert group is not None and len(group.next_hops) == 2
                chosen = set()
                for sport in range(200):
                    hop, _ = group.choose_live(
                        flow_hash(1, 2, 17, sport, 53),
                        lambda hop: (
                            h1.topology.ports[hop.port_id or ""].host_id
                            not in h1.topology.down_hosts
                        ),
                    )
                    chosen.add(h1.topology.ports[hop.port_id or ""].host_id or "")
                return chosen

            await pass_time(clock, 0.5)
            assert set(h1.probe.sessions) == {"h2", "h3"}
            assert live_uplinks() == {"h2", "h3"}
            # h3's agent stops answering h1's probes (its lease stays alive in the store).
            c.underlay.partition(HOSTS["h1"], HOSTS["h3"])
            await pass_time(clock, 0.2)
            assert "h3" not in h1.topology.down_hosts  # one or two lost probes: no flap
            await pass_time(clock, 0.3)
            assert "h3" in h1.live_hosts  # the lease alone would not have noticed
            assert "h3" in h1.topology.down_hosts  # detected within 0.5 s of fake time
            assert live_uplinks() == {"h2"}
            assert "h3" not in c.agents["h2"].topology.down_hosts  # h2 still reaches it
            # It comes back only after several answered probes.
            c.underlay.heal()
            await pass_time(clock, 0.1)
            assert "h3" in h1.topology.down_hosts
            await pass_time(clock, 0.4)
            assert "h3" not in h1.topology.down_hosts
            assert live_uplinks() == {"h2", "h3"}

    run(scenario())


def test_a_gateway_uplink_whose_link_dies_leaves_the_other_agents_ecmp(
    store_url: str,  # noqa: F811
) -> None:
    clock = ManualClock()
    links: dict[str, bool | None] = {"hnup2": True, "hnup3": True}

    async def scenario() -> None:
        async with cloud(store_url, clock) as c:
            router = (await c.repo.create(Router(name="edge"))).obj
            uplink_ids = {}
            for n in (2, 3):
                port = Port(
                    device_kind=DeviceKind.ROUTER,
                    device_id=router.id,
                    host_id=f"h{n}",
                    interface_name=f"hnup{n}",
                    addresses=(ipaddress.ip_interface(f"203.0.113.{n}/24"),),
                )
                uplink_ids[n] = (await c.repo.create(port)).obj.id
            for host in HOSTS:
                datapath = MemoryDatapath(host, HOSTS[host], c.underlay)
                await c.start_host_agent(host, datapath, clock=clock, link_state=links.get)
            await c.synced()
            await pass_time(clock, 0.5)
            h1, h3 = c.agents["h1"], c.agents["h3"]
            assert h3.bound_ports.keys() >= {uplink_ids[3]}
            assert not h1.topology.down_ports
            links["hnup3"] = False  # h3's uplink loses its link; h3 itself stays up
            await pass_time(clock, 0.4)
            assert uplink_ids[3] in h3.topology.down_ports  # h3's own ECMP skips it
            assert h1.topology.down_ports == {uplink_ids[3]}  # told in a probe reply
            assert "h3" not in h1.topology.down_hosts
            links["hnup3"] = True
            await pass_time(clock, 0.1)
            assert h1.topology.down_ports == {uplink_ids[3]}  # not back after one good poll
            await pass_time(clock, 0.6)
            assert not h1.topology.down_ports and not h3.topology.down_ports

    run(scenario())
