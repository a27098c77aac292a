"""Multi-host scenarios over the memory datapath: topology + frames in at VM ports +
what every VM port received, with flows cached and invalidated as the agents would."""

from __future__ import annotations

import ipaddress

import pytest

from hivenet.datapath.memory import DatapathError, MemoryDatapath, MemoryUnderlay
from hivenet.flows.actions import Output, SetField, Tunnel
from hivenet.model import RouteType
from hivenet.model.types import mac_to_int
from hivenet.packets import parse_frame
from tests.integration.sim.harness import Cloud
from tests.unit.sim.topo import Topo, arp_who_has, mac, ping, port_mac, udp

VMS = ("vm1", "vm2", "vm3", "vm4")


def l2_cloud() -> tuple[Cloud, Topo]:
    """One bridge, VMs on three hosts (vm4 shares h1 with vm1)."""
    cloud = Cloud(["h1", "h2", "h3"])
    topo = Topo()
    topo.bridge("b1")
    for n, host in enumerate(("h1", "h2", "h3", "h1"), 1):
        topo.vm_port("b1", f"vm{n}", host, mac_n=n)
    cloud.apply(*topo.objects)
    return cloud, topo


def test_learning_and_flooding_across_three_hosts() -> None:
    cloud, _ = l2_cloud()
    first = udp(mac(1), mac(2), "10.0.0.1", "10.0.0.2")
    cloud.send("vm1", first)
    # Unknown destination: flooded to every other VM, over tunnels where remote.
    assert cloud.inboxes(VMS) == {"vm1": 0, "vm2": 1, "vm3": 1, "vm4": 1}
    cloud.send("vm2", udp(mac(2), mac(1), "10.0.0.2", "10.0.0.1"))
    assert cloud.inboxes(VMS) == {"vm1": 1, "vm2": 0, "vm3": 0, "vm4": 0}
    # vm2 is now known: vm1's next packet is unicast (the flood flow was invalidated).
    cloud.send("vm1", first)
    assert cloud.inboxes(VMS) == {"vm1": 0, "vm2": 1, "vm3": 0, "vm4": 0}
    assert cloud.counters("h1")["upcalls"] == 2
    # And the unicast flow is now cached on h1: no further upcall.
    cloud.send("vm1", first)
    assert cloud.inboxes(VMS)["vm2"] == 1
    counters = cloud.counters("h1")
    assert counters["upcalls"] == 2 and counters["hits"] == 1


def test_mac_move_invalidates_flows_on_every_host() -> None:
    cloud, _topo = l2_cloud()
    cloud.send("vm2", udp(mac(2), mac(9), "10.0.0.2", "10.0.0.9"))
    cloud.send("vm1", udp(mac(1), mac(2), "10.0.0.1", "10.0.0.2"))
    assert cloud.inboxes(VMS)["vm2"] == 1
    # mac(2) moves behind vm3 (e.g. live migration): vm1's cached unicast must follow.
    cloud.send("vm3", udp(mac(2), mac(9), "10.0.0.2", "10.0.0.9"))
    cloud.inboxes(VMS)
    cloud.send("vm1", udp(mac(1), mac(2), "10.0.0.1", "10.0.0.2"))
    assert cloud.inboxes(VMS) == {"vm1": 0, "vm2": 0, "vm3": 1, "vm4": 0}


def routed_cloud() -> tuple[Cloud, Topo]:
    cloud = Cloud(["h1", "h2"])
    topo = Topo()
    topo.bridge("b1")
    topo.bridge("b2")
    topo.router("r1")
    topo.vm_port("b1", "vm1", "h1", mac_n=1, addresses=("10.0.1.10/24",))
    topo.vm_port("b2", "vm2", "h2", mac_n=2, addresses=("10.0.2.10/24",))
    topo.link("b1", "r1", "10.0.1.1/24")
    topo.link("b2", "r1", "10.0.2.1/24")
    cloud.apply(*topo.objects)
    return cloud, topo


def test_router_between_two_subnets_end_to_end() -> None:
    cloud, topo = routed_cloud()
    gateway = port_mac(topo, "r1-b1")
    # ARP for the gateway: answered by the router.
    cloud.send("vm1", arp_who_has(mac(1), "10.0.1.10", "10.0.1.1"))
    (arp_reply,) = cloud.received("vm1")
    assert parse_frame(arp_reply).arp.sender_mac == gateway  # type: ignore[union-attr]
    # Ping the gateway.
    cloud.send("vm1", ping(mac(1), gateway, "10.0.1.10", "10.0.1.1"))
    (echo,) = cloud.received("vm1")
    assert parse_frame(echo).icmp.type == 0  # type: ignore[union-attr]
    # First packet to vm2: the router ARPs for it (the request reaches vm2 on h2), drops.
    packet = udp(mac(1), gateway, "10.0.1.10", "10.0.2.10", ttl=64)
    cloud.send("vm1", packet)
    (request,) = cloud.received("vm2")
    arp = parse_frame(request).arp
    assert arp is not None and arp.operation == 1
    # vm2 answers; the router learns, which invalidates the short drop flow on h1.
    cloud.send("vm2", parse_reply_to(request, mac(2)))
    assert cloud.received("vm1") == []
    cloud.send("vm1", packet)
    (delivered,) = cloud.received("vm2")
    parsed = parse_frame(delivered)
    assert parsed.ethernet.src == port_mac(topo, "r1-b2")
    assert parsed.ethernet.dst == mac_to_int(mac(2))
    assert parsed.ipv4 is not None and parsed.ipv4.ttl == 63
    # The routed flow is cached: the next packet does not upcall.
    upcalls = cloud.counters("h1")["upcalls"]
    cloud.send("vm1", packet)
    assert len(cloud.received("vm2")) == 1
    assert cloud.counters("h1")["upcalls"] == upcalls


def parse_reply_to(request: bytes, answer_mac: str) -> bytes:
    from hivenet.packets import arp_reply_to

    return arp_reply_to(request, answer_mac)


def resolved_routed_cloud() -> tuple[Cloud, Topo]:
    cloud, topo = routed_cloud()
    cloud.tables.neighbours[("r1", 4, int(ipaddress.IPv4Address("10.0.2.10")))] = mac_to_int(mac(2))
    cloud.tables.neighbours[("r1", 4, int(ipaddress.IPv4Address("10.0.1.10")))] = mac_to_int(mac(1))
    return cloud, topo


def test_ttl_expiry_returns_time_exceeded_to_the_sender() -> None:
    cloud, topo = resolved_routed_cloud()
    cloud.send("vm1", udp(mac(1), port_mac(topo, "r1-b1"), "10.0.1.10", "10.0.2.10", ttl=1))
    assert cloud.received("vm2") == []
    (error,) = cloud.received("vm1")
    parsed = parse_frame(error)
    assert parsed.icmp is not None and parsed.icmp.type == 11
    assert parsed.ipv4 is not None and parsed.ipv4.src == int(ipaddress.IPv4Address("10.0.1.1"))


@pytest.mark.parametrize(
    ("kind", "icmp_replies"), [(RouteType.REJECT, 1), (RouteType.BLACKHOLE, 0)]
)
def test_reject_and_blackhole_routes(kind: RouteType, icmp_replies: int) -> None:
    cloud, topo = resolved_routed_cloud()
    topo2 = Topo()
    cloud.apply(topo2.special_route("r1", "203.0.113.0/24", kind))
    cloud.send("vm1", udp(mac(1), port_mac(topo, "r1-b1"), "10.0.1.10", "203.0.113.5"))
    replies = cloud.received("vm1")
    assert len(replies) == icmp_replies
    if replies:
        assert parse_frame(replies[0]).icmp.type == 3  # type: ignore[union-attr]


def test_route_change_reroutes_a_cached_flow() -> None:
    cloud, topo = resolved_routed_cloud()
    packet = udp(mac(1), port_mac(topo, "r1-b1"), "10.0.1.10", "203.0.113.5")
    extra = Topo()
    route = extra.route("r1", "203.0.113.0/24", "r1-b2", gw="10.0.2.10")
    cloud.apply(route)
    cloud.send("vm1", packet)
    cloud.send("vm1", packet)
    assert len(cloud.received("vm2")) == 2
    cloud.remove("route", route.id)
    cloud.send("vm1", packet)
    assert cloud.received("vm2") == []
    assert parse_frame(cloud.received("vm1")[0]).icmp.code == 0  # type: ignore[union-attr]


def test_rule_change_invalidates_and_port_down_drops() -> None:
    cloud, _topo = l2_cloud()
    extra = Topo()
    chain = extra.chain("guard")
    cloud.apply(chain, cloud.port("vm1").model_copy(update={"inbound_chain_id": "guard"}))
    cloud.send("vm2", udp(mac(2), mac(9), "10.0.0.2", "10.0.0.9"))
    cloud.inboxes(VMS)
    packet = udp(mac(1), mac(2), "10.0.0.1", "10.0.0.2", dport=22)
    cloud.send("vm1", packet)
    assert cloud.inboxes(VMS)["vm2"] == 1
    from hivenet.model import PortRange

    cloud.apply(extra.rule("guard", "drop", tp_dst=PortRange(start=22, end=22)))
    cloud.send("vm1", packet)
    assert cloud.inboxes(VMS)["vm2"] == 0
    assert cloud.counters("h1")["drop.flow_rule_drop"] == 1
    cloud.send("vm1", udp(mac(1), mac(2), "10.0.0.1", "10.0.0.2", dport=80))
    assert cloud.inboxes(VMS)["vm2"] == 1
    cloud.apply(cloud.port("vm2").model_copy(update={"admin_state_up": False}))
    cloud.send("vm1", udp(mac(1), mac(2), "10.0.0.1", "10.0.0.2", dport=80))
    assert cloud.inboxes(VMS)["vm2"] == 0


def test_partitioned_underlay_drops_tunnelled_copies_only() -> None:
    cloud, _ = l2_cloud()
    cloud.underlay.partition("192.0.2.1", "192.0.2.2")
    cloud.send("vm1", udp(mac(1), mac(9), "10.0.0.1", "10.0.0.9"))
    assert cloud.inboxes(VMS) == {"vm1": 0, "vm2": 0, "vm3": 1, "vm4": 1}
    cloud.underlay.heal()
    cloud.send("vm1", udp(mac(1), mac(9), "10.0.0.1", "10.0.0.9"))
    assert cloud.inboxes(VMS) == {"vm1": 0, "vm2": 1, "vm3": 1, "vm4": 1}


def test_flows_expire_when_idle() -> None:
    cloud, _ = l2_cloud()
    cloud.send("vm1", udp(mac(1), mac(9), "10.0.0.1", "10.0.0.9"))
    assert cloud.counters("h1")["flows"] == 1
    cloud.advance(61)
    assert cloud.counters("h1")["flows"] == 0


def test_memory_datapath_is_strict() -> None:
    underlay = MemoryUnderlay()
    datapath = MemoryDatapath("h1", "192.0.2.1", underlay, clock=lambda: 0.0)
    datapath.bind_port(5, "hn-vm5")
    mask = tuple(0 for _ in range(23))
    with pytest.raises(DatapathError, match="port_key 6"):
        datapath.install_flow(mask, mask, [Output(6)], [])
    with pytest.raises(DatapathError, match=r"198\.51\.100\.1"):
        datapath.execute(b"", [Tunnel("198.51.100.1", 5)])
    with pytest.raises(DatapathError, match="not a flow action"):
        datapath.install_flow(mask, mask, ["output:5"], [])  # type: ignore[list-item]
    with pytest.raises(DatapathError, match="not bound"):
        datapath.receive(7, b"\x00" * 60)
    with pytest.raises(DatapathError, match="no port with that key"):
        datapath.receive_tunnel(9, b"\x00" * 60)
    with pytest.raises(DatapathError, match="match"):
        datapath.install_flow((1, *mask[1:]), mask, [Output(5)], [])
    datapath.install_flow(mask, mask, [SetField("eth_dst", 1), Output(5)], ["t"])
    assert datapath.invalidate(["t"]) == 1
