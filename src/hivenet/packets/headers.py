"""Header value types for every protocol HiveNet decodes, declared as field tables.

Owns the frozen, slotted dataclass of each header, its `LAYOUT` (field names and bit widths),
its protocol constants and its decoding of variable parts (options). Addresses and MACs are
plain ints as in `FlowMatch`. Checksums are stored as found; computing them belongs to
`builders.py` and `checksum.py`, walking a whole frame to `parse.py`. No I/O, no policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Self

from hivenet.packets.errors import MalformedPacket, TruncatedPacket, UnsupportedPacket
from hivenet.packets.layout import Header, Layout, layout
from hivenet.packets.options import (
    Option,
    walk_end_nop_options,
    walk_ipv6_tlv_options,
    walk_nd_options,
)

# --- Ethernet and 802.1Q ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EthernetHeader(Header):
    LAYOUT: ClassVar[Layout] = layout("Ethernet", ("dst", 48), ("src", 48), ("ethertype", 16))
    dst: int
    src: int
    ethertype: int


@dataclass(frozen=True, slots=True)
class Dot1QTag(Header):
    """The 4 bytes after the MAC addresses' 0x8100: priority, drop-eligible bit, VLAN id and
    the ethertype of what follows."""

    LAYOUT: ClassVar[Layout] = layout(
        "802.1Q", ("pcp", 3), ("dei", 1), ("vid", 12), ("ethertype", 16)
    )
    pcp: int
    dei: int
    vid: int
    ethertype: int


# --- ARP -------------------------------------------------------------------------------------

ARP_REQUEST = 1
ARP_REPLY = 2


@dataclass(frozen=True, slots=True)
class ArpPacket(Header):
    """Ethernet/IPv4 ARP (RFC 826); other hardware or protocol types are not decoded."""

    LAYOUT: ClassVar[Layout] = layout(
        "ARP",
        ("hardware_type", 16),
        ("protocol_type", 16),
        ("hardware_length", 8),
        ("protocol_length", 8),
        ("operation", 16),
        ("sender_mac", 48),
        ("sender_ip", 32),
        ("target_mac", 48),
        ("target_ip", 32),
    )
    hardware_type: int
    protocol_type: int
    hardware_length: int
    protocol_length: int
    operation: int
    sender_mac: int
    sender_ip: int
    target_mac: int
    target_ip: int

    @classmethod
    def decode(cls, data: bytes, offset: int = 0) -> Self:
        arp = cls.decode_fixed(data, offset)
        if arp.hardware_type != 1 or arp.protocol_type != 0x0800:
            raise UnsupportedPacket(
                "ARP",
                "hardware_type",
                f"only Ethernet/IPv4 ARP, got {arp.hardware_type}/{arp.protocol_type:#x}",
            )
        if arp.hardware_length != 6 or arp.protocol_length != 4:
            raise MalformedPacket(
                "ARP",
                "hardware_length",
                f"Ethernet/IPv4 ARP needs lengths 6/4, got "
                f"{arp.hardware_length}/{arp.protocol_length}",
            )
        return arp

    def encode(self) -> bytes:
        return self.encode_fixed()


# --- IPv4 ------------------------------------------------------------------------------------

IPV4_FLAG_DONT_FRAGMENT = 0b010
IPV4_FLAG_MORE_FRAGMENTS = 0b001


@dataclass(frozen=True, slots=True)
class Ipv4Header(Header):
    """IPv4 (RFC 791). `options` holds the raw option bytes (ihl * 4 - 20 of them)."""

    LAYOUT: ClassVar[Layout] = layout(
        "IPv4",
        ("version", 4),
        ("ihl", 4),
        ("tos", 8),
        ("total_length", 16),
        ("identification", 16),
        ("flags", 3),
        ("fragment_offset", 13),
        ("ttl", 8),
        ("protocol", 8),
        ("checksum", 16),
        ("src", 32),
        ("dst", 32),
    )
    version: int
    ihl: int
    tos: int
    total_length: int
    identification: int
    flags: int
    fragment_offset: int
    ttl: int
    protocol: int
    checksum: int
    src: int
    dst: int
    options: bytes = b""

    def __post_init__(self) -> None:
        Header.__post_init__(self)
        if len(self.options) != self.ihl * 4 - 20:
            raise MalformedPacket(
                "IPv4", "ihl", f"{self.ihl} does not match {len(self.options)} option bytes"
            )

    @classmethod
    def decode(cls, data: bytes, offset: int = 0) -> Self:
        """Decode and validate the header at `offset`; `data` must hold the whole datagram
        (total_length is checked against it)."""
        fixed = cls.LAYOUT.decode(data, offset)
        version, ihl, total_length = fixed[0], fixed[1], fixed[3]
        available = len(data) - offset
        if version != 4:
            raise MalformedPacket("IPv4", "version", f"expected 4, got {version}")
        if ihl < 5:
            raise MalformedPacket("IPv4", "ihl", f"{ihl} is below the minimum 5")
        if ihl * 4 > available:
            raise TruncatedPacket(
                "IPv4", "ihl", f"header of {ihl * 4} bytes, only {available} present"
            )
        if total_length < ihl * 4:
            raise MalformedPacket(
                "IPv4", "total_length", f"{total_length} is shorter than the header ({ihl * 4})"
            )
        if total_length > available:
            raise TruncatedPacket(
                "IPv4", "total_length", f"{total_length} exceeds the {available} bytes present"
            )
        options = bytes(data[offset + 20 : offset + ihl * 4])
        walk_end_nop_options("IPv4", options)
        return cls.from_fields(fixed, options)

    def encode(self) -> bytes:
        return self.encode_fixed() + self.options

    @property
    def header_length(self) -> int:
        return self.ihl * 4

    @property
    def more_fragments(self) -> bool:
        return bool(self.flags & IPV4_FLAG_MORE_FRAGMENTS)

    def option_list(self) -> tuple[Option, ...]:
        """Options as (kind, data) pairs; NOPs appear as (1, b"")."""
        return walk_end_nop_options("IPv4", self.options)


# --- IPv6 ------------------------------------------------------------------------------------

IPV6_HOP_BY_HOP = 0
IPV6_ROUTING = 43
IPV6_FRAGMENT = 44
IPV6_NO_NEXT_HEADER = 59
IPV6_DEST_OPTIONS = 60
IPV6_EXTENSION_NAMES = {
    IPV6_HOP_BY_HOP: "IPv6HopByHop",
    IPV6_ROUTING: "IPv6Routing",
    IPV6_DEST_OPTIONS: "IPv6DestOptions",
}


@dataclass(frozen=True, slots=True)
class Ipv6Header(Header):
    LAYOUT: ClassVar[Layout] = layout(
        "IPv6",
        ("version", 4),
        ("traffic_class", 8),
        ("flow_label", 20),
        ("payload_length", 16),
        ("next_header", 8),
        ("hop_limit", 8),
        ("src", 128),
        ("dst", 128),
    )
    version: int
    traffic_class: int
    flow_label: int
    payload_length: int
    next_header: int
    hop_limit: int
    src: int
    dst: int

    @classmethod
    def decode(cls, data: bytes, offset: int = 0) -> Self:
        header = cls.decode_fixed(data, offset)
        if header.version != 6:
            raise MalformedPacket("IPv6", "version", f"expected 6, got {header.version}")
        available = len(data) - offset - 40
        if header.payload_length > available:
            raise TruncatedPacket(
                "IPv6",
                "payload_length",
                f"{header.payload_length} exceeds the {available} bytes present",
            )
        return header

    def encode(self) -> bytes:
        return self.encode_fixed()


@dataclass(frozen=True, slots=True)
class Ipv6ExtensionHeader(Header):
    """Hop-by-hop, routing or destination-options header: `kind` is the protocol number that
    named it, `data` the bytes after the two-byte prefix ((length_units + 1) * 8 - 2)."""

    LAYOUT: ClassVar[Layout] = layout("IPv6Extension", ("next_header", 8), ("length_units", 8))
    next_header: int
    length_units: int
    kind: int = IPV6_DEST_OPTIONS
    data: bytes = b"\x01\x04\x00\x00\x00\x00"

    def __post_init__(self) -> None:
        Header.__post_init__(self)
        if self.kind not in IPV6_EXTENSION_NAMES:
            raise MalformedPacket("IPv6Extension", "kind", f"{self.kind} is not skippable here")
        if len(self.data) != (self.length_units + 1) * 8 - 2:
            raise MalformedPacket(
                IPV6_EXTENSION_NAMES[self.kind],
                "length_units",
                f"{self.length_units} does not match {len(self.data)} data bytes",
            )

    @classmethod
    def decode(cls, data: bytes, offset: int, end: int, kind: int) -> Self:
        name = IPV6_EXTENSION_NAMES[kind]
        if end - offset < 2:
            raise TruncatedPacket(name, "header", f"needs 2 bytes, only {end - offset}")
        next_header, length_units = data[offset], data[offset + 1]
        length = (length_units + 1) * 8
        if length > end - offset:
            raise TruncatedPacket(name, "length", f"{length} bytes, only {end - offset} present")
        body = bytes(data[offset + 2 : offset + length])
        if kind != IPV6_ROUTING:
            walk_ipv6_tlv_options(name, body)
        return cls(next_header, length_units, kind, body)

    @property
    def size(self) -> int:
        return (self.length_units + 1) * 8

    def encode(self) -> bytes:
        return self.encode_fixed() + self.data

    def option_list(self) -> tuple[Option, ...]:
        if self.kind == IPV6_ROUTING:
            raise MalformedPacket("IPv6Routing", "options", "a routing header has no options")
        return walk_ipv6_tlv_options(IPV6_EXTENSION_NAMES[self.kind], self.data)


@dataclass(frozen=True, slots=True)
class Ipv6FragmentHeader(Header):
    LAYOUT: ClassVar[Layout] = layout(
        "IPv6Fragment",
        ("next_header", 8),
        ("reserved", 8),
        ("fragment_offset", 13),
        ("reserved_bits", 2),
        ("more_fragments", 1),
        ("identification", 32),
    )
    next_header: int
    reserved: int
    fragment_offset: int
    reserved_bits: int
    more_fragments: int
    identification: int

    size: ClassVar[int] = 8

    @classmethod
    def decode(cls, data: bytes, offset: int, end: int) -> Self:
        if end - offset < 8:
            raise TruncatedPacket("IPv6Fragment", "header", f"needs 8 bytes, only {end - offset}")
        return cls.decode_fixed(data, offset)

    def encode(self) -> bytes:
        return self.encode_fixed()


# --- ICMP and ICMPv6 -------------------------------------------------------------------------

ICMP_ECHO_REPLY = 0
ICMP_DEST_UNREACHABLE = 3
ICMP_REDIRECT = 5
ICMP_ECHO_REQUEST = 8
ICMP_TIME_EXCEEDED = 11
ICMP_PARAMETER_PROBLEM = 12
ICMP_ERROR_TYPES = frozenset(
    {ICMP_DEST_UNREACHABLE, ICMP_REDIRECT, ICMP_TIME_EXCEEDED, ICMP_PARAMETER_PROBLEM}
)
# Destination-unreachable codes (RFC 792, RFC 1812).
ICMP_NET_UNREACHABLE = 0
ICMP_HOST_UNREACHABLE = 1
ICMP_PROTOCOL_UNREACHABLE = 2
ICMP_PORT_UNREACHABLE = 3
ICMP_FRAGMENTATION_NEEDED = 4
ICMP_ADMIN_PROHIBITED = 13
# Time-exceeded codes.
ICMP_TTL_EXCEEDED = 0
ICMP_REASSEMBLY_TIME_EXCEEDED = 1

ICMPV6_DEST_UNREACHABLE = 1
ICMPV6_PACKET_TOO_BIG = 2
ICMPV6_TIME_EXCEEDED = 3
ICMPV6_PARAMETER_PROBLEM = 4
ICMPV6_ECHO_REQUEST = 128
ICMPV6_ECHO_REPLY = 129
ICMPV6_ROUTER_SOLICIT = 133
ICMPV6_ROUTER_ADVERT = 134
ICMPV6_NEIGHBOR_SOLICIT = 135
ICMPV6_NEIGHBOR_ADVERT = 136
ICMPV6_ERROR_TYPES = frozenset(
    {ICMPV6_DEST_UNREACHABLE, ICMPV6_PACKET_TOO_BIG, ICMPV6_TIME_EXCEEDED, ICMPV6_PARAMETER_PROBLEM}
)
# ICMPv6 destination-unreachable codes (RFC 4443).
ICMPV6_NO_ROUTE = 0
ICMPV6_ADMIN_PROHIBITED = 1
ICMPV6_ADDRESS_UNREACHABLE = 3
ICMPV6_PORT_UNREACHABLE = 4


@dataclass(frozen=True, slots=True)
class IcmpHeader(Header):
    """ICMP (RFC 792): type, code, checksum and the 32-bit type-specific word (`rest`)."""

    LAYOUT: ClassVar[Layout] = layout(
        "ICMP", ("type", 8), ("code", 8), ("checksum", 16), ("rest", 32)
    )
    type: int
    code: int
    checksum: int
    rest: int = 0

    @classmethod
    def decode(cls, data: bytes, offset: int = 0) -> Self:
        return cls.decode_fixed(data, offset)

    def encode(self) -> bytes:
        return self.encode_fixed()

    @property
    def identifier(self) -> int:
        """Echo identifier (meaningful for echo request/reply only)."""
        return self.rest >> 16

    @property
    def sequence(self) -> int:
        return self.rest & 0xFFFF

    @property
    def next_hop_mtu(self) -> int:
        """MTU of a fragmentation-needed error (RFC 1191) or an ICMPv6 packet-too-big."""
        return self.rest & 0xFFFF


@dataclass(frozen=True, slots=True)
class Icmpv6Header(IcmpHeader):
    """ICMPv6 (RFC 4443): the same 8-byte prefix as ICMP; the checksum covers a pseudo-header."""

    LAYOUT: ClassVar[Layout] = layout(
        "ICMPv6", ("type", 8), ("code", 8), ("checksum", 16), ("rest", 32)
    )

    @property
    def next_hop_mtu(self) -> int:
        return self.rest


# --- Neighbour discovery (RFC 4861): the ICMPv6 body from byte 4 on ---------------------------

ND_OPTION_SOURCE_LLADDR = 1
ND_OPTION_TARGET_LLADDR = 2
ND_OPTION_PREFIX_INFORMATION = 3
ND_OPTION_MTU = 5


def _link_address(options: tuple[Option, ...], kind: int) -> int | None:
    for option_kind, data in options:
        if option_kind == kind:
            if len(data) != 6:
                raise MalformedPacket(
                    "ND", "options", f"link-layer address option {kind} has {len(data)} bytes"
                )
            return int.from_bytes(data, "big")
    return None


@dataclass(frozen=True, slots=True)
class NeighborSolicitation(Header):
    LAYOUT: ClassVar[Layout] = layout("ND", ("reserved", 32), ("target", 128))
    reserved: int
    target: int
    options: tuple[Option, ...] = ()

    @property
    def source_link_address(self) -> int | None:
        return _link_address(self.options, ND_OPTION_SOURCE_LLADDR)


@dataclass(frozen=True, slots=True)
class NeighborAdvertisement(Header):
    LAYOUT: ClassVar[Layout] = layout(
        "ND",
        ("router", 1),
        ("solicited", 1),
        ("override", 1),
        ("reserved", 29),
        ("target", 128),
    )
    router: int
    solicited: int
    override: int
    reserved: int
    target: int
    options: tuple[Option, ...] = ()

    @property
    def target_link_address(self) -> int | None:
        return _link_address(self.options, ND_OPTION_TARGET_LLADDR)


@dataclass(frozen=True, slots=True)
class RouterSolicitation(Header):
    LAYOUT: ClassVar[Layout] = layout("ND", ("reserved", 32))
    reserved: int
    options: tuple[Option, ...] = ()

    @property
    def source_link_address(self) -> int | None:
        return _link_address(self.options, ND_OPTION_SOURCE_LLADDR)


@dataclass(frozen=True, slots=True)
class RouterAdvertisement(Header):
    LAYOUT: ClassVar[Layout] = layout(
        "ND",
        ("cur_hop_limit", 8),
        ("managed", 1),
        ("other", 1),
        ("reserved", 6),
        ("router_lifetime", 16),
        ("reachable_time", 32),
        ("retrans_timer", 32),
    )
    cur_hop_limit: int
    managed: int
    other: int
    reserved: int
    router_lifetime: int
    reachable_time: int
    retrans_timer: int
    options: tuple[Option, ...] = ()

    @property
    def source_link_address(self) -> int | None:
        return _link_address(self.options, ND_OPTION_SOURCE_LLADDR)


NdMessage = NeighborSolicitation | NeighborAdvertisement | RouterSolicitation | RouterAdvertisement
ND_MESSAGE_TYPES: dict[int, type[NdMessage]] = {
    ICMPV6_ROUTER_SOLICIT: RouterSolicitation,
    ICMPV6_ROUTER_ADVERT: RouterAdvertisement,
    ICMPV6_NEIGHBOR_SOLICIT: NeighborSolicitation,
    ICMPV6_NEIGHBOR_ADVERT: NeighborAdvertisement,
}


def decode_nd_message(icmp_type: int, data: bytes, offset: int, end: int) -> NdMessage:
    """The ND message whose ICMPv6 header starts at `offset` and ends before `end`."""
    message_class = ND_MESSAGE_TYPES[icmp_type]
    body = bytes(data[offset + 4 : end])
    fixed = message_class.LAYOUT.decode(body)
    options = walk_nd_options(body, message_class.LAYOUT.size)
    message = message_class.from_fields(fixed, options)
    # Validate the link-layer option the hot path reads, so both decoders reject alike.
    if isinstance(message, NeighborSolicitation):
        _link_address(options, ND_OPTION_SOURCE_LLADDR)
    elif isinstance(message, NeighborAdvertisement):
        _link_address(options, ND_OPTION_TARGET_LLADDR)
    return message


def encode_nd_message(message: NdMessage) -> bytes:
    """The ICMPv6 body from byte 4 on: fixed fields, then options padded to 8-byte units."""
    parts = [message.encode_fixed()]
    for kind, data in message.options:
        units = (len(data) + 2 + 7) // 8
        if units > 255:
            raise MalformedPacket("ND", "options", f"option {kind} of {len(data)} bytes too long")
        parts.append(bytes((kind, units)) + data + b"\x00" * (units * 8 - 2 - len(data)))
    return b"".join(parts)


# --- TCP and UDP -----------------------------------------------------------------------------

TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_PSH = 0x08
TCP_ACK = 0x10
TCP_URG = 0x20
TCP_ECE = 0x40
TCP_CWR = 0x80


@dataclass(frozen=True, slots=True)
class TcpHeader(Header):
    """TCP (RFC 9293). `reserved` is the 4 bits before CWR (the lowest was once NS)."""

    LAYOUT: ClassVar[Layout] = layout(
        "TCP",
        ("src_port", 16),
        ("dst_port", 16),
        ("seq", 32),
        ("ack", 32),
        ("data_offset", 4),
        ("reserved", 4),
        ("flags", 8),
        ("window", 16),
        ("checksum", 16),
        ("urgent_pointer", 16),
    )
    src_port: int
    dst_port: int
    seq: int
    ack: int
    data_offset: int
    reserved: int
    flags: int
    window: int
    checksum: int
    urgent_pointer: int
    options: bytes = b""

    def __post_init__(self) -> None:
        Header.__post_init__(self)
        if len(self.options) != self.data_offset * 4 - 20:
            raise MalformedPacket(
                "TCP",
                "data_offset",
                f"{self.data_offset} does not match {len(self.options)} option bytes",
            )

    @classmethod
    def decode(cls, data: bytes, offset: int = 0, end: int | None = None) -> Self:
        end = len(data) if end is None else end
        available = end - offset
        if available < 20:
            raise TruncatedPacket("TCP", "header", f"needs 20 bytes, only {available} present")
        fixed = cls.LAYOUT.decode(data, offset)
        data_offset = fixed[4]
        if data_offset < 5:
            raise MalformedPacket("TCP", "data_offset", f"{data_offset} is below the minimum 5")
        if data_offset * 4 > available:
            raise TruncatedPacket(
                "TCP",
                "data_offset",
                f"header of {data_offset * 4} bytes, only {available} present",
            )
        options = bytes(data[offset + 20 : offset + data_offset * 4])
        walk_end_nop_options("TCP", options)
        return cls.from_fields(fixed, options)

    def encode(self) -> bytes:
        return self.encode_fixed() + self.options

    @property
    def header_length(self) -> int:
        return self.data_offset * 4

    def option_list(self) -> tuple[Option, ...]:
        return walk_end_nop_options("TCP", self.options)


@dataclass(frozen=True, slots=True)
class UdpHeader(Header):
    LAYOUT: ClassVar[Layout] = layout(
        "UDP", ("src_port", 16), ("dst_port", 16), ("length", 16), ("checksum", 16)
    )
    src_port: int
    dst_port: int
    length: int
    checksum: int

    @classmethod
    def decode(
        cls, data: bytes, offset: int = 0, end: int | None = None, *, fragment: bool = False
    ) -> Self:
        """Decode at `offset`; unless the datagram is a `fragment`, its length must fit."""
        end = len(data) if end is None else end
        available = end - offset
        if available < 8:
            raise TruncatedPacket("UDP", "header", f"needs 8 bytes, only {available} present")
        header = cls.decode_fixed(data, offset)
        if header.length < 8:
            raise MalformedPacket("UDP", "length", f"{header.length} is below the header size 8")
        if header.length > available and not fragment:
            raise TruncatedPacket(
                "UDP", "length", f"{header.length} exceeds the {available} bytes present"
            )
        return header

    def encode(self) -> bytes:
        return self.encode_fixed()


# --- VXLAN -----------------------------------------------------------------------------------

VXLAN_PORT = 4789
VXLAN_FLAG_VNI_VALID = 0x08


@dataclass(frozen=True, slots=True)
class VxlanHeader(Header):
    """VXLAN (RFC 7348): flags (I = 0x08 marks a valid VNI), 24 reserved bits, the 24-bit
    VNI and 8 more reserved bits."""

    LAYOUT: ClassVar[Layout] = layout(
        "VXLAN", ("flags", 8), ("reserved", 24), ("vni", 24), ("reserved_low", 8)
    )
    flags: int
    reserved: int
    vni: int
    reserved_low: int = 0

    @classmethod
    def decode(cls, data: bytes, offset: int = 0) -> Self:
        header = cls.decode_fixed(data, offset)
        if not header.flags & VXLAN_FLAG_VNI_VALID:
            raise MalformedPacket("VXLAN", "flags", f"I flag not set ({header.flags:#04x})")
        return header

    def encode(self) -> bytes:
        return self.encode_fixed()
