"""Header rewrites the datapath applies to frames: the executor of `SetField`, `DecTtl`,
`PushVlan` and `PopVlan` actions (see `hivenet.flows.actions`).

Owns only in-place byte surgery on complete Ethernet frames, keeping every checksum valid: the
IPv4 header checksum and the TCP/UDP/ICMPv6 checksums (which cover the pseudo-header) are
updated incrementally (RFC 1624), so a checksum that was wrong before stays wrong by the same
amount and a UDP checksum of 0 over IPv4 ("none") stays 0. Pure functions: bytes in, bytes
out. A rewrite that cannot apply to the frame (tp_src on ARP, TTL already 0, pop on an untagged
frame) raises `RewriteError`; a value out of the field's range raises it too, naming the field.

Not handled: the IPv6 pseudo-header of a packet with a routing header uses the final
destination, which an ip_dst rewrite here does not track (nothing in HiveNet emits those).
"""

from __future__ import annotations

import struct

from hivenet.packets.checksum import checksum_update
from hivenet.packets.errors import MalformedPacket, RewriteError, TruncatedPacket
from hivenet.packets.flowmatch import (
    ETH_TYPE_IPV4,
    ETH_TYPE_IPV6,
    ETH_TYPE_VLAN,
    IP_PROTO_ICMP,
    IP_PROTO_ICMPV6,
    IP_PROTO_TCP,
    IP_PROTO_UDP,
)

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_IPV6_EXTENSIONS = (0, 43, 60)  # hop-by-hop, routing, destination options
_IPV6_FRAGMENT = 44

REWRITABLE_FIELDS = frozenset(
    {"eth_src", "eth_dst", "ip_src", "ip_dst", "ip_tos", "tp_src", "tp_dst", "icmp_id"}
)


class _IpLayout:
    """Where the IP and L4 headers of a frame start; computed once per rewrite."""

    __slots__ = ("ip_offset", "is_ipv4", "l4_offset", "protocol")

    def __init__(self, ip_offset: int, is_ipv4: bool, l4_offset: int, protocol: int) -> None:
        self.ip_offset = ip_offset
        self.is_ipv4 = is_ipv4
        self.l4_offset = l4_offset  # -1 when the frame carries no L4 header (later fragment)
        self.protocol = protocol


def _ethertype_offset(frame: bytes | bytearray) -> tuple[int, int]:
    """(ethertype, offset of the L3 header), looking through one 802.1Q tag."""
    if len(frame) < 14:
        raise TruncatedPacket("Ethernet", "header", f"needs 14 bytes, only {len(frame)} present")
    (eth_type,) = _U16.unpack_from(frame, 12)
    if eth_type != ETH_TYPE_VLAN:
        return eth_type, 14
    if len(frame) < 18:
        raise TruncatedPacket("802.1Q", "header", f"needs 18 bytes, only {len(frame)} present")
    (eth_type,) = _U16.unpack_from(frame, 16)
    return eth_type, 18


def _locate_ip(frame: bytes | bytearray, action: str) -> _IpLayout:
    eth_type, offset = _ethertype_offset(frame)
    available = len(frame) - offset
    if eth_type == ETH_TYPE_IPV4:
        if available < 20:
            raise TruncatedPacket("IPv4", "header", f"needs 20 bytes, only {available} present")
        version_ihl = frame[offset]
        header_length = (version_ihl & 0x0F) * 4
        if version_ihl >> 4 != 4 or header_length < 20:
            raise MalformedPacket("IPv4", "ihl", f"bad version/IHL byte {version_ihl:#04x}")
        if header_length > available:
            raise TruncatedPacket(
                "IPv4", "ihl", f"header of {header_length} bytes, only {available} present"
            )
        (flags_fragment,) = _U16.unpack_from(frame, offset + 6)
        later_fragment = flags_fragment & 0x1FFF
        l4_offset = -1 if later_fragment else offset + header_length
        return _IpLayout(offset, True, l4_offset, frame[offset + 9])
    if eth_type == ETH_TYPE_IPV6:
        if available < 40:
            raise TruncatedPacket("IPv6", "header", f"needs 40 bytes, only {available} present")
        next_header = frame[offset + 6]
        position = offset + 40
        size = len(frame)
        while True:
            if next_header in _IPV6_EXTENSIONS:
                if size - position < 2:
                    raise TruncatedPacket("IPv6", "extension", "extension header cut short")
                length = (frame[position + 1] + 1) * 8
                if size - position < length:
                    raise TruncatedPacket("IPv6", "extension", f"{length} bytes not present")
                next_header = frame[position]
                position += length
            elif next_header == _IPV6_FRAGMENT:
                if size - position < 8:
                    raise TruncatedPacket("IPv6Fragment", "header", "fragment header cut short")
                next_header = frame[position]
                (offset_flags,) = _U16.unpack_from(frame, position + 2)
                position += 8
                if offset_flags >> 3:
                    return _IpLayout(offset, False, -1, next_header)
            else:
                return _IpLayout(offset, False, position, next_header)
    raise RewriteError("rewrite", action, f"frame is not IP (ethertype {eth_type:#06x})")


def _l4_checksum_offset(layout: _IpLayout, frame: bytearray) -> int:
    """Offset of the L4 checksum a pseudo-header change affects, or -1 if there is none."""
    start = layout.l4_offset
    if start < 0:
        return -1
    protocol = layout.protocol
    if protocol == IP_PROTO_TCP:
        _need(frame, start, 20, "TCP")
        return start + 16
    if protocol == IP_PROTO_UDP:
        _need(frame, start, 8, "UDP")
        return start + 6
    if protocol == IP_PROTO_ICMPV6 and not layout.is_ipv4:
        _need(frame, start, 8, "ICMPv6")
        return start + 2
    return -1


def _need(frame: bytes | bytearray, start: int, size: int, layer: str) -> None:
    if len(frame) - start < size:
        raise TruncatedPacket(layer, "header", f"needs {size} bytes, only {len(frame) - start}")


def _patch(frame: bytearray, offset: int, new: bytes, checksum_offsets: tuple[int, ...]) -> None:
    """Write `new` at `offset` and fix each checksum stored at `checksum_offsets`.

    A UDP checksum (the only kind stored as 0 to mean "absent") is recognised by the caller
    passing its offset negated minus one; it stays 0 if 0 and never becomes 0 otherwise.
    """
    old = bytes(frame[offset : offset + len(new)])
    frame[offset : offset + len(new)] = new
    for checksum_offset in checksum_offsets:
        if checksum_offset >= 0:
            (checksum,) = _U16.unpack_from(frame, checksum_offset)
            _U16.pack_into(frame, checksum_offset, checksum_update(checksum, old, new))
        else:
            udp_offset = -checksum_offset - 1
            (checksum,) = _U16.unpack_from(frame, udp_offset)
            if checksum:
                _U16.pack_into(frame, udp_offset, checksum_update(checksum, old, new) or 0xFFFF)


def _transport_checksum(layout: _IpLayout, frame: bytearray) -> tuple[int, ...]:
    checksum_offset = _l4_checksum_offset(layout, frame)
    if checksum_offset < 0:
        return ()
    if layout.protocol == IP_PROTO_UDP:
        return (-checksum_offset - 1,)
    return (checksum_offset,)


def _check_range(field: str, value: int, bits: int) -> None:
    if not 0 <= value < (1 << bits):
        raise RewriteError("rewrite", field, f"value {value!r} does not fit in {bits} bits")


def rewrite_frame(frame: bytes, field: str, value: int) -> bytes:
    """`frame` with FlowMatch field `field` set to `value` and its checksums fixed."""
    if field not in REWRITABLE_FIELDS:
        raise RewriteError(
            "rewrite", field, f"not a rewritable field (one of {sorted(REWRITABLE_FIELDS)})"
        )
    if not isinstance(value, int) or isinstance(value, bool):
        raise RewriteError("rewrite", field, f"value must be an int, got {value!r}")
    buffer = bytearray(frame)
    if field in ("eth_dst", "eth_src"):
        _check_range(field, value, 48)
        if len(buffer) < 14:
            raise TruncatedPacket("Ethernet", "header", f"needs 14 bytes, only {len(buffer)}")
        start = 0 if field == "eth_dst" else 6
        buffer[start : start + 6] = value.to_bytes(6, "big")
        return bytes(buffer)

    layout = _locate_ip(buffer, field)
    ip = layout.ip_offset
    if field in ("ip_src", "ip_dst"):
        if layout.is_ipv4:
            _check_range(field, value, 32)
            start = ip + (12 if field == "ip_src" else 16)
            _patch(
                buffer,
                start,
                value.to_bytes(4, "big"),
                (ip + 10, *_transport_checksum(layout, buffer)),
            )
        else:
            _check_range(field, value, 128)
            start = ip + (8 if field == "ip_src" else 24)
            _patch(buffer, start, value.to_bytes(16, "big"), _transport_checksum(layout, buffer))
        return bytes(buffer)
    if field == "ip_tos":
        _check_range(field, value, 8)
        if layout.is_ipv4:
            new_word = bytes((buffer[ip], value))
            _patch(buffer, ip, new_word, (ip + 10,))
        else:
            (word,) = _U32.unpack_from(buffer, ip)
            _U32.pack_into(buffer, ip, (word & 0xF00FFFFF) | (value << 20))
        return bytes(buffer)

    _check_range(field, value, 16)
    start = layout.l4_offset
    if start < 0:
        raise RewriteError("rewrite", field, "later IP fragment carries no L4 header")
    protocol = layout.protocol
    if field in ("tp_src", "tp_dst"):
        if protocol not in (IP_PROTO_TCP, IP_PROTO_UDP):
            raise RewriteError("rewrite", field, f"no TCP/UDP header (ip_proto {protocol})")
        checksums = _transport_checksum(layout, buffer)
        _patch(buffer, start + (0 if field == "tp_src" else 2), value.to_bytes(2, "big"), checksums)
        return bytes(buffer)
    # icmp_id: the identifier of an ICMP or ICMPv6 echo request/reply.
    echo_types = (0, 8) if layout.is_ipv4 else (128, 129)
    expected_protocol = IP_PROTO_ICMP if layout.is_ipv4 else IP_PROTO_ICMPV6
    if protocol != expected_protocol:
        raise RewriteError("rewrite", field, f"no ICMP header (ip_proto {protocol})")
    _need(buffer, start, 8, "ICMP")
    if buffer[start] not in echo_types:
        raise RewriteError("rewrite", field, f"ICMP type {buffer[start]} is not an echo")
    _patch(buffer, start + 4, value.to_bytes(2, "big"), (start + 2,))
    return bytes(buffer)


def dec_ttl(frame: bytes) -> bytes:
    """`frame` with the IPv4 TTL or IPv6 hop limit lowered by one (header checksum fixed)."""
    buffer = bytearray(frame)
    layout = _locate_ip(buffer, "ip_ttl")
    ip = layout.ip_offset
    if layout.is_ipv4:
        ttl = buffer[ip + 8]
        if ttl == 0:
            raise RewriteError("IPv4", "ttl", "is already 0")
        _patch(buffer, ip + 8, bytes((ttl - 1, buffer[ip + 9])), (ip + 10,))
    else:
        hop_limit = buffer[ip + 7]
        if hop_limit == 0:
            raise RewriteError("IPv6", "hop_limit", "is already 0")
        buffer[ip + 7] = hop_limit - 1
    return bytes(buffer)


def push_vlan(frame: bytes, vid: int) -> bytes:
    """`frame` with an 802.1Q tag (priority 0, VLAN `vid`) inserted after the MAC addresses."""
    if not isinstance(vid, int) or isinstance(vid, bool) or not 1 <= vid <= 4095:
        raise RewriteError("802.1Q", "vid", f"must be an int in 1..4095, got {vid!r}")
    if len(frame) < 14:
        raise TruncatedPacket("Ethernet", "header", f"needs 14 bytes, only {len(frame)} present")
    if _U16.unpack_from(frame, 12)[0] == ETH_TYPE_VLAN:
        raise RewriteError("802.1Q", "vid", "frame is already tagged (only one tag is supported)")
    return b"".join((frame[:12], _U16.pack(ETH_TYPE_VLAN), _U16.pack(vid), frame[12:]))


def pop_vlan(frame: bytes) -> bytes:
    """`frame` without its 802.1Q tag."""
    if len(frame) < 14:
        raise TruncatedPacket("Ethernet", "header", f"needs 14 bytes, only {len(frame)} present")
    if _U16.unpack_from(frame, 12)[0] != ETH_TYPE_VLAN:
        raise RewriteError("802.1Q", "tag", "frame is not tagged")
    if len(frame) < 18:
        raise TruncatedPacket("802.1Q", "header", f"needs 18 bytes, only {len(frame)} present")
    return frame[:12] + frame[16:]
