"""Connection tracking: the table of connections each device ("zone": a port, port group or
router id) has seen, and the classification of a packet against it (new, forward, return,
related, invalid).

Owns `ConntrackTable`, the TCP state machine (as data: `TCP_TRANSITIONS`), the per-state idle
timeouts (`ConntrackTimeouts`) and the `ConntrackRecord` value the wire format and the agent
exchange. Does not own NAT (`nat.py`), the wire encoding (`wire.py`), deciding which hosts
need an entry (`peers.py`), or when a packet is allowed (the simulation's chains: a packet is
classified first and its state change committed only if the simulation lets it through).
Pure: no I/O, no clock (`now` is a float in seconds, passed in); imports only `hivenet.packets`.

Keys: an entry is stored under (zone, key of the direction that opened it). A packet whose
own key is stored is in the ORIGINAL direction; one whose reversed key is stored is a REPLY.
ICMP/ICMPv6 errors quoting a tracked connection's datagram are RELATED to it.

Timeouts (seconds, idle: every packet that moves or keeps a connection resets its clock),
Linux nf_conntrack's defaults (Documentation/networking/nf_conntrack-sysctl.rst):
TCP SYN_SENT 120, SYN_RECV 60, ESTABLISHED 432000 (5 days), FIN_WAIT 120, LAST_ACK 30,
TIME_WAIT 120, CLOSED 10; UDP 30 until a reply is seen, then 120 (udp_timeout_stream);
ICMP/ICMPv6 30; any other protocol 600 (generic_timeout).
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from hivenet.flowstate.keys import (
    ECHO_REPLY_TYPES,
    ECHO_REQUEST_TYPES,
    ICMP_PROTOCOLS,
    PORT_PROTOCOLS,
    FlowKey,
    PackedKeys,
    is_echo,
    is_icmp_error,
    key_of_match,
    proto_of,
)
from hivenet.flowstate.schedule import (
    TRACKED_SLOTS,
    EntryOrder,
    EntryScheduler,
    RefreshPolicy,
    TrackedEntry,
)
from hivenet.packets.flowmatch import IP_PROTO_TCP, IP_PROTO_UDP, FlowMatch

TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_ACK = 0x10


class ConnState(enum.IntEnum):
    """Connection states. TCP uses SYN_SENT..CLOSED; every other protocol UNREPLIED/REPLIED.
    The values are part of the wire format: never renumber."""

    SYN_SENT = 1
    SYN_RECV = 2
    ESTABLISHED = 3
    FIN_WAIT_ORIGINAL = 4  # the originator sent the first FIN
    FIN_WAIT_REPLY = 5  # the responder sent the first FIN
    LAST_ACK = 6  # both sides sent FIN, waiting for the last ACK
    TIME_WAIT = 7
    CLOSED = 8  # reset
    UNREPLIED = 9
    REPLIED = 10


TCP_STATES = frozenset(ConnState) - {ConnState.UNREPLIED, ConnState.REPLIED}
# Connections no reply completed yet (a TCP handshake not finished, a datagram flow never
# answered): what a full table evicts first (see `ConntrackTable`).
HALF_OPEN_STATES = frozenset({ConnState.SYN_SENT, ConnState.SYN_RECV, ConnState.UNREPLIED})


class Direction(enum.IntEnum):
    ORIGINAL = 0  # same direction as the packet that opened the connection
    REPLY = 1


class TcpEvent(enum.IntEnum):
    """What a TCP segment means to the state machine, from its flags (`tcp_event`).
    (An IntEnum so the transition table's tuple keys hash at C speed.)"""

    SYN = 1
    SYN_ACK = 2
    FIN = 3
    ACK = 4
    RST = 5
    INVALID = 6  # no SYN/ACK/RST/FIN bit, or SYN together with FIN


def tcp_event(flags: int) -> TcpEvent:
    if flags & TCP_RST:
        return TcpEvent.RST
    if flags & TCP_SYN:
        if flags & TCP_FIN:
            return TcpEvent.INVALID
        return TcpEvent.SYN_ACK if flags & TCP_ACK else TcpEvent.SYN
    if flags & TCP_FIN:
        return TcpEvent.FIN
    if flags & TCP_ACK:
        return TcpEvent.ACK
    return TcpEvent.INVALID


_O, _R = Direction.ORIGINAL, Direction.REPLY
_S = ConnState

# The TCP state machine. Invariants:
# - Only a SYN (without ACK) in the original direction opens a connection (the `None` row):
#   a lone mid-stream segment, a SYN-ACK, a FIN or a RST never creates state.
# - A RST in either direction closes the connection from every state.
# - A (state, direction, event) absent from the table leaves the state unchanged: data,
#   retransmissions and window updates belong to the connection but move nothing.
# - A new SYN from the originator reopens a connection in TIME_WAIT or CLOSED (port reuse).
# - LAST_ACK ends with an ACK from either side, as in Linux (which side is not tracked).
TCP_TRANSITIONS: Mapping[tuple[ConnState | None, Direction, TcpEvent], ConnState] = (
    MappingProxyType(
        {
            (None, _O, TcpEvent.SYN): _S.SYN_SENT,
            (_S.SYN_SENT, _R, TcpEvent.SYN_ACK): _S.SYN_RECV,
            (_S.SYN_SENT, _R, TcpEvent.SYN): _S.SYN_RECV,  # simultaneous open
            (_S.SYN_RECV, _O, TcpEvent.ACK): _S.ESTABLISHED,
            (_S.SYN_RECV, _O, TcpEvent.FIN): _S.FIN_WAIT_ORIGINAL,
            (_S.SYN_RECV, _R, TcpEvent.FIN): _S.FIN_WAIT_REPLY,
            (_S.ESTABLISHED, _O, TcpEvent.FIN): _S.FIN_WAIT_ORIGINAL,
            (_S.ESTABLISHED, _R, TcpEvent.FIN): _S.FIN_WAIT_REPLY,
            (_S.FIN_WAIT_ORIGINAL, _R, TcpEvent.FIN): _S.LAST_ACK,
            (_S.FIN_WAIT_REPLY, _O, TcpEvent.FIN): _S.LAST_ACK,
            (_S.LAST_ACK, _O, TcpEvent.ACK): _S.TIME_WAIT,
            (_S.LAST_ACK, _R, TcpEvent.ACK): _S.TIME_WAIT,
            (_S.TIME_WAIT, _O, TcpEvent.SYN): _S.SYN_SENT,
            (_S.CLOSED, _O, TcpEvent.SYN): _S.SYN_SENT,
        }
        | {
            (state, direction, TcpEvent.RST): _S.CLOSED
            for state in TCP_STATES
            for direction in Direction
        }
    )
)

# Every other protocol: the first packet opens UNREPLIED, the first reply makes it REPLIED.
DATAGRAM_TRANSITIONS: Mapping[tuple[ConnState | None, Direction], ConnState] = MappingProxyType(
    {
        (None, _O): _S.UNREPLIED,
        (_S.UNREPLIED, _R): _S.REPLIED,
    }
)

# Merging a peer's copy of an entry keeps the state furthest along the connection's life, so
# reordered pushes never move a connection backwards. Reopening (a SYN_SENT over TIME_WAIT or
# CLOSED) and the two half-closes (which together make LAST_ACK) are handled in `merge`.
STATE_PROGRESS: Mapping[ConnState, int] = MappingProxyType(
    {
        _S.SYN_SENT: 1,
        _S.SYN_RECV: 2,
        _S.ESTABLISHED: 3,
        _S.FIN_WAIT_ORIGINAL: 4,
        _S.FIN_WAIT_REPLY: 4,
        _S.LAST_ACK: 5,
        _S.TIME_WAIT: 6,
        _S.CLOSED: 7,
        _S.UNREPLIED: 1,
        _S.REPLIED: 2,
    }
)


@dataclass(frozen=True, slots=True)
class ConntrackTimeouts:
    """Idle timeouts in seconds (defaults: Linux nf_conntrack, see the module docstring)."""

    tcp_syn_sent: float = 120.0
    tcp_syn_recv: float = 60.0
    tcp_established: float = 432_000.0
    tcp_fin_wait: float = 120.0
    tcp_last_ack: float = 30.0
    tcp_time_wait: float = 120.0
    tcp_closed: float = 10.0
    udp_unreplied: float = 30.0
    udp_replied: float = 120.0
    icmp: float = 30.0
    other: float = 600.0

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0 < value <= 0xFFFFFFFF / 1000:
                raise ValueError(
                    f"ConntrackTimeouts.{name} must be a positive number of seconds "
                    f"(at most 49 days, the wire format's limit), got {value!r}"
                )

    def timeout_for(self, ip_proto: int, state: ConnState) -> float:
        if ip_proto == IP_PROTO_TCP:
            return {
                _S.SYN_SENT: self.tcp_syn_sent,
                _S.SYN_RECV: self.tcp_syn_recv,
                _S.ESTABLISHED: self.tcp_established,
                _S.FIN_WAIT_ORIGINAL: self.tcp_fin_wait,
                _S.FIN_WAIT_REPLY: self.tcp_fin_wait,
                _S.LAST_ACK: self.tcp_last_ack,
                _S.TIME_WAIT: self.tcp_time_wait,
                _S.CLOSED: self.tcp_closed,
            }.get(state, self.tcp_closed)
        if ip_proto == IP_PROTO_UDP:
            return self.udp_replied if state is _S.REPLIED else self.udp_unreplied
        if ip_proto in ICMP_PROTOCOLS:
            return self.icmp
        return self.other


DEFAULT_TIMEOUTS = ConntrackTimeouts()


class Verdict(enum.Enum):
    NEW = "new"  # no entry; committing opens one
    FORWARD = "forward"  # an entry exists, packet in the original direction
    RETURN = "return"  # an entry exists, packet in the reply direction
    RELATED = "related"  # an ICMP error about a tracked connection
    INVALID = "invalid"  # cannot open a connection and belongs to none
    UNTRACKED = "untracked"  # no flow key: not IP, or a later fragment


@dataclass(frozen=True, slots=True)
class ConntrackRecord:
    """One connection as exchanged with peers and the persistence file."""

    zone: str
    key: FlowKey  # the original direction
    state: ConnState
    expires_at: float

    def __post_init__(self) -> None:
        if not isinstance(self.zone, str) or not self.zone:
            raise ValueError(
                f"ConntrackRecord.zone must be a non-empty device id, got {self.zone!r}"
            )
        if not isinstance(self.key, FlowKey):
            raise ValueError(f"ConntrackRecord.key must be a FlowKey, got {self.key!r}")
        is_tcp_state = self.state in TCP_STATES
        if is_tcp_state != (self.key.ip_proto == IP_PROTO_TCP):
            raise ValueError(
                f"ConntrackRecord.state {self.state.name} does not fit protocol {self.key.ip_proto}"
            )


@dataclass(frozen=True, slots=True)
class Classification:
    """What a packet is to the table, and what committing it would do.

    `key` is the connection's original-direction key (the packet's own key for NEW/INVALID).
    `event`/`next_state` describe the transition a commit applies (None: no state change).
    `depends_on_tcp_flags` says the verdict would differ for other TCP flags, so a cached
    flow for it must match tcp_flags too (or not be cached).
    """

    verdict: Verdict
    zone: str
    key: FlowKey | None
    direction: Direction = Direction.ORIGINAL
    state: ConnState | None = None
    next_state: ConnState | None = None
    depends_on_tcp_flags: bool = False

    @property
    def is_return(self) -> bool:
        return self.verdict is Verdict.RETURN or self.verdict is Verdict.RELATED

    @property
    def opens(self) -> bool:
        return self.verdict is Verdict.NEW


class _ConnEntry(TrackedEntry):
    """A connection in the table. Its key is held as a plain int (`packed`, also the zone
    dict's key): a FlowKey is an int subclass, so tracked by the cyclic GC, 64 bytes where
    a plain int of the same value takes 48. `key` makes the FlowKey when one is asked for."""

    __slots__ = (*TRACKED_SLOTS, "packed", "state", "zone")

    def __init__(
        self, zone: str, packed: int, state: ConnState, expires_at: float, timeout: float
    ) -> None:
        super().__init__(expires_at, timeout)
        self.zone = zone
        self.packed = packed
        self.state = state

    @property
    def key(self) -> FlowKey:
        return int.__new__(FlowKey, self.packed)

    def record(self) -> ConntrackRecord:
        return ConntrackRecord(self.zone, self.key, self.state, self.expires_at)


def _next_state(
    proto: int, state: ConnState | None, direction: Direction, tcp_flags: int
) -> ConnState | None:
    """The state after a packet, `state` itself when it changes nothing, or None when the
    packet cannot open a connection (only possible with `state is None`)."""
    if proto == IP_PROTO_TCP:
        target = TCP_TRANSITIONS.get((state, direction, tcp_event(tcp_flags)))
        return target if target is not None else state
    target = DATAGRAM_TRANSITIONS.get((state, direction))
    return target if target is not None else state


class ConntrackTable:
    """Connections per zone, with idle expiry and the push/refresh queue (see
    `schedule.py`). Entries are mutable inside; callers see `ConntrackRecord` snapshots.

    Bounded (`max_entries`, None: unbounded): a new connection in a full table first evicts
    one, as Linux's `early_drop` does, in this order: the half-open connection
    (`HALF_OPEN_STATES`) that became half-open longest ago; only when there is none, the
    connection closest to its idle timeout (to the wheel's granularity: closing TCP states
    and short datagram timeouts come first, then the longest idle established connection;
    Linux would drop the new packet instead, which lets a flood of established connections
    lock new ones out). Entries the caller is working on (`keep`) are never evicted, so a
    table may briefly hold up to `len(keep)` more than `max_entries`. A SYN flood therefore
    only replaces its own half-open entries. Evicted entries are counted (`evicted_half_open`,
    `evicted_other`) and handed out once by `take_evicted()`, so the caller can remove the
    flows tagged with them, as it does for `expire()`. Evictions are not pushed: a peer's
    copy lapses at its own timeout (nobody refreshes it) or under its own bound."""

    def __init__(
        self,
        timeouts: ConntrackTimeouts = DEFAULT_TIMEOUTS,
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
        self.timeouts = timeouts
        self.max_entries = max_entries
        self._timeout_cache: dict[tuple[int, ConnState], float] = {}
        self._zones: dict[str, dict[int, _ConnEntry]] = {}  # by packed key (see `_ConnEntry`)
        self._schedule = EntryScheduler(refresh or RefreshPolicy(), granularity)
        self._count = 0
        # Half-open entries in the order they became half-open (a dict as an ordered set).
        self._half_open = EntryOrder()
        self._evicted: list[ConntrackRecord] = []
        self.evicted_half_open = 0
        self.evicted_other = 0

    def __len__(self) -> int:
        return self._count

    def _timeout(self, ip_proto: int, state: ConnState) -> float:
        cached = self._timeout_cache.get((ip_proto, state))
        if cached is None:
            cached = self._timeout_cache[(ip_proto, state)] = self.timeouts.timeout_for(
                ip_proto, state
            )
        return cached

    def __iter__(self) -> Iterator[ConntrackRecord]:
        for entries in self._zones.values():
            for entry in entries.values():
                yield entry.record()

    # --- lookups ------------------------------------------------------------------------------

    def _live(self, zone: str, key: FlowKey, now: float) -> _ConnEntry | None:
        entries = self._zones.get(zone)
        if entries is None:
            return None
        entry = entries.get(key)
        if entry is None or entry.expires_at <= now:
            return None
        return entry

    def get(self, zone: str, key: FlowKey, now: float) -> ConntrackRecord | None:
        """The live connection stored under `key` (original direction) in `zone`."""
        entry = self._live(zone, key, now)
        return entry.record() if entry is not None else None

    def find(self, zone: str, key: FlowKey, now: float) -> tuple[ConntrackRecord, Direction] | None:
        """The live connection `key` belongs to in either direction."""
        entry = self._live(zone, key, now)
        if entry is not None:
            return entry.record(), Direction.ORIGINAL
        entry = self._live(zone, key.reversed(), now)
        if entry is not None:
            return entry.record(), Direction.REPLY
        return None

    def classify(
        self, zone: str, match: FlowMatch, now: float, embedded: FlowKey | None = None
    ) -> Classification:
        """Classify `match` in `zone` without changing anything.

        `embedded`: for an ICMP/ICMPv6 error, the key of the datagram it quotes (see
        `keys.key_of_embedded`); without it an error can only be INVALID.
        """
        key = key_of_match(match)
        if key is None:
            return Classification(Verdict.UNTRACKED, zone, None)
        proto = key.ip_proto
        if proto in ICMP_PROTOCOLS and is_icmp_error(match):
            return self._classify_error(zone, key, embedded, now)
        is_tcp = proto == IP_PROTO_TCP
        entry = self._live(zone, key, now)
        direction = Direction.ORIGINAL
        if entry is None:
            entry = self._live(zone, key.reversed(), now)
            direction = Direction.REPLY
        if entry is None:
            if proto in ICMP_PROTOCOLS and ECHO_REPLY_TYPES.get(proto) == match.icmp_type:
                return Classification(Verdict.INVALID, zone, key)  # a reply opens nothing
            opened = _next_state(proto, None, Direction.ORIGINAL, match.tcp_flags)
            if opened is None:
                return Classification(Verdict.INVALID, zone, key, depends_on_tcp_flags=is_tcp)
            return Classification(
                Verdict.NEW,
                zone,
                key,
                Direction.ORIGINAL,
                None,
                opened,
                depends_on_tcp_flags=is_tcp,
            )
        if proto in ICMP_PROTOCOLS:
            expected = ECHO_REQUEST_TYPES if direction is Direction.ORIGINAL else ECHO_REPLY_TYPES
            if is_echo(proto, match.icmp_type) and expected.get(proto) != match.icmp_type:
                # An echo request travelling the reply way is not an answer to anything.
                return Classification(Verdict.INVALID, zone, entry.key, direction, entry.state)
        next_state = _next_state(proto, entry.state, direction, match.tcp_flags)
        verdict = Verdict.FORWARD if direction is Direction.ORIGINAL else Verdict.RETURN
        return Classification(
            verdict, zone, entry.key, direction, entry.state, next_state, depends_on_tcp_flags=False
        )

    def _classify_error(
        self, zone: str, key: FlowKey, embedded: FlowKey | None, now: float
    ) -> Classification:
        if embedded is not None:
            # The quoted datagram travelled the opposite way to the error about it.
            for candidate, direction in (
                (embedded, Direction.REPLY),
                (embedded.reversed(), Direction.ORIGINAL),
            ):
                entry = self._live(zone, candidate, now)
                if entry is not None:
                    return Classification(Verdict.RELATED, zone, entry.key, direction, entry.state)
        return Classification(Verdict.INVALID, zone, key)

    def is_return_flow(self, zone: str, match: FlowMatch, now: float) -> bool:
        """`classify(...).is_return` (fast path for the common TCP/UDP case)."""
        key = key_of_match(match)
        if key is None or key.ip_proto not in PORT_PROTOCOLS:
            return self.classify(zone, match, now).is_return
        entries = self._zones.get(zone)
        if entries is None:
            return False
        entry = entries.get(key)
        if entry is not None and entry.expires_at > now:
            return False
        entry = entries.get(key.reversed())
        return entry is not None and entry.expires_at > now

    # --- changes ------------------------------------------------------------------------------

    def commit(
        self,
        classification: Classification,
        tcp_flags: int,
        now: float,
        keep: Collection[tuple[str, FlowKey]] = (),
    ) -> ConntrackRecord | None:
        """Apply a classified packet that the simulation let through: open the connection
        (NEW), or move and refresh it (FORWARD/RETURN). The transition is recomputed against
        the entry as it is now, so a commit after other changes stays consistent. Returns
        the entry after the change (None for verdicts that change nothing). `keep`: (zone,
        key) of connections a full table must not evict to make room (the packet's own)."""
        verdict = classification.verdict
        key = classification.key
        if key is None or verdict not in (Verdict.NEW, Verdict.FORWARD, Verdict.RETURN):
            return None
        zone = classification.zone
        entry = self._live(zone, key, now)
        if entry is None:
            if verdict is not Verdict.NEW:
                return None  # the connection ended between classification and commit
            state = _next_state(key.ip_proto, None, Direction.ORIGINAL, tcp_flags)
            if state is None:
                return None
            return self._insert(zone, key, state, now, changed=True, keep=keep).record()
        self._advance(entry, classification.direction, tcp_flags, now)
        return entry.record()

    def track(
        self, zone: str, match: FlowMatch, now: float, embedded: FlowKey | None = None
    ) -> Classification:
        """Classify and commit in one step (for callers that already know the packet passes)."""
        classification = self.classify(zone, match, now, embedded)
        self.commit(classification, match.tcp_flags, now)
        return classification

    def _advance(self, entry: _ConnEntry, direction: Direction, tcp_flags: int, now: float) -> None:
        proto = proto_of(entry.packed)
        state = _next_state(proto, entry.state, direction, tcp_flags)
        if state is None:
            return
        changed = state is not entry.state
        if changed:
            self._set_state(entry, state)
        self._schedule.set_expiry(
            entry,
            now + self._timeout(proto, state),
            self._timeout(proto, state),
        )
        if changed:
            self._schedule.mark_changed(entry)
        else:
            self._schedule.mark_used(entry)

    def _set_state(self, entry: _ConnEntry, state: ConnState) -> None:
        if state in HALF_OPEN_STATES:
            if entry.state not in HALF_OPEN_STATES:
                self._half_open.add(entry)
        elif entry.state in HALF_OPEN_STATES:
            self._half_open.discard(entry)
        entry.state = state

    def _insert(
        self,
        zone: str,
        key: FlowKey,
        state: ConnState,
        now: float,
        changed: bool,
        keep: Collection[tuple[str, FlowKey]] = (),
    ) -> _ConnEntry:
        timeout = self._timeout(key.ip_proto, state)
        entries = self._zones.get(zone)
        old = entries.get(key) if entries is not None else None
        if old is not None:
            self._unlink(old)
        elif self.max_entries is not None and self._count >= self.max_entries:
            self._make_room(keep)
        entries = self._zones.get(zone)
        if entries is None:
            entries = self._zones[zone] = {}
        packed = self._packed(key)  # a plain int, not the caller's FlowKey (see `_ConnEntry`)
        entry = _ConnEntry(zone, packed, state, now + timeout, timeout)
        if state in HALF_OPEN_STATES:
            self._half_open.add(entry)
        entries[packed] = entry
        self._count += 1
        self._schedule.set_expiry(entry, now + timeout, timeout)
        if changed:
            self._schedule.mark_changed(entry)
        return entry

    def _make_room(self, keep: Collection[tuple[str, FlowKey]]) -> None:
        """Evict until a new entry fits (see the class docstring for the order)."""
        assert self.max_entries is not None
        kept = {
            entry for zone, key in keep if (entry := self._zones.get(zone, {}).get(key)) is not None
        }
        while self._count >= self.max_entries:
            victim, half_open = self._schedule.victim(self._half_open, kept)
            if victim is None:
                return  # only kept entries left: the table holds one more for a moment
            assert isinstance(victim, _ConnEntry)
            self.evicted_half_open += half_open
            self.evicted_other += not half_open
            self._unlink(victim)
            self._evicted.append(victim.record())

    def _unlink(self, entry: _ConnEntry) -> None:
        """Remove `entry` from every index and schedule."""
        entries = self._zones.get(entry.zone)
        if entries is not None and entries.get(entry.packed) is entry:
            del entries[entry.packed]
            if not entries:
                del self._zones[entry.zone]
        self._schedule.forget(entry)
        self._half_open.discard(entry)
        self._count -= 1

    def take_evicted(self) -> list[ConntrackRecord]:
        """The entries evicted to make room since the last call (each handed out once)."""
        evicted, self._evicted = self._evicted, []
        return evicted

    @property
    def evicted(self) -> int:
        return self.evicted_half_open + self.evicted_other

    def touch(self, zone: str, key: FlowKey, now: float) -> bool:
        """A live flow used the connection `key` belongs to (either direction): reset its
        idle timer and note it for refresh. False when no such live connection exists."""
        entry = self._live(zone, key, now) or self._live(zone, key.reversed(), now)
        if entry is None:
            return False
        self._schedule.set_expiry(entry, now + entry.timeout, entry.timeout)
        self._schedule.mark_used(entry)
        return True

    def note_use(self, zone: str, key: int, now: float) -> bool:
        """`touch` for the agent's periodic scan of used flows (the key a flow's conntrack tag
        names: either direction): the idle timer restarts to within `schedule.USE_SLACK` of
        the timeout (`EntryScheduler.note_use`). False when nothing changed (no such live
        connection, or within the slack). `key` may be a plain int (as the scan reads it from
        a tag): the zone dicts are keyed so."""
        entries = self._zones.get(zone)
        if entries is None:
            return False
        entry = entries.get(key)
        if entry is None or entry.expires_at <= now:
            entry = entries.get(int.__new__(FlowKey, key).reversed())
            if entry is None or entry.expires_at <= now:
                return False
        return self._schedule.note_use(entry, now)

    def zones(self) -> list[str]:
        """The zones holding entries."""
        return list(self._zones)

    def observe_tcp_flags(
        self, zone: str, key: FlowKey, tcp_flags: int, now: float
    ) -> ConntrackRecord | None:
        """Advance a TCP connection by the union of the flags a cached flow saw since the last
        report (datapath flow statistics, as OVS keeps them). A union loses the order, so it
        is replayed in the order a connection uses them: SYN (SYN-ACK in the reply
        direction), FIN, ACK, and RST last. Touches the entry as `touch` does."""
        entry = self._live(zone, key, now)
        direction = Direction.ORIGINAL
        if entry is None:
            entry = self._live(zone, key.reversed(), now)
            direction = Direction.REPLY
        if entry is None or proto_of(entry.packed) != IP_PROTO_TCP:
            return None
        steps: list[int] = []
        if tcp_flags & TCP_SYN:
            steps.append(TCP_SYN | (tcp_flags & TCP_ACK if direction is Direction.REPLY else 0))
        if tcp_flags & TCP_FIN:
            steps.append(TCP_FIN | TCP_ACK)
        if tcp_flags & TCP_ACK:
            steps.append(TCP_ACK)
        if tcp_flags & TCP_RST:
            steps.append(TCP_RST)
        for flags in steps or [0]:
            self._advance(entry, direction, flags, now)
        return entry.record()

    def merge(self, record: ConntrackRecord, now: float) -> ConntrackRecord | None:
        """Install or update an entry a peer pushed (or the persistence file held).

        An already-expired record removes the entry (a peer saying it is gone). Otherwise
        the state furthest along the connection wins (`STATE_PROGRESS`), a SYN_SENT over
        TIME_WAIT/CLOSED reopens, and two different half-closes make LAST_ACK. Returns the
        entry after the merge, or None when it was removed."""
        zone, key = record.zone, record.key
        if record.expires_at <= now:
            self.remove(zone, key)
            return None
        entry = self._live(zone, key, now)
        if entry is None:
            timeout = self._timeout(key.ip_proto, record.state)
            entry = self._insert(zone, key, record.state, now, changed=False)
            self._schedule.set_expiry(entry, record.expires_at, timeout)
            self._schedule.mark_known_to_peers(entry, now)
            return entry.record()
        local, incoming = entry.state, record.state
        half_closes = {_S.FIN_WAIT_ORIGINAL, _S.FIN_WAIT_REPLY}
        reopens = incoming is _S.SYN_SENT and local in (_S.TIME_WAIT, _S.CLOSED)
        if local in half_closes and incoming in half_closes and local is not incoming:
            merged = _S.LAST_ACK
        elif reopens or STATE_PROGRESS[incoming] >= STATE_PROGRESS[local]:
            merged = incoming
        else:
            merged = local
        timeout = self._timeout(key.ip_proto, merged)
        if merged is incoming and incoming is not local:
            expires_at = record.expires_at
        elif merged is not local:
            expires_at = now + timeout
        else:
            expires_at = max(entry.expires_at, record.expires_at)
        self._set_state(entry, merged)
        self._schedule.set_expiry(entry, expires_at, timeout)
        if merged is not incoming:
            self._schedule.mark_changed(entry)  # the sender holds an older state: tell it
        elif not entry.needs_push:
            self._schedule.mark_known_to_peers(entry, now)
        return entry.record()

    def remove(self, zone: str, key: FlowKey) -> bool:
        entries = self._zones.get(zone)
        entry = entries.get(key) if entries is not None else None
        if entry is None:
            return False
        self._unlink(entry)
        return True

    def set_peers(self, zone: str, key: FlowKey, peers: frozenset[str]) -> None:
        """Remember which hosts the connection `key` belongs to is pushed to."""
        entries = self._zones.get(zone)
        entry = None if entries is None else entries.get(key) or entries.get(key.reversed())
        if entry is not None:
            entry.peers = peers

    # --- time ---------------------------------------------------------------------------------

    def expire(self, now: float) -> list[ConntrackRecord]:
        """Remove and return every connection idle past its timeout at `now`."""
        expired: list[ConntrackRecord] = []
        for entry in self._schedule.pop_expired(now):
            assert isinstance(entry, _ConnEntry)
            entries = self._zones.get(entry.zone)
            if entries is not None and entries.get(entry.packed) is entry:
                self._unlink(entry)
            expired.append(entry.record())
        return expired

    def due_for_push(self, now: float) -> list[tuple[ConntrackRecord, frozenset[str]]]:
        """Entries to push to peers at `now` (new, changed, or used and due for refresh),
        each with the peers it was last assigned; they count as pushed at `now`."""
        out = []
        for entry in self._schedule.pop_due_for_push(now):
            assert isinstance(entry, _ConnEntry)
            out.append((entry.record(), entry.peers))
        return out

    def snapshot(self, now: float) -> list[ConntrackRecord]:
        """Every live connection (for the local persistence file)."""
        return [
            entry.record()
            for entries in self._zones.values()
            for entry in entries.values()
            if entry.expires_at > now
        ]
