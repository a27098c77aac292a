"""Raw-header keys for the userspace datapath's exact-match cache (the per-frame fast path).

Owns `raw_flow_key`: for the common frames (IPv4 without options and not fragmented, or IPv6
without extension headers, untagged or with one 802.1Q tag, carrying TCP, UDP, ICMP or an
ICMPv6 echo) it returns a tuple taken straight from the header bytes by one precompiled
`struct` call, skipping every per-packet-varying field that is not a `FlowMatch` field (IPv4
total length, id and checksum; IPv6 payload length and the low flow-label bits; TCP sequence,
acknowledgement, window, checksum, urgent pointer and options; UDP length and checksum; ICMP
checksum and echo sequence). It also performs every check `extract_flow_match` makes on such a
frame that depends on skipped bytes (lengths, option layout), so:

  * a key is returned only for a frame that `extract_flow_match` accepts, and
  * two frames with equal keys have equal `FlowMatch`es (for the same ingress port),

which lets the datapath cache "key -> flow" per port and skip parsing on a hit. Every other
frame (ARP, IPv4 options or fragments, IPv6 extension headers, TCP options other than the
Linux timestamp layout, QinQ, ND, malformed frames, ...) gets None: the caller takes the
parse path. `tests/unit/datapath/test_fastkey.py` checks both properties with hypothesis.

The key is sound by construction: it starts with the whole Ethernet header (and tag), so the
ethertype, the IP version and protocol, and hence the layout the rest of the key was read
with, are part of the key; every FlowMatch field of such a frame is read from the key's bytes.

Must not touch: sockets, the flow table, or `hivenet.packets` parsing (this module reads
bytes, it never decides what a frame means beyond "fast or not").
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

RawFlowKey = tuple[Any, ...]
Buffer = bytes | bytearray | memoryview

_ETH_TYPE_IPV4 = 0x0800
_ETH_TYPE_IPV6 = 0x86DD
_ETH_TYPE_VLAN = 0x8100
_IP_PROTO_ICMP = 1
_IP_PROTO_TCP = 6
_IP_PROTO_UDP = 17
_IP_PROTO_ICMPV6 = 58
_ICMPV6_ECHO_REQUEST = 128
_ICMPV6_ECHO_REPLY = 129
_IPV4_NO_OPTIONS = 0x45  # version 4, IHL 5
_IPV4_FRAGMENT_BITS = 0x3FFF  # MF + fragment offset
# TCP options of every Linux segment after the handshake: NOP, NOP, timestamp (kind 8, len 10).
_TCP_TIMESTAMP_HEAD = 0x0101080A
_TCP_TIMESTAMP_HEADER_LEN = 32

_U16 = struct.Struct("!H").unpack_from
_U32 = struct.Struct("!I").unpack_from
# version/IHL, total length, flags+fragment offset, protocol
_IPV4_CHECK = struct.Struct("!BxH2xHxB").unpack_from
# version/class/label word, payload length, next header
_IPV6_CHECK = struct.Struct("!IHB").unpack_from

# Key layouts per L3 offset (14 untagged, 18 with one tag). Each starts with the L2 header.
# IPv4: version/IHL, TOS, (skip length, id, flags/fragment), TTL, protocol, (skip checksum),
# addresses. IPv6: first 16 bits (version, class, 4 label bits), (skip rest of label and
# payload length), next header, hop limit, addresses.
_IPV4_PART = "BB6xBB2x8s"
_IPV6_PART = "H4xBB32s"
# TCP: ports, (skip seq/ack), data offset byte, flags. UDP: ports. ICMP: type, code, (skip
# checksum), identifier (the sequence after it is skipped).
_TCP_PART = "4s8xBB"
_UDP_PART = "4s"
_ICMP_PART = "BB2xH"

KeyReader = Callable[[Buffer, int], RawFlowKey]


def _reader(l3_offset: int, l3_part: str, l4_part: str) -> KeyReader:
    return struct.Struct(f"!{l3_offset}s{l3_part}{l4_part}").unpack_from


_IPV4_READERS: dict[int, tuple[KeyReader, KeyReader, KeyReader]] = {
    l3: (
        _reader(l3, _IPV4_PART, _TCP_PART),
        _reader(l3, _IPV4_PART, _UDP_PART),
        _reader(l3, _IPV4_PART, _ICMP_PART),
    )
    for l3 in (14, 18)
}
_IPV6_READERS: dict[int, tuple[KeyReader, KeyReader, KeyReader]] = {
    l3: (
        _reader(l3, _IPV6_PART, _TCP_PART),
        _reader(l3, _IPV6_PART, _UDP_PART),
        _reader(l3, _IPV6_PART, _ICMP_PART),
    )
    for l3 in (14, 18)
}


def raw_flow_key(buffer: Buffer, base: int, size: int) -> RawFlowKey | None:
    """The exact-match key of the `size`-byte Ethernet frame at `buffer[base:]`, or None when
    the frame must take the parse path (see the module docstring). Reads only the header."""
    if size < 34:
        return None
    eth_type = _U16(buffer, base + 12)[0]
    l3_offset = 14
    if eth_type == _ETH_TYPE_VLAN:
        eth_type = _U16(buffer, base + 16)[0]
        l3_offset = 18
    if eth_type == _ETH_TYPE_IPV4:
        if size < l3_offset + 20:
            return None
        at = base + l3_offset
        version_ihl, total_length, flags_fragment, protocol = _IPV4_CHECK(buffer, at)
        if (
            version_ihl != _IPV4_NO_OPTIONS
            or flags_fragment & _IPV4_FRAGMENT_BITS
            or total_length < 20
            or total_length > size - l3_offset
        ):
            return None
        tcp_reader, udp_reader, icmp_reader = _IPV4_READERS[l3_offset]
        available = total_length - 20
        l4_at = at + 20
        if protocol == _IP_PROTO_TCP:
            return tcp_reader(buffer, base) if _tcp_ok(buffer, l4_at, available) else None
        if protocol == _IP_PROTO_UDP:
            return udp_reader(buffer, base) if _udp_ok(buffer, l4_at, available) else None
        if protocol == _IP_PROTO_ICMP:
            return icmp_reader(buffer, base) if available >= 8 else None
        return None
    if eth_type == _ETH_TYPE_IPV6:
        if size < l3_offset + 40:
            return None
        at = base + l3_offset
        version_class_label, payload_length, next_header = _IPV6_CHECK(buffer, at)
        if version_class_label >> 28 != 6 or payload_length > size - l3_offset - 40:
            return None
        tcp_reader, udp_reader, icmp_reader = _IPV6_READERS[l3_offset]
        l4_at = at + 40
        if next_header == _IP_PROTO_TCP:
            return tcp_reader(buffer, base) if _tcp_ok(buffer, l4_at, payload_length) else None
        if next_header == _IP_PROTO_UDP:
            return udp_reader(buffer, base) if _udp_ok(buffer, l4_at, payload_length) else None
        if (
            next_header == _IP_PROTO_ICMPV6
            and payload_length >= 8
            and buffer[l4_at] in (_ICMPV6_ECHO_REQUEST, _ICMPV6_ECHO_REPLY)
        ):
            return icmp_reader(buffer, base)
    return None


def _tcp_ok(buffer: Buffer, at: int, available: int) -> bool:
    """The TCP header at `at` is complete within `available` bytes and its options are none or
    exactly NOP, NOP, timestamp (anything else: the parse path validates the options)."""
    if available < 20:
        return False
    header_length = (buffer[at + 12] >> 4) * 4
    if header_length == 20:
        return True
    return (
        header_length == _TCP_TIMESTAMP_HEADER_LEN
        and available >= _TCP_TIMESTAMP_HEADER_LEN
        and _U32(buffer, at + 20)[0] == _TCP_TIMESTAMP_HEAD
    )


def _udp_ok(buffer: Buffer, at: int, available: int) -> bool:
    if available < 8:
        return False
    length = _U16(buffer, at + 4)[0]
    return 8 <= length <= available
