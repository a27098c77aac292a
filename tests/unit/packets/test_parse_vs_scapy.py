"""The generic parser agrees field by field with scapy on random frames built by scapy."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror
from scapy.layers.inet6 import (
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6ND_RA,
    ICMPv6NDOptDstLLAddr,
    ICMPv6NDOptSrcLLAddr,
    IPv6,
    IPv6ExtHdrFragment,
)
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Packet

from hivenet.packets import mac_to_int, parse_frame, verify_checksums
from hivenet.packets.flowmatch import FRAG_FIRST, FRAG_LATER, FRAG_NONE
from hivenet.packets.headers import NeighborAdvertisement, NeighborSolicitation, RouterAdvertisement
from hivenet.packets.parse import ParsedFrame, embedded_datagram

from .scapy_frames import scapy_frames


def _ip(text: str) -> int:
    return int(ipaddress.ip_address(text))


def _check_l2(parsed: ParsedFrame, reference: Packet) -> None:
    assert parsed.ethernet.dst == mac_to_int(reference[Ether].dst)
    assert parsed.ethernet.src == mac_to_int(reference[Ether].src)
    assert parsed.ethernet.ethertype == reference[Ether].type
    if Dot1Q in reference:
        assert parsed.vlan is not None
        assert (parsed.vlan.vid, parsed.vlan.pcp, parsed.vlan.dei) == (
            reference[Dot1Q].vlan,
            reference[Dot1Q].prio,
            reference[Dot1Q].dei,
        )
        assert parsed.eth_type == reference[Dot1Q].type
    else:
        assert parsed.vlan is None


def _check_ipv4(parsed: ParsedFrame, reference: Packet, frame: bytes) -> None:
    ip = reference[IP]
    ours = parsed.ipv4
    assert ours is not None
    assert (ours.ihl, ours.tos, ours.total_length, ours.identification) == (
        ip.ihl,
        ip.tos,
        ip.len,
        ip.id,
    )
    assert (ours.flags, ours.fragment_offset, ours.ttl, ours.protocol, ours.checksum) == (
        int(ip.flags),
        ip.frag,
        ip.ttl,
        ip.proto,
        ip.chksum,
    )
    assert (ours.src, ours.dst) == (_ip(ip.src), _ip(ip.dst))
    assert ours.options == frame[parsed.l3_offset + 20 : parsed.l3_offset + ip.ihl * 4]
    expected_frag = FRAG_LATER if ip.frag else FRAG_FIRST if int(ip.flags) & 1 else FRAG_NONE
    assert parsed.ip_frag == expected_frag


def _check_ipv6(parsed: ParsedFrame, reference: Packet) -> None:
    ip = reference[IPv6]
    ours = parsed.ipv6
    assert ours is not None
    assert (ours.traffic_class, ours.flow_label, ours.payload_length) == (ip.tc, ip.fl, ip.plen)
    assert (ours.next_header, ours.hop_limit) == (ip.nh, ip.hlim)
    assert (ours.src, ours.dst) == (_ip(ip.src), _ip(ip.dst))
    if IPv6ExtHdrFragment in reference:
        fragment = reference[IPv6ExtHdrFragment]
        if fragment.offset:
            assert parsed.ip_frag == FRAG_LATER
            assert parsed.ip_protocol == fragment.nh
        elif fragment.m:
            assert parsed.ip_frag == FRAG_FIRST
    else:
        assert parsed.ip_frag == FRAG_NONE


def _check_l4(parsed: ParsedFrame, reference: Packet) -> None:
    # scapy dissects quoted datagrams as TCPerror/UDPerror; only the outer layer counts here.
    if TCP in reference and parsed.ip_frag != FRAG_LATER and parsed.tcp is not None:
        tcp = reference[TCP]
        ours = parsed.tcp
        assert (ours.src_port, ours.dst_port, ours.seq, ours.ack) == (
            tcp.sport,
            tcp.dport,
            tcp.seq,
            tcp.ack,
        )
        assert ours.data_offset == tcp.dataofs
        assert ours.flags == int(tcp.flags) & 0xFF
        assert ours.reserved == (tcp.reserved << 1) | (int(tcp.flags) >> 8)
        assert (ours.window, ours.checksum, ours.urgent_pointer) == (
            tcp.window,
            tcp.chksum,
            tcp.urgptr,
        )
        assert parsed.payload == bytes(tcp.payload)[: len(parsed.payload)]
    elif UDP in reference and parsed.udp is not None:
        udp = reference[UDP]
        assert (parsed.udp.src_port, parsed.udp.dst_port) == (udp.sport, udp.dport)
        assert (parsed.udp.length, parsed.udp.checksum) == (udp.len, udp.chksum)
    else:
        assert parsed.tcp is None and parsed.udp is None


def _check_icmp(parsed: ParsedFrame, reference: Packet) -> None:
    if parsed.icmp is not None:
        icmp = reference[ICMP]
        assert (parsed.icmp.type, parsed.icmp.code, parsed.icmp.checksum) == (
            icmp.type,
            icmp.code,
            icmp.chksum,
        )
        if icmp.type in (0, 8):
            assert (parsed.icmp.identifier, parsed.icmp.sequence) == (icmp.id, icmp.seq)
        if icmp.type in (3, 11) and IPerror in reference:
            quoted = embedded_datagram(parsed)
            assert quoted.ipv4 is not None
            assert (quoted.ipv4.src, quoted.ipv4.dst) == (
                _ip(reference[IPerror].src),
                _ip(reference[IPerror].dst),
            )
            assert quoted.ipv4.ttl == reference[IPerror].ttl
    if parsed.icmpv6 is not None:
        assert (parsed.icmpv6.type, parsed.icmpv6.code) == _icmpv6_type_code(reference)
    if isinstance(parsed.nd, NeighborSolicitation):
        assert parsed.nd.target == _ip(reference[ICMPv6ND_NS].tgt)
        if ICMPv6NDOptSrcLLAddr in reference:
            assert parsed.nd.source_link_address == mac_to_int(
                reference[ICMPv6NDOptSrcLLAddr].lladdr
            )
        else:
            assert parsed.nd.source_link_address is None
    if isinstance(parsed.nd, NeighborAdvertisement):
        na = reference[ICMPv6ND_NA]
        assert (parsed.nd.target, parsed.nd.router, parsed.nd.solicited, parsed.nd.override) == (
            _ip(na.tgt),
            na.R,
            na.S,
            na.O,
        )
        if ICMPv6NDOptDstLLAddr in reference:
            assert parsed.nd.target_link_address == mac_to_int(
                reference[ICMPv6NDOptDstLLAddr].lladdr
            )
    if isinstance(parsed.nd, RouterAdvertisement):
        ra = reference[ICMPv6ND_RA]
        assert (
            parsed.nd.cur_hop_limit,
            parsed.nd.managed,
            parsed.nd.other,
            parsed.nd.router_lifetime,
            parsed.nd.reachable_time,
            parsed.nd.retrans_timer,
        ) == (ra.chlim, ra.M, ra.O, ra.routerlifetime, ra.reachabletime, ra.retranstimer)
        assert [kind for kind, _ in parsed.nd.options] == [1, 5, 3]


def _icmpv6_type_code(reference: Packet) -> tuple[int, int]:
    # getattr on a scapy layer searches its payload too, so look at each layer's own fields.
    layer = reference[IPv6]
    while not any(field.name == "cksum" for field in layer.fields_desc):
        layer = layer.payload
    return layer.type, layer.code


@settings(max_examples=300, deadline=None)
@given(scapy_frames())
def test_parse_agrees_with_scapy_field_by_field(frame: bytes) -> None:
    reference = Ether(frame)
    parsed = parse_frame(frame)
    _check_l2(parsed, reference)
    if ARP in reference:
        arp = reference[ARP]
        assert parsed.arp is not None
        assert (parsed.arp.operation, parsed.arp.sender_mac, parsed.arp.target_mac) == (
            arp.op,
            mac_to_int(arp.hwsrc),
            mac_to_int(arp.hwdst),
        )
        assert (parsed.arp.sender_ip, parsed.arp.target_ip) == (_ip(arp.psrc), _ip(arp.pdst))
    elif IP in reference:
        _check_ipv4(parsed, reference, frame)
    elif IPv6 in reference:
        _check_ipv6(parsed, reference)
    else:
        assert parsed.ipv4 is None and parsed.ipv6 is None and parsed.arp is None
    _check_l4(parsed, reference)
    _check_icmp(parsed, reference)
    # scapy computed every checksum when it built the frame: ours must accept them all.
    assert verify_checksums(frame) == []
