"""`extract_flow_match`: the datapath-miss hot path from raw frame bytes to a `FlowMatch`.

Owns only this hand-tuned decoder. It reads fields with precompiled `struct` unpackers at
computed offsets, allocates no per-layer objects and builds one `FlowMatch` at the end. It must
agree with the generic parser (`hivenet.packets.parse`) on every frame: the same fields for a
valid frame, a `PacketError` for an invalid one. The unit tests check that property on random
frames, so any validation added to one decoder must be added to the other.
"""

from __future__ import annotations

import struct

from hivenet.packets.errors import MalformedPacket, TruncatedPacket, UnsupportedPacket
from hivenet.packets.flowmatch import (
    ETH_TYPE_ARP,
    ETH_TYPE_IPV4,
    ETH_TYPE_IPV6,
    ETH_TYPE_VLAN,
    FRAG_FIRST,
    FRAG_LATER,
    FRAG_NONE,
    IP_PROTO_ICMP,
    IP_PROTO_ICMPV6,
    IP_PROTO_TCP,
    IP_PROTO_UDP,
    FlowMatch,
)
from hivenet.packets.options import (
    walk_end_nop_options,
    walk_ipv6_tlv_options,
    walk_nd_options,
)

_ETHERNET = struct.Struct("!HIHIH").unpack_from  # dst hi/lo, src hi/lo, ethertype
_U16 = struct.Struct("!H").unpack_from
_VLAN_TAG = struct.Struct("!HH").unpack_from  # TCI, inner ethertype
_ARP_HEAD = struct.Struct("!HHBBH").unpack_from
_ARP_ADDRESSES = struct.Struct("!HIIHII").unpack_from  # sha hi/lo, spa, tha hi/lo, tpa
_IPV4 = struct.Struct("!BBHHHBB2xII").unpack_from
_IPV6 = struct.Struct("!IHBBQQQQ").unpack_from
_PORTS = struct.Struct("!HH").unpack_from
_TCP_OFFSET_FLAGS = struct.Struct("!BB").unpack_from
_ICMP = struct.Struct("!BB2xH").unpack_from  # type, code, identifier
_ND_TARGET = struct.Struct("!QQ").unpack_from
_EXT_HEADER = struct.Struct("!BB").unpack_from
_FRAGMENT = struct.Struct("!B1xH").unpack_from

IPV6_HOP_BY_HOP = 0
IPV6_ROUTING = 43
IPV6_FRAGMENT = 44
IPV6_DEST_OPTIONS = 60
ICMP_ECHO_REPLY = 0
ICMP_ECHO_REQUEST = 8
ICMPV6_ECHO_REQUEST = 128
ICMPV6_ECHO_REPLY = 129
ND_NEIGHBOR_SOLICIT = 135
ND_NEIGHBOR_ADVERT = 136
ND_OPTION_SOURCE_LLADDR = 1
ND_OPTION_TARGET_LLADDR = 2


def extract_flow_match(frame: bytes, in_port: int) -> FlowMatch:
    """Decode the header fields of an Ethernet `frame` received on virtual port `in_port`.

    Raises a `PacketError` subclass for a frame the generic parser would reject.
    """
    size = len(frame)
    if size < 14:
        raise TruncatedPacket("Ethernet", "header", f"needs 14 bytes, only {size} present")
    dst_hi, dst_lo, src_hi, src_lo, eth_type = _ETHERNET(frame, 0)
    eth_dst = (dst_hi << 32) | dst_lo
    eth_src = (src_hi << 32) | src_lo
    offset = 14
    vlan = 0
    if eth_type == ETH_TYPE_VLAN:
        if size < 18:
            raise TruncatedPacket("802.1Q", "header", f"needs 4 bytes, only {size - 14} present")
        tci, eth_type = _VLAN_TAG(frame, 14)
        vlan = tci & 0x0FFF
        offset = 18

    if eth_type == ETH_TYPE_IPV4:
        return _ipv4(frame, offset, in_port, eth_src, eth_dst, vlan)
    if eth_type == ETH_TYPE_IPV6:
        return _ipv6(frame, offset, in_port, eth_src, eth_dst, vlan)
    if eth_type == ETH_TYPE_ARP:
        if size - offset < 28:
            raise TruncatedPacket("ARP", "header", f"needs 28 bytes, only {size - offset} present")
        hardware_type, protocol_type, hardware_length, protocol_length, operation = _ARP_HEAD(
            frame, offset
        )
        sha_hi, sha_lo, spa, tha_hi, tha_lo, tpa = _ARP_ADDRESSES(frame, offset + 8)
        if hardware_type != 1 or protocol_type != ETH_TYPE_IPV4:
            raise UnsupportedPacket(
                "ARP",
                "hardware_type",
                f"only Ethernet/IPv4 ARP, got {hardware_type}/{protocol_type:#x}",
            )
        if hardware_length != 6 or protocol_length != 4:
            raise MalformedPacket(
                "ARP",
                "hardware_length",
                f"Ethernet/IPv4 ARP needs lengths 6/4, got {hardware_length}/{protocol_length}",
            )
        return FlowMatch(
            in_port=in_port,
            eth_src=eth_src,
            eth_dst=eth_dst,
            eth_type=eth_type,
            vlan=vlan,
            arp_op=operation,
            arp_sha=(sha_hi << 32) | sha_lo,
            arp_spa=spa,
            arp_tha=(tha_hi << 32) | tha_lo,
            arp_tpa=tpa,
        )
    return FlowMatch(
        in_port=in_port, eth_src=eth_src, eth_dst=eth_dst, eth_type=eth_type, vlan=vlan
    )


def _ipv4(
    frame: bytes, offset: int, in_port: int, eth_src: int, eth_dst: int, vlan: int
) -> FlowMatch:
    available = len(frame) - offset
    if available < 20:
        raise TruncatedPacket("IPv4", "header", f"needs 20 bytes, only {available} present")
    version_ihl, tos, total_length, _identification, flags_fragment, ttl, protocol, src, dst = (
        _IPV4(frame, offset)
    )
    if version_ihl >> 4 != 4:
        raise MalformedPacket("IPv4", "version", f"expected 4, got {version_ihl >> 4}")
    header_length = (version_ihl & 0x0F) * 4
    if header_length < 20:
        raise MalformedPacket("IPv4", "ihl", f"{header_length // 4} is below the minimum 5")
    if header_length > available:
        raise TruncatedPacket(
            "IPv4", "ihl", f"header of {header_length} bytes, only {available} present"
        )
    if total_length < header_length:
        raise MalformedPacket(
            "IPv4", "total_length", f"{total_length} is shorter than the header ({header_length})"
        )
    if total_length > available:
        raise TruncatedPacket(
            "IPv4", "total_length", f"{total_length} exceeds the {available} bytes present"
        )
    if header_length > 20:
        walk_end_nop_options("IPv4", frame[offset + 20 : offset + header_length])
    if flags_fragment & 0x1FFF:
        check_ipv4_fragment(flags_fragment & 0x1FFF, protocol, total_length - header_length)
        return FlowMatch(
            in_port=in_port,
            eth_src=eth_src,
            eth_dst=eth_dst,
            eth_type=ETH_TYPE_IPV4,
            vlan=vlan,
            ip_src=src,
            ip_dst=dst,
            ip_proto=protocol,
            ip_tos=tos,
            ip_ttl=ttl,
            ip_frag=FRAG_LATER,
        )
    ip_frag = FRAG_FIRST if flags_fragment & 0x2000 else FRAG_NONE
    start = offset + header_length
    end = offset + total_length
    tp_src = tp_dst = tcp_flags = icmp_type = icmp_code = icmp_id = 0
    if protocol in (IP_PROTO_TCP, IP_PROTO_UDP):
        tp_src, tp_dst, tcp_flags = _transport(frame, start, end, protocol, ip_frag)
    elif protocol == IP_PROTO_ICMP:
        if end - start < 8:
            raise TruncatedPacket("ICMP", "header", f"needs 8 bytes, only {end - start} present")
        icmp_type, icmp_code, identifier = _ICMP(frame, start)
        if icmp_type in (ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY):
            icmp_id = identifier
    return FlowMatch(
        in_port,
        eth_src,
        eth_dst,
        ETH_TYPE_IPV4,
        vlan,
        src,
        dst,
        protocol,
        tos,
        ttl,
        ip_frag,
        tp_src,
        tp_dst,
        tcp_flags,
        icmp_type,
        icmp_code,
        icmp_id,
    )


def check_ipv4_fragment(offset_units: int, protocol: int, payload_length: int) -> None:
    """Refuse the stateless-detectable fragment attacks on a non-first IPv4 fragment: one that
    ends past the 65535 bytes a datagram may have (ping of death), and a TCP fragment at
    offset 8 bytes, which can only overlap the first fragment's TCP header (RFC 1858)."""
    end = offset_units * 8 + payload_length
    if end + 20 > 65535:  # + the smallest header the reassembled datagram can have
        raise MalformedPacket("IPv4", "fragment_offset", f"fragment ends at {end}")
    if offset_units == 1 and protocol == IP_PROTO_TCP:
        raise MalformedPacket("IPv4", "fragment_offset", "TCP fragment at offset 8 (RFC 1858)")


def _transport(
    frame: bytes, start: int, end: int, protocol: int, ip_frag: int
) -> tuple[int, int, int]:
    """(tp_src, tp_dst, tcp_flags) of the TCP or UDP header at `start`."""
    available = end - start
    if protocol == IP_PROTO_TCP:
        if available < 20:
            raise TruncatedPacket("TCP", "header", f"needs 20 bytes, only {available} present")
        source_port, destination_port = _PORTS(frame, start)
        offset_byte, flags = _TCP_OFFSET_FLAGS(frame, start + 12)
        header_length = (offset_byte >> 4) * 4
        if header_length < 20:
            raise MalformedPacket(
                "TCP", "data_offset", f"{header_length // 4} is below the minimum 5"
            )
        if header_length > available:
            raise TruncatedPacket(
                "TCP", "data_offset", f"header of {header_length} bytes, only {available} present"
            )
        if header_length > 20:
            walk_end_nop_options("TCP", frame[start + 20 : start + header_length])
        return source_port, destination_port, flags
    if available < 8:
        raise TruncatedPacket("UDP", "header", f"needs 8 bytes, only {available} present")
    source_port, destination_port = _PORTS(frame, start)
    (length,) = _U16(frame, start + 4)
    if length < 8:
        raise MalformedPacket("UDP", "length", f"{length} is below the header size 8")
    if length > available and ip_frag == FRAG_NONE:
        raise TruncatedPacket("UDP", "length", f"{length} exceeds the {available} bytes present")
    return source_port, destination_port, 0


def _ipv6(
    frame: bytes, offset: int, in_port: int, eth_src: int, eth_dst: int, vlan: int
) -> FlowMatch:
    available = len(frame) - offset
    if available < 40:
        raise TruncatedPacket("IPv6", "header", f"needs 40 bytes, only {available} present")
    version_class_label, payload_length, next_header, hop_limit, src_hi, src_lo, dst_hi, dst_lo = (
        _IPV6(frame, offset)
    )
    if version_class_label >> 28 != 6:
        raise MalformedPacket("IPv6", "version", f"expected 6, got {version_class_label >> 28}")
    if payload_length > available - 40:
        raise TruncatedPacket(
            "IPv6",
            "payload_length",
            f"{payload_length} exceeds the {available - 40} bytes present",
        )
    traffic_class = (version_class_label >> 20) & 0xFF
    src = (src_hi << 64) | src_lo
    dst = (dst_hi << 64) | dst_lo
    position = offset + 40
    end = position + payload_length
    ip_frag = FRAG_NONE
    first_header = True
    seen_fragment = False
    while True:
        if next_header in (IPV6_HOP_BY_HOP, IPV6_ROUTING, IPV6_DEST_OPTIONS):
            if next_header == IPV6_HOP_BY_HOP and not first_header:
                raise MalformedPacket(
                    "IPv6", "next_header", "hop-by-hop options must directly follow the header"
                )
            layer = _EXTENSION_NAMES[next_header]
            if end - position < 2:
                raise TruncatedPacket(layer, "header", f"needs 2 bytes, only {end - position}")
            following, units = _EXT_HEADER(frame, position)
            length = (units + 1) * 8
            if length > end - position:
                raise TruncatedPacket(
                    layer, "length", f"{length} bytes, only {end - position} present"
                )
            if next_header != IPV6_ROUTING:
                walk_ipv6_tlv_options(layer, frame[position + 2 : position + length])
            position += length
            next_header = following
            first_header = False
            continue
        if next_header == IPV6_FRAGMENT:
            if seen_fragment:
                # RFC 8200 4.1: at most one Fragment header; two are an evasion attempt.
                raise MalformedPacket("IPv6Fragment", "next_header", "a second fragment header")
            seen_fragment = True
            if end - position < 8:
                raise TruncatedPacket(
                    "IPv6Fragment", "header", f"needs 8 bytes, only {end - position}"
                )
            following, offset_flags = _FRAGMENT(frame, position)
            position += 8
            next_header = following
            first_header = False
            if offset_flags >> 3:
                ip_frag = FRAG_LATER
                break
            if offset_flags & 1:
                ip_frag = FRAG_FIRST
            continue
        break
    tp_src = tp_dst = tcp_flags = icmp_type = icmp_code = icmp_id = 0
    arp_sha = arp_tha = nd_target = 0
    if ip_frag != FRAG_LATER:
        if next_header in (IP_PROTO_TCP, IP_PROTO_UDP):
            tp_src, tp_dst, tcp_flags = _transport(frame, position, end, next_header, ip_frag)
        elif next_header == IP_PROTO_ICMPV6:
            if end - position < 8:
                raise TruncatedPacket(
                    "ICMPv6", "header", f"needs 8 bytes, only {end - position} present"
                )
            icmp_type, icmp_code, identifier = _ICMP(frame, position)
            if icmp_type in (ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY):
                icmp_id = identifier
            elif icmp_type in (ND_NEIGHBOR_SOLICIT, ND_NEIGHBOR_ADVERT):
                if end - position < 24:
                    raise TruncatedPacket(
                        "ND", "target", f"needs 24 bytes, only {end - position} present"
                    )
                target_hi, target_lo = _ND_TARGET(frame, position + 8)
                nd_target = (target_hi << 64) | target_lo
                link_address = nd_link_address(
                    walk_nd_options(frame[position + 24 : end]),
                    ND_OPTION_SOURCE_LLADDR
                    if icmp_type == ND_NEIGHBOR_SOLICIT
                    else ND_OPTION_TARGET_LLADDR,
                )
                if icmp_type == ND_NEIGHBOR_SOLICIT:
                    arp_sha = link_address
                else:
                    arp_tha = link_address
    return FlowMatch(
        in_port,
        eth_src,
        eth_dst,
        ETH_TYPE_IPV6,
        vlan,
        src,
        dst,
        next_header,
        traffic_class,
        hop_limit,
        ip_frag,
        tp_src,
        tp_dst,
        tcp_flags,
        icmp_type,
        icmp_code,
        icmp_id,
        0,
        arp_sha,
        0,
        arp_tha,
        0,
        nd_target,
    )


_EXTENSION_NAMES = {
    IPV6_HOP_BY_HOP: "IPv6HopByHop",
    IPV6_ROUTING: "IPv6Routing",
    IPV6_DEST_OPTIONS: "IPv6DestOptions",
}


def nd_link_address(options: tuple[tuple[int, bytes], ...], wanted_kind: int) -> int:
    """The first source/target link-layer address option of kind `wanted_kind`, 0 if absent.

    On Ethernet the option is exactly 8 bytes (6 of address); any other size is malformed.
    """
    for kind, data in options:
        if kind == wanted_kind:
            if len(data) != 6:
                raise MalformedPacket(
                    "ND",
                    "options",
                    f"link-layer address option {kind} has {len(data)} bytes, not 6",
                )
            return int.from_bytes(data, "big")
    return 0
