"""Exact-match kernel entries derived from megaflows: the pure part of the eBPF datapath.

Owns: the byte layouts of `struct hn_flow_key` and `struct hn_flow_entry` (bpf/hn_fastpath.c;
keep both in step), which packets the kernel program can key (`kernel_key`), which megaflows an
exact entry may stand for (`mask_allows_exact_entry`), and how a flow's action list becomes the
kernel's fixed action record (`kernel_entry`). No I/O, no clock: the datapath calls these with
a packet's `FlowMatch` values and the interface indexes it knows.

An exact entry made from packet P that hit megaflow M is right for every packet Q with the same
key: Q agrees with P on every key field, and on the fields the key leaves out the kernel program
only accepts what P had too (untagged, not a fragment, no ARP/ND fields, TCP without SYN, FIN
or RST). So M must not look at tcp_flags beyond those three bits; everything else M may match.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from hivenet.flows.actions import Action, DecTtl, Output, SetField, Tunnel
from hivenet.packets.flowmatch import (
    ETH_TYPE_IPV4,
    FIELD_INDEX,
    FRAG_NONE,
    IP_PROTO_ICMP,
    IP_PROTO_TCP,
    IP_PROTO_UDP,
)

# struct hn_flow_key: ifindex, ip_src, ip_dst, tp_src, tp_dst, eth_src, eth_dst, ip_proto,
# ip_tos, ip_ttl, icmp_type, icmp_code, pad, icmp_id (addresses and ports in network order).
FLOW_KEY = struct.Struct("=I4s4s2s2s6s6sBBBBBx2s")
# struct hn_flow_entry: packets, bytes (kernel counters), flags, out_ifindex, tunnel_id,
# tunnel_remote (host order), ip_src, ip_dst, tp_src, tp_dst, eth_src, eth_dst, mtu (host
# order, 0: none; a bigger IP packet is a miss and goes to the agent), pad.
FLOW_ENTRY = struct.Struct("=QQIIII4s4s2s2s6s6sH6x")
assert FLOW_KEY.size == 36 and FLOW_ENTRY.size == 64

SET_ETH_SRC = 1 << 0
SET_ETH_DST = 1 << 1
SET_IP_SRC = 1 << 2
SET_IP_DST = 1 << 3
SET_TP_SRC = 1 << 4
SET_TP_DST = 1 << 5
DEC_TTL = 1 << 6
OUT_TUNNEL = 1 << 7

# TCP flags that always send a packet to the agent (connection state changes).
TCP_FLAGS_TO_AGENT = 0x07  # FIN | SYN | RST
ICMP_ECHO_TYPES = frozenset({0, 8})

_I = FIELD_INDEX
_SET_FLAGS = {
    "eth_src": SET_ETH_SRC,
    "eth_dst": SET_ETH_DST,
    "ip_src": SET_IP_SRC,
    "ip_dst": SET_IP_DST,
    "tp_src": SET_TP_SRC,
    "tp_dst": SET_TP_DST,
}
_FIELD_BYTES = {"eth_src": 6, "eth_dst": 6, "ip_src": 4, "ip_dst": 4, "tp_src": 2, "tp_dst": 2}


def kernel_key(values: tuple[int, ...], ifindex: int) -> bytes | None:
    """The `hn_flow_key` the kernel program computes for a packet with these FlowMatch
    values arriving on interface `ifindex`; None when the program never keys such a packet
    (it goes to the agent every time)."""
    if (
        values[_I["eth_type"]] != ETH_TYPE_IPV4
        or values[_I["vlan"]] != 0
        or values[_I["ip_frag"]] != FRAG_NONE
    ):
        return None
    protocol = values[_I["ip_proto"]]
    tp_src = tp_dst = icmp_type = icmp_code = icmp_id = 0
    if protocol in (IP_PROTO_TCP, IP_PROTO_UDP):
        if protocol == IP_PROTO_TCP and values[_I["tcp_flags"]] & TCP_FLAGS_TO_AGENT:
            return None
        tp_src, tp_dst = values[_I["tp_src"]], values[_I["tp_dst"]]
    elif protocol == IP_PROTO_ICMP:
        icmp_type = values[_I["icmp_type"]]
        if icmp_type not in ICMP_ECHO_TYPES:
            return None
        icmp_code, icmp_id = values[_I["icmp_code"]], values[_I["icmp_id"]]
    else:
        return None
    return FLOW_KEY.pack(
        ifindex,
        values[_I["ip_src"]].to_bytes(4, "big"),
        values[_I["ip_dst"]].to_bytes(4, "big"),
        tp_src.to_bytes(2, "big"),
        tp_dst.to_bytes(2, "big"),
        values[_I["eth_src"]].to_bytes(6, "big"),
        values[_I["eth_dst"]].to_bytes(6, "big"),
        protocol,
        values[_I["ip_tos"]],
        values[_I["ip_ttl"]],
        icmp_type,
        icmp_code,
        icmp_id.to_bytes(2, "big"),
    )


def mask_allows_exact_entry(mask: tuple[int, ...]) -> bool:
    """Whether exact entries may stand for a megaflow with this mask (see the module doc)."""
    return mask[_I["tcp_flags"]] & ~TCP_FLAGS_TO_AGENT == 0


@dataclass(frozen=True, slots=True)
class KernelEntry:
    """One flow's actions as the kernel applies them, and where the packet goes."""

    value: bytes  # FLOW_ENTRY with zero counters
    output_port: int | None  # local port key, None for a tunnel


def kernel_entry(
    values: tuple[int, ...],
    actions: Sequence[Action],
    port_ifindexes: Mapping[int, int],
    tunnel_ifindex: int | None,
    *,
    mtu: int = 0,
) -> KernelEntry | None:
    """The kernel action record for `actions` run on a packet with `values` (`mtu`: the
    megaflow's, see `Flow.mtu`: the kernel passes a larger packet up); None when the
    kernel cannot do them (anything but header rewrites and TTL decrement followed by exactly
    one output to a bound port or one IPv4 tunnel, e.g. flooding, VLAN, drops, ToS/ICMP id
    rewrites, a TTL that would reach 0)."""
    flags = 0
    fields: dict[str, bytes] = {}
    protocol = values[_I["ip_proto"]]
    for position, action in enumerate(actions):
        if isinstance(action, SetField):
            if action.field not in _SET_FLAGS:
                return None
            if action.field.startswith("tp_") and protocol not in (IP_PROTO_TCP, IP_PROTO_UDP):
                return None
            flags |= _SET_FLAGS[action.field]
            try:
                fields[action.field] = action.value.to_bytes(_FIELD_BYTES[action.field], "big")
            except OverflowError:  # e.g. an IPv6 address: not for this IPv4-only program
                return None
        elif isinstance(action, DecTtl):
            if flags & DEC_TTL or values[_I["ip_ttl"]] <= 1:
                return None
            flags |= DEC_TTL
        elif isinstance(action, Output | Tunnel):
            if position != len(actions) - 1:
                return None
            return _with_output(flags, fields, action, port_ifindexes, tunnel_ifindex, mtu)
        else:
            return None
    return None


def _with_output(
    flags: int,
    fields: dict[str, bytes],
    output: Output | Tunnel,
    port_ifindexes: Mapping[int, int],
    tunnel_ifindex: int | None,
    mtu: int,
) -> KernelEntry | None:
    tunnel_id = tunnel_remote = 0
    output_port: int | None = None
    if isinstance(output, Output):
        out_ifindex = port_ifindexes.get(output.port_key)
        if out_ifindex is None:
            return None
        output_port = output.port_key
    else:
        try:
            remote = ipaddress.ip_address(output.remote_ip)
        except ValueError:
            return None
        if tunnel_ifindex is None or remote.version != 4:
            return None
        flags |= OUT_TUNNEL
        out_ifindex = tunnel_ifindex
        tunnel_id = output.tunnel_key
        tunnel_remote = int(remote)
    value = FLOW_ENTRY.pack(
        0,
        0,
        flags,
        out_ifindex,
        tunnel_id,
        tunnel_remote,
        fields.get("ip_src", bytes(4)),
        fields.get("ip_dst", bytes(4)),
        fields.get("tp_src", bytes(2)),
        fields.get("tp_dst", bytes(2)),
        fields.get("eth_src", bytes(6)),
        fields.get("eth_dst", bytes(6)),
        mtu,
    )
    return KernelEntry(value, output_port)


def entry_counters(value: bytes) -> tuple[int, int]:
    """(packets, bytes) the kernel counted on an entry read back from the map."""
    packets, byte_count = struct.unpack_from("=QQ", value)
    return packets, byte_count
