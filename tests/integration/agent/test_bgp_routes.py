"""The BGP speakers' bookkeeping in the store (agent/bgp.py), without BIRD: what a session
learned becomes exactly the router's learned routes (created, changed, withdrawn), and the
first live host deletes routes learned through a gateway that is down."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path

from hivenet.agent.bgp import BgpSpeakers, LearnedRoute, learned_routes_for
from hivenet.datapath.memory import MemoryDatapath
from hivenet.model import BgpPeer, DeviceKind, Host, Port, Route, Router, TopologyObject
from hivenet.sim import MemoryTables, TopologyView
from hivenet.store import open_store
from hivenet.store.topology import TopologyRepository


def default_via(gateway: str) -> LearnedRoute:
    return LearnedRoute(ipaddress.IPv4Network("0.0.0.0/0"), ipaddress.IPv4Address(gateway))


def test_learned_routes_follow_the_session_and_the_gateways_liveness() -> None:
    async def body() -> None:
        store = open_store("memory://")
        repo = TopologyRepository(store)
        try:
            objects: list[TopologyObject] = [Host(id="gw1"), Host(id="gw2"), Router(id="r1")]
            peers: dict[str, BgpPeer] = {}
            ports: dict[str, Port] = {}
            for number, host in ((1, "gw1"), (2, "gw2")):
                port = Port(
                    id=f"up{number}",
                    device_kind=DeviceKind.ROUTER,
                    device_id="r1",
                    addresses=(ipaddress.IPv4Interface(f"192.0.2.{number}/24"),),
                    host_id=host,
                    interface_name=f"eth{number}",
                )
                objects.append(port)
                peer = BgpPeer(
                    id=f"peer{number}",
                    port_id=port.id,
                    local_as=65001,
                    peer_as=65000,
                    peer_ip=ipaddress.IPv4Address("192.0.2.100"),
                )
                objects.append(peer)
                peers[host], ports[host] = peer, port
            for obj in objects:
                await repo.create(obj)
            view = TopologyView()

            async def stored_routes() -> list[Route]:
                return [item.obj for item in (await repo.list(Route)).items]

            async def load_view() -> None:
                """What the agent's watch would do: the view's routes become the store's."""
                for route_id in [r.id for r in view.all("route")]:
                    view.remove("route", route_id)
                for route in await stored_routes():
                    view.apply(route)

            stored = [item.obj for item in (await repo.list(Port)).items]
            view.apply_all([*objects[:3], *stored, peers["gw1"], peers["gw2"]])

            def speakers(host: str, live: set[str]) -> BgpSpeakers:
                return BgpSpeakers(
                    host,
                    view,
                    MemoryTables(),
                    MemoryDatapath(host, "127.0.0.1"),
                    repo,
                    is_bound=lambda _port: True,
                    live_hosts=lambda: live,
                )

            gw1 = speakers("gw1", {"gw2"})
            learned = [default_via("192.0.2.100")]
            await gw1._sync_routes(
                peers["gw1"], learned_routes_for(peers["gw1"], ports["gw1"], learned)
            )
            await load_view()
            (route,) = await stored_routes()
            assert route.learned_from == "peer1" and route.next_hop_port_id == "up1"
            # The peer changed its next hop: the route is rewritten, not duplicated.
            moved = learned_routes_for(peers["gw1"], ports["gw1"], [default_via("192.0.2.101")])
            await gw1._sync_routes(peers["gw1"], moved)
            await load_view()
            (route,) = await stored_routes()
            assert str(route.next_hop_gateway) == "192.0.2.101"
            # Withdrawn by the peer: gone.
            await gw1._sync_routes(peers["gw1"], [])
            await load_view()
            assert await stored_routes() == []
            # gw2 learns too, then dies: gw1 (first live host) sweeps its routes; gw2's own
            # sweep while gw1 lives does nothing (not the first live host).
            gw2 = speakers("gw2", {"gw1"})
            await gw2._sync_routes(
                peers["gw2"], learned_routes_for(peers["gw2"], ports["gw2"], learned)
            )
            await load_view()
            await gw2._sweep_dead_gateways()
            assert len(await stored_routes()) == 1
            alone = speakers("gw1", set())
            await alone._sweep_dead_gateways()
            assert await stored_routes() == []
        finally:
            await store.close()

    asyncio.run(body())


def test_speakers_make_their_temporary_directory_only_when_used_and_remove_it(
    tmp_path: Path,
) -> None:
    """Without a state directory given, none is made until a speaker needs one (an agent
    that never speaks BGP, closed or not, leaves nothing in /tmp); `close` removes it."""

    async def body() -> None:
        store = open_store("memory://")
        try:

            def speakers_of(host: str, state_dir: Path | None = None) -> BgpSpeakers:
                return BgpSpeakers(
                    host,
                    TopologyView(),
                    MemoryTables(),
                    MemoryDatapath(host, "127.0.0.1"),
                    TopologyRepository(store),
                    is_bound=lambda _port: True,
                    live_hosts=set,
                    state_dir=state_dir,
                )

            speakers = speakers_of("gw1")
            assert speakers._state_dir is None
            made = speakers.state_dir
            assert made.is_dir() and made.name.startswith("hn-bgp-")
            assert speakers.state_dir == made  # made once
            await speakers.close()
            assert not made.exists()
            given = speakers_of("gw2", tmp_path / "hn-bgp-given")
            given.state_dir.mkdir()
            await given.close()
            assert given.state_dir.is_dir()  # not ours to remove
        finally:
            await store.close()

    asyncio.run(body())
