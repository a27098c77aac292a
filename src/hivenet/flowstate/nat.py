"""NAT bindings: which connection a device ("zone": usually a router) translated to what, and
the reverse lookups that translate the replies and the ICMP errors about it.

A binding maps (zone, kind, original key) -> translated key. SNAT rewrites the source side
(address and port, or ICMP echo id), DNAT the destination side. Each binding is indexed by
its original key and by its translated key, so it can be found from either side: a forward
packet before translation (`lookup_original`), after it (`lookup_translated`, hairpin), and a
reply (`lookup_reply`: the reply's key reversed is the translated key).

Owns `NatTable`, `NatBinding`, `NatRecord`, the ICMP error translation and the NAT idle
timeouts. SNAT ports come from a `PortBlockAllocator` (`portblocks.py`); leasing blocks
through the store is the agent's job. Does not own connection tracking (`conntrack.py`) or
the wire format. Pure: no I/O, no clock; imports only `hivenet.packets`.

Idle timeouts (seconds), the NAT behaviour RFCs' recommendations rather than conntrack's
(a NAT binding holds a scarce port): TCP 7440 (RFC 5382, 2 h 4 min for established
connections), UDP 300 (RFC 4787 REQ-5: at least 2 min, 5 min recommended), ICMP 60
(RFC 5508 REQ-1), any other protocol 600. A caller that tracks the connection (the flow-state
transaction) may pass its own timeout to `touch`.
"""

from __future__ import annotations

import enum
import zlib
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, cast

from hivenet.flowstate.keys import ICMP_PROTOCOLS, FlowKey, PackedKeys, uses_echo_id
from hivenet.flowstate.portblocks import (
    AllocatedPort,
    Destination,
    NatRange,
    PortBlockAllocator,
)
from hivenet.flowstate.schedule import (
    TABLE_FLAG,
    TRACKED_SLOTS,
    EntryOrder,
    EntryScheduler,
    RefreshPolicy,
    TrackedEntry,
)
from hivenet.packets.flowmatch import IP_PROTO_TCP, IP_PROTO_UDP, FlowMatch


class NatKind(enum.IntEnum):
    """Values are part of the wire format: never renumber."""

    SNAT = 1
    DNAT = 2


class NatError(Exception):
    """Base of the NAT table's errors."""


class NatPortsExhausted(NatError):
    """No free (address, port) in the blocks this host holds: lease another block
    (`PortBlockAllocator.blocks_to_try`) and retry."""

    def __init__(self, zone: str, targets: Sequence[NatRange], destination: Destination) -> None:
        super().__init__(
            f"SNAT in zone {zone!r}: no free port in the held blocks of {list(targets)} "
            f"for destination {destination}"
        )
        self.zone = zone
        self.targets = tuple(targets)
        self.destination = destination


class NatTargetsExhausted(NatError):
    """DNAT: every target address/port would collide with an existing binding."""


@dataclass(frozen=True, slots=True)
class NatTimeouts:
    tcp: float = 7440.0
    udp: float = 300.0
    icmp: float = 60.0
    other: float = 600.0

    def __post_init__(self) -> None:
        for name in ("tcp", "udp", "icmp", "other"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0 < value <= 0xFFFFFFFF / 1000:
                raise ValueError(
                    f"NatTimeouts.{name} must be 0 < seconds <= 49 days, got {value!r}"
                )

    def timeout_for(self, ip_proto: int) -> float:
        if ip_proto == IP_PROTO_TCP:
            return self.tcp
        if ip_proto == IP_PROTO_UDP:
            return self.udp
        if ip_proto in ICMP_PROTOCOLS:
            return self.icmp
        return self.other


DEFAULT_NAT_TIMEOUTS = NatTimeouts()


def key_rewrites(before: FlowKey, after: FlowKey) -> dict[str, int]:
    """FlowMatch fields (all settable) that turn a packet keyed `before` into one keyed
    `after`. ICMP echo ids travel in both port slots of a key and map to `icmp_id`."""
    rewrites: dict[str, int] = {}
    if before.ip_src != after.ip_src:
        rewrites["ip_src"] = after.ip_src
    if before.ip_dst != after.ip_dst:
        rewrites["ip_dst"] = after.ip_dst
    if uses_echo_id(after):
        if before.tp_src != after.tp_src:
            rewrites["icmp_id"] = after.tp_src
    else:
        if before.tp_src != after.tp_src:
            rewrites["tp_src"] = after.tp_src
        if before.tp_dst != after.tp_dst:
            rewrites["tp_dst"] = after.tp_dst
    return rewrites


class _Index(NamedTuple):
    zone: str
    kind: NatKind


# One _Index object per (zone, kind) in use: every binding of a zone holds the same one (one
# slot for both fields). Values only, so nothing here can go stale; emptied when full
# (bindings made before keep theirs, equal to the new one).
_indexes: dict[_Index, _Index] = {}
_INDEXES_MAX = 1 << 16


def _plain_index(zone: str, kind: NatKind) -> _Index:
    """A plain tuple, which finds the `_Index` it equals in a dict without building one
    (~0.3 us a NamedTuple): for lookups only, never stored."""
    return cast(_Index, (zone, kind))


def _index_of(zone: str, kind: NatKind) -> _Index:
    held = _indexes.get(_plain_index(zone, kind))
    if held is None:
        if len(_indexes) >= _INDEXES_MAX:
            _indexes.clear()
        held = _Index(zone, kind)
        _indexes[held] = held
    return held


class NatBinding:
    """(zone, kind, original key) -> translated key. A value: immutable, compared and hashed
    by its four fields. Not a dataclass so that the table's entry can be one (`_NatEntry`: a
    binding with its timers, one object per connection instead of an entry holding a binding);
    a binding and an entry with the same fields are equal and hash alike.

    The keys are held as plain ints (`original_packed`, `translated_packed`; the table's
    dicts are keyed by the same objects): a FlowKey is an int subclass, so tracked by the
    cyclic GC, 64 bytes where a plain int of the same value takes 48. `original` and
    `translated` make the FlowKeys when they are asked for. The zone and the kind are one
    slot, `index`: an (zone, kind) pair all bindings of the zone share (8 bytes less a
    binding, which puts a table entry in pymalloc's 96-byte class instead of 112)."""

    __slots__ = ("index", "original_packed", "translated_packed")
    __match_args__ = ("zone", "kind", "original", "translated")

    if TYPE_CHECKING:  # read-only for the type checker too (a table entry is writable)

        @property
        def index(self) -> _Index: ...
        @property
        def original_packed(self) -> int: ...
        @property
        def translated_packed(self) -> int: ...

    @property
    def zone(self) -> str:
        return self.index[0]

    @property
    def kind(self) -> NatKind:
        return self.index[1]

    @property
    def original(self) -> FlowKey:
        return int.__new__(FlowKey, self.original_packed)

    @property
    def translated(self) -> FlowKey:
        return int.__new__(FlowKey, self.translated_packed)

    def __init__(self, zone: str, kind: NatKind, original: FlowKey, translated: FlowKey) -> None:
        if not isinstance(zone, str) or not zone:
            raise ValueError(f"NatBinding.zone must be a non-empty device id, got {zone!r}")
        if type(kind) is not NatKind:  # an int equal to one would share the zone's _Index
            raise ValueError(f"NatBinding.kind must be a NatKind, got {kind!r}")
        if not isinstance(original, FlowKey) or not isinstance(translated, FlowKey):
            raise ValueError("NatBinding.original and .translated must be FlowKeys")
        if (original.ip_version, original.ip_proto) != (translated.ip_version, translated.ip_proto):
            raise ValueError(
                f"NatBinding.translated {translated} changes IP version or protocol of {original}"
            )
        echo = uses_echo_id(original)
        if kind is NatKind.SNAT:
            kept = (original.ip_dst, original.tp_dst if not echo else None)
            now = (translated.ip_dst, translated.tp_dst if not echo else None)
            side = "destination"
        else:
            kept = (original.ip_src, original.tp_src)
            now = (translated.ip_src, translated.tp_src)
            side = "source"
        if kept != now:
            raise ValueError(
                f"NatBinding {kind.name} must keep the {side}: {original} -> {translated}"
            )
        if echo and translated.tp_src != translated.tp_dst:
            raise ValueError(
                f"NatBinding.translated {translated}: an ICMP echo key carries its id twice"
            )
        set_field = object.__setattr__
        set_field(self, "index", _index_of(zone, kind))
        set_field(self, "original_packed", int(original))
        set_field(self, "translated_packed", int(translated))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"NatBinding is immutable: cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"NatBinding is immutable: cannot delete {name!r}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NatBinding):
            return NotImplemented
        return (
            self.original_packed == other.original_packed
            and self.translated_packed == other.translated_packed
            and self.index == other.index
        )

    def __hash__(self) -> int:
        return hash((self.index, self.original_packed, self.translated_packed))

    def __repr__(self) -> str:
        return (
            f"NatBinding(zone={self.zone!r}, kind={self.kind!r}, original={self.original!r}, "
            f"translated={self.translated!r})"
        )

    def __reduce__(self) -> tuple[type[NatBinding], tuple[str, NatKind, FlowKey, FlowKey]]:
        # A binding, never an entry (its timers are the table's): pickled and copied by value.
        return NatBinding, (self.zone, self.kind, self.original, self.translated)

    def forward_rewrites(self) -> dict[str, int]:
        """Rewrites for a packet of the original direction (original -> translated)."""
        return key_rewrites(self.original, self.translated)

    def reply_rewrites(self) -> dict[str, int]:
        """Rewrites for a reply (translated reversed -> original reversed)."""
        return key_rewrites(self.translated.reversed(), self.original.reversed())


_SET_BINDING_FIELDS = tuple(
    vars(NatBinding)[name].__set__ for name in ("index", "original_packed", "translated_packed")
)


def unchecked_binding(
    zone: str, kind: NatKind, original: FlowKey, translated: FlowKey
) -> NatBinding:
    """The binding `NatBinding(zone, kind, original, translated)` without its checks, for a
    caller that checked the same rules on the values itself (the wire decoder's fast path):
    its slots set through their descriptors (`packets/slots.py` does this for records whose
    fields are their slots; a binding's keys are held packed, so not here)."""
    binding = object.__new__(NatBinding)
    set_index, set_original, set_translated = _SET_BINDING_FIELDS
    set_index(binding, _index_of(zone, kind))
    set_original(binding, int(original))
    set_translated(binding, int(translated))
    return binding


@dataclass(frozen=True, slots=True)
class NatRecord:
    """A binding with its expiry, as exchanged with peers and the persistence file."""

    binding: NatBinding
    expires_at: float


@dataclass(frozen=True, slots=True)
class IcmpErrorTranslation:
    """How to translate an ICMP error about a NATed connection.

    `outer_rewrites`: FlowMatch fields of the error packet itself. `inner_rewrites`: fields of
    the datagram the error quotes, named as FlowMatch fields of that datagram (ip_src, ip_dst,
    tp_src, tp_dst, icmp_id); the datapath rewrites them inside the ICMP payload (and fixes
    the quoted IP header checksum and the ICMP checksum).
    """

    binding: NatBinding
    outer_rewrites: dict[str, int]
    inner_rewrites: dict[str, int]


class _NatEntry(NatBinding, TrackedEntry):
    """A binding in the table: the binding itself plus its timers (no separate binding
    object: ~60 bytes less per binding). The table hands it out wherever a binding is asked
    for; its binding fields never change (only the table's timing fields do)."""

    __slots__ = TRACKED_SLOTS

    # The table writes its timing fields (the binding's are set once, below) at C speed: an
    # override would cost a Python call per write. mypy types the slot wrapper as bound.
    __setattr__ = object.__setattr__  # type: ignore[assignment]

    def __init__(
        self,
        index: _Index,
        original_packed: int,
        translated_packed: int,
        expires_at: float,
        timeout: float,
    ) -> None:
        # Not validated again: the table makes entries from a NatBinding or from keys it
        # derived by the rules NatBinding checks; the keys come packed (`PackedKeys`), the
        # index shared (`_index_of`).
        set_field = object.__setattr__
        set_field(self, "index", index)
        set_field(self, "original_packed", original_packed)
        set_field(self, "translated_packed", translated_packed)
        TrackedEntry.__init__(self, expires_at, timeout)

    @property
    def owns_port(self) -> bool:
        """This host allocated the translated port (SNAT) and must release it; the port and
        its destination are read back from the binding instead of kept twice (a bit of
        `flags`, not a slot of its own)."""
        return bool(self.flags & TABLE_FLAG)

    @owns_port.setter
    def owns_port(self, owns: bool) -> None:
        self.flags = self.flags | TABLE_FLAG if owns else self.flags & ~TABLE_FLAG


def snat_destination(key: FlowKey) -> Destination:
    """Where a SNAT binding of forward key `key` goes: ports are unique per destination (ICMP
    echo: per address, the id travels in both port slots)."""
    echo = uses_echo_id(key)
    return Destination(key.ip_version, key.ip_proto, key.ip_dst, 0 if echo else key.tp_dst)


def _stable_hash(key: FlowKey) -> int:
    return zlib.crc32(repr(tuple(key)).encode())


class NatTable:
    """NAT bindings with idle expiry and the push/refresh queue (see `schedule.py`).

    Bounded (`max_entries`, None: unbounded), as `ConntrackTable` is: a new binding in a
    full table first evicts the binding never used since it was made (no second packet
    either way, no reply lookup, no refresh from a peer) that was made longest ago, and
    only when there is none the binding closest to its idle timeout (the longest idle).
    A NAT table cannot see TCP states, so "used again" stands for "half-open": a flood of
    one-packet connections only replaces its own bindings. Bindings in `keep` (the ones the
    caller's packet depends on) are never evicted. An evicted binding frees its port; it is
    counted (`evicted_unused`, `evicted_other`) and handed out once by `take_evicted()`.

    An original and a translated key are unique: a new binding (made here or merged from a
    peer) whose original or translated key another binding holds (live, or expired and not
    yet swept) replaces that one, and so does a SYN's DNAT rebinding (`dnat(opening=True)`)
    the binding it drops, even when no new binding follows. A replaced binding is handed out
    once by `take_replaced()` (not counted as evicted). The caller removes its flows as it
    does an expired binding's: a forward flow depends on its binding through the binding's
    `nat_tag` only (`sim.stateful`), which the new binding's tags need not name, and the new
    binding may be rolled back."""

    def __init__(
        self,
        allocator: PortBlockAllocator | None = None,
        timeouts: NatTimeouts = DEFAULT_NAT_TIMEOUTS,
        refresh: RefreshPolicy | None = None,
        granularity: float = 1.0,
        max_entries: int | None = None,
        packed_keys: PackedKeys | None = None,
    ) -> None:
        if max_entries is not None and (
            isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1
        ):
            raise ValueError(f"max_entries must be an int >= 1 or None, got {max_entries!r}")
        # The plain ints entries hold their keys as (one PackedKeys for an agent's tables).
        self._packed = packed_keys if packed_keys is not None else PackedKeys()
        self.allocator = allocator
        self.timeouts = timeouts
        self.max_entries = max_entries
        # Keyed by the entries' packed keys (plain ints); looked up with FlowKeys (equal ints).
        self._by_original: dict[_Index, dict[int, _NatEntry]] = {}
        self._by_translated: dict[_Index, dict[int, _NatEntry]] = {}
        self._schedule = EntryScheduler(refresh or RefreshPolicy(), granularity)
        self._count = 0
        # Bindings not used since they were made, oldest first (a dict as an ordered set).
        self._unused = EntryOrder()
        self._evicted: list[NatRecord] = []
        self._replaced: list[NatRecord] = []
        self.evicted_unused = 0
        self.evicted_other = 0

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[NatRecord]:
        for entries in self._by_original.values():
            for entry in entries.values():
                yield NatRecord(entry, entry.expires_at)

    # --- lookups ------------------------------------------------------------------------------

    @staticmethod
    def _live(
        index: dict[_Index, dict[int, _NatEntry]],
        zone: str,
        kind: NatKind,
        key: FlowKey,
        now: float,
    ) -> _NatEntry | None:
        entries = index.get(_plain_index(zone, kind))
        if entries is None:
            return None
        entry = entries.get(key)
        if entry is None or entry.expires_at <= now:
            return None
        return entry

    def lookup_original(
        self, zone: str, kind: NatKind, key: FlowKey, now: float
    ) -> NatBinding | None:
        """The binding of a forward packet before translation."""
        entry = self._live(self._by_original, zone, kind, key, now)
        return entry if entry is not None else None

    def lookup_translated(
        self, zone: str, kind: NatKind, key: FlowKey, now: float
    ) -> NatBinding | None:
        """The binding whose translated key is `key` (a forward packet after translation)."""
        entry = self._live(self._by_translated, zone, kind, key, now)
        return entry if entry is not None else None

    def lookup_reply(
        self, zone: str, kind: NatKind, reply_key: FlowKey, now: float
    ) -> NatBinding | None:
        """The binding a reply packet (key `reply_key`) belongs to (which counts as a use
        for the eviction order: the connection was answered)."""
        entry = self._live(self._by_translated, zone, kind, reply_key.reversed(), now)
        if entry is None:
            return None
        self._unused.discard(entry)
        return entry

    def reverse(
        self, zone: str, kind: NatKind, reply_key: FlowKey, now: float
    ) -> dict[str, int] | None:
        """Rewrites for rev_snat/rev_dnat on a reply keyed `reply_key`; None if untranslated."""
        binding = self.lookup_reply(zone, kind, reply_key, now)
        return binding.reply_rewrites() if binding is not None else None

    # --- creating bindings --------------------------------------------------------------------

    def dnat(
        self,
        zone: str,
        key: FlowKey,
        targets: Sequence[NatRange],
        now: float,
        *,
        opening: bool = False,
        keep: Collection[NatBinding] = (),
    ) -> tuple[NatBinding, bool]:
        """The DNAT binding of forward key `key`: the existing one (touched), or a new one to
        a target chosen by a stable hash of the key (every host picks the same for the same
        connection), skipping targets that would collide with another binding's reply.
        `opening`: the packet opens a connection (a TCP SYN); an existing binding to an
        address no target covers any more belongs to an earlier connection that reused the
        same ports, and is replaced, as conntrack reopens a closed connection. (For a VIP the
        one target is the member a new connection gets now: a member removed, offline or
        moved by Maglev since.) `keep`: bindings a full table must not evict to make room.
        Returns (binding, created)."""
        existing = self._live(self._by_original, zone, NatKind.DNAT, key, now)
        if existing is not None and opening and not covers(targets, existing):
            self._replace(existing)
            existing = None
        if existing is not None:
            self._touch_entry(existing, now, None)
            return existing, False
        _check_targets(targets, key)
        index = _Index(zone, NatKind.DNAT)
        taken = self._by_translated.get(index, {})
        digest = _stable_hash(key)
        echo = uses_echo_id(key)
        for target in _rotate(targets, digest):
            address_count = target.address_count
            port_count = 1 if target.keeps_port or echo else target.port_to - target.port_from + 1
            tries = min(address_count * port_count, 64)
            for attempt in range(tries):
                choice = (digest + attempt) % (address_count * port_count)
                ip = target.ip_from + choice // port_count
                port = (
                    key.tp_dst
                    if target.keeps_port or echo
                    else target.port_from + choice % port_count
                )
                translated = FlowKey.unchecked(
                    key.ip_version, key.ip_src, ip, key.ip_proto, key.tp_src, port
                )
                entry = taken.get(translated)
                if entry is None or entry.expires_at <= now:
                    made = self._insert(zone, NatKind.DNAT, key, translated, now, True, keep=keep)
                    return made, True
        raise NatTargetsExhausted(
            f"DNAT in zone {zone!r}: every target of {list(targets)} collides for {key}"
        )

    def snat(
        self,
        zone: str,
        key: FlowKey,
        targets: Sequence[NatRange],
        now: float,
        *,
        keep: Collection[NatBinding] = (),
    ) -> tuple[NatBinding, bool]:
        """The SNAT binding of forward key `key`: the existing one (touched), or a new one
        with an (address, port) from the allocator's blocks that no binding to the same
        destination uses. Raises NatPortsExhausted when the held blocks are full. `keep`:
        bindings a full table must not evict to make room."""
        existing = self._live(self._by_original, zone, NatKind.SNAT, key, now)
        if existing is not None:
            self._touch_entry(existing, now, None)
            return existing, False
        if self.allocator is None:
            raise NatError(
                f"SNAT in zone {zone!r} needs a PortBlockAllocator; this NatTable has none"
            )
        _check_targets(targets, key)
        echo = uses_echo_id(key)
        destination = snat_destination(key)
        translated_index = self._by_translated.get(_Index(zone, NatKind.SNAT), {})

        def make(ip: int, port: int) -> FlowKey:
            return FlowKey.unchecked(
                key.ip_version, ip, key.ip_dst, key.ip_proto, port, port if echo else key.tp_dst
            )

        def is_taken(ip: int, port: int) -> bool:
            entry = translated_index.get(make(ip, port))
            return entry is not None and entry.expires_at > now

        for target in targets:
            allocated = self.allocator.allocate(target, destination, key.tp_src, is_taken)
            if allocated is not None:
                translated = make(allocated.ip, allocated.port)
                entry = self._insert(zone, NatKind.SNAT, key, translated, now, True, keep=keep)
                entry.owns_port = True
                return entry, True
        raise NatPortsExhausted(zone, targets, destination)

    def _insert(
        self,
        zone: str,
        kind: NatKind,
        original: FlowKey,
        translated: FlowKey,
        now: float,
        changed: bool,
        expires_at: float | None = None,
        keep: Collection[NatBinding] = (),
    ) -> _NatEntry:
        """The new entry (binding) original -> translated, replacing any of the same original
        or translated key."""
        index = _index_of(zone, kind)
        for table, key in ((self._by_original, original), (self._by_translated, translated)):
            stale = table.get(index, {}).get(key)
            if stale is not None:  # an original and a translated key are unique: newer wins
                self._replace(stale)
        if self.max_entries is not None and self._count >= self.max_entries:
            self._make_room(keep)
        timeout = self.timeouts.timeout_for(original.ip_proto)
        deadline = now + timeout if expires_at is None else expires_at
        entry = _NatEntry(
            index, self._packed(original), self._packed(translated), deadline, timeout
        )
        self._by_original.setdefault(index, {})[entry.original_packed] = entry
        self._by_translated.setdefault(index, {})[entry.translated_packed] = entry
        self._count += 1
        self._unused.add(entry)
        self._schedule.set_expiry(entry, deadline, timeout)
        if changed:
            self._schedule.mark_changed(entry)
        return entry

    def _replace(self, entry: _NatEntry) -> None:
        """Drop `entry` for a newer binding (or a SYN's rebinding), handed out once by
        `take_replaced` so the caller removes its flows, whatever then becomes of the newer
        binding (a rolled-back transaction removes it without a trace)."""
        self._replaced.append(NatRecord(entry, entry.expires_at))
        self._drop(entry)

    def _make_room(self, keep: Collection[NatBinding]) -> None:
        """Evict until a new binding fits (see the class docstring for the order)."""
        assert self.max_entries is not None
        kept = {
            entry
            for binding in keep
            if (entry := self._by_original.get(binding.index, {}).get(binding.original_packed))
            is not None
        }
        while self._count >= self.max_entries:
            victim, unused = self._schedule.victim(self._unused, kept)
            if victim is None:
                return  # only kept bindings left: the table holds one more for a moment
            assert isinstance(victim, _NatEntry)
            self.evicted_unused += unused
            self.evicted_other += not unused
            self._evicted.append(NatRecord(victim, victim.expires_at))
            self._drop(victim)

    def take_evicted(self) -> list[NatRecord]:
        """The bindings evicted to make room since the last call (each handed out once)."""
        evicted, self._evicted = self._evicted, []
        return evicted

    def take_replaced(self) -> list[NatRecord]:
        """The bindings a newer binding with the same translated key replaced since the last
        call (each handed out once; see the class docstring)."""
        replaced, self._replaced = self._replaced, []
        return replaced

    @property
    def evicted(self) -> int:
        return self.evicted_unused + self.evicted_other

    # --- ICMP errors --------------------------------------------------------------------------

    def icmp_error_translation(
        self, zone: str, kind: NatKind, match: FlowMatch, embedded: FlowKey, now: float
    ) -> IcmpErrorTranslation | None:
        """Translation of an ICMP error (`match`) quoting a datagram keyed `embedded`.

        An error about a translated forward packet travels back towards the originator: its
        quote is put back to the original key and, when the error is addressed to the
        translated source (SNAT) or comes from the translated destination (DNAT), the outer
        address too. An error about a reply (travelling forwards) is translated the other
        way. Addresses of routers in between are left alone. None: not about this zone's
        bindings."""
        entry = self._live(self._by_translated, zone, kind, embedded, now)
        if entry is not None:
            original, translated = entry.original, entry.translated  # (each read makes a key)
            inner = key_rewrites(embedded, original)
            outer: dict[str, int] = {}
            if kind is NatKind.SNAT and match.ip_dst == translated.ip_src:
                outer["ip_dst"] = original.ip_src
            if kind is NatKind.DNAT and match.ip_src == translated.ip_dst:
                outer["ip_src"] = original.ip_dst
            return IcmpErrorTranslation(entry, outer, inner)
        entry = self._live(self._by_original, zone, kind, embedded.reversed(), now)
        if entry is not None:
            original, translated = entry.original, entry.translated
            inner = key_rewrites(embedded, translated.reversed())
            outer = {}
            if kind is NatKind.SNAT and match.ip_src == original.ip_src:
                outer["ip_src"] = translated.ip_src
            if kind is NatKind.DNAT and match.ip_dst == original.ip_dst:
                outer["ip_dst"] = translated.ip_dst
            return IcmpErrorTranslation(entry, outer, inner)
        return None

    # --- upkeep -------------------------------------------------------------------------------

    def touch(
        self, zone: str, kind: NatKind, key: FlowKey, now: float, timeout: float | None = None
    ) -> bool:
        """A live flow used the binding `key` names (original, translated or reply key):
        reset its idle timer (to `timeout` if given) and note it for refresh."""
        entry = (
            self._live(self._by_original, zone, kind, key, now)
            or self._live(self._by_translated, zone, kind, key, now)
            or self._live(self._by_translated, zone, kind, key.reversed(), now)
        )
        if entry is None:
            return False
        self._touch_entry(entry, now, timeout)
        return True

    def note_use(self, zone: str, kind: NatKind, key: int, now: float) -> bool:
        """`touch` for the agent's periodic scan of used flows, for the binding a flow's NAT
        tag names (`nat_key_tag`: the binding whose original key is `key`, else the one whose
        translated key is its reverse): the idle timer restarts to within
        `schedule.USE_SLACK` of the timeout (`EntryScheduler.note_use`). False when nothing
        changed (no such live binding, or within the slack). `key` may be a plain int (as the
        scan reads it from a tag): the tables' dicts are keyed so."""
        index = _plain_index(zone, kind)
        entries = self._by_original.get(index)
        entry = entries.get(key) if entries is not None else None
        if entry is None or entry.expires_at <= now:
            entries = self._by_translated.get(index)
            if entries is None:
                return False
            entry = entries.get(int.__new__(FlowKey, key).reversed())
            if entry is None or entry.expires_at <= now:
                return False
        self._unused.discard(entry)
        return self._schedule.note_use(entry, now)

    def zones(self) -> set[str]:
        """The zones holding bindings."""
        return {index.zone for index, entries in self._by_original.items() if entries}

    def _touch_entry(self, entry: _NatEntry, now: float, timeout: float | None) -> None:
        self._unused.discard(entry)
        timeout = entry.timeout if timeout is None else timeout
        self._schedule.set_expiry(entry, now + timeout, timeout)
        self._schedule.mark_used(entry)

    def merge(self, record: NatRecord, now: float) -> NatBinding | None:
        """Install a binding a peer pushed (or the persistence file held). An expired record
        removes the binding; a record for an existing original key replaces its translation
        only if it differs (the later push wins) and otherwise extends its expiry."""
        binding = record.binding
        zone, kind, original = binding.zone, binding.kind, binding.original
        if record.expires_at <= now:
            self.remove(zone, kind, original)
            return None
        entry = self._live(self._by_original, zone, kind, original, now)
        if entry is not None and entry == binding:
            self._unused.discard(entry)  # the peer refreshed it: it is in use there
            self._schedule.set_expiry(
                entry, max(entry.expires_at, record.expires_at), entry.timeout
            )
            if not entry.needs_push:
                self._schedule.mark_known_to_peers(entry, now)
            return binding
        entry = self._insert(
            zone, kind, original, binding.translated, now, False, expires_at=record.expires_at
        )
        self._schedule.mark_known_to_peers(entry, now)
        return entry

    def remove(self, zone: str, kind: NatKind, original: FlowKey) -> bool:
        entries = self._by_original.get(_Index(zone, kind))
        entry = entries.get(original) if entries is not None else None
        if entry is None:
            return False
        self._drop(entry)
        return True

    def _drop(self, entry: _NatEntry) -> None:
        binding = entry
        index = binding.index
        for table, key in (
            (self._by_original, binding.original_packed),
            (self._by_translated, binding.translated_packed),
        ):
            entries = table.get(index)
            if entries is not None and entries.get(key) is entry:
                del entries[key]
                if not entries:
                    del table[index]
        self._schedule.forget(entry)
        self._unused.discard(entry)
        self._count -= 1
        if entry.owns_port and self.allocator is not None:
            translated = binding.translated
            self.allocator.release(
                AllocatedPort(translated.ip_version, translated.ip_src, translated.tp_src),
                snat_destination(binding.original),
            )
            entry.owns_port = False

    def expire(self, now: float) -> list[NatRecord]:
        """Remove and return every binding idle past its timeout; their ports are freed."""
        expired = []
        for entry in self._schedule.pop_expired(now):
            assert isinstance(entry, _NatEntry)
            expired.append(NatRecord(entry, entry.expires_at))
            self._drop(entry)
        return expired

    def set_peers(self, zone: str, kind: NatKind, original: FlowKey, peers: frozenset[str]) -> None:
        entries = self._by_original.get(_Index(zone, kind))
        entry = entries.get(original) if entries is not None else None
        if entry is not None:
            entry.peers = peers

    def due_for_push(self, now: float) -> list[tuple[NatRecord, frozenset[str]]]:
        """Bindings to push at `now` (new, or used and due for refresh), with their peers."""
        out = []
        for entry in self._schedule.pop_due_for_push(now):
            assert isinstance(entry, _NatEntry)
            out.append((NatRecord(entry, entry.expires_at), entry.peers))
        return out

    def snapshot(self, now: float) -> list[NatRecord]:
        return [
            NatRecord(entry, entry.expires_at)
            for entries in self._by_original.values()
            for entry in entries.values()
            if entry.expires_at > now
        ]


def _check_targets(targets: Sequence[NatRange], key: FlowKey) -> None:
    if not targets:
        raise NatError(f"NAT of {key} needs at least one NatRange target")
    for target in targets:
        if target.ip_version != key.ip_version:
            raise NatError(
                f"NAT target {target} is IPv{target.ip_version}, the packet IPv{key.ip_version}"
            )


def _rotate(targets: Sequence[NatRange], digest: int) -> list[NatRange]:
    start = digest % len(targets)
    return [*targets[start:], *targets[:start]]


def covers(targets: Sequence[NatRange], binding: NatBinding) -> bool:
    """Whether one of `targets` could have made `binding`'s translated destination."""
    translated, original = binding.translated, binding.original
    for target in targets:
        if not target.contains_address(translated.ip_version, translated.ip_dst):
            continue
        if target.keeps_port or uses_echo_id(original):
            if translated.tp_dst == original.tp_dst:
                return True
        elif target.port_from <= translated.tp_dst <= target.port_to:
            return True
    return False
