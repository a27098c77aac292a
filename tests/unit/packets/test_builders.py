"""Builders: table tests of each answer's fields (checked with scapy) and valid checksums."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, UDPerror
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6NDOptDstLLAddr,
    ICMPv6NDOptSrcLLAddr,
    ICMPv6PacketTooBig,
    ICMPv6TimeExceeded,
    IPerror6,
    IPv6,
)
from scapy.layers.l2 import ARP, Dot1Q, Ether

from hivenet.packets import (
    PacketError,
    arp_reply_to,
    build_arp_reply,
    build_arp_request,
    build_echo_request,
    build_icmp_dest_unreachable,
    build_icmp_echo_reply,
    build_icmp_time_exceeded,
    build_icmpv6_dest_unreachable,
    build_icmpv6_echo_reply,
    build_icmpv6_packet_too_big,
    build_icmpv6_time_exceeded,
    build_neighbor_advertisement,
    build_neighbor_solicitation,
    build_tcp_rst,
    build_tcp_segment,
    build_udp_datagram,
    icmp_error_allowed,
    neighbor_advertisement_to,
    parse_frame,
    verify_checksums,
)
from hivenet.packets.headers import (
    ICMP_ADMIN_PROHIBITED,
    ICMP_FRAGMENTATION_NEEDED,
    ICMP_HOST_UNREACHABLE,
    ICMP_NET_UNREACHABLE,
    ICMP_PORT_UNREACHABLE,
    TCP_ACK,
    TCP_FIN,
    TCP_PSH,
    TCP_RST,
    TCP_SYN,
)

from .scapy_frames import ipv4s, ipv6s, macs, payloads, u16
from .scapy_oracle import checksums_valid

VM_MAC, ROUTER_MAC = "02:00:00:00:00:01", "02:00:00:00:00:fe"
VM_IP, ROUTER_IP, REMOTE_IP = "10.0.0.5", "10.0.0.1", "192.0.2.9"
VM_IP6, ROUTER_IP6, REMOTE_IP6 = "2001:db8::5", "2001:db8::1", "2001:db8:1::9"


# --- traffic builders ------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    macs,
    macs,
    st.one_of(st.tuples(ipv4s, ipv4s), st.tuples(ipv6s, ipv6s)),
    u16,
    u16,
    payloads,
    st.sampled_from([0, 0, 100]),
)
def test_udp_and_tcp_builders_parse_in_scapy_with_valid_checksums(
    eth_src: str,
    eth_dst: str,
    ips: tuple[str, str],
    sport: int,
    dport: int,
    payload: bytes,
    vlan: int,
) -> None:
    common = dict(eth_src=eth_src, eth_dst=eth_dst, ip_src=ips[0], ip_dst=ips[1], vlan=vlan)
    udp = build_udp_datagram(src_port=sport, dst_port=dport, payload=payload, **common)
    tcp = build_tcp_segment(
        src_port=sport,
        dst_port=dport,
        seq=7,
        ack=9,
        flags=TCP_PSH | TCP_ACK,
        options=b"\x02\x04\x05\xb4",
        payload=payload,
        **common,
    )
    for frame, layer in ((udp, UDP), (tcp, TCP)):
        packet = Ether(frame)
        assert checksums_valid(frame)
        assert packet[layer].sport == sport and packet[layer].dport == dport
        assert bytes(packet[layer].payload) == payload
        assert (Dot1Q in packet) == bool(vlan)
        assert verify_checksums(frame) == []
    assert Ether(tcp)[TCP].options == [("MSS", 1460)]


@pytest.mark.parametrize(("src", "dst"), [(VM_IP, REMOTE_IP), (VM_IP6, REMOTE_IP6)])
def test_echo_request_and_reply(src: str, dst: str) -> None:
    request = build_echo_request(
        eth_src=VM_MAC,
        eth_dst=ROUTER_MAC,
        ip_src=src,
        ip_dst=dst,
        identifier=0x4242,
        sequence=3,
        payload=b"ping data",
        vlan=12,
    )
    v4 = ":" not in src
    reply = build_icmp_echo_reply(request) if v4 else build_icmpv6_echo_reply(request)
    packet = Ether(reply)
    assert checksums_valid(request) and checksums_valid(reply)
    assert (packet.src, packet.dst, packet[Dot1Q].vlan) == (ROUTER_MAC, VM_MAC, 12)
    if v4:
        assert (packet[IP].src, packet[IP].dst) == (dst, src)
        assert (packet[ICMP].type, packet[ICMP].id, packet[ICMP].seq) == (0, 0x4242, 3)
        assert bytes(packet[ICMP].payload) == b"ping data"
    else:
        assert (packet[IPv6].src, packet[IPv6].dst) == (dst, src)
        echo = packet[ICMPv6EchoReply]
        assert (echo.id, echo.seq, echo.data) == (0x4242, 3, b"ping data")
    with pytest.raises(PacketError):
        (build_icmp_echo_reply if v4 else build_icmpv6_echo_reply)(reply)


# --- ARP -------------------------------------------------------------------------------------


def test_arp_request_reply_fields() -> None:
    request = build_arp_request(sender_mac=VM_MAC, sender_ip=VM_IP, target_ip=ROUTER_IP, vlan=7)
    arp = Ether(request)[ARP]
    assert Ether(request).dst == "ff:ff:ff:ff:ff:ff"
    assert (arp.op, arp.hwsrc, arp.psrc, arp.hwdst, arp.pdst) == (
        1,
        VM_MAC,
        VM_IP,
        "00:00:00:00:00:00",
        ROUTER_IP,
    )
    reply = arp_reply_to(request, ROUTER_MAC)
    packet = Ether(reply)
    assert (packet.src, packet.dst, packet[Dot1Q].vlan) == (ROUTER_MAC, VM_MAC, 7)
    assert (packet[ARP].op, packet[ARP].hwsrc, packet[ARP].psrc) == (2, ROUTER_MAC, ROUTER_IP)
    assert (packet[ARP].hwdst, packet[ARP].pdst) == (VM_MAC, VM_IP)
    explicit = build_arp_reply(
        sender_mac=ROUTER_MAC, sender_ip=ROUTER_IP, target_mac=VM_MAC, target_ip=VM_IP, vlan=7
    )
    assert explicit == reply
    with pytest.raises(PacketError, match="not an ARP request"):
        arp_reply_to(reply, ROUTER_MAC)
    with pytest.raises(ValueError, match="sender_ip"):
        build_arp_request(sender_mac=VM_MAC, sender_ip=VM_IP6, target_ip=ROUTER_IP)


# --- ICMP errors -----------------------------------------------------------------------------


def _offending_udp() -> bytes:
    return bytes(
        Ether(src=VM_MAC, dst=ROUTER_MAC)
        / IP(src=VM_IP, dst=REMOTE_IP, ttl=1, options=b"\x94\x04\x00\x00")
        / UDP(sport=33434, dport=53)
        / (b"A" * 100)
    )


@pytest.mark.parametrize(
    ("code", "mtu"),
    [
        (ICMP_NET_UNREACHABLE, 0),
        (ICMP_HOST_UNREACHABLE, 0),
        (ICMP_PORT_UNREACHABLE, 0),
        (ICMP_ADMIN_PROHIBITED, 0),
        (ICMP_FRAGMENTATION_NEEDED, 1400),
    ],
)
def test_dest_unreachable_embeds_ip_header_and_8_bytes(code: int, mtu: int) -> None:
    offending = _offending_udp()
    error = build_icmp_dest_unreachable(offending, code, src_ip=ROUTER_IP, mtu=mtu)
    packet = Ether(error)
    assert checksums_valid(error)
    assert (packet.src, packet.dst) == (ROUTER_MAC, VM_MAC)
    assert (packet[IP].src, packet[IP].dst, packet[IP].proto) == (ROUTER_IP, VM_IP, 1)
    assert (packet[ICMP].type, packet[ICMP].code) == (3, code)
    if mtu:
        assert packet[ICMP].nexthopmtu == mtu
    ip_header_length = 24  # 20 + the 4-byte router-alert option
    quoted = bytes(packet[ICMP].payload)
    assert quoted == offending[14 : 14 + ip_header_length + 8]
    assert (packet[IPerror].src, packet[IPerror].dst) == (VM_IP, REMOTE_IP)
    assert (packet[UDPerror].sport, packet[UDPerror].dport) == (33434, 53)


def test_time_exceeded_and_embedded_datagram_round_trip() -> None:
    error = build_icmp_time_exceeded(
        _offending_udp(), src_ip=ROUTER_IP, src_mac="02:00:00:00:00:aa"
    )
    packet = Ether(error)
    assert checksums_valid(error)
    assert packet.src == "02:00:00:00:00:aa"
    assert (packet[ICMP].type, packet[ICMP].code) == (11, 0)
    from hivenet.packets import embedded_datagram

    quoted = embedded_datagram(parse_frame(error))
    assert quoted.ipv4 is not None and quoted.ipv4.ttl == 1
    assert (quoted.src_port, quoted.dst_port, quoted.protocol) == (33434, 53, 17)


def test_icmp_error_argument_checks() -> None:
    with pytest.raises(ValueError, match="mtu"):
        build_icmp_dest_unreachable(_offending_udp(), ICMP_FRAGMENTATION_NEEDED, src_ip=ROUTER_IP)
    with pytest.raises(PacketError, match="not IPv4"):
        build_icmp_dest_unreachable(bytes(Ether() / IPv6()), 1, src_ip=ROUTER_IP)


def test_icmp_error_allowed_rules() -> None:
    assert icmp_error_allowed(_offending_udp())
    error = build_icmp_time_exceeded(_offending_udp(), src_ip=ROUTER_IP)
    assert not icmp_error_allowed(error)
    assert not icmp_error_allowed(bytes(Ether() / IP(frag=3, proto=17) / (b"x" * 8)))
    assert not icmp_error_allowed(bytes(Ether(dst="ff:ff:ff:ff:ff:ff") / IP() / UDP()))
    assert not icmp_error_allowed(bytes(Ether(dst=ROUTER_MAC) / IP(dst="224.0.0.5") / UDP()))
    assert not icmp_error_allowed(b"junk")
    assert icmp_error_allowed(bytes(Ether(dst=ROUTER_MAC) / IP(src=VM_IP) / ICMP(type=8)))


def _offending_v6(size: int) -> bytes:
    return bytes(
        Ether(src=VM_MAC, dst=ROUTER_MAC)
        / IPv6(src=VM_IP6, dst=REMOTE_IP6, hlim=1)
        / UDP(sport=5000, dport=6000)
        / (b"B" * size)
    )


@pytest.mark.parametrize("size", [10, 1500])
@pytest.mark.parametrize("kind", ["unreachable", "time", "too_big"])
def test_icmpv6_errors_quote_up_to_1280_bytes(size: int, kind: str) -> None:
    offending = _offending_v6(size)
    if kind == "unreachable":
        error = build_icmpv6_dest_unreachable(offending, 4, src_ip=ROUTER_IP6)
    elif kind == "time":
        error = build_icmpv6_time_exceeded(offending, src_ip=ROUTER_IP6)
    else:
        error = build_icmpv6_packet_too_big(offending, mtu=1400, src_ip=ROUTER_IP6)
    packet = Ether(error)
    assert checksums_valid(error)
    assert (packet[IPv6].src, packet[IPv6].dst) == (ROUTER_IP6, VM_IP6)
    assert len(error) - 14 == min(1280, 40 + 8 + len(offending) - 14)
    layer = {
        "unreachable": ICMPv6DestUnreach,
        "time": ICMPv6TimeExceeded,
        "too_big": ICMPv6PacketTooBig,
    }[kind]
    assert layer in packet
    if kind == "too_big":
        assert packet[ICMPv6PacketTooBig].mtu == 1400
    assert packet[IPerror6].src == VM_IP6
    assert bytes(packet[IPerror6])[:48] == offending[14:62]


# --- TCP reset -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "payload", "expected_seq", "expected_ack", "expected_flags"),
    [
        (TCP_SYN, b"", 0, 1001, TCP_RST | TCP_ACK),  # SYN counts one
        (TCP_SYN | TCP_FIN, b"abc", 0, 1005, TCP_RST | TCP_ACK),
        (TCP_PSH, b"hello", 0, 1005, TCP_RST | TCP_ACK),
        (TCP_ACK, b"", 5555, 0, TCP_RST),  # seq = SEG.ACK, no ACK flag
        (TCP_ACK | TCP_PSH, b"data", 5555, 0, TCP_RST),
    ],
)
@pytest.mark.parametrize(("src", "dst"), [(VM_IP, REMOTE_IP), (VM_IP6, REMOTE_IP6)])
def test_tcp_rst_sequence_numbers_follow_rfc_793(
    flags: int,
    payload: bytes,
    expected_seq: int,
    expected_ack: int,
    expected_flags: int,
    src: str,
    dst: str,
) -> None:
    segment = build_tcp_segment(
        eth_src=VM_MAC,
        eth_dst=ROUTER_MAC,
        ip_src=src,
        ip_dst=dst,
        src_port=40000,
        dst_port=22,
        seq=1000,
        ack=5555,
        flags=flags,
        payload=payload,
    )
    reset = build_tcp_rst(segment)
    packet = Ether(reset)
    assert checksums_valid(reset)
    tcp = packet[TCP]
    assert (tcp.sport, tcp.dport) == (22, 40000)
    assert (tcp.seq, tcp.ack, int(tcp.flags)) == (expected_seq, expected_ack, expected_flags)
    assert (packet.src, packet.dst) == (ROUTER_MAC, VM_MAC)
    ip = packet[IP] if IP in packet else packet[IPv6]
    assert (ip.src, ip.dst) == (dst, src)
    with pytest.raises(PacketError, match="never answered"):
        build_tcp_rst(reset)


def test_tcp_rst_ack_wraps_around_32_bits() -> None:
    segment = build_tcp_segment(
        eth_src=VM_MAC,
        eth_dst=ROUTER_MAC,
        ip_src=VM_IP,
        ip_dst=REMOTE_IP,
        src_port=1,
        dst_port=2,
        seq=0xFFFFFFFF,
        flags=TCP_SYN,
    )
    assert Ether(build_tcp_rst(segment))[TCP].ack == 0


# --- neighbour discovery ---------------------------------------------------------------------


def test_neighbor_solicitation_and_advertisement() -> None:
    solicitation = build_neighbor_solicitation(src_mac=VM_MAC, src_ip=VM_IP6, target_ip=ROUTER_IP6)
    packet = Ether(solicitation)
    assert checksums_valid(solicitation)
    assert packet.dst == "33:33:ff:00:00:01"
    assert packet[IPv6].dst == "ff02::1:ff00:1" and packet[IPv6].hlim == 255
    assert packet[ICMPv6ND_NS].tgt == ROUTER_IP6
    assert packet[ICMPv6NDOptSrcLLAddr].lladdr == VM_MAC

    advertisement = neighbor_advertisement_to(solicitation, ROUTER_MAC)
    packet = Ether(advertisement)
    assert checksums_valid(advertisement)
    assert (packet.src, packet.dst) == (ROUTER_MAC, VM_MAC)
    assert (packet[IPv6].src, packet[IPv6].dst, packet[IPv6].hlim) == (ROUTER_IP6, VM_IP6, 255)
    na = packet[ICMPv6ND_NA]
    assert (na.tgt, na.R, na.S, na.O) == (ROUTER_IP6, 1, 1, 1)
    assert packet[ICMPv6NDOptDstLLAddr].lladdr == ROUTER_MAC

    dad = build_neighbor_solicitation(src_mac=VM_MAC, src_ip="::", target_ip=VM_IP6)
    assert ICMPv6NDOptSrcLLAddr not in Ether(dad)
    answer = Ether(neighbor_advertisement_to(dad, ROUTER_MAC, router=False))
    assert answer[IPv6].dst == "ff02::1" and answer.dst == "33:33:00:00:00:01"
    assert (answer[ICMPv6ND_NA].S, answer[ICMPv6ND_NA].R) == (0, 0)

    unsolicited = build_neighbor_advertisement(
        src_mac=ROUTER_MAC,
        src_ip=ROUTER_IP6,
        dst_mac="33:33:00:00:00:01",
        dst_ip="ff02::1",
        solicited=False,
    )
    assert checksums_valid(unsolicited)
    assert Ether(unsolicited)[ICMPv6ND_NA].S == 0
    assert ICMPv6EchoRequest not in Ether(unsolicited)
    assert ipaddress.IPv6Address(Ether(unsolicited)[ICMPv6ND_NA].tgt) == ipaddress.IPv6Address(
        ROUTER_IP6
    )


def test_checksum_oracle_detects_corruption() -> None:
    """The scapy oracle itself must fail on a wrong checksum, or the tests above prove nothing."""
    frames = [
        build_udp_datagram(
            eth_src=VM_MAC,
            eth_dst=ROUTER_MAC,
            ip_src=ip_src,
            ip_dst=ip_dst,
            src_port=1,
            dst_port=2,
            payload=b"payload",
        )
        for ip_src, ip_dst in ((VM_IP, REMOTE_IP), (VM_IP6, REMOTE_IP6))
    ]
    frames.append(build_icmp_time_exceeded(_offending_udp(), src_ip=ROUTER_IP))
    frames.append(build_icmpv6_time_exceeded(_offending_v6(10), src_ip=ROUTER_IP6))
    for frame in frames:
        assert checksums_valid(frame)
        corrupted = bytearray(frame)
        corrupted[-1] ^= 0x01
        assert not checksums_valid(bytes(corrupted))
        assert verify_checksums(bytes(corrupted)) != []
