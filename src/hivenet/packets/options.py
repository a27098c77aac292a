"""Type-length-value option walkers shared by the generic parser and the hot path.

Owns the validation of IPv4 options, TCP options, IPv6 hop-by-hop / destination options and
neighbour-discovery options, so both decoders reject exactly the same bad lengths. Each walker
returns the options as (kind, data) pairs; callers that only need validation ignore them.
"""

from __future__ import annotations

from hivenet.packets.checksum import ipv4_header_checksum_ok
from hivenet.packets.errors import MalformedPacket, TruncatedPacket

Option = tuple[int, bytes]


def walk_end_nop_options(layer: str, data: bytes) -> tuple[Option, ...]:
    """IPv4 and TCP options: kind 0 ends the list, kind 1 is a one-byte pad, others are TLVs.

    The length byte counts the kind and length bytes themselves, so it must be at least 2.
    Padding after an end-of-list marker is kept out of the result.
    """
    options: list[Option] = []
    position = 0
    size = len(data)
    while position < size:
        kind = data[position]
        if kind == 0:
            break
        if kind == 1:
            options.append((1, b""))
            position += 1
            continue
        if position + 1 >= size:
            raise TruncatedPacket(layer, "options", f"option {kind} at {position} has no length")
        length = data[position + 1]
        if length < 2:
            raise MalformedPacket(layer, "options", f"option {kind} has length {length} (< 2)")
        if position + length > size:
            raise TruncatedPacket(
                layer,
                "options",
                f"option {kind} length {length} runs past the option area ({size} bytes)",
            )
        options.append((kind, bytes(data[position + 2 : position + length])))
        position += length
    return tuple(options)


IPV4_OPTION_LSRR = 131  # loose source and record route
IPV4_OPTION_SSRR = 137  # strict source and record route


def ipv4_source_routed(frame: bytes | bytearray | memoryview, offset: int) -> bool:
    """Whether the IPv4 header at `frame[offset:]` (already parsed: its options are valid)
    carries a source route option. A router drops such a packet (RFC 7126 4.3, 4.4; Linux's
    accept_source_route=0 default): it lets the sender pick the path past filters."""
    header_length = (frame[offset] & 0x0F) * 4
    if header_length <= 20:
        return False
    options = walk_end_nop_options("IPv4", bytes(frame[offset + 20 : offset + header_length]))
    return any(kind in (IPV4_OPTION_LSRR, IPV4_OPTION_SSRR) for kind, _ in options)


def ipv4_unroutable(frame: bytes | bytearray | memoryview, offset: int) -> str | None:
    """Why a router must not forward the parsed IPv4 packet whose header is at
    `frame[offset:]`: "bad_ip_checksum" (RFC 1812 5.2.2), "ip_source_route"; None if it may.
    Neither is a flow match field, so a datapath re-checks every packet of a routed flow."""
    if not ipv4_header_checksum_ok(frame, offset):
        return "bad_ip_checksum"
    if frame[offset] != 0x45 and ipv4_source_routed(frame, offset):
        return "ip_source_route"
    return None


def walk_ipv6_tlv_options(layer: str, data: bytes) -> tuple[Option, ...]:
    """Hop-by-hop / destination options (RFC 8200 4.2): Pad1 is one byte, every other option
    is type, length (of the data only), data."""
    options: list[Option] = []
    position = 0
    size = len(data)
    while position < size:
        kind = data[position]
        if kind == 0:
            position += 1
            continue
        if position + 1 >= size:
            raise TruncatedPacket(layer, "options", f"option {kind} at {position} has no length")
        length = data[position + 1]
        if position + 2 + length > size:
            raise TruncatedPacket(
                layer,
                "options",
                f"option {kind} length {length} runs past the header ({size} option bytes)",
            )
        options.append((kind, bytes(data[position + 2 : position + 2 + length])))
        position += 2 + length
    return tuple(options)


def walk_nd_options(data: bytes, start: int = 0) -> tuple[Option, ...]:
    """Neighbour-discovery options (RFC 4861 4.6): type, length in units of 8 bytes (never 0),
    then data; the returned data excludes the type and length bytes."""
    options: list[Option] = []
    position = start
    size = len(data)
    while position < size:
        if position + 2 > size:
            raise TruncatedPacket("ND", "options", f"option at {position} has no length")
        kind = data[position]
        units = data[position + 1]
        if units == 0:
            raise MalformedPacket("ND", "options", f"option {kind} has length 0")
        end = position + units * 8
        if end > size:
            raise TruncatedPacket(
                "ND", "options", f"option {kind} length {units * 8} runs past the message"
            )
        options.append((kind, bytes(data[position + 2 : end])))
        position = end
    return tuple(options)
