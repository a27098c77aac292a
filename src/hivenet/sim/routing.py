"""A router's compiled route table: longest-prefix match over destination then source prefix,
weights, and ECMP by rendezvous (highest-random-weight) hashing of the 5-tuple.

Owns the lookup structure and the next-hop choice. Built once per change of the router's
routes or ports (`sim/topology.py` decides when), read per simulation. Pure: no I/O, no clock.

Route choice, in order: the longest destination prefix that has at least one route whose
source prefix contains the packet's source; among those, the longest source prefix; among
those, the lowest weight; among the remaining routes, one next hop per distinct
(port, gateway) chosen by rendezvous hashing. A blackhole or reject route in the winning
set wins over normal routes (an operator who writes one means it).

Why rendezvous hashing: every next hop gets a score hash(flow, next hop) and the highest
wins, so removing a next hop only moves the flows it was winning; hash-mod-N would move
almost all of them. Scores use a fixed 64-bit mixer over integers, never Python's `hash()` of
strings (salted per process): every agent must pick the same next hop for a flow.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from hivenet.model import Route, RouteType

_MASK64 = (1 << 64) - 1


def mix64(value: int) -> int:
    """SplitMix64 finalizer: a fast, well-distributed 64-bit integer mixer."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def stable_seed(text: str) -> int:
    """A 64-bit seed from a string, identical in every process (unlike `hash(str)`)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def flow_hash(ip_src: int, ip_dst: int, ip_proto: int, tp_src: int, tp_dst: int) -> int:
    """A 64-bit hash of the 5-tuple (IPv6 addresses are folded 64 bits at a time)."""
    value = mix64((ip_src & _MASK64) ^ (ip_src >> 64))
    value = mix64(value ^ (ip_dst & _MASK64) ^ ((ip_dst >> 64) << 1))
    return mix64(value ^ (ip_proto << 32) ^ (tp_src << 16) ^ tp_dst)


@dataclass(frozen=True, slots=True)
class NextHop:
    """One way out: a normal route's port and gateway (None: the destination is on-link)."""

    route_id: str
    type: RouteType
    port_id: str | None
    gateway: int | None
    seed: int


@dataclass(frozen=True, slots=True)
class RouteGroup:
    """Routes sharing (dst prefix, src prefix) that won on weight: the ECMP set."""

    dst_prefix_len: int
    src_network: int
    src_mask: int
    src_prefix_len: int
    weight: int
    next_hops: tuple[NextHop, ...]
    route_ids: tuple[str, ...]

    def choose(self, five_tuple_hash: int) -> NextHop:
        if len(self.next_hops) == 1:
            return self.next_hops[0]
        return max(self.next_hops, key=lambda hop: mix64(five_tuple_hash ^ hop.seed))

    def choose_live(
        self, five_tuple_hash: int, is_live: Callable[[NextHop], bool]
    ) -> tuple[NextHop, tuple[NextHop, ...]]:
        """The highest-scoring live next hop, and the hops whose liveness decided it: the
        dead ones ranked above it (were one to come back, it would win). With no live hop:
        the highest-scoring one (its egress drops the packet) and all the others (the first
        to come back wins). Hops ranked below the choice never matter to this flow."""
        ranked = sorted(
            self.next_hops, key=lambda hop: mix64(five_tuple_hash ^ hop.seed), reverse=True
        )
        for index, hop in enumerate(ranked):
            if is_live(hop):
                return hop, tuple(ranked[:index])
        return ranked[0], tuple(ranked[1:])


def _prefix_mask(bits: int, length: int) -> int:
    return ((1 << length) - 1) << (bits - length) if length else 0


class RouteTable:
    """LPM table for one IP family of one router.

    `dst_read_mask` / `src_read_mask`: the bits of ip_dst / ip_src any lookup may depend on
    (the longest prefix length present); the simulation records reads under these masks, so
    a cached flow is only reused by packets the whole table would route the same way.
    """

    __slots__ = (
        "_buckets",
        "_dst_lengths",
        "address_bits",
        "dst_read_mask",
        "route_count",
        "src_read_mask",
    )

    def __init__(self, address_bits: int, routes: Iterable[Route]) -> None:
        self.address_bits = address_bits
        grouped: dict[tuple[int, int, int, int], list[Route]] = {}
        for route in routes:
            dst = route.dst_prefix
            src = route.src_prefix
            src_len = src.prefixlen if src is not None else 0
            src_net = int(src.network_address) if src is not None else 0
            key = (dst.prefixlen, int(dst.network_address), src_len, src_net)
            grouped.setdefault(key, []).append(route)
        buckets: dict[int, dict[int, list[RouteGroup]]] = {}
        max_dst = 0
        max_src = 0
        count = 0
        for (dst_len, dst_net, src_len, src_net), members in grouped.items():
            count += len(members)
            weight = min(r.weight for r in members)
            winners = sorted((r for r in members if r.weight == weight), key=lambda r: r.id)
            special = [r for r in winners if r.type is not RouteType.NORMAL]
            chosen = special[:1] or winners
            hops: dict[tuple[str | None, int | None], NextHop] = {}
            for route in chosen:
                gateway = int(route.next_hop_gateway) if route.next_hop_gateway else None
                key2 = (route.next_hop_port_id, gateway)
                if key2 not in hops:
                    hops[key2] = NextHop(
                        route_id=route.id,
                        type=route.type,
                        port_id=route.next_hop_port_id,
                        gateway=gateway,
                        seed=stable_seed(f"{route.next_hop_port_id}|{gateway}"),
                    )
            group = RouteGroup(
                dst_prefix_len=dst_len,
                src_network=src_net,
                src_mask=_prefix_mask(address_bits, src_len),
                src_prefix_len=src_len,
                weight=weight,
                next_hops=tuple(hops.values()),
                route_ids=tuple(r.id for r in chosen),
            )
            buckets.setdefault(dst_len, {}).setdefault(dst_net, []).append(group)
            max_dst = max(max_dst, dst_len)
            max_src = max(max_src, src_len)
        self._buckets: dict[int, tuple[int, dict[int, tuple[RouteGroup, ...]]]] = {
            length: (
                _prefix_mask(address_bits, length),
                {
                    net: tuple(sorted(groups, key=lambda g: -g.src_prefix_len))
                    for net, groups in by_net.items()
                },
            )
            for length, by_net in buckets.items()
        }
        self._dst_lengths = tuple(sorted(self._buckets, reverse=True))
        self.dst_read_mask = _prefix_mask(address_bits, max_dst) if count else 0
        self.src_read_mask = _prefix_mask(address_bits, max_src)
        self.route_count = count

    def lookup(self, ip_dst: int, ip_src: int) -> RouteGroup | None:
        buckets = self._buckets
        for length in self._dst_lengths:
            mask, by_net = buckets[length]
            groups = by_net.get(ip_dst & mask)
            if groups is None:
                continue
            for group in groups:
                if ip_src & group.src_mask == group.src_network:
                    return group
        return None

    def __len__(self) -> int:
        return self.route_count
