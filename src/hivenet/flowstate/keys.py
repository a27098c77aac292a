"""Connection keys: `FlowKey`, the 5-tuple (plus IP version) that names one direction of a
connection, and how to derive it from a `FlowMatch` or from the datagram an ICMP error quotes.

Owns the key's shape and the rules that fill it: TCP/UDP ports as they are; ICMP and ICMPv6
echo messages carry their identifier in both port slots (so the reply's key, reversed, is the
request's key); every other protocol has ports 0. It does not decide what a key means for a
connection (that is `conntrack.py`) nor how it is translated (`nat.py`).
Pure: no I/O, no clock; imports only `hivenet.packets`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from typing import Any

from hivenet.packets.flowmatch import (
    ETH_TYPE_IPV4,
    ETH_TYPE_IPV6,
    FRAG_LATER,
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
)
from hivenet.packets.parse import EmbeddedDatagram

ECHO_REQUEST_TYPES = {IP_PROTO_ICMP: ICMP_ECHO_REQUEST, IP_PROTO_ICMPV6: ICMPV6_ECHO_REQUEST}
ECHO_REPLY_TYPES = {IP_PROTO_ICMP: ICMP_ECHO_REPLY, IP_PROTO_ICMPV6: ICMPV6_ECHO_REPLY}
ICMP_PROTOCOLS = (IP_PROTO_ICMP, IP_PROTO_ICMPV6)
PORT_PROTOCOLS = (IP_PROTO_TCP, IP_PROTO_UDP)

_ADDRESS_BITS = {4: 32, 6: 128}
_ETH_TYPE_VERSION = {ETH_TYPE_IPV4: 4, ETH_TYPE_IPV6: 6}


class FlowKeyError(ValueError):
    """A flow key field is out of range; the message names the field and the value."""


# A key is one int: its fields side by side, most significant first, each at a fixed width
# for its IP version (addresses 32 bits for IPv4, 128 for IPv6), so that comparing two keys
# of one version compares their fields in order, as tuples do:
#   ip_version (4) | ip_src (A) | ip_dst (A) | ip_proto (8) | tp_src (16) | tp_dst (16)
# An IPv4 key is 108 bits: a 48-byte object where a 6-tuple of ints took 96 (plus its
# fields' ints); an IPv6 key 72 bytes. An IPv6 key is >= 6 << 296, an IPv4 key < 1 << 108.
_PORTS_BITS = 32
_LOW_BITS = 8 + _PORTS_BITS  # ip_proto, tp_src, tp_dst
_V6_VERSION_SHIFT = _LOW_BITS + 2 * 128


def proto_of(packed: int) -> int:
    """The ip_proto of a key, a FlowKey or one held as a plain int (the tables hold keys so):
    `FlowKey.ip_proto` itself."""
    return packed >> 32 & 0xFF


class FlowKey(int):
    """One direction of a connection: (ip_version, ip_src, ip_dst, ip_proto, tp_src, tp_dst).

    Packed into one int (see above: compact, cheap to hash and compare) that reads as the
    6-tuple it stands for: its fields by name, by index (`key[3]`), by iteration (`tuple(key)`
    is the tuple), and keys of one IP version order as those tuples do. The constructor
    validates every field; hot paths that build keys from already-bounded values use
    `FlowKey.unchecked`.
    """

    __slots__ = ()

    def __new__(
        cls, ip_version: int, ip_src: int, ip_dst: int, ip_proto: int, tp_src: int, tp_dst: int
    ) -> FlowKey:
        bits = _ADDRESS_BITS.get(ip_version)
        if bits is None:
            raise FlowKeyError(f"ip_version must be 4 or 6, got {ip_version!r}")
        for name, address in (("ip_src", ip_src), ("ip_dst", ip_dst)):
            if not isinstance(address, int) or not 0 <= address < (1 << bits):
                raise FlowKeyError(f"{name} {address!r} is not an IPv{ip_version} address")
        if not isinstance(ip_proto, int) or not 0 <= ip_proto <= 255:
            raise FlowKeyError(f"ip_proto must be 0..255, got {ip_proto!r}")
        for name, port in (("tp_src", tp_src), ("tp_dst", tp_dst)):
            if not isinstance(port, int) or not 0 <= port <= 0xFFFF:
                raise FlowKeyError(f"{name} must be 0..65535, got {port!r}")
        return cls.unchecked(ip_version, ip_src, ip_dst, ip_proto, tp_src, tp_dst)

    @classmethod
    def unchecked(
        cls, ip_version: int, ip_src: int, ip_dst: int, ip_proto: int, tp_src: int, tp_dst: int
    ) -> FlowKey:
        """A key from values the caller already knows are in range (no validation)."""
        if ip_version == 4:
            return int.__new__(
                cls,
                ((4 << 32 | ip_src) << 32 | ip_dst) << 40 | ip_proto << 32 | tp_src << 16 | tp_dst,
            )
        return int.__new__(
            cls,
            ((ip_version << 128 | ip_src) << 128 | ip_dst) << 40
            | ip_proto << 32
            | tp_src << 16
            | tp_dst,
        )

    # The fields read back from the layout above with its offsets as literals (each read is
    # one compare, shift and mask: these run ~100 times per new connection). An IPv4 key is
    # below 1 << 108, its addresses at bits 72 and 40; an IPv6 key's at 168 and 40.

    @property
    def ip_version(self) -> int:
        return 4 if self < 1 << 108 else 6

    @property
    def ip_src(self) -> int:
        if self < 1 << 108:
            return self >> 72 & 0xFFFFFFFF
        return self >> 168 & (1 << 128) - 1

    @property
    def ip_dst(self) -> int:
        if self < 1 << 108:
            return self >> 40 & 0xFFFFFFFF
        return self >> 40 & (1 << 128) - 1

    ip_proto = property(proto_of)

    @property
    def tp_src(self) -> int:
        return self >> 16 & 0xFFFF

    @property
    def tp_dst(self) -> int:
        return self & 0xFFFF

    def fields(self) -> tuple[int, int, int, int, int, int]:
        """(ip_version, ip_src, ip_dst, ip_proto, tp_src, tp_dst)."""
        v6 = self >> _V6_VERSION_SHIFT
        bits = 128 if v6 else 32
        value = int(self)
        addresses = value >> _LOW_BITS
        mask = (1 << bits) - 1
        return (
            6 if v6 else 4,
            addresses >> bits & mask,
            addresses & mask,
            value >> _PORTS_BITS & 0xFF,
            value >> 16 & 0xFFFF,
            value & 0xFFFF,
        )

    def __iter__(self) -> Iterator[int]:
        return iter(self.fields())

    def __len__(self) -> int:
        return 6

    def __getitem__(self, index: int) -> int:
        return self.fields()[index]

    def reversed(self) -> FlowKey:
        """The key of the other direction of the same connection."""
        value = int(self)
        if value < 1 << 108:  # IPv4: swap the 32-bit addresses and the ports
            return int.__new__(
                FlowKey,
                (4 << 64 | (value >> 40 & 0xFFFFFFFF) << 32 | value >> 72 & 0xFFFFFFFF) << 40
                | value & 0xFF00000000
                | (value & 0xFFFF) << 16
                | value >> 16 & 0xFFFF,
            )
        mask = (1 << 128) - 1
        addresses = value >> _LOW_BITS
        swapped = ((addresses >> 256) << 128 | addresses & mask) << 128 | addresses >> 128 & mask
        return int.__new__(
            FlowKey,
            swapped << _LOW_BITS
            | value & 0xFF00000000
            | (value & 0xFFFF) << 16
            | value >> 16 & 0xFFFF,
        )

    def __repr__(self) -> str:
        value = int(self)
        if not value >> _V6_VERSION_SHIFT:
            # IPv4, spelled from the packed value in one expression: every NAT decision's
            # trace text shows two keys (~0.8 us each instead of ~1.9).
            source, target = value >> (_LOW_BITS + 32) & 0xFFFFFFFF, value >> _LOW_BITS & 0xFFFFFFFF
            return (
                f"FlowKey({source >> 24}.{source >> 16 & 255}.{source >> 8 & 255}.{source & 255}:"
                f"{value >> 16 & 0xFFFF} -> "
                f"{target >> 24}.{target >> 16 & 255}.{target >> 8 & 255}.{target & 255}:{value & 0xFFFF}"
                f" proto {value >> _PORTS_BITS & 0xFF})"
            )
        version, ip_src, ip_dst, proto, tp_src, tp_dst = self.fields()
        src = format_address(4, ip_src) if version == 4 else self._v6(ip_src)
        dst = format_address(4, ip_dst) if version == 4 else self._v6(ip_dst)
        return f"FlowKey({src}:{tp_src} -> {dst}:{tp_dst} proto {proto})"

    __str__ = __repr__

    def __reduce__(self) -> tuple[Any, tuple[int]]:
        # (int's own would call FlowKey(value), which takes the six fields)
        return _flow_key_of_value, (int(self),)

    @staticmethod
    def _v6(value: int) -> str:
        return f"[{ipaddress.IPv6Address(value)}]"


class PackedKeys:
    """The plain ints the tables hold their keys as, one object per value packed lately.

    A FlowKey is an int subclass, so tracked by the cyclic GC: 64 bytes where a plain int of
    the same value takes 48 (40 asked for, pymalloc's 16-byte steps). The conntrack and NAT
    tables of one agent share one of these, so a connection's conntrack entry and the NAT
    binding of the same key (made in one transaction, or decoded from one push) hold one int
    between them. Values only, so nothing here can go stale; emptied when it holds
    `max_recent` (keys packed before keep theirs). Not shared between agents: each agent
    holds its own copies, as separate processes do."""

    __slots__ = ("_recent", "max_recent")

    def __init__(self, max_recent: int = 1 << 13) -> None:
        if isinstance(max_recent, bool) or not isinstance(max_recent, int) or max_recent < 1:
            raise ValueError(f"PackedKeys.max_recent must be an int >= 1, got {max_recent!r}")
        self.max_recent = max_recent
        self._recent: dict[int, int] = {}

    def __call__(self, key: int) -> int:
        recent = self._recent
        held = recent.get(key)
        if held is None:
            if len(recent) >= self.max_recent:
                recent.clear()
            held = int(key)
            recent[held] = held  # not `key` as the dict's key: that would keep the FlowKey
        return held


def _flow_key_of_value(value: int) -> FlowKey:
    """The key whose packed value is `value` (unpickling, copying)."""
    return int.__new__(FlowKey, value)


def is_icmp_error(match: FlowMatch) -> bool:
    if match.ip_proto == IP_PROTO_ICMP and match.eth_type == ETH_TYPE_IPV4:
        return match.icmp_type in ICMP_ERROR_TYPES
    if match.ip_proto == IP_PROTO_ICMPV6 and match.eth_type == ETH_TYPE_IPV6:
        return match.icmp_type in ICMPV6_ERROR_TYPES
    return False


def is_echo(proto: int, icmp_type: int) -> bool:
    return ECHO_REQUEST_TYPES.get(proto) == icmp_type or ECHO_REPLY_TYPES.get(proto) == icmp_type


def key_of_match(match: FlowMatch) -> FlowKey | None:
    """The flow key of `match`, or None for a packet without one: non-IP frames and later
    fragments (which carry no L4 header, so their connection cannot be told)."""
    version = _ETH_TYPE_VERSION.get(match.eth_type)
    if version is None or match.ip_frag == FRAG_LATER:
        return None
    proto = match.ip_proto
    if proto in PORT_PROTOCOLS:
        return FlowKey.unchecked(
            version, match.ip_src, match.ip_dst, proto, match.tp_src, match.tp_dst
        )
    if proto in ICMP_PROTOCOLS and is_echo(proto, match.icmp_type):
        return FlowKey.unchecked(
            version, match.ip_src, match.ip_dst, proto, match.icmp_id, match.icmp_id
        )
    return FlowKey.unchecked(version, match.ip_src, match.ip_dst, proto, 0, 0)


def key_of_embedded(datagram: EmbeddedDatagram) -> FlowKey | None:
    """The flow key of the datagram an ICMP error quotes (see `packets.embedded_datagram`),
    or None when the quote is too short to name its connection (ports cut off)."""
    if datagram.ipv4 is not None:
        version, src, dst = 4, int(datagram.ipv4.src), int(datagram.ipv4.dst)
    elif datagram.ipv6 is not None:
        version, src, dst = 6, int(datagram.ipv6.src), int(datagram.ipv6.dst)
    else:
        return None
    proto = datagram.protocol
    if proto in PORT_PROTOCOLS:
        if datagram.src_port is None or datagram.dst_port is None:
            return None
        return FlowKey(version, src, dst, proto, datagram.src_port, datagram.dst_port)
    if proto in ICMP_PROTOCOLS:
        quoted = datagram.l4_bytes
        if len(quoted) < 6:
            return None
        if not is_echo(proto, quoted[0]):
            return FlowKey(version, src, dst, proto, 0, 0)
        echo_id = int.from_bytes(quoted[4:6], "big")
        return FlowKey(version, src, dst, proto, echo_id, echo_id)
    return FlowKey(version, src, dst, proto, 0, 0)


def uses_echo_id(key: FlowKey) -> bool:
    """True when the key's port slots hold an ICMP echo identifier (translated as icmp_id)."""
    return key.ip_proto in ICMP_PROTOCOLS


def key_text(key: FlowKey) -> str:
    """`proto:src:sport-dst:dport`, the addresses as `ipaddress` spells them (the connection
    tags spell keys so, several per new connection: an IPv4 key is read straight off its
    packed int here, ~3x cheaper than through its fields)."""
    value = int(key)
    if value < 1 << 108:
        src, dst = value >> 72 & 0xFFFFFFFF, value >> 40 & 0xFFFFFFFF
        return (
            f"{value >> 32 & 0xFF}:{src >> 24}.{src >> 16 & 255}.{src >> 8 & 255}.{src & 255}"
            f":{value >> 16 & 0xFFFF}-{dst >> 24}.{dst >> 16 & 255}.{dst >> 8 & 255}."
            f"{dst & 255}:{value & 0xFFFF}"
        )
    return (
        f"{key.ip_proto}:{format_address(6, key.ip_src)}:{key.tp_src}"
        f"-{format_address(6, key.ip_dst)}:{key.tp_dst}"
    )


def format_address(ip_version: int, address: int) -> str:
    """The address as `ipaddress` spells it (flow tags are built from it on every new
    connection: IPv4 is formatted here directly, the same dotted quad, ~10x cheaper)."""
    if ip_version == 4 and 0 <= address <= 0xFFFFFFFF:
        return f"{address >> 24}.{address >> 16 & 255}.{address >> 8 & 255}.{address & 255}"
    return str(ipaddress.ip_address(address) if ip_version == 4 else ipaddress.IPv6Address(address))
