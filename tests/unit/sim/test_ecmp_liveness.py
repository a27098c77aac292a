"""ECMP over live next hops: uplinks on down hosts or with a down link (`down_ports`) are
left out of the choice while a live one remains, and exactly the flows whose choice a death
or a return changes carry the tag that invalidates them."""

from __future__ import annotations

import ipaddress

from hivenet.flows.actions import Output, Tunnel
from hivenet.model.types import mac_to_int
from hivenet.sim import SimulationResult
from tests.unit.sim.topo import Sim, Topo, mac, port_mac, udp

HOSTS = {"h1": "192.0.2.1", "g1": "192.0.2.11", "g2": "192.0.2.12", "g3": "192.0.2.13"}
GATEWAYS = ("g1", "g2", "g3")
SPORTS = range(3000, 3600)


def uplinks() -> tuple[Topo, Sim]:
    """VM on h1 behind r1; three uplinks (one per gateway host), a default route via each."""
    topo = Topo()
    topo.bridge("b1")
    topo.router("r1")
    topo.vm_port("b1", "vm1", "h1", mac_n=1, addresses=("10.0.1.10/24",))
    topo.link("b1", "r1", "10.0.1.1/24")
    for n, host in enumerate(GATEWAYS, 1):
        topo.router_port(
            "r1", f"up-{host}", f"203.0.113.{n}/30", host_id=host, interface_name=f"hnup{n}"
        )
        topo.route("r1", "0.0.0.0/0", f"up-{host}", gw=f"203.0.113.{n + 100}")
    topo.zone(HOSTS)
    sim = Sim(topo.view())
    for n in range(1, len(GATEWAYS) + 1):
        ip = int(ipaddress.IPv4Address(f"203.0.113.{n + 100}"))
        sim.tables.neighbours[("r1", 4, ip)] = mac_to_int(mac(100 + n))
    return topo, sim


def out(sim: Sim, topo: Topo, sport: int) -> tuple[str | None, SimulationResult]:
    """The gateway host a flow leaves through (None: dropped), and the result."""
    result = sim.run(
        udp(mac(1), port_mac(topo, "r1-b1"), "10.0.1.10", "8.8.8.8", sport=sport), "vm1"
    )
    for action in result.actions:
        if isinstance(action, Tunnel):
            return next(h for h, ip in HOSTS.items() if ip == action.remote_ip), result
        if isinstance(action, Output):
            return "h1", result
    return None, result


def choices(sim: Sim, topo: Topo) -> dict[int, tuple[str | None, frozenset[str]]]:
    chosen = {}
    for sport in SPORTS:
        host, result = out(sim, topo, sport)
        chosen[sport] = (host, frozenset(result.tags))
    return chosen


def test_a_down_gateway_host_leaves_the_ecmp_set_and_only_its_flows_move() -> None:
    topo, sim = uplinks()
    before = choices(sim, topo)
    assert {host for host, _ in before.values()} == set(GATEWAYS)
    tags = sim.view.set_host_alive("g2", False)
    assert tags == {"host:g2"}
    # Exactly the flows that used g2 carry its tag (they are what the agent invalidates).
    tagged = {sport for sport, (_, flow_tags) in before.items() if tags & flow_tags}
    assert tagged == {sport for sport, (host, _) in before.items() if host == "g2"}
    during = choices(sim, topo)
    assert {host for host, _ in during.values()} == {"g1", "g3"}  # nothing dropped
    moved = {sport for sport in SPORTS if before[sport][0] != during[sport][0]}
    assert moved == tagged
    # It comes back: the flows whose choice returns to g2 carry host:g2 (they skipped it).
    back = sim.view.set_host_alive("g2", True)
    tagged_now = {sport for sport, (_, flow_tags) in during.items() if back & flow_tags}
    after = choices(sim, topo)
    changed = {sport for sport in SPORTS if during[sport][0] != after[sport][0]}
    assert changed == {sport for sport in SPORTS if after[sport][0] == "g2"}
    assert changed <= tagged_now
    # No flow that kept its choice and never ranked g2 first is invalidated needlessly.
    assert tagged_now == changed
    assert {sport: host for sport, (host, _) in after.items()} == {
        sport: host for sport, (host, _) in before.items()
    }


def test_a_down_uplink_port_leaves_the_ecmp_set_and_its_egress_drops() -> None:
    topo, sim = uplinks()
    before = choices(sim, topo)
    tags = sim.view.set_port_alive("up-g3", False)
    assert tags == {"port:up-g3"}
    assert sim.view.set_port_alive("up-g3", False) == frozenset()  # no change, no tags
    tagged = {sport for sport, (_, flow_tags) in before.items() if tags & flow_tags}
    assert tagged == {sport for sport, (host, _) in before.items() if host == "g3"}
    during = choices(sim, topo)
    assert {host for host, _ in during.values()} == {"g1", "g2"}
    assert all(during[s][0] == before[s][0] for s in SPORTS if before[s][0] != "g3")
    sim.view.set_port_alive("up-g3", True)
    assert {s: h for s, (h, _) in choices(sim, topo).items()} == {
        s: h for s, (h, _) in before.items()
    }


def test_with_every_uplink_down_the_packet_is_dropped_and_any_return_invalidates_it() -> None:
    topo, sim = uplinks()
    for host in GATEWAYS:
        sim.view.set_host_alive(host, False)
    host, result = out(sim, topo, 3000)
    assert host is None and result.drop_reason == "egress_host_down"
    assert {"host:g1", "host:g2", "host:g3"} <= set(result.tags)
    sim.view.set_host_alive("g1", True)
    sim.view.set_port_alive("up-g1", False)
    host, result = out(sim, topo, 3000)
    assert host is None and result.drop_reason in ("egress_host_down", "egress_port_down")


def test_a_single_uplink_that_is_down_drops_with_its_reason() -> None:
    topo = Topo()
    topo.bridge("b1")
    topo.router("r1")
    topo.vm_port("b1", "vm1", "h1", mac_n=1, addresses=("10.0.1.10/24",))
    topo.link("b1", "r1", "10.0.1.1/24")
    topo.router_port("r1", "up-g1", "203.0.113.1/30", host_id="g1", interface_name="hnup1")
    topo.route("r1", "0.0.0.0/0", "up-g1", gw="203.0.113.101")
    topo.zone(HOSTS)
    sim = Sim(topo.view())
    sim.tables.neighbours[("r1", 4, int(ipaddress.IPv4Address("203.0.113.101")))] = 7
    sim.view.set_port_alive("up-g1", False)
    host, result = out(sim, topo, 3000)
    assert host is None and result.drop_reason == "egress_port_down"
    assert "port:up-g1" in result.tags
