"""The edge in the simulation: BGP packets for an uplink's own address go to the host's
speaker (never cached, before any chain), everything else through the uplink is routed as
before; routes learned by BGP share traffic across uplinks (ECMP) and leave the set as soon
as their gateway's host is down (sim/router.py, sim/topology.py)."""

from __future__ import annotations

import ipaddress

from hivenet.model import BgpPeer, RouteType
from hivenet.sim.router import HANDOFF_BGP
from tests.unit.sim.topo import Sim, Topo, mac, port_mac, tcp

PEER_MAC = mac(900)


def edge() -> Topo:
    """r1 with net1 behind it and two uplinks on gw1/gw2, each with a BGP peer and a learned
    default route."""
    topo = Topo()
    topo.bridge("net1")
    topo.router("r1")
    topo.link("net1", "r1", "10.0.1.1/24")
    topo.vm_port("net1", "vm1", "h1", addresses=("10.0.1.10/24",))
    for number, host in ((1, "gw1"), (2, "gw2")):
        base = 0 if number == 1 else 128
        topo.router_port(
            "r1",
            f"up{number}",
            f"192.0.2.{base + 1}/25",
            host_id=host,
            interface_name=f"eth{number}",
        )
        topo.add(
            BgpPeer(
                id=f"peer{number}",
                port_id=f"up{number}",
                local_as=65001,
                peer_as=65000,
                peer_ip=ipaddress.ip_address(f"192.0.2.{base + 2}"),
            )
        )
        topo.route(
            "r1", "0.0.0.0/0", f"up{number}", f"192.0.2.{base + 2}", learned_from=f"peer{number}"
        )
    topo.zone({"h1": "172.31.0.1", "gw1": "172.31.0.2", "gw2": "172.31.0.3"})
    return topo


def test_bgp_to_the_uplink_address_is_handed_to_the_speaker_and_never_cached() -> None:
    topo = edge()
    sim = Sim(topo.view(), host="gw1")
    for sport, dport in ((40000, 179), (179, 40000)):
        frame = tcp(PEER_MAC, port_mac(topo, "up1"), "192.0.2.2", "192.0.2.1", sport, dport)
        result = sim.run(frame, "up1")
        assert result.handoff == HANDOFF_BGP, result.format_trace()
        assert not result.install and not result.generated
        assert result.drop_reason == HANDOFF_BGP  # consumed here; nothing leaves the router


def test_other_tcp_to_the_uplink_address_is_not_handed_off() -> None:
    topo = edge()
    sim = Sim(topo.view(), host="gw1")
    frame = tcp(PEER_MAC, port_mac(topo, "up1"), "192.0.2.2", "192.0.2.1", 40000, 22)
    assert sim.run(frame, "up1").handoff is None
    # BGP-port traffic to another address (routed through) is no session of ours either.
    frame = tcp(PEER_MAC, port_mac(topo, "up1"), "192.0.2.2", "10.0.1.10", 40000, 179)
    assert sim.run(frame, "up1").handoff is None


def test_an_uplink_without_a_bgp_peer_hands_nothing_off() -> None:
    topo = edge()
    view = topo.view()
    tags = view.remove("bgp_peer", "peer1")
    assert "port:up1" in tags  # its cached flows did not tell BGP packets apart
    frame = tcp(PEER_MAC, port_mac(topo, "up1"), "192.0.2.2", "192.0.2.1", 40000, 179)
    assert Sim(view, host="gw1").run(frame, "up1").handoff is None


def test_learned_defaults_share_flows_across_both_uplinks() -> None:
    topo = edge()
    view = topo.view()
    group = view.routers["r1"].routes_v4.lookup(int(ipaddress.ip_address("203.0.113.1")), 0)
    assert group is not None
    assert {hop.port_id for hop in group.next_hops} == {"up1", "up2"}


def test_a_dead_gateway_leaves_the_ecmp_set_and_comes_back() -> None:
    topo = edge()
    view = topo.view()
    internet = int(ipaddress.ip_address("203.0.113.1"))
    tags = view.set_host_alive("gw1", False)
    assert "router:r1" in tags  # flows that chose it are invalidated
    group = view.routers["r1"].routes_v4.lookup(internet, 0)
    assert group is not None and [hop.port_id for hop in group.next_hops] == ["up2"]
    tags = view.set_host_alive("gw1", True)
    assert "router:r1" in tags
    group = view.routers["r1"].routes_v4.lookup(internet, 0)
    assert group is not None and {hop.port_id for hop in group.next_hops} == {"up1", "up2"}


def test_a_static_route_through_a_dead_gateway_stays() -> None:
    """Only learned routes follow their gateway's liveness (a static one is the operator's)."""
    topo = edge()
    topo.route("r1", "198.18.0.0/15", "up1", "192.0.2.2")
    view = topo.view()
    view.set_host_alive("gw1", False)
    group = view.routers["r1"].routes_v4.lookup(int(ipaddress.ip_address("198.18.0.1")), 0)
    assert group is not None and group.next_hops[0].port_id == "up1"
    assert group.next_hops[0].type is RouteType.NORMAL
