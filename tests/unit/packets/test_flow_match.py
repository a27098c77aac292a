"""`extract_flow_match` (hand-tuned hot path) agrees with the generic parser, and its fields
mean what the FlowMatch docstring says (checked against scapy)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6NDOptDstLLAddr,
    ICMPv6NDOptSrcLLAddr,
    IPv6,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
)
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Raw

from hivenet.packets import PacketError, extract_flow_match, flow_match_of, parse_frame
from hivenet.packets.flowmatch import FRAG_FIRST, FRAG_LATER, FRAG_NONE, FlowMatch

from .scapy_frames import scapy_frames


def _both(frame: bytes) -> tuple[FlowMatch | str, FlowMatch | str]:
    """The two decoders' answers; a PacketError becomes the string "error"."""
    try:
        fast: FlowMatch | str = extract_flow_match(frame, 7)
    except PacketError:
        fast = "error"
    try:
        generic: FlowMatch | str = flow_match_of(parse_frame(frame), 7)
    except PacketError:
        generic = "error"
    return fast, generic


@settings(max_examples=300, deadline=None)
@given(scapy_frames())
def test_hot_path_agrees_with_generic_parser_on_valid_frames(frame: bytes) -> None:
    fast, generic = _both(frame)
    assert fast != "error"
    assert fast == generic


@settings(max_examples=300, deadline=None)
@given(scapy_frames(), st.data())
def test_hot_path_agrees_on_corrupted_and_truncated_frames(
    frame: bytes, data: st.DataObject
) -> None:
    corrupted = bytearray(frame)
    for _ in range(data.draw(st.integers(0, 3))):
        position = data.draw(st.integers(0, len(corrupted) - 1))
        corrupted[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(corrupted)))
    fast, generic = _both(bytes(corrupted[:cut]))
    assert fast == generic


MAC_A, MAC_B = "02:00:00:00:00:0a", "02:00:00:00:00:0b"


def _int(address: str) -> int:
    return int(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    ("packet", "expected"),
    [
        (
            Ether(src=MAC_A, dst=MAC_B)
            / Dot1Q(vlan=42)
            / IP(src="10.0.0.1", dst="10.0.0.2", tos=0xB8, ttl=9)
            / TCP(sport=1234, dport=80, flags="SA"),
            dict(
                vlan=42,
                eth_type=0x0800,
                ip_proto=6,
                ip_tos=0xB8,
                ip_ttl=9,
                tp_src=1234,
                tp_dst=80,
                tcp_flags=0x12,
                ip_src=_int("10.0.0.1"),
                ip_dst=_int("10.0.0.2"),
            ),
        ),
        (
            Ether(src=MAC_A, dst=MAC_B) / Dot1Q(vlan=0, prio=5) / IP() / UDP(sport=5, dport=6),
            dict(vlan=0, eth_type=0x0800, ip_proto=17, tp_src=5, tp_dst=6),
        ),
        (
            Ether(src=MAC_A, dst=MAC_B) / IP(flags="MF") / UDP(sport=5, dport=6),
            dict(ip_frag=FRAG_FIRST, tp_src=5, tp_dst=6),
        ),
        (
            Ether(src=MAC_A, dst=MAC_B) / IP(frag=10, proto=17) / b"not a udp header",
            dict(ip_frag=FRAG_LATER, ip_proto=17, tp_src=0, tp_dst=0),
        ),
        (
            Ether(src=MAC_A, dst=MAC_B) / IP() / ICMP(type=8, id=0x1234, seq=9),
            dict(ip_proto=1, icmp_type=8, icmp_code=0, icmp_id=0x1234),
        ),
        (
            Ether(src=MAC_A, dst=MAC_B) / IP() / ICMP(type=3, code=3) / IP() / UDP(),
            dict(ip_proto=1, icmp_type=3, icmp_code=3, icmp_id=0),
        ),
        (
            Ether(src=MAC_A, dst="ff:ff:ff:ff:ff:ff")
            / ARP(op=1, hwsrc=MAC_A, psrc="10.0.0.1", pdst="10.0.0.9"),
            dict(
                eth_type=0x0806,
                arp_op=1,
                arp_sha=0x02000000000A,
                arp_spa=_int("10.0.0.1"),
                arp_tha=0,
                arp_tpa=_int("10.0.0.9"),
                ip_src=0,
                ip_proto=0,
            ),
        ),
        (
            Ether(src=MAC_A, dst=MAC_B)
            / IPv6(src="fe80::1", dst="ff02::1:ff00:2", hlim=255)
            / ICMPv6ND_NS(tgt="fe80::2")
            / ICMPv6NDOptSrcLLAddr(lladdr=MAC_A),
            dict(
                eth_type=0x86DD,
                ip_proto=58,
                ip_ttl=255,
                icmp_type=135,
                nd_target=_int("fe80::2"),
                arp_sha=0x02000000000A,
            ),
        ),
        (
            Ether(src=MAC_A, dst=MAC_B)
            / IPv6()
            / ICMPv6ND_NA(tgt="fe80::2")
            / ICMPv6NDOptDstLLAddr(lladdr=MAC_B),
            dict(icmp_type=136, nd_target=_int("fe80::2"), arp_tha=0x02000000000B, arp_sha=0),
        ),
        (
            Ether(src=MAC_A, dst=MAC_B)
            / IPv6(tc=0x21)
            / IPv6ExtHdrHopByHop()
            / IPv6ExtHdrFragment(offset=0, m=1)
            / TCP(sport=1, dport=2, flags="F"),
            dict(ip_proto=6, ip_tos=0x21, ip_frag=FRAG_FIRST, tp_src=1, tp_dst=2, tcp_flags=1),
        ),
        (
            Ether(src=MAC_A, dst=MAC_B) / IPv6() / IPv6ExtHdrFragment(offset=3, nh=6) / (b"x" * 16),
            dict(ip_proto=6, ip_frag=FRAG_LATER, tp_src=0),
        ),
        (
            Ether(src=MAC_A, dst=MAC_B) / IPv6() / IPv6ExtHdrFragment(offset=0, m=0) / UDP(),
            dict(ip_proto=17, ip_frag=FRAG_NONE, tp_src=53),
        ),
        (
            Ether(src=MAC_A, dst=MAC_B) / IPv6() / ICMPv6EchoRequest(id=77),
            dict(ip_proto=58, icmp_type=128, icmp_id=77),
        ),
        (
            Ether(src=MAC_A, dst=MAC_B, type=0x88CC) / b"lldp",
            dict(eth_type=0x88CC, ip_proto=0),
        ),
    ],
)
def test_fields_mean_what_flowmatch_says(packet: Ether, expected: dict[str, int]) -> None:
    frame = bytes(packet)
    match = extract_flow_match(frame, 99)
    assert match.in_port == 99
    assert match.eth_src == 0x02000000000A
    for field, value in expected.items():
        assert getattr(match, field) == value, field
    assert flow_match_of(parse_frame(frame), 99) == match


@pytest.mark.parametrize(
    ("frame", "error_text"),
    [
        (bytes(Ether() / IP())[:20], "IPv4.header"),
        (bytes(Ether() / IP(ihl=4)), "IPv4.ihl"),
        (bytes(Ether() / IP(len=200)), "IPv4.total_length"),
        (bytes(Ether() / IP(len=10)), "IPv4.total_length"),
        (bytes(Ether() / IP() / TCP(dataofs=4)), "TCP.data_offset"),
        (bytes(Ether() / IP() / TCP(dataofs=15)), "TCP.data_offset"),
        (bytes(Ether() / IP() / UDP(len=4)), "UDP.length"),
        (bytes(Ether() / IP(options=b"\x07\x01\x00\x00")), "IPv4.options"),
        (bytes(Ether() / IP() / TCP(dataofs=6) / b"\x02\x09\x00\x00"), "TCP.options"),
        (bytes(Ether() / IP() / TCP(dataofs=6) / b"\x02\x01\x00\x00"), "TCP.options"),
        (bytes(Ether() / IPv6(plen=100)), "IPv6.payload_length"),
        (bytes(Ether() / IPv6() / IPv6ExtHdrFragment() / IPv6ExtHdrHopByHop()), "IPv6.next_header"),
        (
            bytes(Ether() / IPv6() / IPv6ExtHdrFragment(m=1) / IPv6ExtHdrFragment(offset=7)),
            "IPv6Fragment.next_header",
        ),
        (bytes(Ether() / IPv6() / ICMPv6ND_NS() / (b"\x01\x00" + bytes(6))), "ND.options"),
        (bytes(Ether() / ARP(hwlen=8)), "ARP"),
        (bytes(Ether() / Dot1Q())[:16], "802.1Q.header"),
    ],
)
def test_lying_headers_raise_typed_errors_naming_the_field(frame: bytes, error_text: str) -> None:
    for decode in (lambda: extract_flow_match(frame, 1), lambda: parse_frame(frame)):
        with pytest.raises(PacketError, match=error_text.replace(".", r"\.")):
            decode()


@pytest.mark.parametrize(
    ("name", "packet"),
    [
        ("ends_past_65535", IP(frag=8191, proto=17) / Raw(b"x" * 16)),
        ("tcp_at_offset_8", IP(frag=1, proto=6) / Raw(b"x" * 16)),
        ("tiny_first_tcp", IP(flags="MF", proto=6) / Raw(b"x" * 8)),
        ("tiny_first_udp", IP(flags="MF", proto=17) / Raw(b"x" * 4)),
    ],
)
def test_fragment_attacks_are_refused_by_both_decoders(name: str, packet: IP) -> None:
    frame = bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / packet)
    assert _both(frame) == ("error", "error"), name


def test_ordinary_fragments_still_decode() -> None:
    for packet in (
        IP(flags="MF") / TCP() / Raw(b"x" * 8),
        IP(frag=2, proto=6) / Raw(b"x" * 8),
        IP(frag=8000, proto=17) / Raw(b"x" * 16),
    ):
        frame = bytes(Ether() / packet)
        fast, generic = _both(frame)
        assert fast != "error" and fast == generic
