"""Frame builders: complete Ethernet frames with valid checksums for what the simulation
answers or generates (ARP, ICMP/ICMPv6 echo replies and errors, TCP resets, neighbour
discovery) and for test traffic (UDP datagrams, TCP segments, echo requests).

Owns the assembly of layers into bytes and the protocol rules of each answer (RFC 793 reset
sequence numbers, RFC 792/4443 error quoting, RFC 4861 ND options). Does not decide whether
to answer: `icmp_error_allowed` states the RFC 1812 / RFC 4443 limits, the simulation applies
them. MACs are ints or "aa:bb:..." text; IP addresses are `ipaddress` objects or text, and the
family of the addresses picks IPv4 or IPv6.
"""

from __future__ import annotations

import ipaddress

from hivenet.packets.addresses import (
    BROADCAST_MAC,
    IpAddress,
    IpLike,
    MacLike,
    ip_address,
    mac_to_int,
    multicast_mac,
    solicited_node_multicast,
)
from hivenet.packets.checksum import internet_checksum, transport_checksum
from hivenet.packets.errors import UnsupportedPacket
from hivenet.packets.flowmatch import (
    ETH_TYPE_ARP,
    ETH_TYPE_IPV4,
    ETH_TYPE_IPV6,
    ETH_TYPE_VLAN,
    FRAG_LATER,
    FRAG_NONE,
    IP_PROTO_ICMP,
    IP_PROTO_ICMPV6,
    IP_PROTO_TCP,
    IP_PROTO_UDP,
)
from hivenet.packets.headers import (
    ARP_REPLY,
    ARP_REQUEST,
    ICMP_DEST_UNREACHABLE,
    ICMP_ECHO_REPLY,
    ICMP_ECHO_REQUEST,
    ICMP_ERROR_TYPES,
    ICMP_FRAGMENTATION_NEEDED,
    ICMP_TIME_EXCEEDED,
    ICMPV6_DEST_UNREACHABLE,
    ICMPV6_ECHO_REPLY,
    ICMPV6_ECHO_REQUEST,
    ICMPV6_ERROR_TYPES,
    ICMPV6_PACKET_TOO_BIG,
    ICMPV6_PARAMETER_PROBLEM,
    ICMPV6_TIME_EXCEEDED,
    ND_MESSAGE_TYPES,
    ND_OPTION_SOURCE_LLADDR,
    ND_OPTION_TARGET_LLADDR,
    TCP_ACK,
    TCP_FIN,
    TCP_RST,
    TCP_SYN,
    ArpPacket,
    Dot1QTag,
    EthernetHeader,
    IcmpHeader,
    Icmpv6Header,
    Ipv4Header,
    Ipv6Header,
    NdMessage,
    NeighborAdvertisement,
    NeighborSolicitation,
    TcpHeader,
    UdpHeader,
    encode_nd_message,
)
from hivenet.packets.parse import ParsedFrame, parse_frame

DEFAULT_TTL = 64
ND_HOP_LIMIT = 255  # RFC 4861: ND messages are sent, and accepted only, with hop limit 255
IPV6_MINIMUM_MTU = 1280
ALL_NODES = ipaddress.IPv6Address("ff02::1")
UNSPECIFIED_V6 = ipaddress.IPv6Address("::")
ICMP_QUOTE_L4_BYTES = 8  # RFC 792: the IP header plus the first 64 bits of the datagram

# --- layers ----------------------------------------------------------------------------------


def ethernet_frame(
    dst_mac: MacLike, src_mac: MacLike, eth_type: int, payload: bytes, vlan: int = 0
) -> bytes:
    """Ethernet header (+ one 802.1Q tag when `vlan` is 1..4095) and `payload`."""
    dst, src = mac_to_int(dst_mac), mac_to_int(src_mac)
    if vlan:
        tag = Dot1QTag(0, 0, vlan, eth_type)
        return EthernetHeader(dst, src, ETH_TYPE_VLAN).encode_fixed() + tag.encode_fixed() + payload
    return EthernetHeader(dst, src, eth_type).encode_fixed() + payload


def _same_family(src: IpLike, dst: IpLike) -> tuple[IpAddress, IpAddress]:
    source, destination = ip_address(src), ip_address(dst)
    if source.version != destination.version:
        raise ValueError(f"ip_dst: {destination} is not IPv{source.version} like ip_src {source}")
    return source, destination


def ipv4_packet(
    src: IpLike,
    dst: IpLike,
    protocol: int,
    payload: bytes,
    *,
    ttl: int = DEFAULT_TTL,
    tos: int = 0,
    identification: int = 0,
    flags: int = 0,
    fragment_offset: int = 0,
    options: bytes = b"",
) -> bytes:
    """An IPv4 datagram with a correct header checksum; `options` are zero-padded to 4 bytes."""
    source, destination = _same_family(src, dst)
    if source.version != 4:
        raise ValueError(f"ip_src: {source} is not IPv4")
    options = options + b"\x00" * (-len(options) % 4)
    header = Ipv4Header(
        4,
        5 + len(options) // 4,
        tos,
        20 + len(options) + len(payload),
        identification,
        flags,
        fragment_offset,
        ttl,
        protocol,
        0,
        int(source),
        int(destination),
        options,
    ).encode()
    checksum = internet_checksum(header)
    return header[:10] + checksum.to_bytes(2, "big") + header[12:] + payload


def ipv6_packet(
    src: IpLike,
    dst: IpLike,
    next_header: int,
    payload: bytes,
    *,
    hop_limit: int = DEFAULT_TTL,
    traffic_class: int = 0,
    flow_label: int = 0,
) -> bytes:
    source, destination = _same_family(src, dst)
    if source.version != 6:
        raise ValueError(f"ip_src: {source} is not IPv6")
    header = Ipv6Header(
        6,
        traffic_class,
        flow_label,
        len(payload),
        next_header,
        hop_limit,
        int(source),
        int(destination),
    )
    return header.encode() + payload


def ip_packet(
    src: IpLike, dst: IpLike, protocol: int, payload: bytes, *, ttl: int = DEFAULT_TTL, tos: int = 0
) -> tuple[int, bytes]:
    """(ethertype, IPv4 or IPv6 packet) for the family of `src`."""
    if ip_address(src).version == 4:
        return ETH_TYPE_IPV4, ipv4_packet(src, dst, protocol, payload, ttl=ttl, tos=tos)
    return ETH_TYPE_IPV6, ipv6_packet(src, dst, protocol, payload, hop_limit=ttl, traffic_class=tos)


def _with_checksum(segment: bytes, checksum_offset: int, checksum: int) -> bytes:
    return segment[:checksum_offset] + checksum.to_bytes(2, "big") + segment[checksum_offset + 2 :]


def udp_segment(
    src: IpLike, dst: IpLike, src_port: int, dst_port: int, payload: bytes = b""
) -> bytes:
    """A UDP header and payload with the pseudo-header checksum (0 computed is sent as 0xFFFF)."""
    source, destination = _same_family(src, dst)
    segment = UdpHeader(src_port, dst_port, 8 + len(payload), 0).encode() + payload
    checksum = transport_checksum(source.packed, destination.packed, IP_PROTO_UDP, segment)
    return _with_checksum(segment, 6, checksum or 0xFFFF)


def tcp_segment(
    src: IpLike,
    dst: IpLike,
    src_port: int,
    dst_port: int,
    *,
    seq: int = 0,
    ack: int = 0,
    flags: int = TCP_SYN,
    window: int = 65535,
    options: bytes = b"",
    payload: bytes = b"",
    urgent_pointer: int = 0,
) -> bytes:
    """A TCP header (options zero-padded to 4 bytes) and payload with a valid checksum."""
    source, destination = _same_family(src, dst)
    options = options + b"\x00" * (-len(options) % 4)
    header = TcpHeader(
        src_port,
        dst_port,
        seq,
        ack,
        5 + len(options) // 4,
        0,
        flags,
        window,
        0,
        urgent_pointer,
        options,
    )
    segment = header.encode() + payload
    checksum = transport_checksum(source.packed, destination.packed, IP_PROTO_TCP, segment)
    return _with_checksum(segment, 16, checksum)


def icmp_message(icmp_type: int, code: int, rest: int, body: bytes) -> bytes:
    message = IcmpHeader(icmp_type, code, 0, rest).encode() + body
    return _with_checksum(message, 2, internet_checksum(message))


def icmpv6_message(
    src: IpLike, dst: IpLike, icmp_type: int, code: int, rest: int, body: bytes
) -> bytes:
    source, destination = _same_family(src, dst)
    message = Icmpv6Header(icmp_type, code, 0, rest).encode() + body
    checksum = transport_checksum(source.packed, destination.packed, IP_PROTO_ICMPV6, message)
    return _with_checksum(message, 2, checksum)


# --- traffic ---------------------------------------------------------------------------------


def build_udp_datagram(
    *,
    eth_src: MacLike,
    eth_dst: MacLike,
    ip_src: IpLike,
    ip_dst: IpLike,
    src_port: int,
    dst_port: int,
    payload: bytes = b"",
    vlan: int = 0,
    ttl: int = DEFAULT_TTL,
    tos: int = 0,
) -> bytes:
    segment = udp_segment(ip_src, ip_dst, src_port, dst_port, payload)
    eth_type, packet = ip_packet(ip_src, ip_dst, IP_PROTO_UDP, segment, ttl=ttl, tos=tos)
    return ethernet_frame(eth_dst, eth_src, eth_type, packet, vlan)


def build_tcp_segment(
    *,
    eth_src: MacLike,
    eth_dst: MacLike,
    ip_src: IpLike,
    ip_dst: IpLike,
    src_port: int,
    dst_port: int,
    seq: int = 0,
    ack: int = 0,
    flags: int = TCP_SYN,
    window: int = 65535,
    options: bytes = b"",
    payload: bytes = b"",
    vlan: int = 0,
    ttl: int = DEFAULT_TTL,
    tos: int = 0,
) -> bytes:
    segment = tcp_segment(
        ip_src,
        ip_dst,
        src_port,
        dst_port,
        seq=seq,
        ack=ack,
        flags=flags,
        window=window,
        options=options,
        payload=payload,
    )
    eth_type, packet = ip_packet(ip_src, ip_dst, IP_PROTO_TCP, segment, ttl=ttl, tos=tos)
    return ethernet_frame(eth_dst, eth_src, eth_type, packet, vlan)


def build_echo_request(
    *,
    eth_src: MacLike,
    eth_dst: MacLike,
    ip_src: IpLike,
    ip_dst: IpLike,
    identifier: int,
    sequence: int,
    payload: bytes = b"",
    vlan: int = 0,
    ttl: int = DEFAULT_TTL,
) -> bytes:
    """An ICMP (IPv4) or ICMPv6 (IPv6) echo request."""
    rest = (identifier << 16) | sequence
    if ip_address(ip_src).version == 4:
        message = icmp_message(ICMP_ECHO_REQUEST, 0, rest, payload)
        packet = ipv4_packet(ip_src, ip_dst, IP_PROTO_ICMP, message, ttl=ttl)
        return ethernet_frame(eth_dst, eth_src, ETH_TYPE_IPV4, packet, vlan)
    message = icmpv6_message(ip_src, ip_dst, ICMPV6_ECHO_REQUEST, 0, rest, payload)
    packet = ipv6_packet(ip_src, ip_dst, IP_PROTO_ICMPV6, message, hop_limit=ttl)
    return ethernet_frame(eth_dst, eth_src, ETH_TYPE_IPV6, packet, vlan)


# --- ARP -------------------------------------------------------------------------------------


def _ipv4_int(value: IpLike, field: str) -> int:
    address = ip_address(value)
    if address.version != 4:
        raise ValueError(f"{field}: ARP needs an IPv4 address, got {address}")
    return int(address)


def build_arp_request(
    *, sender_mac: MacLike, sender_ip: IpLike, target_ip: IpLike, vlan: int = 0
) -> bytes:
    """Broadcast "who has target_ip? tell sender_ip"."""
    arp = ArpPacket(
        1,
        ETH_TYPE_IPV4,
        6,
        4,
        ARP_REQUEST,
        mac_to_int(sender_mac),
        _ipv4_int(sender_ip, "sender_ip"),
        0,
        _ipv4_int(target_ip, "target_ip"),
    )
    return ethernet_frame(BROADCAST_MAC, sender_mac, ETH_TYPE_ARP, arp.encode(), vlan)


def build_arp_reply(
    *,
    sender_mac: MacLike,
    sender_ip: IpLike,
    target_mac: MacLike,
    target_ip: IpLike,
    vlan: int = 0,
) -> bytes:
    """Unicast "sender_ip is at sender_mac" to target_mac."""
    arp = ArpPacket(
        1,
        ETH_TYPE_IPV4,
        6,
        4,
        ARP_REPLY,
        mac_to_int(sender_mac),
        _ipv4_int(sender_ip, "sender_ip"),
        mac_to_int(target_mac),
        _ipv4_int(target_ip, "target_ip"),
    )
    return ethernet_frame(target_mac, sender_mac, ETH_TYPE_ARP, arp.encode(), vlan)


def arp_reply_to(request_frame: bytes, answer_mac: MacLike) -> bytes:
    """The reply to an ARP request: the requested address is at `answer_mac`."""
    parsed = parse_frame(request_frame)
    arp = parsed.arp
    if arp is None or arp.operation != ARP_REQUEST:
        raise UnsupportedPacket("ARP", "operation", "frame is not an ARP request")
    return build_arp_reply(
        sender_mac=answer_mac,
        sender_ip=ipaddress.IPv4Address(arp.target_ip),
        target_mac=arp.sender_mac,
        target_ip=ipaddress.IPv4Address(arp.sender_ip),
        vlan=parsed.vlan.vid if parsed.vlan else 0,
    )


# --- echo replies ----------------------------------------------------------------------------


def _addresses(parsed: ParsedFrame) -> tuple[IpAddress, IpAddress]:
    if parsed.ipv4 is not None:
        return ipaddress.IPv4Address(parsed.ipv4.src), ipaddress.IPv4Address(parsed.ipv4.dst)
    if parsed.ipv6 is not None:
        return ipaddress.IPv6Address(parsed.ipv6.src), ipaddress.IPv6Address(parsed.ipv6.dst)
    raise UnsupportedPacket("IP", "eth_type", f"frame is not IP ({parsed.eth_type:#06x})")


def _vlan(parsed: ParsedFrame) -> int:
    return parsed.vlan.vid if parsed.vlan else 0


def build_icmp_echo_reply(request_frame: bytes) -> bytes:
    """The echo reply to an IPv4 ICMP echo request: addresses swapped, same identifier,
    sequence and data, a fresh TTL, the same VLAN."""
    parsed = parse_frame(request_frame)
    if parsed.icmp is None or parsed.icmp.type != ICMP_ECHO_REQUEST:
        raise UnsupportedPacket("ICMP", "type", "frame is not an ICMP echo request")
    if parsed.ip_frag != FRAG_NONE:
        raise UnsupportedPacket("IPv4", "fragment_offset", "cannot answer a fragment")
    assert parsed.ipv4 is not None
    src, dst = _addresses(parsed)
    message = icmp_message(ICMP_ECHO_REPLY, 0, parsed.icmp.rest, parsed.payload)
    packet = ipv4_packet(dst, src, IP_PROTO_ICMP, message, tos=parsed.ipv4.tos)
    return ethernet_frame(
        parsed.ethernet.src, parsed.ethernet.dst, ETH_TYPE_IPV4, packet, _vlan(parsed)
    )


def build_icmpv6_echo_reply(request_frame: bytes) -> bytes:
    """The ICMPv6 echo reply to an echo request (RFC 4443 4.2)."""
    parsed = parse_frame(request_frame)
    if parsed.icmpv6 is None or parsed.icmpv6.type != ICMPV6_ECHO_REQUEST:
        raise UnsupportedPacket("ICMPv6", "type", "frame is not an ICMPv6 echo request")
    if parsed.ip_frag != FRAG_NONE:
        raise UnsupportedPacket("IPv6Fragment", "fragment_offset", "cannot answer a fragment")
    assert parsed.ipv6 is not None
    src, dst = _addresses(parsed)
    message = icmpv6_message(dst, src, ICMPV6_ECHO_REPLY, 0, parsed.icmpv6.rest, parsed.payload)
    packet = ipv6_packet(
        dst, src, IP_PROTO_ICMPV6, message, traffic_class=parsed.ipv6.traffic_class
    )
    return ethernet_frame(
        parsed.ethernet.src, parsed.ethernet.dst, ETH_TYPE_IPV6, packet, _vlan(parsed)
    )


# --- ICMP errors -----------------------------------------------------------------------------


def icmp_error_allowed(frame: bytes) -> bool:
    """Whether an ICMP/ICMPv6 error may be sent about `frame` (RFC 1812 4.3.2.7, RFC 4443
    2.4 e): not about an ICMP error, a non-first fragment, or a packet sent to or from a
    broadcast/multicast address (directed broadcasts need the topology and are the caller's
    to check). (The ICMPv6 Packet Too Big exception for multicast is left to
    the caller.)"""
    try:
        parsed = parse_frame(frame)
    except ValueError:
        return False
    if parsed.ip_frag == FRAG_LATER or parsed.ethernet.dst >> 40 & 1:
        return False  # a non-first fragment, or a link-layer broadcast/multicast
    if parsed.icmp is not None and parsed.icmp.type in ICMP_ERROR_TYPES:
        return False
    if parsed.icmpv6 is not None and (
        parsed.icmpv6.type in ICMPV6_ERROR_TYPES or parsed.icmpv6.type in ND_MESSAGE_TYPES
    ):
        return False
    try:
        src, dst = _addresses(parsed)
    except ValueError:
        return False
    limited_broadcast = ipaddress.IPv4Address("255.255.255.255")
    return not (
        src.is_multicast
        or dst.is_multicast
        or src.is_unspecified
        or limited_broadcast in (src, dst)
    )


def _error_macs(parsed: ParsedFrame, src_mac: MacLike | None) -> tuple[int, int]:
    """(dst, src) MACs of an error sent back the way `parsed` came."""
    return parsed.ethernet.src, parsed.ethernet.dst if src_mac is None else mac_to_int(src_mac)


def build_icmp_error(
    offending_frame: bytes,
    icmp_type: int,
    code: int,
    *,
    src_ip: IpLike,
    src_mac: MacLike | None = None,
    mtu: int = 0,
    ttl: int = DEFAULT_TTL,
) -> bytes:
    """An ICMP error about `offending_frame` from router address `src_ip`, sent back to the
    frame's source MAC from `src_mac` (default: the MAC the frame was sent to). It quotes the
    offending IP header with its options and the first 8 bytes of its payload (RFC 792).
    `mtu` is the next-hop MTU of a fragmentation-needed error (RFC 1191)."""
    if icmp_type not in (ICMP_DEST_UNREACHABLE, ICMP_TIME_EXCEEDED):
        raise ValueError(
            f"icmp_type: {icmp_type} is not dest-unreachable (3) or time-exceeded (11)"
        )
    if not 0 <= code <= 15:
        raise ValueError(f"code: {code} is not an ICMP error code (0..15)")
    if not 0 <= mtu <= 0xFFFF:
        raise ValueError(f"mtu: {mtu} does not fit in 16 bits")
    parsed = parse_frame(offending_frame)
    if parsed.ipv4 is None:
        raise UnsupportedPacket("IPv4", "eth_type", "the offending frame is not IPv4")
    header_end = parsed.l3_offset + parsed.ipv4.header_length
    datagram_end = parsed.l3_offset + parsed.ipv4.total_length
    quote = offending_frame[parsed.l3_offset : min(header_end + ICMP_QUOTE_L4_BYTES, datagram_end)]
    rest = mtu if icmp_type == ICMP_DEST_UNREACHABLE and code == ICMP_FRAGMENTATION_NEEDED else 0
    message = icmp_message(icmp_type, code, rest, quote)
    packet = ipv4_packet(
        src_ip, ipaddress.IPv4Address(parsed.ipv4.src), IP_PROTO_ICMP, message, ttl=ttl
    )
    dst_mac, source_mac = _error_macs(parsed, src_mac)
    return ethernet_frame(dst_mac, source_mac, ETH_TYPE_IPV4, packet, _vlan(parsed))


def build_icmp_dest_unreachable(
    offending_frame: bytes,
    code: int,
    *,
    src_ip: IpLike,
    src_mac: MacLike | None = None,
    mtu: int = 0,
) -> bytes:
    """Destination unreachable: code 0 net, 1 host, 3 port, 4 fragmentation needed (give
    `mtu`), 13 administratively prohibited (see the ICMP_* code constants)."""
    if code == ICMP_FRAGMENTATION_NEEDED and not mtu:
        raise ValueError("mtu: fragmentation-needed (code 4) needs the next-hop MTU")
    return build_icmp_error(
        offending_frame, ICMP_DEST_UNREACHABLE, code, src_ip=src_ip, src_mac=src_mac, mtu=mtu
    )


def build_icmp_time_exceeded(
    offending_frame: bytes, *, src_ip: IpLike, src_mac: MacLike | None = None, code: int = 0
) -> bytes:
    """Time exceeded: code 0 TTL expired in transit, 1 fragment reassembly time exceeded."""
    return build_icmp_error(
        offending_frame, ICMP_TIME_EXCEEDED, code, src_ip=src_ip, src_mac=src_mac
    )


def build_icmpv6_error(
    offending_frame: bytes,
    icmp_type: int,
    code: int,
    *,
    src_ip: IpLike,
    src_mac: MacLike | None = None,
    value: int = 0,
    hop_limit: int = DEFAULT_TTL,
) -> bytes:
    """An ICMPv6 error quoting as much of the offending packet as keeps the error within the
    IPv6 minimum MTU of 1280 bytes (RFC 4443 2.4 c). `value` is the 32-bit word after the
    checksum: the MTU of a packet-too-big, the pointer of a parameter problem."""
    allowed = (
        ICMPV6_DEST_UNREACHABLE,
        ICMPV6_PACKET_TOO_BIG,
        ICMPV6_TIME_EXCEEDED,
        ICMPV6_PARAMETER_PROBLEM,
    )
    if icmp_type not in allowed:
        raise ValueError(f"icmp_type: {icmp_type} is not an ICMPv6 error type {allowed}")
    if not 0 <= code <= 255:
        raise ValueError(f"code: {code} does not fit in 8 bits")
    parsed = parse_frame(offending_frame)
    if parsed.ipv6 is None:
        raise UnsupportedPacket("IPv6", "eth_type", "the offending frame is not IPv6")
    datagram_end = parsed.l3_offset + 40 + parsed.ipv6.payload_length
    room = IPV6_MINIMUM_MTU - 40 - 8
    quote = offending_frame[parsed.l3_offset : min(datagram_end, parsed.l3_offset + room)]
    destination = ipaddress.IPv6Address(parsed.ipv6.src)
    message = icmpv6_message(src_ip, destination, icmp_type, code, value, quote)
    packet = ipv6_packet(src_ip, destination, IP_PROTO_ICMPV6, message, hop_limit=hop_limit)
    dst_mac, source_mac = _error_macs(parsed, src_mac)
    return ethernet_frame(dst_mac, source_mac, ETH_TYPE_IPV6, packet, _vlan(parsed))


def build_icmpv6_dest_unreachable(
    offending_frame: bytes, code: int, *, src_ip: IpLike, src_mac: MacLike | None = None
) -> bytes:
    """Code 0 no route, 1 administratively prohibited, 3 address unreachable, 4 port
    unreachable (see the ICMPV6_* code constants)."""
    return build_icmpv6_error(
        offending_frame, ICMPV6_DEST_UNREACHABLE, code, src_ip=src_ip, src_mac=src_mac
    )


def build_icmpv6_time_exceeded(
    offending_frame: bytes, *, src_ip: IpLike, src_mac: MacLike | None = None, code: int = 0
) -> bytes:
    """Code 0 hop limit exceeded in transit, 1 fragment reassembly time exceeded."""
    return build_icmpv6_error(
        offending_frame, ICMPV6_TIME_EXCEEDED, code, src_ip=src_ip, src_mac=src_mac
    )


def build_icmpv6_packet_too_big(
    offending_frame: bytes, *, mtu: int, src_ip: IpLike, src_mac: MacLike | None = None
) -> bytes:
    if not IPV6_MINIMUM_MTU <= mtu <= 0xFFFFFFFF:
        raise ValueError(f"mtu: {mtu} is below the IPv6 minimum 1280")
    return build_icmpv6_error(
        offending_frame, ICMPV6_PACKET_TOO_BIG, 0, src_ip=src_ip, src_mac=src_mac, value=mtu
    )


# --- TCP reset -------------------------------------------------------------------------------


def build_tcp_rst(segment_frame: bytes, *, src_mac: MacLike | None = None) -> bytes:
    """The reset answering a TCP segment sent to a closed port (RFC 793 3.4 / RFC 9293
    3.10.7.1): if the segment had ACK, <SEQ=SEG.ACK><CTL=RST>; else
    <SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>, where SYN and FIN each count one. A reset is
    never answered. Sent back from `src_mac` (default: the MAC the segment was sent to)."""
    parsed = parse_frame(segment_frame)
    tcp = parsed.tcp
    if tcp is None:
        raise UnsupportedPacket("TCP", "ip_proto", "frame is not a TCP segment")
    if tcp.flags & TCP_RST:
        raise UnsupportedPacket("TCP", "flags", "a reset is never answered with a reset")
    if parsed.ip_frag != FRAG_NONE:
        raise UnsupportedPacket("TCP", "ip_frag", "cannot answer a fragmented segment")
    src, dst = _addresses(parsed)
    if tcp.flags & TCP_ACK:
        seq, ack, flags = tcp.ack, 0, TCP_RST
    else:
        segment_length = len(parsed.payload) + bool(tcp.flags & TCP_SYN) + bool(tcp.flags & TCP_FIN)
        seq, ack, flags = 0, (tcp.seq + segment_length) & 0xFFFFFFFF, TCP_RST | TCP_ACK
    segment = tcp_segment(
        dst, src, tcp.dst_port, tcp.src_port, seq=seq, ack=ack, flags=flags, window=0
    )
    eth_type, packet = ip_packet(dst, src, IP_PROTO_TCP, segment)
    dst_mac, source_mac = _error_macs(parsed, src_mac)
    return ethernet_frame(dst_mac, source_mac, eth_type, packet, _vlan(parsed))


# --- neighbour discovery ---------------------------------------------------------------------


def _mac_option(kind: int, mac: MacLike) -> tuple[int, bytes]:
    return (kind, mac_to_int(mac).to_bytes(6, "big"))


def build_nd_frame(
    message: NdMessage,
    *,
    eth_src: MacLike,
    eth_dst: MacLike,
    ip_src: IpLike,
    ip_dst: IpLike,
    vlan: int = 0,
) -> bytes:
    """Any ND message (RS, RA, NS, NA) in a frame, with hop limit 255."""
    icmp_type = next(kind for kind, cls in ND_MESSAGE_TYPES.items() if isinstance(message, cls))
    body = encode_nd_message(message)
    # The first 4 body bytes are the ICMPv6 "rest" word; encode them through the header.
    rest = int.from_bytes(body[:4], "big")
    icmp = icmpv6_message(ip_src, ip_dst, icmp_type, 0, rest, body[4:])
    packet = ipv6_packet(ip_src, ip_dst, IP_PROTO_ICMPV6, icmp, hop_limit=ND_HOP_LIMIT)
    return ethernet_frame(eth_dst, eth_src, ETH_TYPE_IPV6, packet, vlan)


def build_neighbor_solicitation(
    *,
    src_mac: MacLike,
    src_ip: IpLike,
    target_ip: IpLike,
    dst_ip: IpLike | None = None,
    dst_mac: MacLike | None = None,
    vlan: int = 0,
) -> bytes:
    """NS for `target_ip`, by default to its solicited-node multicast group. The source
    link-layer option is included unless `src_ip` is :: (duplicate address detection)."""
    target = ip_address(target_ip)
    destination = solicited_node_multicast(target) if dst_ip is None else ip_address(dst_ip)
    source = ip_address(src_ip)
    options = () if source == UNSPECIFIED_V6 else (_mac_option(ND_OPTION_SOURCE_LLADDR, src_mac),)
    message = NeighborSolicitation(0, int(target), options)
    return build_nd_frame(
        message,
        eth_src=src_mac,
        eth_dst=multicast_mac(destination) if dst_mac is None else dst_mac,
        ip_src=source,
        ip_dst=destination,
        vlan=vlan,
    )


def build_neighbor_advertisement(
    *,
    src_mac: MacLike,
    src_ip: IpLike,
    dst_mac: MacLike,
    dst_ip: IpLike,
    target_ip: IpLike | None = None,
    router: bool = False,
    solicited: bool = True,
    override: bool = True,
    vlan: int = 0,
) -> bytes:
    """NA saying `target_ip` (default `src_ip`) is at `src_mac` (target link-layer option)."""
    target = ip_address(src_ip if target_ip is None else target_ip)
    message = NeighborAdvertisement(
        int(router),
        int(solicited),
        int(override),
        0,
        int(target),
        (_mac_option(ND_OPTION_TARGET_LLADDR, src_mac),),
    )
    return build_nd_frame(
        message, eth_src=src_mac, eth_dst=dst_mac, ip_src=src_ip, ip_dst=dst_ip, vlan=vlan
    )


def neighbor_advertisement_to(
    solicitation_frame: bytes, answer_mac: MacLike, *, router: bool = True
) -> bytes:
    """The NA answering an NS: to its sender, or to all-nodes (unsolicited) when the sender
    is :: doing duplicate address detection (RFC 4861 7.2.4)."""
    parsed = parse_frame(solicitation_frame)
    if not isinstance(parsed.nd, NeighborSolicitation) or parsed.ipv6 is None:
        raise UnsupportedPacket("ICMPv6", "type", "frame is not a neighbour solicitation")
    source = ipaddress.IPv6Address(parsed.ipv6.src)
    target = ipaddress.IPv6Address(parsed.nd.target)
    if source == UNSPECIFIED_V6:
        dst_ip: IpAddress = ALL_NODES
        dst_mac = multicast_mac(ALL_NODES)
        solicited = False
    else:
        dst_ip = source
        dst_mac = parsed.nd.source_link_address or parsed.ethernet.src
        solicited = True
    return build_neighbor_advertisement(
        src_mac=answer_mac,
        src_ip=target,
        dst_mac=dst_mac,
        dst_ip=dst_ip,
        target_ip=target,
        router=router,
        solicited=solicited,
        vlan=_vlan(parsed),
    )
