"""A gateway agent's uplink reports (agent/uplinks.py) read back through the API's view
(api/uplinks.py `router_uplinks`): real in-process agents, memory datapath, fake clock and
fake link states. The report follows the link, is written only when it changed, and is
gone with the agent's lease."""

from __future__ import annotations

import ipaddress

from hivenet.api.auth import Principal, Role
from hivenet.api.uplinks import router_uplinks
from hivenet.clock import ManualClock
from hivenet.datapath.memory import MemoryDatapath
from hivenet.model import BgpPeer, DeviceKind, Port, Router
from hivenet.store.keys import uplink_status_key
from tests.integration.agent.test_agents import HOSTS, cloud, store_url  # noqa: F401
from tests.integration.common import pass_time, run

ADMIN = Principal("admin", None, Role.ADMIN)


def test_uplink_reports_follow_the_link_and_vanish_with_the_host(
    store_url: str,  # noqa: F811
) -> None:
    clock = ManualClock()
    links: dict[str, bool | None] = {"hnup2": True}

    async def scenario() -> None:
        async with cloud(store_url, clock) as c:
            router = (await c.repo.create(Router(name="edge"))).obj
            port = Port(
                device_kind=DeviceKind.ROUTER,
                device_id=router.id,
                host_id="h2",
                interface_name="hnup2",
                addresses=(ipaddress.ip_interface("203.0.113.2/24"),),
            )
            uplink = (await c.repo.create(port)).obj
            peer = BgpPeer(
                port_id=uplink.id, local_as=65001, peer_as=65000, peer_ip="203.0.113.254"
            )
            await c.repo.create(peer)
            for host in HOSTS:
                datapath = MemoryDatapath(host, HOSTS[host], c.underlay)
                await c.start_host_agent(host, datapath, clock=clock, link_state=links.get)
            await c.synced()
            await pass_time(clock, 1.5)
            key = uplink_status_key("h2", uplink.id)
            assert await c.repo.store.get(key) is not None
            for host in HOSTS:  # only the uplink's own host reports it
                if host != "h2":
                    assert await c.repo.store.get(uplink_status_key(host, uplink.id)) is None

            (shown,) = (await router_uplinks(c.repo, ADMIN, router.id)).uplinks
            assert (shown.host_id, shown.host_alive, shown.link_up) == ("h2", True, True)
            # This agent runs no BGP speaker: the peer is listed, its session not reported.
            (session,) = shown.bgp_peers
            assert session.peer_ip == "203.0.113.254" and session.state is None

            reporter = c.agents["h2"].uplink_status
            writes = reporter.writes
            await pass_time(clock, 3.0)
            assert reporter.writes == writes  # nothing changed: nothing written

            links["hnup2"] = False
            await pass_time(clock, 1.5)
            (shown,) = (await router_uplinks(c.repo, ADMIN, router.id)).uplinks
            assert shown.link_up is False and reporter.writes == writes + 1

            await c.agents["h2"].stop()  # graceful: its lease is revoked
            (shown,) = (await router_uplinks(c.repo, ADMIN, router.id)).uplinks
            assert shown.host_alive is False and shown.link_up is None
            assert await c.repo.store.get(key) is None

    run(scenario())
