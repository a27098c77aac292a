"""Pure backend selection for a new flow to a load-balancer VIP.

Owns the decision "which member serves this new flow, and what must the caller remember":
which members may take new flows (admin state, weight, health), the pool algorithm (Maglev
over the 5-tuple, Maglev over the source address, or this agent's own weighted round
robin), and source-IP session persistence. Also the two naive selectors the benchmark
compares Maglev with (`WeightedRoundRobin` per agent, `HashModN`).

The choice sticks to the connection, not to the table: the caller records the returned
`BackendBinding` in its conntrack/NAT state and translates every later packet of the flow
from that record, without asking again. So a member change (a new member, a weight change,
a health flap) changes the choice for new flows only. With `session_persistence=source_ip`
the caller also keeps the returned `PersistedChoice` (keyed by pool and source address) and
passes it back for the next new flow from that source until it expires.

Also the pure half of health monitoring (`agent/health.py` is the I/O half): which hosts
probe a member (`choose_probers`, rendezvous hashing over the live hosts), the probe state
machine (`PROBE_TRANSITIONS`, a table), and how every agent derives a member's observed
status from the probers' reports (`derive_member_status`). And `PersistenceTable`, an agent's
source-IP persistence records.

Must not touch I/O, the clock (`now` is passed in), the store or flow-state tables: it takes
values and returns values. Built once per change of the pool, its members or their observed
health (`PoolBalancer`), then read per new flow.
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from hivenet.model.loadbalancer import (
    HealthMonitor,
    LbAlgorithm,
    LbProtocol,
    Listener,
    Member,
    OperatingStatus,
    Pool,
    SessionPersistence,
)
from hivenet.packets.flowmatch import IP_PROTO_TCP, IP_PROTO_UDP, FlowMatch
from hivenet.sim.maglev import (
    DEFAULT_TABLE_SIZE,
    MaglevTable,
    WeightedMember,
    five_tuple_hash,
    source_ip_hash,
    weighted_turn_order,
)

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

IP_PROTO_OF: dict[LbProtocol, int] = {LbProtocol.TCP: IP_PROTO_TCP, LbProtocol.UDP: IP_PROTO_UDP}


class BackendState(enum.Enum):
    """What a member may do, from its admin state, weight and observed health."""

    ACCEPTING = "accepting"  # takes new flows
    DRAINING = "draining"  # keeps its flows and persistent clients, takes no new choice
    DOWN = "down"  # takes nothing new; persisted clients move elsewhere


# Observed operating status -> state, for an admin-up member of positive weight.
_STATE_OF_STATUS: dict[OperatingStatus, BackendState] = {
    OperatingStatus.ONLINE: BackendState.ACCEPTING,
    OperatingStatus.NO_MONITOR: BackendState.ACCEPTING,  # nobody checks it: assume it serves
    OperatingStatus.DEGRADED: BackendState.ACCEPTING,
    OperatingStatus.DRAINING: BackendState.DRAINING,
    OperatingStatus.OFFLINE: BackendState.DOWN,
    OperatingStatus.ERROR: BackendState.DOWN,
}


def backend_state(member: Member, observed: OperatingStatus | None = None) -> BackendState:
    """A member's state; `observed` (from a health monitor) overrides its stored status."""
    if not member.admin_state_up:
        return BackendState.DOWN
    state = _STATE_OF_STATUS[observed if observed is not None else member.operating_status]
    if state is BackendState.ACCEPTING and member.weight == 0:
        return BackendState.DRAINING
    return state


@dataclass(frozen=True, slots=True)
class Backend:
    """A member as the selection sees it."""

    member_id: str
    address: IpAddress
    protocol_port: int
    weight: int
    state: BackendState


@dataclass(frozen=True, slots=True)
class FlowTuple:
    """The 5-tuple of a new flow, addresses as ints (IPv4 or IPv6), as in `FlowMatch`."""

    ip_src: int
    ip_dst: int
    ip_proto: int
    tp_src: int
    tp_dst: int

    @classmethod
    def from_match(cls, match: FlowMatch) -> FlowTuple:
        return cls(match.ip_src, match.ip_dst, match.ip_proto, match.tp_src, match.tp_dst)

    def hash(self) -> int:
        return five_tuple_hash(self.ip_src, self.ip_dst, self.ip_proto, self.tp_src, self.tp_dst)


@dataclass(frozen=True, slots=True)
class PersistedChoice:
    """A source-IP persistence record: new flows from `source` to `pool_id` go to
    `member_id` until `expires_at` (the caller's clock, seconds)."""

    pool_id: str
    source: int
    member_id: str
    expires_at: float


@dataclass(frozen=True, slots=True)
class BackendBinding:
    """What the caller records in the flow's conntrack/NAT state: the flow keeps this
    member (its translated destination) for its whole life."""

    flow: FlowTuple
    pool_id: str
    member_id: str
    backend_address: IpAddress
    backend_port: int


class SelectionReason(enum.Enum):
    MAGLEV = "maglev"  # Maglev over the 5-tuple
    SOURCE_HASH = "source_hash"  # Maglev over the source address (algorithm or persistence)
    ROUND_ROBIN = "round_robin"  # this agent's weighted round robin
    PERSISTED = "persisted"  # a live persistence record


@dataclass(frozen=True, slots=True)
class Selection:
    """The chosen member. Record `binding` with the flow; store `persist` (when not None) in
    the pool's persistence table, replacing any older record for the source."""

    binding: BackendBinding
    reason: SelectionReason
    persist: PersistedChoice | None

    @property
    def member_id(self) -> str:
        return self.binding.member_id


@dataclass(frozen=True, slots=True)
class NoBackend:
    """No member can take the flow; `reason` is for the trace (the VIP rejects the flow)."""

    reason: str


class WeightedRoundRobin:
    """One agent's weighted round robin: each member's turns spread evenly through the
    cycle, in proportion to its weight (stride scheduling over the weights divided by their
    greatest common divisor). Agents do not share the cursor, so two agents choose
    independently: that is the point the benchmark makes against Maglev."""

    __slots__ = ("_cycle", "_position")

    def __init__(self, members: Iterable[WeightedMember], *, start: int = 0) -> None:
        chosen = sorted((m for m in members if m.weight > 0), key=lambda m: m.member_id)
        divisor = math.gcd(*(member.weight for member in chosen)) if chosen else 1
        order = weighted_turn_order([member.weight // divisor for member in chosen])
        self._cycle = tuple(chosen[index].member_id for index in order)
        self._position = start % len(self._cycle) if self._cycle else 0

    @property
    def cycle(self) -> tuple[str, ...]:
        return self._cycle

    def next(self) -> str:
        if not self._cycle:
            raise LookupError("round robin over no member of positive weight")
        member_id = self._cycle[self._position]
        self._position = (self._position + 1) % len(self._cycle)
        return member_id


class HashModN:
    """The naive consistent-looking choice: `slots[hash % len(slots)]`, each member holding
    `weight` slots. Every member change reshuffles almost every flow (benchmark baseline)."""

    __slots__ = ("_slots",)

    def __init__(self, members: Iterable[WeightedMember]) -> None:
        chosen = sorted((m for m in members if m.weight > 0), key=lambda m: m.member_id)
        self._slots = tuple(m.member_id for m in chosen for _ in range(m.weight))

    def select(self, flow_hash: int) -> str:
        if not self._slots:
            raise LookupError("hash mod N over no member of positive weight")
        return self._slots[flow_hash % len(self._slots)]


class PoolBalancer:
    """A pool's selection, compiled: its backends, the Maglev table over the members that
    take new flows, and this agent's round-robin cursor. Rebuild it when the pool, a member
    or an observed health status changes (the table build is ~20 ms for M=65537)."""

    __slots__ = ("_round_robin", "backends", "pool", "table")

    def __init__(
        self,
        pool: Pool,
        members: Iterable[Member],
        *,
        observed_status: Mapping[str, OperatingStatus] | None = None,
        table_size: int = DEFAULT_TABLE_SIZE,
    ) -> None:
        observed = observed_status or {}
        backends: dict[str, Backend] = {}
        for member in members:
            if member.pool_id != pool.id:
                raise ValueError(
                    f"pool_id={member.pool_id!r} of member {member.id}: not pool {pool.id!r}"
                )
            if member.address.version != pool.ip_version:
                raise ValueError(
                    f"address={member.address} of member {member.id}: pool {pool.id} serves "
                    f"IPv{pool.ip_version}"
                )
            backends[member.id] = Backend(
                member_id=member.id,
                address=member.address,
                protocol_port=member.protocol_port,
                weight=member.weight,
                state=backend_state(member, observed.get(member.id)),
            )
        self.pool = pool
        self.backends: Mapping[str, Backend] = backends
        candidates = [
            WeightedMember(backend.member_id, backend.weight)
            for backend in backends.values()
            if backend.state is BackendState.ACCEPTING
        ]
        self.table = MaglevTable.build(candidates, table_size)
        uses_round_robin = (
            pool.algorithm is LbAlgorithm.ROUND_ROBIN
            and pool.session_persistence is SessionPersistence.NONE
        )
        self._round_robin = WeightedRoundRobin(candidates) if uses_round_robin else None

    def select(
        self, flow: FlowTuple, *, now: float, persisted: PersistedChoice | None = None
    ) -> Selection | NoBackend:
        """The member for a new flow. `persisted`: the pool's persistence record for the
        flow's source, if the caller has one (ignored unless the pool persists by source)."""
        pool = self.pool
        if not pool.admin_state_up:
            return NoBackend(f"pool {pool.id} is administratively down")
        persists = pool.session_persistence is SessionPersistence.SOURCE_IP
        if persists and persisted is not None:
            kept = self._still_valid(persisted, flow, now)
            if kept is not None:
                return self._selection(flow, kept, SelectionReason.PERSISTED, now)
        if self.table.is_empty:
            return NoBackend(f"pool {pool.id} has no member that takes new flows")
        if persists or pool.algorithm is LbAlgorithm.SOURCE_IP:
            # Hashing the source alone: every agent makes the same first choice for a
            # client, even one that never saw its persistence record.
            member_id = self.table.select(source_ip_hash(flow.ip_src))
            reason = SelectionReason.SOURCE_HASH
        elif self._round_robin is not None:
            member_id = self._round_robin.next()
            reason = SelectionReason.ROUND_ROBIN
        else:
            member_id = self.table.select(flow.hash())
            reason = SelectionReason.MAGLEV
        return self._selection(flow, self.backends[member_id], reason, now)

    def _still_valid(
        self, persisted: PersistedChoice, flow: FlowTuple, now: float
    ) -> Backend | None:
        if persisted.pool_id != self.pool.id or persisted.source != flow.ip_src:
            raise ValueError(
                f"persisted: record for pool {persisted.pool_id} and source {persisted.source} "
                f"passed for pool {self.pool.id} and source {flow.ip_src}"
            )
        if persisted.expires_at <= now:
            return None
        backend = self.backends.get(persisted.member_id)
        # A draining member still takes its persistent clients; a down or removed one not.
        if backend is None or backend.state is BackendState.DOWN:
            return None
        return backend

    def _selection(
        self, flow: FlowTuple, backend: Backend, reason: SelectionReason, now: float
    ) -> Selection:
        pool = self.pool
        persist = None
        if pool.session_persistence is SessionPersistence.SOURCE_IP:
            persist = PersistedChoice(
                pool.id, flow.ip_src, backend.member_id, now + pool.persistence_timeout
            )
        binding = BackendBinding(
            flow, pool.id, backend.member_id, backend.address, backend.protocol_port
        )
        return Selection(binding, reason, persist)


def listener_takes(listener: Listener, flow: FlowTuple, vip_version: int | None = None) -> bool:
    """Whether a new flow is for this listener and allowed by it: the VIP address, the
    protocol and port, admin state and `allowed_cidrs`. `vip_version` is the packet's IP
    version (an int address alone does not say; defaults to the VIP's)."""
    vip = listener.vip_address
    if vip_version is not None and vip_version != vip.version:
        return False
    if (
        not listener.admin_state_up
        or flow.ip_dst != int(vip)
        or flow.ip_proto != IP_PROTO_OF[listener.protocol]
        or flow.tp_dst != listener.protocol_port
    ):
        return False
    if flow.ip_src >= 1 << (32 if vip.version == 4 else 128):
        return False
    source: IpAddress = (
        ipaddress.IPv4Address(flow.ip_src)
        if vip.version == 4
        else ipaddress.IPv6Address(flow.ip_src)
    )
    return listener.admits(source)


# ---------------------------------------------------------------------------- persistence


DEFAULT_PERSISTENCE_ENTRIES = 65536


class PersistenceTable:
    """One agent's source-IP persistence records, by (pool, source address).

    Per agent is enough: a client VM always enters at its own host, and a client the agent
    has no record for gets the same first choice everywhere (Maglev over the source address).
    Bounded: beyond `max_entries` the least recently refreshed record goes first."""

    __slots__ = ("_records", "max_entries")

    def __init__(self, max_entries: int = DEFAULT_PERSISTENCE_ENTRIES) -> None:
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"max_entries={max_entries!r}: must be a positive integer")
        self.max_entries = max_entries
        self._records: OrderedDict[tuple[str, int], PersistedChoice] = OrderedDict()

    def __len__(self) -> int:
        return len(self._records)

    def get(self, pool_id: str, source: int, now: float) -> PersistedChoice | None:
        """The live record for `source` in `pool_id` (an expired one is dropped)."""
        key = (pool_id, source)
        record = self._records.get(key)
        if record is not None and record.expires_at <= now:
            del self._records[key]
            return None
        return record

    def remember(self, choice: PersistedChoice) -> None:
        key = (choice.pool_id, choice.source)
        self._records.pop(key, None)
        self._records[key] = choice
        while len(self._records) > self.max_entries:
            self._records.popitem(last=False)

    def forget_pool(self, pool_id: str) -> int:
        """Drop every record of a deleted pool; returns how many."""
        stale = [key for key in self._records if key[0] == pool_id]
        for key in stale:
            del self._records[key]
        return len(stale)

    def expire(self, now: float) -> int:
        stale = [key for key, record in self._records.items() if record.expires_at <= now]
        for key in stale:
            del self._records[key]
        return len(stale)


# ---------------------------------------------------------------------------- health

PROBERS_PER_MEMBER = 2


def _rendezvous_score(member_id: str, host_id: str) -> int:
    digest = hashlib.blake2b(
        f"{member_id}\x00{host_id}".encode(), digest_size=8, person=b"hn-probers"
    ).digest()
    return int.from_bytes(digest, "big")


def choose_probers(
    member_id: str, live_hosts: Iterable[str], count: int = PROBERS_PER_MEMBER
) -> tuple[str, ...]:
    """The hosts that probe `member_id`: the `count` live hosts ranking highest for it by
    rendezvous (highest-random-weight) hashing. Every agent computes the same set from the
    same live hosts; a host leaving moves only the members it probed, each to one new host."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count={count!r}: must be a positive integer")
    ranked = sorted(
        set(live_hosts), key=lambda host: (_rendezvous_score(member_id, host), host), reverse=True
    )
    return tuple(ranked[:count])


class ProbeState(enum.Enum):
    UNKNOWN = "unknown"  # no conclusion yet (this host just started probing the member)
    ONLINE = "online"
    OFFLINE = "offline"


class StreakNeeded(enum.Enum):
    """How many probe outcomes in a row a transition needs."""

    ONE = "one"
    RISE = "rise"  # the monitor's max_retries
    FALL = "fall"  # the monitor's max_retries_down


@dataclass(frozen=True, slots=True)
class ProbeTransition:
    to: ProbeState
    needs: StreakNeeded


# (state, probe succeeded) -> where a streak of that outcome leads, and how long it must be.
# Invariants: a state changes only after a streak of the outcome that argues for the new state
# (never on a mixed history); a first success proves the member serves (no need to wait for
# `rise`, as haproxy's initial state); OFFLINE needs `fall` failures in a row from anywhere,
# ONLINE after OFFLINE needs `rise` successes in a row.
PROBE_TRANSITIONS: dict[tuple[ProbeState, bool], ProbeTransition] = {
    (ProbeState.UNKNOWN, True): ProbeTransition(ProbeState.ONLINE, StreakNeeded.ONE),
    (ProbeState.UNKNOWN, False): ProbeTransition(ProbeState.OFFLINE, StreakNeeded.FALL),
    (ProbeState.ONLINE, True): ProbeTransition(ProbeState.ONLINE, StreakNeeded.ONE),
    (ProbeState.ONLINE, False): ProbeTransition(ProbeState.OFFLINE, StreakNeeded.FALL),
    (ProbeState.OFFLINE, True): ProbeTransition(ProbeState.ONLINE, StreakNeeded.RISE),
    (ProbeState.OFFLINE, False): ProbeTransition(ProbeState.OFFLINE, StreakNeeded.ONE),
}

STATUS_OF_PROBE_STATE: dict[ProbeState, OperatingStatus | None] = {
    ProbeState.UNKNOWN: None,
    ProbeState.ONLINE: OperatingStatus.ONLINE,
    ProbeState.OFFLINE: OperatingStatus.OFFLINE,
}


@dataclass(frozen=True, slots=True)
class MemberProbe:
    """One prober's view of one member: its state and the current streak of equal outcomes."""

    state: ProbeState = ProbeState.UNKNOWN
    streak_success: bool = True
    streak: int = 0

    def advance(self, succeeded: bool, monitor: HealthMonitor) -> MemberProbe:
        """The probe state after one more probe outcome."""
        streak = self.streak + 1 if self.streak and self.streak_success == succeeded else 1
        transition = PROBE_TRANSITIONS[(self.state, succeeded)]
        needed = {
            StreakNeeded.ONE: 1,
            StreakNeeded.RISE: monitor.max_retries,
            StreakNeeded.FALL: monitor.max_retries_down,
        }[transition.needs]
        state = transition.to if streak >= needed else self.state
        return MemberProbe(state, succeeded, streak)

    @property
    def status(self) -> OperatingStatus | None:
        return STATUS_OF_PROBE_STATE[self.state]


def derive_member_status(reports: Iterable[OperatingStatus]) -> OperatingStatus | None:
    """A member's observed status from the reports of its live probers: OFFLINE only when
    every report says so (one prober whose own host cannot reach the member must not take it
    away from clients on other hosts), ONLINE when any says ONLINE, None without reports
    (then the stored status counts: a member nobody has probed yet keeps its traffic)."""
    statuses = list(reports)
    if not statuses:
        return None
    if all(status is OperatingStatus.OFFLINE for status in statuses):
        return OperatingStatus.OFFLINE
    return OperatingStatus.ONLINE
