"""The flow-state side of one simulation: what the chains asked of conntrack and NAT while a
packet was walked, applied to the tables only if the packet is let through.

Owns `FlowStateTransaction` (the API the simulation's flow-state hook is built on),
`NatAction`, `NatOutcome` and the flow tags that name conntrack entries, NAT bindings and
NAT reply keys, each kind spelled by one formatter (a cached flow carries them; when an
entry expires the agent invalidates the flows tagged with it). Does not own the tables, the hook protocol (`sim/flowstate_hook.py`) or pushing.
Pure: no I/O, no clock; imports only `hivenet.packets`.

Life of a transaction (one per simulated packet, on the ingress host):
1. the hook calls `is_return_flow` for match_forward/return_flow conditions: a read-only
   classification, remembered; and `nat` for dnat/snat/rev_dnat/rev_snat rules: new
   bindings go into the NAT table at once (so a later device of the same walk, or a
   hairpin, finds them; SNAT must reserve its port anyway);
2. the simulation ends: if the packet is dropped, `rollback()` removes the bindings it made
   (freeing their ports); otherwise `commit(now)` opens/advances the connections;
3. the agent then pushes what the tables report `due_for_push` to the peers, before it
   forwards the packet.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from hivenet.flowstate.conntrack import (
    TCP_ACK,
    TCP_SYN,
    Classification,
    ConntrackRecord,
    ConntrackTable,
    Verdict,
)
from hivenet.flowstate.keys import FlowKey, is_icmp_error, key_of_match, key_text
from hivenet.flowstate.nat import NatBinding, NatKind, NatTable, covers
from hivenet.flowstate.portblocks import NatRange
from hivenet.packets.flowmatch import IP_PROTO_TCP, FlowMatch


class NatAction(enum.Enum):
    """The NAT rule actions; values equal `model.RuleAction`'s."""

    DNAT = "dnat"
    SNAT = "snat"
    REV_DNAT = "rev_dnat"
    REV_SNAT = "rev_snat"


_KIND_OF_ACTION = {
    NatAction.DNAT: NatKind.DNAT,
    NatAction.SNAT: NatKind.SNAT,
    NatAction.REV_DNAT: NatKind.DNAT,
    NatAction.REV_SNAT: NatKind.SNAT,
}


# The connection tags, one constructor per kind (`conntrack_tag`, `nat_tag`, `nat_key_tag`,
# `nat_reply_tag` and `ConnectionTags` all go through `_tag`).
#
# One NAT tag family: the NAT tag of (zone, kind, key) names the NAT state a packet with that
# key sees in (zone, kind): the binding whose original key it is (the forward lookup) and the
# binding whose translated key is its reverse (the reply lookup), present or not. A binding
# appearing, changing or going invalidates the tag of its original key (`nat_tag`) and the
# tag of its translated key's reverse (`nat_reply_tag`). So a forward flow that missed the
# reply lookup and then made or used a binding for the same key carries one NAT tag, not two.
#
# A connection tag is one int (issue 16): its key, its zone's hash and its kind side by side,
#   key (108 bits for IPv4, 304 for IPv6) | hash(zone) (64) | kind (2)
# 48 bytes for an IPv4 key whatever the zone, where the text `conntrack:<zone>:<key>` took
# ~95 with the benchmark's 1-2 character zones and ~130 with the API's UUIDs, and made in
# ~0.2 us instead of ~1.5 (the key's text). Every other flow tag is a str (`chain:<id>`...),
# so the flow table tells a connection's tags by their type (`flows.table.is_connection_tag`).
# The zone is its str hash (kept in the str object; salted per process, and tags never leave
# their process): two zones whose hashes collide (~n^2 / 2^65 for n zones) would share the
# tags of equal keys, which only invalidates more, never less. `tag_text` spells a tag for
# people (traces), the zone found among the ids it is given.
_CONNTRACK_KIND = 1
_NAT_KINDS = {NatKind.SNAT: 2, NatKind.DNAT: 3}
_KIND_TEXTS = {_CONNTRACK_KIND: "conntrack", 2: "nat:snat", 3: "nat:dnat"}
_ZONE_MASK = (1 << 64) - 1


def _tag(zone: str, kind: int, key: int) -> int:
    return ((key << 64) | (hash(zone) & _ZONE_MASK)) << 2 | kind


CONNTRACK_TAG_KIND = _CONNTRACK_KIND
# The `NatKind` a NAT tag's kind code names (`split_tag`).
NAT_TAG_KINDS = {code: kind for kind, code in _NAT_KINDS.items()}


def zone_hash(zone: str) -> int:
    """The part of a connection tag that names `zone` (its str hash, 64 bits)."""
    return hash(zone) & _ZONE_MASK


# A connection tag's layout (see above), for readers that split tags in a loop.
TAG_KIND_MASK, TAG_ZONE_SHIFT, TAG_ZONE_MASK, TAG_KEY_SHIFT = 3, 2, _ZONE_MASK, 66


def split_tag(tag: int) -> tuple[int, int, FlowKey]:
    """A connection tag's kind code (`CONNTRACK_TAG_KIND` or a key of `NAT_TAG_KINDS`), zone
    hash (`zone_hash`) and key: for a conntrack tag the lower of the connection's two
    directions, for a NAT tag the key of the packet whose NAT state it names."""
    return (
        tag & TAG_KIND_MASK,
        tag >> TAG_ZONE_SHIFT & TAG_ZONE_MASK,
        int.__new__(FlowKey, tag >> TAG_KEY_SHIFT),
    )


def _connection_key(key: FlowKey) -> FlowKey:
    """The direction of `key` a conntrack tag names: the lower of it and its reverse."""
    reverse = key.reversed()
    return key if key <= reverse else reverse


def conntrack_tag(zone: str, key: FlowKey) -> int:
    """The flow tag of the connection `key` belongs to: the same for both directions (the
    lower of `key` and its reverse is named), so a flow depends on one tag per connection
    and a flow cached before either side opened it is invalidated by that same tag."""
    return _tag(zone, _CONNTRACK_KIND, _connection_key(key))


def nat_key_tag(zone: str, kind: NatKind, key: FlowKey) -> int:
    """Tag of the NAT state a packet with `key` sees in (zone, kind): the binding with
    original key `key` and the binding with translated key `key.reversed()`, present or not
    (see above)."""
    return _tag(zone, _NAT_KINDS[kind], key)


def nat_tag(binding: NatBinding) -> int:
    """The flow tag of a NAT binding (named by its original key): `nat_key_tag` of it."""
    return _tag(binding.zone, _NAT_KINDS[binding.kind], binding.original)


def nat_reply_tag(zone: str, kind: NatKind, translated: FlowKey) -> int:
    """Tag of "the binding whose translated key is `translated`" (present or not):
    `nat_key_tag` of the reply's key, `translated.reversed()`. A flow that looked a reply up
    (hit or miss) carries it, so a binding with that translated key appearing or going
    invalidates the flow."""
    return _tag(zone, _NAT_KINDS[kind], translated.reversed())


def tag_text(tag: str | int, zones: Iterable[str] = ()) -> str:
    """A flow tag as text: a str tag is its own; a connection tag reads
    `conntrack:<zone>:<key>` or `nat:<zone>:<snat|dnat>:<key>`, its zone the one of `zones`
    whose hash it holds, else `#` and the hash in hex."""
    if isinstance(tag, str):
        return tag
    kind, hashed, key = split_tag(tag)
    zone = next((z for z in zones if zone_hash(z) == hashed), f"#{hashed:016x}")
    prefix, _, nat_kind = _KIND_TEXTS[kind].partition(":")
    middle = f"{zone}:{nat_kind}" if nat_kind else zone
    return f"{prefix}:{middle}:{key_text(key)}"


class ConnectionTags:
    """`conntrack_tag`, `nat_tag`, `nat_key_tag` and `nat_reply_tag` (the same constructors),
    each NAT tag made once: the two lookups of one key (forward and reply) hand out one int
    object instead of building it twice. Lives as long as one transaction or one installed
    message (keys are values: nothing here goes stale)."""

    __slots__ = ("_nat_tags",)

    def __init__(self) -> None:
        self._nat_tags: dict[tuple[str, NatKind, FlowKey], int] = {}

    def conntrack(self, zone: str, key: FlowKey) -> int:
        """`conntrack_tag(zone, key)`."""
        return _tag(zone, _CONNTRACK_KIND, _connection_key(key))

    def nat(self, binding: NatBinding) -> int:
        """`nat_tag(binding)`."""
        return self.nat_key(binding.zone, binding.kind, binding.original)

    def nat_key(self, zone: str, kind: NatKind, key: FlowKey) -> int:
        """`nat_key_tag(zone, kind, key)`."""
        spelled = (zone, kind, key)
        tag = self._nat_tags.get(spelled)
        if tag is None:
            tag = self._nat_tags[spelled] = _tag(zone, _NAT_KINDS[kind], key)
        return tag

    def nat_reply(self, zone: str, kind: NatKind, translated: FlowKey) -> int:
        """`nat_reply_tag(zone, kind, translated)`."""
        return self.nat_key(zone, kind, translated.reversed())


@dataclass(frozen=True, slots=True)
class NatOutcome:
    """What a NAT rule does to the packet: FlowMatch field -> new value (empty: nothing, e.g.
    a rev_snat on a packet no binding translated), the binding, and the flow tags."""

    rewrites: Mapping[str, int] = field(default_factory=dict)
    binding: NatBinding | None = None
    tags: frozenset[int] = frozenset()
    # False: the answer depends on more than the megaflow reads (a DNAT binding kept only
    # because the packet is no SYN: a SYN on the same 5-tuple would rebind).
    cacheable: bool = True


@dataclass(frozen=True, slots=True)
class TransactionResult:
    connections: tuple[ConntrackRecord, ...]
    nat_bindings: tuple[NatBinding, ...]
    tags: frozenset[int]


class FlowStateTransaction:
    """Conntrack classifications and NAT bindings of one simulated packet.

    `embedded`: for an ICMP error, the key of the datagram it quotes (the agent parses it
    from the frame: `keys.key_of_embedded`). `cacheable` turns False when a decision depended
    on something a megaflow keyed on the 5-tuple does not capture (TCP flags that could not
    open a connection, ICMP errors).
    """

    def __init__(
        self, conntrack: ConntrackTable, nat: NatTable, embedded: FlowKey | None = None
    ) -> None:
        self.conntrack = conntrack
        self.nat_table = nat
        self.embedded = embedded
        self._classified: list[tuple[Classification, int]] = []
        self._created: list[NatBinding] = []
        # The port allocator and its position before this packet (restored by a rollback).
        allocator = nat.allocator
        self._rewind = (allocator, allocator.mark()) if allocator is not None else None
        # Every binding this packet's translation used: a full table must not evict them to
        # make room for another binding of the same packet (its flow depends on all of them).
        self._bindings: list[NatBinding] = []
        self._tags: set[int] = set()
        self.cacheable = True
        self._finished = False
        # This packet's tags, each NAT tag made once (the hook and the commit share them).
        self.texts = ConnectionTags()

    @property
    def tags(self) -> frozenset[int]:
        return frozenset(self._tags)

    def _check_open(self) -> None:
        if self._finished:
            raise RuntimeError("flow-state transaction already committed or rolled back")

    def is_return_flow(self, zone: str, match: FlowMatch, now: float) -> bool:
        return self.classify(zone, match, now)[0].is_return

    def classify(
        self, zone: str, match: FlowMatch, now: float
    ) -> tuple[Classification, int | None]:
        """Classify `match` in `zone` (remembered for the commit, as `is_return_flow`) and
        the `conntrack_tag` of the classified key (None without one), so a caller that
        needs both asks the table once."""
        self._check_open()
        classification = self.conntrack.classify(zone, match, now, self.embedded)
        self._classified.append((classification, match.tcp_flags))
        verdict = classification.verdict
        if verdict is Verdict.INVALID and classification.depends_on_tcp_flags:
            self.cacheable = False
        if (verdict is Verdict.RELATED or verdict is Verdict.INVALID) and is_icmp_error(match):
            self.cacheable = False
        key = classification.key
        if key is None:
            return classification, None
        tag = self.texts.conntrack(zone, key)
        if verdict is not Verdict.INVALID:
            self._tags.add(tag)
        return classification, tag

    def nat(
        self,
        zone: str,
        action: NatAction,
        match: FlowMatch,
        targets: Sequence[NatRange],
        now: float,
        *,
        key: FlowKey | None = None,
    ) -> NatOutcome:
        """Apply a dnat/snat (find or create the binding) or rev_dnat/rev_snat (reverse
        lookup) rule. Raises `nat.NatError` subclasses (ports exhausted, bad targets).
        `key`: `key_of_match(match)` when the caller already has it (not derived again)."""
        self._check_open()
        if key is None:
            key = key_of_match(match)
        if key is None:
            return NatOutcome()
        kind = _KIND_OF_ACTION[action]
        if action in (NatAction.REV_DNAT, NatAction.REV_SNAT):
            if is_icmp_error(match) and self.embedded is not None:
                self.cacheable = False
                translation = self.nat_table.icmp_error_translation(
                    zone, kind, match, self.embedded, now
                )
                if translation is None:
                    return NatOutcome()
                tag = self.texts.nat(translation.binding)
                self._tags.add(tag)
                self._bindings.append(translation.binding)
                return NatOutcome(translation.outer_rewrites, translation.binding, frozenset({tag}))
            binding = self.nat_table.lookup_reply(zone, kind, key, now)
            if binding is None:
                return NatOutcome()
            tag = self.texts.nat(binding)
            self._tags.add(tag)
            self._bindings.append(binding)
            return NatOutcome(binding.reply_rewrites(), binding, frozenset({tag}))
        cacheable = True
        if action is NatAction.DNAT:
            opening = (
                match.ip_proto == IP_PROTO_TCP and match.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
            )
            binding, created = self.nat_table.dnat(
                zone, key, targets, now, opening=opening, keep=self._bindings
            )
            if not created and match.ip_proto == IP_PROTO_TCP and not covers(targets, binding):
                # Kept only because this is no SYN: a SYN on the same 5-tuple would rebind,
                # so the decision read the TCP flags, which the megaflow does not.
                self.cacheable = cacheable = False
        else:
            binding, created = self.nat_table.snat(zone, key, targets, now, keep=self._bindings)
        if created:
            self._created.append(binding)
        self._bindings.append(binding)
        tag = self.texts.nat(binding)
        self._tags.add(tag)
        return NatOutcome(binding.forward_rewrites(), binding, frozenset({tag}), cacheable)

    def commit(self, now: float, peers: frozenset[str] = frozenset()) -> TransactionResult:
        """The packet was let through: open/advance its connections, and remember `peers`
        (`peers.push_targets`) on every entry it touched so refreshes go to them too."""
        self._check_open()
        self._finished = True
        connections = []
        # A full table must not evict a connection this packet depends on to open another.
        keep = [
            (classification.zone, classification.key)
            for classification, _ in self._classified
            if classification.key is not None
        ]
        for classification, tcp_flags in self._classified:
            record = self.conntrack.commit(classification, tcp_flags, now, keep)
            if record is not None:
                connections.append(record)
                if peers:
                    self.conntrack.set_peers(record.zone, record.key, peers)
        if peers:
            for binding in self._created:
                self.nat_table.set_peers(binding.zone, binding.kind, binding.original, peers)
        return TransactionResult(tuple(connections), tuple(self._created), frozenset(self._tags))

    def rollback(self) -> None:
        """The packet was dropped (or its replay declined): forget the classifications,
        remove the bindings made and let the port allocator start where it did, as if the
        packet had not been."""
        self._check_open()
        self._finished = True
        for binding in self._created:
            self.nat_table.remove(binding.zone, binding.kind, binding.original)
        if self._created and self._rewind is not None:
            allocator, mark = self._rewind
            allocator.rewind(mark)
        self._created.clear()
        self._classified.clear()
