"""The egress MTU (sim/mtu.py): a packet bigger than the egress network's MTU is answered with
ICMP fragmentation-needed / ICMPv6 packet-too-big (DF, IPv6) or dropped (no DF); one that fits
is forwarded and its flow carries the MTU, so the datapath sends bigger packets back here."""

from __future__ import annotations

import ipaddress

import pytest
from scapy.layers.inet import ICMP, IP, IPerror
from scapy.layers.inet6 import ICMPv6PacketTooBig, IPv6
from scapy.layers.l2 import Ether

from hivenet.flows.actions import Output, Tunnel
from hivenet.model.types import mac_to_int
from hivenet.packets import parse_frame
from hivenet.packets.builders import (
    ethernet_frame,
    ipv4_packet,
    ipv6_packet,
    udp_segment,
)
from hivenet.sim import SimContext
from tests.unit.packets.scapy_oracle import checksums_valid
from tests.unit.sim.topo import Sim, Topo, arp_who_has, mac, port_mac

HOSTS = {"h1": "192.0.2.1", "h2": "192.0.2.2"}
IPV4_DF = 0b010  # the IPv4 flags field: DF


def udp_of_size(
    src_mac: int | str, dst_mac: int | str, src: str, dst: str, size: int, *, df: bool = True
) -> bytes:
    """A UDP datagram of `size` L3 bytes (IPv6: header included), DF set or not."""
    if ":" in src:
        segment = udp_segment(src, dst, 1000, 53, b"x" * (size - 48))
        return ethernet_frame(dst_mac, src_mac, 0x86DD, ipv6_packet(src, dst, 17, segment))
    segment = udp_segment(src, dst, 1000, 53, b"x" * (size - 28))
    packet = ipv4_packet(src, dst, 17, segment, flags=IPV4_DF if df else 0)
    return ethernet_frame(dst_mac, src_mac, 0x0800, packet)


def topology(*, b2_mtu: int | None = None, b1_mtu: int | None = None) -> Topo:
    """b1: vm1 (h1), vm3 (h2), vm4 (h1); b2: vm2 (h2); r1 between them."""
    topo = Topo()
    topo.bridge("b1", mtu=b1_mtu)
    topo.bridge("b2", mtu=b2_mtu)
    topo.router("r1")
    topo.vm_port("b1", "vm1", "h1", mac_n=1, addresses=("10.0.1.10/24", "2001:db8:1::10/64"))
    topo.vm_port("b1", "vm3", "h2", mac_n=3, addresses=("10.0.1.30/24", "2001:db8:1::30/64"))
    topo.vm_port("b1", "vm4", "h1", mac_n=4, addresses=("10.0.1.40/24",))
    topo.vm_port("b2", "vm2", "h2", mac_n=2, addresses=("10.0.2.10/24",))
    topo.link("b1", "r1", "10.0.1.1/24", "2001:db8:1::1/64")
    topo.link("b2", "r1", "10.0.2.1/24")
    topo.zone(HOSTS)
    return topo


def sim_of(topo: Topo) -> Sim:
    sim = Sim(topo.view())
    sim.tables.neighbours[("r1", 4, int(ipaddress.IPv4Address("10.0.2.10")))] = mac_to_int(mac(2))
    # The bridge knows where the VMs are (no flooding).
    for port_id, n in (("vm1", 1), ("vm3", 3), ("vm4", 4), ("vm2", 2)):
        bridge = "b2" if port_id == "vm2" else "b1"
        sim.tables.macs[(bridge, 0, mac_to_int(mac(n)))] = port_id
    return sim


def key(topo: Topo, port_id: str) -> int:
    return topo.ports[port_id].tunnel_key


def routed(size: int, *, df: bool = True) -> tuple[bytes, Topo]:
    topo = topology()
    return udp_of_size(mac(1), port_mac(topo, "r1-b1"), "10.0.1.10", "10.0.2.10", size, df=df), topo


# --------------------------------------------------------------------------- fits


@pytest.mark.parametrize("size", [1400, 1450])
def test_a_routed_packet_up_to_the_mtu_is_forwarded_and_its_flow_carries_the_mtu(
    size: int,
) -> None:
    frame, topo = routed(size)
    result = sim_of(topo).run(frame, "vm1")
    assert result.drop_reason is None and result.install
    assert result.actions[-1] == Tunnel("192.0.2.2", key(topo, "vm2"))
    assert result.mtu == 1450  # the underlay's 1500 less VXLAN's 50
    assert result.generated == ()


def test_a_bridged_packet_of_exactly_the_mtu_is_forwarded() -> None:
    topo = topology()
    frame = udp_of_size(mac(1), mac(3), "10.0.1.10", "10.0.1.30", 1450)
    result = sim_of(topo).run(frame, "vm1")
    assert result.actions == (Tunnel("192.0.2.2", key(topo, "vm3")),)
    assert result.install and result.mtu == 1450


def test_the_mtu_follows_the_agents_underlay() -> None:
    topo = topology()
    sim = sim_of(topo)
    sim.ctx = SimContext(
        topology=sim.ctx.topology, tables=sim.tables, local_host_id="h1", underlay_mtu=9000
    )
    frame = udp_of_size(mac(1), mac(3), "10.0.1.10", "10.0.1.30", 8950)
    result = sim.run(frame, "vm1")
    assert result.install and result.mtu == 8950


def test_a_local_port_gets_its_bridges_mtu_and_a_tunnel_no_more_than_the_underlay_fits() -> None:
    topo = topology(b1_mtu=9000)
    sim = sim_of(topo)
    local = sim.run(udp_of_size(mac(1), mac(4), "10.0.1.10", "10.0.1.40", 1500), "vm1")
    assert local.actions == (Output(key(topo, "vm4")),) and local.mtu == 9000
    remote = sim.run(udp_of_size(mac(1), mac(3), "10.0.1.10", "10.0.1.30", 1500), "vm1")
    assert remote.drop_reason == "frag_needed"
    (error,) = remote.generated
    assert parse_frame(error.frame).icmp.rest == 1450  # type: ignore[union-attr]


def test_non_ip_traffic_is_not_checked() -> None:
    topo = topology()
    result = sim_of(topo).run(arp_who_has(mac(1), "10.0.1.10", "10.0.1.30"), "vm1")
    assert result.drop_reason is None and result.generated == ()


# --------------------------------------------------------------------------- too big, DF


def test_a_routed_df_packet_too_big_gets_frag_needed_from_the_router_port() -> None:
    frame, topo = routed(1451)
    result = sim_of(topo).run(frame, "vm1")
    assert result.drop_reason == "frag_needed" and not result.install
    assert not any(isinstance(a, Tunnel | Output) for a in result.actions)
    (error,) = result.generated
    assert error.actions == (Output(key(topo, "vm1")),)
    parsed = parse_frame(error.frame)
    assert parsed.ethernet.src == port_mac(topo, "r1-b1") and parsed.ethernet.dst == mac_to_int(
        mac(1)
    )
    assert parsed.ipv4 is not None
    assert parsed.ipv4.src == int(ipaddress.IPv4Address("10.0.1.1"))
    assert parsed.ipv4.dst == int(ipaddress.IPv4Address("10.0.1.10"))
    assert parsed.icmp is not None and (parsed.icmp.type, parsed.icmp.code) == (3, 4)
    assert parsed.icmp.rest == 1450  # RFC 1191: next-hop MTU in the low 16 bits
    # The quote is the datagram as the sender sent it (TTL not yet decremented).
    assert parsed.payload == frame[14 : 14 + 28]
    assert "frag_needed" in result.format_trace()


def test_the_egress_networks_own_mtu_is_the_one_reported() -> None:
    topo = topology(b2_mtu=1400)
    frame = udp_of_size(mac(1), port_mac(topo, "r1-b1"), "10.0.1.10", "10.0.2.10", 1401)
    result = sim_of(topo).run(frame, "vm1")
    assert result.drop_reason == "frag_needed"
    (error,) = result.generated
    assert parse_frame(error.frame).icmp.rest == 1400  # type: ignore[union-attr]
    fits = sim_of(topo).run(
        udp_of_size(mac(1), port_mac(topo, "r1-b1"), "10.0.1.10", "10.0.2.10", 1400), "vm1"
    )
    assert fits.install and fits.mtu == 1400


def test_a_bridged_df_packet_too_big_is_answered_on_the_destinations_behalf() -> None:
    topo = topology()
    frame = udp_of_size(mac(1), mac(3), "10.0.1.10", "10.0.1.30", 1451)
    result = sim_of(topo).run(frame, "vm1")
    assert result.drop_reason == "frag_needed" and not result.install
    (error,) = result.generated
    assert error.actions == (Output(key(topo, "vm1")),)
    parsed = parse_frame(error.frame)
    assert parsed.ethernet.src == mac_to_int(mac(3))
    assert parsed.ipv4 is not None
    assert parsed.ipv4.src == int(ipaddress.IPv4Address("10.0.1.30"))
    assert parsed.ipv4.dst == int(ipaddress.IPv4Address("10.0.1.10"))
    assert (parsed.icmp.type, parsed.icmp.code, parsed.icmp.rest) == (3, 4, 1450)  # type: ignore[union-attr]


def test_the_icmp_bytes_agree_with_scapy() -> None:
    frame, topo = routed(1500)
    (error,) = sim_of(topo).run(frame, "vm1").generated
    assert checksums_valid(error.frame)
    packet = Ether(error.frame)
    assert packet[IP].src == "10.0.1.1" and packet[IP].dst == "10.0.1.10"
    assert packet[ICMP].type == 3 and packet[ICMP].code == 4
    assert packet[ICMP].nexthopmtu == 1450
    quoted = packet[IPerror]
    assert quoted.src == "10.0.1.10" and quoted.dst == "10.0.2.10"
    assert quoted.len == 1500 and quoted.flags.DF


def test_an_ipv6_packet_too_big_gets_packet_too_big() -> None:
    topo = topology()
    frame = udp_of_size(mac(1), mac(3), "2001:db8:1::10", "2001:db8:1::30", 1451)
    result = sim_of(topo).run(frame, "vm1")
    assert result.drop_reason == "frag_needed"
    (error,) = result.generated
    assert checksums_valid(error.frame)
    packet = Ether(error.frame)
    assert packet[IPv6].src == "2001:db8:1::30" and packet[IPv6].dst == "2001:db8:1::10"
    assert packet[ICMPv6PacketTooBig].mtu == 1450
    fits = sim_of(topo).run(
        udp_of_size(mac(1), mac(3), "2001:db8:1::10", "2001:db8:1::30", 1450), "vm1"
    )
    assert fits.install and fits.mtu == 1450


# --------------------------------------------------------------------------- too big, no DF


@pytest.mark.parametrize("bridged", [False, True])
def test_a_packet_too_big_without_df_is_dropped_unanswered(bridged: bool) -> None:
    topo = topology()
    if bridged:
        frame = udp_of_size(mac(1), mac(3), "10.0.1.10", "10.0.1.30", 1451, df=False)
    else:
        frame, topo = routed(1451, df=False)
    result = sim_of(topo).run(frame, "vm1")
    assert result.drop_reason == "too_big" and not result.install
    assert result.generated == ()


def test_a_flooded_unicast_too_big_is_answered_once() -> None:
    topo = topology()
    sim = Sim(topo.view())  # nothing learned: unicast to an unknown MAC floods
    frame = udp_of_size(mac(1), mac(99), "10.0.1.10", "10.0.1.99", 1451)
    result = sim.run(frame, "vm1")
    assert not result.install
    assert not any(isinstance(a, Tunnel | Output) for a in result.actions)
    assert result.format_trace().count("skip: frag_needed: 1451 bytes > mtu 1450") == 2
    (error,) = result.generated  # vm3 and vm4 were both too small: one answer
    assert error.actions == (Output(key(topo, "vm1")),)
    assert parse_frame(error.frame).icmp.rest == 1450  # type: ignore[union-attr]


def test_a_broadcast_too_big_is_skipped_without_an_answer() -> None:
    topo = topology()
    frame = udp_of_size(mac(1), "ff:ff:ff:ff:ff:ff", "10.0.1.10", "10.0.1.255", 1451)
    sim = Sim(topo.view())
    result = sim.run(frame, "vm1")
    assert result.generated == () and not result.install
    assert not any(isinstance(a, Tunnel | Output) for a in result.actions)
    assert "skip: too_big: 1451 bytes > mtu 1450" in result.format_trace()
    # A small one floods to the local and the remote VM.
    small = sim.run(udp_of_size(mac(1), mac(99), "10.0.1.10", "10.0.1.99", 100), "vm1")
    assert Output(key(topo, "vm4")) in small.actions
    assert Tunnel("192.0.2.2", key(topo, "vm3")) in small.actions
