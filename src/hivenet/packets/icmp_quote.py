"""Rewriting the datagram an ICMP/ICMPv6 error quotes: what NAT does to an error about a
translated connection (RFC 5508 section 6: the quoted IP addresses and ports, or ICMP echo
id, are put back as the host that receives the error sent them).

Owns `rewrite_icmp_quote(frame, rewrites)`: the quoted IP source/destination, TCP/UDP ports
and ICMP echo identifier, keeping every checksum consistent by incremental update (RFC
1624): the quoted IPv4 header checksum, the quoted L4 checksum when the quote holds it
(TCP/UDP over the quoted pseudo-header; ICMPv6 too; a quoted UDP checksum of 0 stays 0) and
the error's own ICMP/ICMPv6 checksum, which covers the whole quote. The outer headers are
left alone (`rewrite.rewrite_frame` does those). Pure: bytes in, bytes out.
"""

from __future__ import annotations

from collections.abc import Mapping

from hivenet.packets.checksum import checksum_update
from hivenet.packets.errors import RewriteError
from hivenet.packets.flowmatch import IP_PROTO_ICMP, IP_PROTO_ICMPV6, IP_PROTO_TCP, IP_PROTO_UDP
from hivenet.packets.headers import ICMP_ERROR_TYPES, ICMPV6_ERROR_TYPES
from hivenet.packets.parse import parse_frame

QUOTE_FIELDS = frozenset({"ip_src", "ip_dst", "tp_src", "tp_dst", "icmp_id"})
_ICMP_HEADER = 8
_ECHO_TYPES = {IP_PROTO_ICMP: (0, 8), IP_PROTO_ICMPV6: (128, 129)}


def _patch(buffer: bytearray, offset: int, new: bytes, checksums: list[tuple[int, bool]]) -> None:
    """Write `new` at `offset` and update each (checksum offset, zero_means_none) in place.
    Every checksummed region starts at an even distance from `offset`."""
    old = bytes(buffer[offset : offset + len(new)])
    if old == new:
        return
    buffer[offset : offset + len(new)] = new
    for position, zero_means_none in checksums:
        current = int.from_bytes(buffer[position : position + 2], "big")
        if zero_means_none and current == 0:
            continue
        updated = checksum_update(current, old, new)
        if zero_means_none and updated == 0:
            updated = 0xFFFF
        buffer[position : position + 2] = updated.to_bytes(2, "big")


def rewrite_icmp_quote(frame: bytes, rewrites: Mapping[str, int]) -> bytes:
    """`frame` (an ICMP/ICMPv6 error) with its quoted datagram's fields set per `rewrites`
    (FlowMatch names: ip_src, ip_dst, tp_src, tp_dst, icmp_id). Raises `RewriteError` naming
    the field when the frame is no error or the quote does not hold the field."""
    for name, value in rewrites.items():
        if name not in QUOTE_FIELDS:
            raise RewriteError("ICMP quote", name, f"not a quoted field ({sorted(QUOTE_FIELDS)})")
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise RewriteError("ICMP quote", name, f"value must be an int >= 0, got {value!r}")
    parsed = parse_frame(frame)
    if parsed.icmp is not None and parsed.icmp.type in ICMP_ERROR_TYPES:
        outer_proto = IP_PROTO_ICMP
    elif parsed.icmpv6 is not None and parsed.icmpv6.type in ICMPV6_ERROR_TYPES:
        outer_proto = IP_PROTO_ICMPV6
    else:
        raise RewriteError("ICMP quote", "icmp_type", "frame is not an ICMP/ICMPv6 error")
    buffer = bytearray(frame)
    message_start = parsed.l4_offset
    if parsed.ipv4 is not None:
        end = min(len(buffer), parsed.l3_offset + parsed.ipv4.total_length)
    else:
        assert parsed.ipv6 is not None
        end = min(len(buffer), parsed.l3_offset + 40 + parsed.ipv6.payload_length)
    original_message = bytes(buffer[message_start:end])
    quote = message_start + _ICMP_HEADER
    ip_checksums: list[tuple[int, bool]]
    if outer_proto == IP_PROTO_ICMP:
        if end < quote + 20:
            raise RewriteError("ICMP quote", "ip_src", "quote shorter than an IPv4 header")
        ihl = (buffer[quote] & 0x0F) * 4
        protocol = buffer[quote + 9]
        address_width, src_at, dst_at = 4, quote + 12, quote + 16
        ip_checksums = [(quote + 10, False)]
        l4 = quote + ihl
    else:
        if end < quote + 40:
            raise RewriteError("ICMP quote", "ip_src", "quote shorter than an IPv6 header")
        protocol = buffer[quote + 6]
        address_width, src_at, dst_at = 16, quote + 8, quote + 24
        ip_checksums = []
        l4 = quote + 40
    l4_checksum: tuple[int, bool] | None = None
    if protocol == IP_PROTO_TCP and end >= l4 + 18:
        l4_checksum = (l4 + 16, False)
    elif protocol == IP_PROTO_UDP and end >= l4 + 8:
        l4_checksum = (l4 + 6, True)
    elif protocol in (IP_PROTO_ICMP, IP_PROTO_ICMPV6) and end >= l4 + 4:
        l4_checksum = (l4 + 2, False)
    pseudo_header_checksums = (
        [l4_checksum]
        if l4_checksum is not None and protocol in (IP_PROTO_TCP, IP_PROTO_UDP, IP_PROTO_ICMPV6)
        else []
    )
    for name, at in (("ip_src", src_at), ("ip_dst", dst_at)):
        if name in rewrites:
            value = rewrites[name]
            if value >= 1 << (8 * address_width):
                raise RewriteError(
                    "ICMP quote",
                    name,
                    f"{value} is not an IPv{4 if address_width == 4 else 6} address",
                )
            _patch(
                buffer,
                at,
                value.to_bytes(address_width, "big"),
                ip_checksums + pseudo_header_checksums,
            )
    after_l4 = [l4_checksum] if l4_checksum is not None else []
    for name, at in (("tp_src", l4), ("tp_dst", l4 + 2)):
        if name in rewrites:
            if protocol not in (IP_PROTO_TCP, IP_PROTO_UDP):
                raise RewriteError("ICMP quote", name, f"quoted protocol {protocol} has no ports")
            if end < at + 2:
                raise RewriteError("ICMP quote", name, "quote cut before the port")
            if rewrites[name] > 0xFFFF:
                raise RewriteError("ICMP quote", name, f"{rewrites[name]} is not a port")
            _patch(buffer, at, rewrites[name].to_bytes(2, "big"), after_l4)
    if "icmp_id" in rewrites:
        if protocol not in _ECHO_TYPES or end < l4 + 6 or buffer[l4] not in _ECHO_TYPES[protocol]:
            raise RewriteError("ICMP quote", "icmp_id", "quoted datagram is not an ICMP echo")
        if rewrites["icmp_id"] > 0xFFFF:
            raise RewriteError("ICMP quote", "icmp_id", f"{rewrites['icmp_id']} is not an id")
        _patch(buffer, l4 + 4, rewrites["icmp_id"].to_bytes(2, "big"), after_l4)
    # The error's own checksum covers the whole quote, inner checksums included: update it
    # by the difference of the message before and after (even length: pad both alike).
    new_message = bytes(buffer[message_start:end])
    if new_message != original_message:
        pad = b"\x00" if len(new_message) & 1 else b""
        current = int.from_bytes(buffer[message_start + 2 : message_start + 4], "big")
        updated = checksum_update(current, original_message + pad, new_message + pad)
        buffer[message_start + 2 : message_start + 4] = updated.to_bytes(2, "big")
    return bytes(buffer)
