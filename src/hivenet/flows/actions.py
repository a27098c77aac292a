"""Flow actions: what a datapath may do with a packet. The contract between `sim/` (which
produces them) and every `datapath/` backend (which executes them).

Kept deliberately small so a kernel fast path (tc/eBPF with flows in BPF maps) can implement
the same set later: header rewrites, TTL decrement, VLAN push/pop, output to a local port,
VXLAN tunnel to a host, drop. Actions run in order; `Output`/`Tunnel` send the packet as the
rewrites before them left it. An empty action list drops.
"""

from __future__ import annotations

from dataclasses import dataclass

from hivenet.packets.flowmatch import FIELD_NAMES

# Fields `SetField` may rewrite (the datapath fixes IP/L4 checksums after rewriting them).
SETTABLE_FIELDS: frozenset[str] = frozenset(
    {"eth_src", "eth_dst", "ip_src", "ip_dst", "ip_tos", "tp_src", "tp_dst", "icmp_id"}
)
assert set(FIELD_NAMES) >= SETTABLE_FIELDS


@dataclass(frozen=True, slots=True)
class SetField:
    field: str
    value: int

    def __post_init__(self) -> None:
        if self.field not in SETTABLE_FIELDS:
            raise ValueError(f"SetField: field {self.field!r} is not settable")


@dataclass(frozen=True, slots=True)
class DecTtl:
    """Decrement the IPv4 TTL / IPv6 hop limit (the simulation already checked it is > 1)."""


@dataclass(frozen=True, slots=True)
class PushVlan:
    vlan: int


@dataclass(frozen=True, slots=True)
class PopVlan:
    pass


@dataclass(frozen=True, slots=True)
class Output:
    """Deliver to the virtual port with this tunnel key, bound to an interface on this host."""

    port_key: int


@dataclass(frozen=True, slots=True)
class Tunnel:
    """Encapsulate in VXLAN with VNI `tunnel_key` and send to `remote_ip` (the egress host)."""

    remote_ip: str
    tunnel_key: int


@dataclass(frozen=True, slots=True)
class Drop:
    """Explicit drop, with a reason for counters ("no_route", "rule", "port_down", ...)."""

    reason: str = "unspecified"


Action = SetField | DecTtl | PushVlan | PopVlan | Output | Tunnel | Drop
