"""The generic frame parser: raw Ethernet bytes to a `ParsedFrame` of header value types.

Owns the walk through the layers (Ethernet, one 802.1Q tag, ARP | IPv4 | IPv6 with extension
headers, then TCP | UDP | ICMP | ICMPv6 with neighbour discovery) and `flow_match_of`, the
readable reference for `flowextract.extract_flow_match`. Every rejection is a `PacketError`.
Checksums are not verified here (the datapath forwards what it gets); `verify_checksums` does
that on request. ICMP error payloads are decoded on demand by `embedded_datagram`, leniently,
because an error may quote a truncated or odd datagram.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from hivenet.packets.checksum import internet_checksum, transport_checksum
from hivenet.packets.errors import MalformedPacket, TruncatedPacket, UnsupportedPacket
from hivenet.packets.flowextract import check_ipv4_fragment
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
from hivenet.packets.headers import (
    ICMP_ECHO_REPLY,
    ICMP_ECHO_REQUEST,
    ICMP_ERROR_TYPES,
    ICMPV6_ECHO_REPLY,
    ICMPV6_ECHO_REQUEST,
    ICMPV6_ERROR_TYPES,
    IPV6_EXTENSION_NAMES,
    IPV6_FRAGMENT,
    IPV6_HOP_BY_HOP,
    ND_MESSAGE_TYPES,
    ArpPacket,
    Dot1QTag,
    EthernetHeader,
    IcmpHeader,
    Icmpv6Header,
    Ipv4Header,
    Ipv6ExtensionHeader,
    Ipv6FragmentHeader,
    Ipv6Header,
    NdMessage,
    NeighborAdvertisement,
    NeighborSolicitation,
    TcpHeader,
    UdpHeader,
    decode_nd_message,
)

Ipv6Extension = Ipv6ExtensionHeader | Ipv6FragmentHeader


@dataclass(frozen=True, slots=True)
class ParsedFrame:
    """Every header decoded from one frame; absent layers are None.

    `payload` is what follows the last decoded header, cut to the IP/UDP length (Ethernet
    padding excluded). `l3_offset`/`l4_offset` locate the IP and L4 headers in the frame
    (-1 when absent) for callers that patch bytes.
    """

    ethernet: EthernetHeader
    vlan: Dot1QTag | None = None
    arp: ArpPacket | None = None
    ipv4: Ipv4Header | None = None
    ipv6: Ipv6Header | None = None
    ipv6_extensions: tuple[Ipv6Extension, ...] = ()
    ip_protocol: int = 0
    ip_frag: int = FRAG_NONE
    tcp: TcpHeader | None = None
    udp: UdpHeader | None = None
    icmp: IcmpHeader | None = None
    icmpv6: Icmpv6Header | None = None
    nd: NdMessage | None = None
    payload: bytes = b""
    l3_offset: int = -1
    l4_offset: int = -1

    @property
    def eth_type(self) -> int:
        """The ethertype after any 802.1Q tag."""
        return self.vlan.ethertype if self.vlan else self.ethernet.ethertype


def parse_frame(frame: bytes) -> ParsedFrame:
    """Decode `frame`; raises a `PacketError` subclass for anything truncated or inconsistent."""
    ethernet = EthernetHeader.decode_fixed(frame, 0)
    offset = 14
    vlan = None
    eth_type = ethernet.ethertype
    if eth_type == ETH_TYPE_VLAN:
        vlan = Dot1QTag.decode_fixed(frame, 14)
        eth_type = vlan.ethertype
        offset = 18
    if eth_type == ETH_TYPE_ARP:
        arp = ArpPacket.decode(frame, offset)
        return ParsedFrame(
            ethernet, vlan, arp=arp, payload=bytes(frame[offset + 28 :]), l3_offset=offset
        )
    if eth_type == ETH_TYPE_IPV4:
        return _parse_ipv4(frame, offset, ethernet, vlan)
    if eth_type == ETH_TYPE_IPV6:
        return _parse_ipv6(frame, offset, ethernet, vlan)
    return ParsedFrame(ethernet, vlan, payload=bytes(frame[offset:]))


def _parse_ipv4(
    frame: bytes, offset: int, ethernet: EthernetHeader, vlan: Dot1QTag | None
) -> ParsedFrame:
    ipv4 = Ipv4Header.decode(frame, offset)
    start = offset + ipv4.header_length
    end = offset + ipv4.total_length
    if ipv4.fragment_offset:
        ip_frag = FRAG_LATER
    elif ipv4.more_fragments:
        ip_frag = FRAG_FIRST
    else:
        ip_frag = FRAG_NONE
    network = ParsedFrame(
        ethernet,
        vlan,
        ipv4=ipv4,
        ip_protocol=ipv4.protocol,
        ip_frag=ip_frag,
        payload=bytes(frame[start:end]),
        l3_offset=offset,
    )
    if ip_frag == FRAG_LATER:
        check_ipv4_fragment(
            ipv4.fragment_offset, ipv4.protocol, ipv4.total_length - ipv4.header_length
        )
        return network
    if ipv4.protocol == IP_PROTO_ICMP:
        icmp = IcmpHeader.decode(_bounded(frame, start, end, "ICMP", 8))
        return replace(network, icmp=icmp, payload=bytes(frame[start + 8 : end]), l4_offset=start)
    return _parse_transport(frame, start, end, network)


def _bounded(frame: bytes, start: int, end: int, layer: str, size: int) -> bytes:
    """The `size` header bytes at `start`, which must lie before `end`."""
    if end - start < size:
        raise TruncatedPacket(layer, "header", f"needs {size} bytes, only {end - start} present")
    return bytes(frame[start : start + size])


def _parse_transport(frame: bytes, start: int, end: int, network: ParsedFrame) -> ParsedFrame:
    """Add the TCP or UDP header at `start` (IP payload ends at `end`) to `network`."""
    protocol = network.ip_protocol
    if protocol == IP_PROTO_TCP:
        tcp = TcpHeader.decode(frame, start, end)
        return replace(
            network,
            tcp=tcp,
            payload=bytes(frame[start + tcp.header_length : end]),
            l4_offset=start,
        )
    if protocol == IP_PROTO_UDP:
        fragment = network.ip_frag != FRAG_NONE
        udp = UdpHeader.decode(frame, start, end, fragment=fragment)
        payload_end = end if fragment else start + udp.length
        return replace(
            network, udp=udp, payload=bytes(frame[start + 8 : payload_end]), l4_offset=start
        )
    return network


def _parse_ipv6(
    frame: bytes, offset: int, ethernet: EthernetHeader, vlan: Dot1QTag | None
) -> ParsedFrame:
    ipv6 = Ipv6Header.decode(frame, offset)
    position = offset + 40
    end = position + ipv6.payload_length
    next_header = ipv6.next_header
    extensions: list[Ipv6Extension] = []
    ip_frag = FRAG_NONE
    while True:
        if next_header in IPV6_EXTENSION_NAMES:
            if next_header == IPV6_HOP_BY_HOP and extensions:
                raise MalformedPacket(
                    "IPv6", "next_header", "hop-by-hop options must directly follow the header"
                )
            extension = Ipv6ExtensionHeader.decode(frame, position, end, next_header)
            extensions.append(extension)
            position += extension.size
            next_header = extension.next_header
        elif next_header == IPV6_FRAGMENT:
            if any(isinstance(e, Ipv6FragmentHeader) for e in extensions):
                # RFC 8200 4.1: at most one Fragment header; two are an evasion attempt.
                raise MalformedPacket("IPv6Fragment", "next_header", "a second fragment header")
            fragment = Ipv6FragmentHeader.decode(frame, position, end)
            extensions.append(fragment)
            position += fragment.size
            next_header = fragment.next_header
            if fragment.fragment_offset:
                ip_frag = FRAG_LATER
                break
            if fragment.more_fragments:
                ip_frag = FRAG_FIRST
        else:
            break
    network = ParsedFrame(
        ethernet,
        vlan,
        ipv6=ipv6,
        ipv6_extensions=tuple(extensions),
        ip_protocol=next_header,
        ip_frag=ip_frag,
        payload=bytes(frame[position:end]),
        l3_offset=offset,
    )
    if ip_frag == FRAG_LATER:
        return network
    if next_header == IP_PROTO_ICMPV6:
        icmpv6 = Icmpv6Header.decode(_bounded(frame, position, end, "ICMPv6", 8))
        if icmpv6.type in ND_MESSAGE_TYPES:
            nd = decode_nd_message(icmpv6.type, frame, position, end)
            return replace(network, icmpv6=icmpv6, nd=nd, payload=b"", l4_offset=position)
        return replace(
            network, icmpv6=icmpv6, payload=bytes(frame[position + 8 : end]), l4_offset=position
        )
    return _parse_transport(frame, position, end, network)


def flow_match_of(parsed: ParsedFrame, in_port: int) -> FlowMatch:
    """The `FlowMatch` of a parsed frame: the reference semantics of `extract_flow_match`."""
    fields: dict[str, int] = {
        "in_port": in_port,
        "eth_src": parsed.ethernet.src,
        "eth_dst": parsed.ethernet.dst,
        "eth_type": parsed.eth_type,
        "vlan": parsed.vlan.vid if parsed.vlan else 0,
    }
    if parsed.arp is not None:
        arp = parsed.arp
        fields.update(
            arp_op=arp.operation,
            arp_sha=arp.sender_mac,
            arp_spa=arp.sender_ip,
            arp_tha=arp.target_mac,
            arp_tpa=arp.target_ip,
        )
    ip = parsed.ipv4 or parsed.ipv6
    if parsed.ipv4 is not None:
        fields.update(
            ip_src=parsed.ipv4.src,
            ip_dst=parsed.ipv4.dst,
            ip_tos=parsed.ipv4.tos,
            ip_ttl=parsed.ipv4.ttl,
        )
    elif parsed.ipv6 is not None:
        fields.update(
            ip_src=parsed.ipv6.src,
            ip_dst=parsed.ipv6.dst,
            ip_tos=parsed.ipv6.traffic_class,
            ip_ttl=parsed.ipv6.hop_limit,
        )
    if ip is not None:
        fields.update(ip_proto=parsed.ip_protocol, ip_frag=parsed.ip_frag)
    transport = parsed.tcp or parsed.udp
    if transport is not None:
        fields.update(tp_src=transport.src_port, tp_dst=transport.dst_port)
    if parsed.tcp is not None:
        fields["tcp_flags"] = parsed.tcp.flags
    icmp = parsed.icmp or parsed.icmpv6
    if icmp is not None:
        fields.update(icmp_type=icmp.type, icmp_code=icmp.code)
        echo_types = (
            (ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY)
            if parsed.icmp
            else (ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY)
        )
        if icmp.type in echo_types:
            fields["icmp_id"] = icmp.identifier
    if isinstance(parsed.nd, NeighborSolicitation):
        fields["nd_target"] = parsed.nd.target
        fields["arp_sha"] = parsed.nd.source_link_address or 0
    elif isinstance(parsed.nd, NeighborAdvertisement):
        fields["nd_target"] = parsed.nd.target
        fields["arp_tha"] = parsed.nd.target_link_address or 0
    return FlowMatch(**fields)


@dataclass(frozen=True, slots=True)
class EmbeddedDatagram:
    """The offending datagram quoted by an ICMP/ICMPv6 error: its IP header and, when at
    least 4 bytes of its L4 header were quoted, the TCP/UDP ports (else None)."""

    ipv4: Ipv4Header | None
    ipv6: Ipv6Header | None
    protocol: int
    src_port: int | None
    dst_port: int | None
    l4_bytes: bytes


def embedded_datagram(parsed: ParsedFrame) -> EmbeddedDatagram:
    """Decode the datagram an ICMP(v6) error quotes. The quote may be cut anywhere after the
    IP header (the total/payload length is not checked against it)."""
    quote = parsed.payload
    ipv4 = ipv6 = None
    if parsed.icmp is not None and parsed.icmp.type not in ICMP_ERROR_TYPES:
        raise UnsupportedPacket("ICMP", "type", f"{parsed.icmp.type} is not an error message")
    if parsed.icmpv6 is not None and parsed.icmpv6.type not in ICMPV6_ERROR_TYPES:
        raise UnsupportedPacket("ICMPv6", "type", f"{parsed.icmpv6.type} is not an error message")
    if parsed.icmp is not None:
        fixed = Ipv4Header.LAYOUT.decode(quote)
        version, ihl = fixed[0], fixed[1]
        if version != 4 or ihl < 5:
            raise MalformedPacket("ICMP", "embedded", f"quoted version/IHL {version}/{ihl}")
        if ihl * 4 > len(quote):
            raise TruncatedPacket("ICMP", "embedded", f"quoted IHL {ihl} beyond {len(quote)}")
        ipv4 = Ipv4Header.from_fields(fixed, bytes(quote[20 : ihl * 4]))
        protocol = ipv4.protocol
        l4 = quote[ihl * 4 :]
    elif parsed.icmpv6 is not None:
        ipv6 = Ipv6Header.decode_fixed(quote, 0)
        protocol = ipv6.next_header
        l4 = quote[40:]
    else:
        raise UnsupportedPacket("ICMP", "type", "frame carries no ICMP or ICMPv6 message")
    ports = (
        (int.from_bytes(l4[0:2], "big"), int.from_bytes(l4[2:4], "big"))
        if protocol in (IP_PROTO_TCP, IP_PROTO_UDP) and len(l4) >= 4
        else (None, None)
    )
    return EmbeddedDatagram(ipv4, ipv6, protocol, ports[0], ports[1], bytes(l4))


def verify_checksums(frame: bytes) -> list[str]:
    """Names of the checksums in `frame` that are wrong ("IPv4", "TCP", ...); [] if all hold.

    L4 checksums of fragments are skipped: they cover the reassembled datagram.
    """
    parsed = parse_frame(frame)
    wrong: list[str] = []
    if parsed.ipv4 is not None:
        header = frame[parsed.l3_offset : parsed.l3_offset + parsed.ipv4.header_length]
        if internet_checksum(header) != 0:
            wrong.append("IPv4")
    if parsed.ip_frag != FRAG_NONE or parsed.l4_offset < 0:
        return wrong
    ip = parsed.ipv4 or parsed.ipv6
    assert ip is not None
    if parsed.ipv4 is not None:
        end = parsed.l3_offset + parsed.ipv4.total_length
        src, dst = parsed.ipv4.src.to_bytes(4, "big"), parsed.ipv4.dst.to_bytes(4, "big")
    else:
        assert parsed.ipv6 is not None
        end = parsed.l3_offset + 40 + parsed.ipv6.payload_length
        src, dst = parsed.ipv6.src.to_bytes(16, "big"), parsed.ipv6.dst.to_bytes(16, "big")
    segment = frame[parsed.l4_offset : end]
    if parsed.icmp is not None:
        if internet_checksum(segment) != 0:
            wrong.append("ICMP")
        return wrong
    if parsed.udp is not None:
        segment = segment[: parsed.udp.length]
        if parsed.udp.checksum == 0 and parsed.ipv4 is not None:
            return wrong
    name = "TCP" if parsed.tcp else "UDP" if parsed.udp else "ICMPv6" if parsed.icmpv6 else ""
    if name and transport_checksum(src, dst, parsed.ip_protocol, segment) != 0:
        wrong.append(name)
    return wrong
