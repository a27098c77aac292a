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
from typing import NamedTuple

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


# One int object per address and port value, shared by every key holding it (a key's fields
# parsed from a packet or decoded from the wire are fresh ints: ~32 bytes each, four per key,
# several keys per connection). Only values are kept, so nothing here can go stale; emptied
# when it holds `_SHARED_VALUES_MAX` values (keys already made keep theirs).
_shared_values: dict[int, int] = {}
_SHARED_VALUES_MAX = 1 << 17


class FlowKeyError(ValueError):
    """A flow key field is out of range; the message names the field and the value."""


class _FlowKeyFields(NamedTuple):
    ip_version: int
    ip_src: int
    ip_dst: int
    ip_proto: int
    tp_src: int
    tp_dst: int


class FlowKey(_FlowKeyFields):
    """One direction of a connection: (ip_version, ip_src, ip_dst, ip_proto, tp_src, tp_dst).

    A tuple (cheap to hash, compact). The constructor validates every field; hot paths that
    build keys from already-bounded values use `FlowKey.unchecked`.
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
        return tuple.__new__(cls, (ip_version, ip_src, ip_dst, ip_proto, tp_src, tp_dst))

    @classmethod
    def unchecked(
        cls, ip_version: int, ip_src: int, ip_dst: int, ip_proto: int, tp_src: int, tp_dst: int
    ) -> FlowKey:
        """A key from values the caller already knows are in range (no validation); its
        address and port ints are the shared ones (see `_shared_values`)."""
        if len(_shared_values) >= _SHARED_VALUES_MAX:
            _shared_values.clear()
        shared = _shared_values.setdefault
        return tuple.__new__(
            cls,
            (
                ip_version,
                shared(ip_src, ip_src),
                shared(ip_dst, ip_dst),
                ip_proto,
                shared(tp_src, tp_src),
                shared(tp_dst, tp_dst),
            ),
        )

    def reversed(self) -> FlowKey:
        """The key of the other direction of the same connection."""
        return tuple.__new__(
            FlowKey,
            (self[0], self[2], self[1], self[3], self[5], self[4]),
        )

    def __repr__(self) -> str:
        src = format_address(4, self.ip_src) if self.ip_version == 4 else self._v6(self.ip_src)
        dst = format_address(4, self.ip_dst) if self.ip_version == 4 else self._v6(self.ip_dst)
        return f"FlowKey({src}:{self.tp_src} -> {dst}:{self.tp_dst} proto {self.ip_proto})"

    @staticmethod
    def _v6(value: int) -> str:
        return f"[{ipaddress.IPv6Address(value)}]"


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


def format_address(ip_version: int, address: int) -> str:
    """The address as `ipaddress` spells it (flow tags are built from it on every new
    connection: IPv4 is formatted here directly, the same dotted quad, ~10x cheaper)."""
    if ip_version == 4 and 0 <= address <= 0xFFFFFFFF:
        return f"{address >> 24}.{address >> 16 & 255}.{address >> 8 & 255}.{address & 255}"
    return str(ipaddress.ip_address(address) if ip_version == 4 else ipaddress.IPv6Address(address))
