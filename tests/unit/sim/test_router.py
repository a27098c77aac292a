"""Router simulation: ARP/ND, ping, forwarding, TTL, ICMP errors, route types, ECMP, IPv6."""

from __future__ import annotations

import ipaddress
from collections import Counter

from hivenet.flows.actions import DecTtl, Drop, Output, SetField, Tunnel
from hivenet.model import RouteType
from hivenet.model.types import mac_to_int
from hivenet.packets import build_neighbor_solicitation, parse_frame
from hivenet.sim import LearnedNeighbour
from tests.unit.sim.topo import Sim, Topo, arp_who_has, mac, ping, port_mac, tcp, udp

HOSTS = {"h1": "192.0.2.1", "h2": "192.0.2.2"}


def two_subnets() -> Topo:
    topo = Topo()
    topo.bridge("b1")
    topo.bridge("b2")
    topo.router("r1")
    topo.vm_port("b1", "vm1", "h1", mac_n=1, addresses=("10.0.1.10/24", "2001:db8:1::10/64"))
    topo.vm_port("b2", "vm2", "h2", mac_n=2, addresses=("10.0.2.10/24", "2001:db8:2::10/64"))
    topo.link("b1", "r1", "10.0.1.1/24", "2001:db8:1::1/64")
    topo.link("b2", "r1", "10.0.2.1/24", "2001:db8:2::1/64")
    topo.zone(HOSTS)
    return topo


def gw(topo: Topo, subnet: int = 1) -> int:
    return port_mac(topo, f"r1-b{subnet}")


def key(topo: Topo, port_id: str) -> int:
    return topo.ports[port_id].tunnel_key


def resolved(topo: Topo) -> Sim:
    sim = Sim(topo.view())
    sim.tables.neighbours[("r1", 4, int(ipaddress.IPv4Address("10.0.2.10")))] = mac_to_int(mac(2))
    sim.tables.neighbours[("r1", 4, int(ipaddress.IPv4Address("10.0.1.10")))] = mac_to_int(mac(1))
    return sim


def test_arp_for_the_router_is_answered_and_teaches_the_router() -> None:
    topo = two_subnets()
    sim = Sim(topo.view())
    result = sim.run(arp_who_has(mac(1), "10.0.1.10", "10.0.1.1"), "vm1")
    assert not result.install
    assert LearnedNeighbour(
        "r1", 4, int(ipaddress.IPv4Address("10.0.1.10")), mac_to_int(mac(1))
    ) in (result.learned)
    (reply,) = result.generated
    assert reply.actions == (Output(key(topo, "vm1")),)
    arp = parse_frame(reply.frame).arp
    assert arp is not None and arp.operation == 2 and arp.sender_mac == gw(topo)
    assert arp.sender_ip == int(ipaddress.IPv4Address("10.0.1.1"))


def test_ping_the_router_gets_an_echo_reply() -> None:
    topo = two_subnets()
    result = Sim(topo.view()).run(ping(mac(1), gw(topo), "10.0.1.10", "10.0.1.1"), "vm1")
    (reply,) = result.generated
    parsed = parse_frame(reply.frame)
    assert parsed.icmp is not None and parsed.icmp.type == 0
    assert parsed.ipv4 is not None
    assert parsed.ipv4.src == int(ipaddress.IPv4Address("10.0.1.1"))
    assert reply.actions == (Output(key(topo, "vm1")),)
    assert not result.install


def test_ping_the_far_router_address_is_answered_too() -> None:
    topo = two_subnets()
    result = Sim(topo.view()).run(ping(mac(1), gw(topo), "10.0.1.10", "10.0.2.1"), "vm1")
    (reply,) = result.generated
    assert parse_frame(reply.frame).icmp.type == 0  # type: ignore[union-attr]


def test_forwarding_rewrites_macs_and_decrements_ttl() -> None:
    topo = two_subnets()
    sim = resolved(topo)
    result = sim.run(udp(mac(1), gw(topo), "10.0.1.10", "10.0.2.10", ttl=64), "vm1")
    assert result.actions == (
        SetField("eth_src", gw(topo, 2)),
        SetField("eth_dst", mac_to_int(mac(2))),
        DecTtl(),
        Tunnel("192.0.2.2", key(topo, "vm2")),
    )
    assert result.install
    assert "arp:r1:10.0.2.10" in result.tags and "router:r1" in result.tags
    # TTL is read only as far as "is it <= 1": bits 7..1.
    assert result.wildcard()["ip_ttl"] == 0xFE


def test_a_bad_ipv4_header_checksum_is_dropped_at_the_router_and_never_cached() -> None:
    topo = two_subnets()
    good = udp(mac(1), gw(topo), "10.0.1.10", "10.0.2.10", ttl=64)
    bad = good[:24] + bytes((good[24] ^ 0x5A,)) + good[25:]
    result = resolved(topo).run(bad, "vm1")
    assert result.drop_reason == "bad_ip_checksum"
    assert not result.install and result.generated == ()
    assert resolved(topo).run(good, "vm1").drop_reason is None


def with_ipv4_option(frame: bytes, option: bytes) -> bytes:
    """`frame` (untagged IPv4, no options) with `option` (a multiple of 4 bytes) added."""
    header = bytearray(frame[14:34]) + option
    header[0] = 0x40 | len(header) // 4
    header[2:4] = (int.from_bytes(frame[16:18], "big") + len(option)).to_bytes(2, "big")
    header[10:12] = b"\x00\x00"
    total = sum(int.from_bytes(header[i : i + 2], "big") for i in range(0, len(header), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    header[10:12] = (~total & 0xFFFF).to_bytes(2, "big")
    return frame[:14] + bytes(header) + frame[34:]


# Loose source route through 10.0.2.10 (type 131, length 7, pointer 4) + end of list.
LSRR = bytes((131, 7, 4, 10, 0, 2, 10, 0))
RECORD_ROUTE = bytes((7, 7, 4, 0, 0, 0, 0, 0))


def test_a_source_routed_packet_is_dropped_at_the_router_and_never_cached() -> None:
    topo = two_subnets()
    good = udp(mac(1), gw(topo), "10.0.1.10", "10.0.2.10", ttl=64)
    result = resolved(topo).run(with_ipv4_option(good, LSRR), "vm1")
    assert result.drop_reason == "ip_source_route"
    assert not result.install and result.generated == ()
    # Other options (record route) are forwarded as they are.
    recorded = resolved(topo).run(with_ipv4_option(good, RECORD_ROUTE), "vm1")
    assert recorded.drop_reason is None and recorded.install


def test_a_bridge_forwards_a_bad_ipv4_header_checksum_as_a_switch_does() -> None:
    topo = two_subnets()
    topo.vm_port("b1", "vm3", "h2", mac_n=3, addresses=("10.0.1.11/24",))
    good = udp(mac(1), mac(3), "10.0.1.10", "10.0.1.11")
    bad = good[:24] + bytes((good[24] ^ 0x5A,)) + good[25:]
    sim = Sim(topo.view())
    sim.tables.macs[("b1", 0, mac_to_int(mac(3)))] = "vm3"
    result = sim.run(bad, "vm1")
    assert result.drop_reason is None and result.actions == (Tunnel("192.0.2.2", key(topo, "vm3")),)


def test_unresolved_next_hop_sends_arp_request_and_installs_a_short_tagged_drop() -> None:
    topo = two_subnets()
    result = Sim(topo.view()).run(udp(mac(1), gw(topo), "10.0.1.10", "10.0.2.10"), "vm1")
    assert result.drop_reason == "neighbour_unresolved"
    assert result.install and result.idle_timeout <= 2.0
    assert "arp:r1:10.0.2.10" in result.tags
    (request,) = result.generated
    arp = parse_frame(request.frame).arp
    assert arp is not None and arp.operation == 1
    assert arp.target_ip == int(ipaddress.IPv4Address("10.0.2.10"))
    assert request.actions == (Tunnel("192.0.2.2", key(topo, "vm2")),)


def test_ttl_expiry_sends_time_exceeded_from_the_ingress_port_address() -> None:
    topo = two_subnets()
    frame = udp(mac(1), gw(topo), "10.0.1.10", "10.0.2.10", ttl=1)
    result = resolved(topo).run(frame, "vm1")
    assert result.drop_reason == "ttl_expired" and not result.install
    (error,) = result.generated
    parsed = parse_frame(error.frame)
    assert parsed.icmp is not None and (parsed.icmp.type, parsed.icmp.code) == (11, 0)
    assert parsed.ipv4 is not None
    assert parsed.ipv4.src == int(ipaddress.IPv4Address("10.0.1.1"))
    assert parsed.ipv4.dst == int(ipaddress.IPv4Address("10.0.1.10"))
    # The quote is the offending IP header + 8 bytes (the UDP header).
    assert parsed.payload == frame[14 : 14 + 20 + 8]
    assert error.actions == (Output(key(topo, "vm1")),)


def test_no_route_sends_net_unreachable() -> None:
    topo = two_subnets()
    result = resolved(topo).run(udp(mac(1), gw(topo), "10.0.1.10", "8.8.8.8"), "vm1")
    assert result.drop_reason == "no_route"
    (error,) = result.generated
    assert (parse_frame(error.frame).icmp.type, parse_frame(error.frame).icmp.code) == (3, 0)  # type: ignore[union-attr]


def test_reject_route_sends_unreachable_and_blackhole_drops_silently() -> None:
    topo = two_subnets()
    topo.special_route("r1", "192.168.0.0/16", RouteType.REJECT)
    topo.special_route("r1", "172.16.0.0/12", RouteType.BLACKHOLE)
    sim = resolved(topo)
    rejected = sim.run(udp(mac(1), gw(topo), "10.0.1.10", "192.168.1.1"), "vm1")
    assert rejected.drop_reason == "reject_route" and len(rejected.generated) == 1
    assert parse_frame(rejected.generated[0].frame).icmp.type == 3  # type: ignore[union-attr]
    blackholed = sim.run(udp(mac(1), gw(topo), "10.0.1.10", "172.16.1.1"), "vm1")
    assert blackholed.drop_reason == "blackhole"
    assert blackholed.generated == () and blackholed.install


def test_udp_to_the_router_gets_port_unreachable_and_tcp_gets_rst() -> None:
    topo = two_subnets()
    sim = Sim(topo.view())
    udp_result = sim.run(udp(mac(1), gw(topo), "10.0.1.10", "10.0.1.1"), "vm1")
    icmp = parse_frame(udp_result.generated[0].frame).icmp
    assert icmp is not None and (icmp.type, icmp.code) == (3, 3)
    tcp_result = sim.run(tcp(mac(1), gw(topo), "10.0.1.10", "10.0.1.1", seq=100), "vm1")
    segment = parse_frame(tcp_result.generated[0].frame).tcp
    assert segment is not None and segment.flags & 0x04 and segment.ack == 101


def test_longest_prefix_then_weight_wins() -> None:
    topo = two_subnets()
    topo.route("r1", "10.9.0.0/16", "r1-b1", gw="10.0.1.254", weight=10)
    topo.route("r1", "10.9.0.0/16", "r1-b2", gw="10.0.2.254", weight=5)
    topo.route("r1", "10.9.9.0/24", "r1-b1", gw="10.0.1.253", weight=50)
    sim = Sim(topo.view())
    for ip, gateway in (("10.0.1.254", 1), ("10.0.2.254", 2), ("10.0.1.253", 3)):
        sim.tables.neighbours[("r1", 4, int(ipaddress.IPv4Address(ip)))] = mac_to_int(
            mac(100 + gateway)
        )
    wide = sim.run(udp(mac(1), gw(topo), "10.0.1.10", "10.9.1.1"), "vm1")
    assert SetField("eth_dst", mac_to_int(mac(102))) in wide.actions  # lower weight
    narrow = sim.run(udp(mac(1), gw(topo), "10.0.1.10", "10.9.9.1"), "vm1")
    assert SetField("eth_dst", mac_to_int(mac(103))) in narrow.actions  # longer prefix


def ecmp_topology(next_hops: int) -> tuple[Topo, Sim]:
    topo = two_subnets()
    for index in range(next_hops):
        topo.route("r1", "0.0.0.0/0", "r1-b2", gw=f"10.0.2.{100 + index}")
    sim = Sim(topo.view())
    for index in range(next_hops):
        sim.tables.neighbours[("r1", 4, int(ipaddress.IPv4Address(f"10.0.2.{100 + index}")))] = (
            mac_to_int(mac(200 + index))
        )
    return topo, sim


def chosen_gateway(sim: Sim, topo: Topo, sport: int) -> int:
    result = sim.run(udp(mac(1), gw(topo), "10.0.1.10", "198.51.100.7", sport=sport), "vm1")
    (eth_dst,) = [
        a.value for a in result.actions if isinstance(a, SetField) and a.field == "eth_dst"
    ]
    assert result.wildcard()["tp_src"] == -1  # the 5-tuple is part of the megaflow
    return eth_dst - mac_to_int(mac(200))


def test_ecmp_spreads_flows_and_removing_a_next_hop_moves_only_its_flows() -> None:
    topo, sim = ecmp_topology(4)
    before = {sport: chosen_gateway(sim, topo, sport) for sport in range(2000, 2800)}
    spread = Counter(before.values())
    assert set(spread) == {0, 1, 2, 3}
    assert min(spread.values()) > 800 / 4 * 0.6  # roughly even
    # Same choice on another agent (fresh process state is irrelevant: no salted hashing).
    assert all(chosen_gateway(sim, topo, sport) == hop for sport, hop in list(before.items())[:50])
    removed = next(
        r
        for r in topo.objects
        if getattr(r, "next_hop_gateway", None) == ipaddress.IPv4Address("10.0.2.102")
    )
    sim.view.remove("route", removed.id)
    after = {sport: chosen_gateway(sim, topo, sport) for sport in before}
    moved = {sport for sport in before if before[sport] != after[sport]}
    assert moved == {sport for sport, hop in before.items() if hop == 2}
    assert 2 not in after.values()


def test_ipv6_neighbour_solicitation_for_the_router_is_advertised() -> None:
    topo = two_subnets()
    frame = build_neighbor_solicitation(
        src_mac=mac(1), src_ip="2001:db8:1::10", target_ip="2001:db8:1::1"
    )
    result = Sim(topo.view()).run(frame, "vm1")
    learned = LearnedNeighbour(
        "r1", 6, int(ipaddress.IPv6Address("2001:db8:1::10")), mac_to_int(mac(1))
    )
    assert learned in result.learned
    (advert,) = result.generated
    parsed = parse_frame(advert.frame)
    assert parsed.icmpv6 is not None and parsed.icmpv6.type == 136
    assert parsed.nd is not None and parsed.nd.target == int(ipaddress.IPv6Address("2001:db8:1::1"))
    assert advert.actions == (Output(key(topo, "vm1")),)


def test_ipv6_routing_with_hop_limit_and_nd_resolution() -> None:
    topo = two_subnets()
    sim = Sim(topo.view())
    frame = udp(mac(1), gw(topo), "2001:db8:1::10", "2001:db8:2::10", ttl=5)
    miss = sim.run(frame, "vm1")
    assert miss.drop_reason == "neighbour_unresolved"
    (solicitation,) = miss.generated
    parsed = parse_frame(solicitation.frame)
    assert parsed.icmpv6 is not None and parsed.icmpv6.type == 135
    sim.tables.neighbours[("r1", 6, int(ipaddress.IPv6Address("2001:db8:2::10")))] = mac_to_int(
        mac(2)
    )
    hit = sim.run(frame, "vm1")
    assert hit.actions == (
        SetField("eth_src", gw(topo, 2)),
        SetField("eth_dst", mac_to_int(mac(2))),
        DecTtl(),
        Tunnel("192.0.2.2", key(topo, "vm2")),
    )
    expired = sim.run(udp(mac(1), gw(topo), "2001:db8:1::10", "2001:db8:2::10", ttl=1), "vm1")
    error = parse_frame(expired.generated[0].frame)
    assert error.icmpv6 is not None and error.icmpv6.type == 3


def test_frame_not_addressed_to_the_router_port_is_dropped() -> None:
    topo = two_subnets()
    topo2 = resolved(topo)
    topo2.tables.macs[("b1", 0, mac_to_int(mac(50)))] = "b1-r1"
    result = topo2.run(udp(mac(1), mac(50), "10.0.1.10", "10.0.2.10"), "vm1")
    assert result.drop_reason == "not_for_router"
    assert result.actions == (Drop("not_for_router"),)


def test_two_routers_in_a_row_decrement_twice_and_read_the_whole_ttl() -> None:
    topo = Topo()
    topo.bridge("b1")
    topo.bridge("transit")
    topo.bridge("b3")
    topo.router("r1")
    topo.router("r2")
    topo.vm_port("b1", "vm1", "h1", mac_n=1)
    topo.vm_port("b3", "vm3", "h1", mac_n=3)
    topo.link("b1", "r1", "10.0.1.1/24")
    topo.link("transit", "r1", "10.0.0.1/30")
    topo.link("transit", "r2", "10.0.0.2/30")
    topo.link("b3", "r2", "10.0.3.1/24")
    topo.route("r1", "10.0.3.0/24", "r1-transit", gw="10.0.0.2")
    sim = Sim(topo.view())
    sim.tables.neighbours[("r1", 4, int(ipaddress.IPv4Address("10.0.0.2")))] = port_mac(
        topo, "r2-transit"
    )
    sim.tables.neighbours[("r2", 4, int(ipaddress.IPv4Address("10.0.3.10")))] = mac_to_int(mac(3))
    result = sim.run(udp(mac(1), port_mac(topo, "r1-b1"), "10.0.1.10", "10.0.3.10", ttl=9), "vm1")
    assert result.actions[-3:] == (DecTtl(), DecTtl(), Output(key(topo, "vm3")))
    assert result.wildcard()["ip_ttl"] == -1
    # TTL 2 dies at the second router, which answers from its transit address.
    dying = sim.run(udp(mac(1), port_mac(topo, "r1-b1"), "10.0.1.10", "10.0.3.10", ttl=2), "vm1")
    assert dying.drop_reason == "ttl_expired"
    error = parse_frame(dying.generated[0].frame)
    assert error.ipv4 is not None and error.ipv4.src == int(ipaddress.IPv4Address("10.0.0.2"))


def test_routing_loop_is_cut_by_the_device_limit() -> None:
    topo = Topo()
    topo.bridge("b1")
    topo.bridge("transit")
    topo.router("r1")
    topo.router("r2")
    topo.vm_port("b1", "vm1", "h1", mac_n=1)
    topo.link("b1", "r1", "10.0.1.1/24")
    topo.link("transit", "r1", "10.0.0.1/30")
    topo.link("transit", "r2", "10.0.0.2/30")
    topo.route("r1", "0.0.0.0/0", "r1-transit", gw="10.0.0.2")
    topo.route("r2", "0.0.0.0/0", "r2-transit", gw="10.0.0.1")
    sim = Sim(topo.view())
    sim.tables.neighbours[("r1", 4, int(ipaddress.IPv4Address("10.0.0.2")))] = port_mac(
        topo, "r2-transit"
    )
    sim.tables.neighbours[("r2", 4, int(ipaddress.IPv4Address("10.0.0.1")))] = port_mac(
        topo, "r1-transit"
    )
    result = sim.run(
        udp(mac(1), port_mac(topo, "r1-b1"), "10.0.1.10", "198.51.100.1", ttl=255), "vm1"
    )
    assert result.drop_reason == "device_limit"
    assert result.actions == (Drop("device_limit"),)
