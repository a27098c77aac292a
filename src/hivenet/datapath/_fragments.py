"""First-fragment tracking: IPv4 fragments follow the verdict of their datagram's first one.

Owns `FragmentTracker`, used by every datapath on the frames a port receives (never on what
a tunnel delivers: the ingress host decided for those). A later fragment carries no L4
header, so neither conntrack, NAT nor a security-group rule can classify it, and the megaflow
cache cannot tell two datagrams apart (the IP identification is no match field). So fragments
never take a megaflow of their own:

  * the first fragment (offset 0, MF set) is parsed, looked up and simulated like any packet
    (its L4 header is complete: see "tiny" below); the actions the datapath then applies to it
    are recorded for its datagram, keyed by (ingress port, source, destination, protocol, IP
    id);
  * a later fragment of a recorded datagram gets the same actions without the L4 rewrites
    (`tp_src`, `tp_dst`, `icmp_id`: those bytes are in the first fragment only; an address
    rewrite fixes the IP header checksum, and the L4 checksum, which covers the whole
    datagram, was updated incrementally in the first fragment). So a datagram is SNATed,
    reverse-NATed, admitted by a security group or dropped as one, as conntrack's defrag
    would have it, without reassembly.

Dropped, each with its reason (`drop.<reason>`), as Linux's defrag drops them:
  * `fragment_tiny`: a first fragment without its whole TCP (20 bytes and its data offset),
    UDP or ICMP header (RFC 1858, RFC 3128), or a fragment with MF set carrying fewer than 8
    bytes or a length not a multiple of 8 (RFC 791: only the last fragment may end unaligned);
  * `fragment_overlap`: a fragment whose bytes overlap bytes of the same datagram seen before
    (or that end past its last fragment's end, or a second, different last fragment); from
    then on the whole datagram is dropped (Linux discards such a queue: FragmentSmack);
  * `fragment_duplicate`: exactly the same bytes again;
  * `fragment_no_first`: a later fragment whose datagram's first fragment was not seen (or
    was not forwarded yet, or its entry expired): nothing can say where it may go. Linux sends
    a datagram's fragments in order, so this drops reordered fragments too (no buffering).

The table is bounded (`capacity` datagrams, oldest out first; `fragment_evictions` counts
them) and each entry expires `timeout` seconds after the first fragment (Linux's ipfrag_time
is 30 s); a datagram whose bytes are all seen is forgotten at once.
IPv6 fragments are not tracked (a later IPv6 fragment takes the datapath's usual path).
Pure: no I/O; the clock is passed in.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from dataclasses import dataclass, field

from hivenet.flows.actions import Action, SetField

_ETH_TYPE_IPV4 = 0x0800
_ETH_TYPE_VLAN = 0x8100
_IP_PROTO_ICMP = 1
_IP_PROTO_TCP = 6
_IP_PROTO_UDP = 17
# version/IHL, total length, identification, flags + fragment offset, protocol, addresses
_IPV4 = struct.Struct("!B1xHHH1xB2x4s4s").unpack_from
_L4_HEADER_BYTES = {_IP_PROTO_TCP: 20, _IP_PROTO_UDP: 8, _IP_PROTO_ICMP: 8}
_L4_FIELDS = frozenset({"tp_src", "tp_dst", "icmp_id"})

DEFAULT_CAPACITY = 4096
DEFAULT_TIMEOUT = 30.0

# (ingress port key, source, destination, protocol, identification)
FragmentKey = tuple[int, bytes, bytes, int, int]


@dataclass(frozen=True, slots=True)
class Fragment:
    """One IPv4 fragment's place in its datagram (bytes of IP payload: [start, end))."""

    key: FragmentKey
    start: int
    end: int
    more: bool


@dataclass(slots=True)
class _Datagram:
    created: float
    ranges: list[tuple[int, int]] = field(default_factory=list)
    total: int = -1  # end of the last fragment, once seen
    actions: tuple[Action, ...] | None = None  # the first fragment's, once applied
    mtu: int = 0
    poisoned: bool = False


def ipv4_fragment(frame: bytes, port_key: int) -> tuple[Fragment | None, str | None]:
    """(the fragment, None) for an IPv4 fragment, (None, "fragment_tiny") for a tiny one,
    (None, None) for anything else, including frames too broken to say (the parser's to
    refuse)."""
    size = len(frame)
    if size < 14:
        return None, None
    eth_type = int.from_bytes(frame[12:14], "big")
    offset = 14
    if eth_type == _ETH_TYPE_VLAN:
        if size < 18:
            return None, None
        eth_type = int.from_bytes(frame[16:18], "big")
        offset = 18
    if eth_type != _ETH_TYPE_IPV4 or size - offset < 20:
        return None, None
    version_ihl, total_length, identification, flags_fragment, protocol, src, dst = _IPV4(
        frame, offset
    )
    if not flags_fragment & 0x3FFF:
        return None, None
    header_length = (version_ihl & 0x0F) * 4
    if (
        version_ihl >> 4 != 4
        or header_length < 20
        or not header_length <= total_length <= size - offset
    ):
        return None, None
    payload = total_length - header_length
    start = (flags_fragment & 0x1FFF) * 8
    more = bool(flags_fragment & 0x2000)
    if more and (payload < 8 or payload % 8):
        return None, "fragment_tiny"
    if start == 0:
        needed = _L4_HEADER_BYTES.get(protocol, 0)
        if payload < needed:
            return None, "fragment_tiny"
        if protocol == _IP_PROTO_TCP:
            data_offset = (frame[offset + header_length + 12] >> 4) * 4
            if data_offset > payload:
                return None, "fragment_tiny"
    key = (port_key, src, dst, protocol, identification)
    return Fragment(key, start, start + payload, more), None


def later_fragment_actions(actions: tuple[Action, ...]) -> tuple[Action, ...]:
    """A first fragment's actions as they apply to its later fragments (no L4 rewrites)."""
    return tuple(
        action
        for action in actions
        if not (isinstance(action, SetField) and action.field in _L4_FIELDS)
    )


class FragmentTracker:
    """The datagrams whose first fragment was seen, and what their later fragments get."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY, timeout: float = DEFAULT_TIMEOUT):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity: expected an int >= 1, got {capacity!r}")
        if not timeout > 0:
            raise ValueError(f"timeout: expected a number > 0, got {timeout!r}")
        self.capacity = capacity
        self.timeout = timeout
        self._datagrams: OrderedDict[FragmentKey, _Datagram] = OrderedDict()
        self.evictions = 0
        self.forwarded = 0  # later fragments given their first fragment's actions

    def __len__(self) -> int:
        return len(self._datagrams)

    def first(self, fragment: Fragment, now: float) -> str | None:
        """A first fragment arrives: None to go on (simulate it, then `record`), or the
        drop reason."""
        self._expire(now)
        datagram = self._datagrams.get(fragment.key)
        if datagram is not None:
            return self._add(fragment.key, datagram, fragment)
        while len(self._datagrams) >= self.capacity:
            self._datagrams.popitem(last=False)
            self.evictions += 1
        datagram = self._datagrams[fragment.key] = _Datagram(now)
        datagram.ranges.append((fragment.start, fragment.end))
        return None

    def record(self, key: FragmentKey, actions: tuple[Action, ...], mtu: int = 0) -> None:
        """The actions applied to the first fragment of `key` (its flow's MTU, 0: none)."""
        datagram = self._datagrams.get(key)
        if datagram is not None and datagram.actions is None:
            datagram.actions = later_fragment_actions(actions)
            datagram.mtu = mtu

    def later(
        self, fragment: Fragment, now: float
    ) -> tuple[tuple[Action, ...] | None, int, str | None]:
        """A later fragment arrives: (its actions, the flow MTU, None), or (None, 0, the drop
        reason)."""
        self._expire(now)
        datagram = self._datagrams.get(fragment.key)
        if datagram is None or datagram.actions is None:
            return None, 0, "fragment_no_first"
        reason = self._add(fragment.key, datagram, fragment)
        if reason is not None:
            return None, 0, reason
        self.forwarded += 1
        return datagram.actions, datagram.mtu, None

    def _add(self, key: FragmentKey, datagram: _Datagram, fragment: Fragment) -> str | None:
        if datagram.poisoned:
            return "fragment_overlap"
        start, end = fragment.start, fragment.end
        for seen_start, seen_end in datagram.ranges:
            if start < seen_end and seen_start < end:
                if (seen_start, seen_end) == (start, end):
                    return "fragment_duplicate"
                datagram.poisoned = True
                return "fragment_overlap"
        if not fragment.more:
            if datagram.total >= 0:  # a second last fragment, ending elsewhere
                datagram.poisoned = True
                return "fragment_overlap"
            datagram.total = end
        if datagram.total >= 0 and (
            end > datagram.total or any(e > datagram.total for _, e in datagram.ranges)
        ):
            datagram.poisoned = True
            return "fragment_overlap"
        datagram.ranges.append((start, end))
        if datagram.total >= 0 and sum(e - s for s, e in datagram.ranges) == datagram.total:
            del self._datagrams[key]  # every byte seen: the datagram is through
        return None

    def _expire(self, now: float) -> None:
        datagrams = self._datagrams
        while datagrams:
            key, oldest = next(iter(datagrams.items()))
            if now - oldest.created < self.timeout:
                return
            del datagrams[key]
