"""`FlowMatch`: the header fields of one packet, as the flow table and the simulation see them.

Owns the field list, each field's bit width and the masking arithmetic that megaflows use. Every
field is a plain int so that a masked key is a tuple of ints (cheap to hash on the hot path).
Absent headers read as 0 (an untagged frame has vlan 0, a non-IP frame has ip_proto 0, ...).

Field conventions:
- in_port: the tunnel key of the virtual ingress port.
- eth_src, eth_dst: 48-bit MACs as ints. eth_type: the inner ethertype (after any 802.1Q tag).
- vlan: the 802.1Q VID (1..4095), 0 when untagged (a priority tag with VID 0 counts as untagged).
- ip_src, ip_dst: IPv4 (32-bit) or IPv6 (128-bit) addresses as ints; eth_type says which.
- ip_proto, ip_tos (the whole DSCP+ECN byte / IPv6 traffic class), ip_ttl (TTL or hop limit).
- ip_frag: FRAG_NONE, FRAG_FIRST or FRAG_LATER (later fragments carry no L4 header).
- tp_src, tp_dst: TCP/UDP ports. tcp_flags: the TCP flag bits (FIN=0x01 ... CWR=0x80).
- icmp_type, icmp_code, icmp_id: ICMP/ICMPv6 type and code, echo identifier (0 otherwise).
- arp_op, arp_sha, arp_spa, arp_tha, arp_tpa: ARP fields; for IPv6 neighbour discovery,
  nd_target holds the target address, and (as in Open vSwitch) arp_sha holds the source
  link-layer address option of a solicitation, arp_tha the target link-layer address option
  of an advertisement (0 when the option is absent).
"""

from __future__ import annotations

from dataclasses import astuple, dataclass, fields, replace
from typing import Any

FRAG_NONE = 0
FRAG_FIRST = 1
FRAG_LATER = 2

ETH_TYPE_IPV4 = 0x0800
ETH_TYPE_ARP = 0x0806
ETH_TYPE_VLAN = 0x8100
ETH_TYPE_IPV6 = 0x86DD

IP_PROTO_ICMP = 1
IP_PROTO_TCP = 6
IP_PROTO_UDP = 17
IP_PROTO_ICMPV6 = 58


@dataclass(frozen=True, slots=True)
class FlowMatch:
    in_port: int = 0
    eth_src: int = 0
    eth_dst: int = 0
    eth_type: int = 0
    vlan: int = 0
    ip_src: int = 0
    ip_dst: int = 0
    ip_proto: int = 0
    ip_tos: int = 0
    ip_ttl: int = 0
    ip_frag: int = FRAG_NONE
    tp_src: int = 0
    tp_dst: int = 0
    tcp_flags: int = 0
    icmp_type: int = 0
    icmp_code: int = 0
    icmp_id: int = 0
    arp_op: int = 0
    arp_sha: int = 0
    arp_spa: int = 0
    arp_tha: int = 0
    arp_tpa: int = 0
    nd_target: int = 0

    def as_tuple(self) -> tuple[int, ...]:
        return astuple(self)

    def masked(self, mask: tuple[int, ...]) -> tuple[int, ...]:
        """The key of this match under `mask` (one int mask per field, in FIELD_NAMES order)."""
        return tuple(v & m for v, m in zip(astuple(self), mask, strict=True))

    def with_fields(self, **changes: Any) -> FlowMatch:
        return replace(self, **changes)


FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in fields(FlowMatch))
FIELD_INDEX: dict[str, int] = {name: i for i, name in enumerate(FIELD_NAMES)}

# Bit width of each field; a full mask for a field is (1 << width) - 1.
FIELD_BITS: dict[str, int] = {
    "in_port": 32,
    "eth_src": 48,
    "eth_dst": 48,
    "eth_type": 16,
    "vlan": 12,
    "ip_src": 128,
    "ip_dst": 128,
    "ip_proto": 8,
    "ip_tos": 8,
    "ip_ttl": 8,
    "ip_frag": 2,
    "tp_src": 16,
    "tp_dst": 16,
    "tcp_flags": 8,
    "icmp_type": 8,
    "icmp_code": 8,
    "icmp_id": 16,
    "arp_op": 16,
    "arp_sha": 48,
    "arp_spa": 32,
    "arp_tha": 48,
    "arp_tpa": 32,
    "nd_target": 128,
}
assert set(FIELD_BITS) == set(FIELD_NAMES)

FULL_MASKS: dict[str, int] = {name: (1 << bits) - 1 for name, bits in FIELD_BITS.items()}
EXACT_MASK: tuple[int, ...] = tuple(FULL_MASKS[name] for name in FIELD_NAMES)
EMPTY_MASK: tuple[int, ...] = tuple(0 for _ in FIELD_NAMES)


def mask_from(field_masks: dict[str, int]) -> tuple[int, ...]:
    """A mask tuple from {field name: bit mask}; fields not named are wildcarded (0)."""
    unknown = set(field_masks) - set(FIELD_NAMES)
    if unknown:
        raise ValueError(f"unknown FlowMatch field(s): {sorted(unknown)}")
    return tuple(field_masks.get(name, 0) & FULL_MASKS[name] for name in FIELD_NAMES)
