"""Bounded flow-state tables: the order a full `ConntrackTable` / `NatTable` evicts in
(half-open / never-used first, oldest first; then the entry closest to its idle timeout),
entries a packet depends on kept, evictions counted and handed out once, ports freed, and a
hypothesis machine checking the bound and the order against a model under random traffic."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from hivenet.flowstate import (
    ConnState,
    ConntrackTable,
    FlowKey,
    FlowStateTransaction,
    NatAction,
    NatKind,
    NatRange,
    NatRecord,
    NatTable,
    PortBlockAllocator,
)
from hivenet.flowstate.conntrack import HALF_OPEN_STATES

from .helpers import ACK, SYN, ip, tcp, udp

ZONE = "port-1"
CLIENT, SERVER = "10.0.0.1", "192.0.2.10"
NAT_RANGE = NatRange.parse("203.0.113.7", "203.0.113.7", 1024, 65535)


def syn(port: int) -> object:
    return tcp(CLIENT, port, SERVER, 80, SYN)


def key(port: int, proto: int = 6) -> FlowKey:
    return FlowKey(4, ip(CLIENT), ip(SERVER), proto, port, 80)


def establish(table: ConntrackTable, port: int, now: float) -> None:
    table.track(ZONE, tcp(CLIENT, port, SERVER, 80, SYN), now)
    table.track(ZONE, tcp(SERVER, 80, CLIENT, port, SYN | ACK), now)
    table.track(ZONE, tcp(CLIENT, port, SERVER, 80, ACK), now)
    assert table.get(ZONE, key(port), now).state is ConnState.ESTABLISHED  # type: ignore[union-attr]


def ports_of(table: ConntrackTable) -> set[int]:
    return {record.key.tp_src for record in table}


def test_bad_bounds_are_refused_naming_the_value() -> None:
    for bad in (0, -1, True, 2.5):
        with pytest.raises(ValueError, match="max_entries"):
            ConntrackTable(max_entries=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="max_entries"):
            NatTable(max_entries=bad)  # type: ignore[arg-type]


def test_conntrack_evicts_the_oldest_half_open_before_any_established() -> None:
    table = ConntrackTable(max_entries=3)
    establish(table, 1000, 0.0)
    table.track(ZONE, tcp(CLIENT, 1001, SERVER, 80, SYN), 1.0)
    table.track(ZONE, tcp(CLIENT, 1002, SERVER, 80, SYN), 2.0)
    # A flood of new connections: each replaces the oldest half-open one, never 1000.
    for port in range(1003, 1010):
        table.track(ZONE, tcp(CLIENT, port, SERVER, 80, SYN), float(port - 1000))
        assert len(table) == 3
        assert ports_of(table) == {1000, port - 1, port}
    evicted = table.take_evicted()
    assert [record.key.tp_src for record in evicted] == list(range(1001, 1008))
    assert all(record.state is ConnState.SYN_SENT for record in evicted)
    assert table.take_evicted() == []  # handed out once
    assert (table.evicted_half_open, table.evicted_other, table.evicted) == (7, 0, 7)
    assert table._schedule.scheduled_count() == len(table)


def test_conntrack_half_open_order_is_when_it_became_half_open_and_udp_unreplied_counts() -> None:
    table = ConntrackTable(max_entries=3)
    table.track(ZONE, udp(CLIENT, 5000, SERVER, 53), 0.0)  # UNREPLIED
    table.track(ZONE, tcp(CLIENT, 1001, SERVER, 80, SYN), 1.0)
    table.track(ZONE, udp(SERVER, 53, CLIENT, 5000), 2.0)
    answered = table.get(ZONE, FlowKey(4, ip(CLIENT), ip(SERVER), 17, 5000, 53), 2.0)
    assert answered is not None and answered.state is ConnState.REPLIED
    table.track(ZONE, tcp(SERVER, 80, CLIENT, 1001, SYN | ACK), 3.0)  # SYN_RECV: still half-open
    table.track(ZONE, tcp(CLIENT, 1002, SERVER, 80, SYN), 4.0)
    table.track(ZONE, tcp(CLIENT, 1003, SERVER, 80, SYN), 5.0)
    # The answered UDP flow stays; 1001 (half-open since t=1) goes before 1002.
    assert [record.key.tp_src for record in table.take_evicted()] == [1001]
    assert ports_of(table) == {5000, 1002, 1003}


def test_conntrack_without_half_open_evicts_the_longest_idle() -> None:
    table = ConntrackTable(max_entries=3)
    for port, at in ((1000, 0.0), (1001, 10.0), (1002, 20.0)):
        establish(table, port, at)
    assert table.touch(ZONE, key(1000), 30.0)  # 1001 is now the longest idle
    table.track(ZONE, tcp(CLIENT, 1003, SERVER, 80, SYN), 31.0)
    assert [record.key.tp_src for record in table.take_evicted()] == [1001]
    assert ports_of(table) == {1000, 1002, 1003}
    assert (table.evicted_half_open, table.evicted_other) == (0, 1)


def test_conntrack_keeps_what_the_packet_depends_on_and_merges_are_bounded() -> None:
    table = ConntrackTable(max_entries=2)
    table.track(ZONE, syn(1000), 0.0)  # type: ignore[arg-type]
    table.track(ZONE, syn(1001), 1.0)  # type: ignore[arg-type]
    classification = table.classify(ZONE, syn(1002), 2.0)  # type: ignore[arg-type]
    table.commit(classification, SYN, 2.0, keep=[(ZONE, key(1000))])
    assert ports_of(table) == {1000, 1002}
    # Only kept entries left: the table holds one more for the moment rather than evict them.
    classification = table.classify(ZONE, syn(1003), 3.0)  # type: ignore[arg-type]
    table.commit(classification, SYN, 3.0, keep=[(ZONE, key(1000)), (ZONE, key(1002))])
    assert len(table) == 3
    table.take_evicted()
    # A peer's record also needs room: the oldest half-open goes.
    record = table.get(ZONE, key(1003), 3.0)
    assert record is not None
    table.remove(ZONE, key(1003))
    table.track(ZONE, syn(1004), 4.0)  # type: ignore[arg-type]
    assert len(table) == 2
    table.merge(record, 5.0)
    assert len(table) == 2 and table.get(ZONE, key(1003), 5.0) is not None


def snat_table(max_entries: int) -> tuple[NatTable, PortBlockAllocator]:
    allocator = PortBlockAllocator()
    allocator.claim_all(NAT_RANGE)
    return NatTable(allocator, max_entries=max_entries), allocator


def nat_key(port: int) -> FlowKey:
    return FlowKey(4, ip(CLIENT), ip(SERVER), 6, port, 443)


def test_nat_evicts_the_oldest_binding_never_used_again_and_frees_its_port() -> None:
    table, allocator = snat_table(3)
    table.snat(ZONE, nat_key(1000), [NAT_RANGE], 0.0)
    first_reply, _ = table.snat(ZONE, nat_key(1001), [NAT_RANGE], 1.0)
    table.snat(ZONE, nat_key(1002), [NAT_RANGE], 2.0)
    assert table.touch(ZONE, NatKind.SNAT, nat_key(1000), 3.0)  # used again: a live flow
    reply_key = first_reply.translated.reversed()
    assert table.lookup_reply(ZONE, NatKind.SNAT, reply_key, 3.0) == first_reply  # answered
    for port in range(1003, 1008):
        table.snat(ZONE, nat_key(port), [NAT_RANGE], float(port - 1000))
        assert len(table) == 3 and allocator.in_use() == 3
    evicted = table.take_evicted()
    assert [record.binding.original.tp_src for record in evicted] == [1002, 1003, 1004, 1005, 1006]
    assert all(isinstance(record, NatRecord) for record in evicted)
    assert table.take_evicted() == []
    assert (table.evicted_unused, table.evicted_other) == (5, 0)
    for port in (1000, 1001, 1007):
        assert table.lookup_original(ZONE, NatKind.SNAT, nat_key(port), 8.0) is not None


def test_nat_without_unused_bindings_evicts_the_longest_idle() -> None:
    table, allocator = snat_table(2)
    table.snat(ZONE, nat_key(1000), [NAT_RANGE], 0.0)
    table.snat(ZONE, nat_key(1001), [NAT_RANGE], 10.0)
    table.touch(ZONE, NatKind.SNAT, nat_key(1001), 20.0)
    table.touch(ZONE, NatKind.SNAT, nat_key(1000), 30.0)  # 1001 is now the longest idle
    table.snat(ZONE, nat_key(1002), [NAT_RANGE], 31.0)
    assert [r.binding.original.tp_src for r in table.take_evicted()] == [1001]
    assert (table.evicted_unused, table.evicted_other) == (0, 1)
    assert allocator.in_use() == 2


def test_nat_refresh_from_a_peer_counts_as_use() -> None:
    table, _ = snat_table(2)
    old, _ = table.snat(ZONE, nat_key(1000), [NAT_RANGE], 0.0)
    table.snat(ZONE, nat_key(1001), [NAT_RANGE], 1.0)
    table.merge(NatRecord(old, 500.0), 2.0)  # the peer used 1000 and refreshed it
    table.snat(ZONE, nat_key(1002), [NAT_RANGE], 3.0)
    assert [r.binding.original.tp_src for r in table.take_evicted()] == [1001]


def test_a_transaction_never_evicts_a_binding_its_own_packet_used() -> None:
    """A packet DNATed then SNATed in one simulation, in a full NAT table: the second binding
    must not evict the first (the flow installed for the packet depends on both)."""
    conntrack = ConntrackTable(max_entries=1)
    nat, _ = snat_table(1)
    transaction = FlowStateTransaction(conntrack, nat)
    match = tcp(CLIENT, 1000, SERVER, 443, SYN)
    dnat_target = NatRange.parse("192.0.2.99", "192.0.2.99")
    dnat = transaction.nat("r1", NatAction.DNAT, match, [dnat_target], 0.0)
    snat = transaction.nat("r2", NatAction.SNAT, match, [NAT_RANGE], 0.0)
    assert dnat.binding is not None and snat.binding is not None
    assert len(nat) == 2 and nat.take_evicted() == []
    transaction.is_return_flow("zone-a", match, 0.0)
    transaction.is_return_flow("zone-b", match, 0.0)
    transaction.commit(0.0)
    # zone-b's entry could not evict zone-a's (the same packet's): one over, for a moment.
    assert len(conntrack) == 2 and conntrack.take_evicted() == []
    # The next packet's connection evicts both old half-open ones down to the bound.
    conntrack.track("zone-a", tcp(CLIENT, 1001, SERVER, 443, SYN), 1.0)
    assert len(conntrack) == 1 and len(conntrack.take_evicted()) == 2


# --- hypothesis: the bound and the order against a model ---------------------------------


class BoundedConntrackMachine(RuleBasedStateMachine):
    """Random TCP/UDP packets of a few connections and time steps in a small table.

    The model keeps the order connections became half-open in (from the states the table
    reports, step by step). After each step the table holds at most `max_entries`; a step
    evicts at most one entry, only when it opened a new connection in a full table; the
    victim is the model's oldest half-open connection when there is one; every eviction is
    counted and handed out by `take_evicted` exactly once."""

    MAX = 3

    def __init__(self) -> None:
        super().__init__()
        self.table = ConntrackTable(max_entries=self.MAX)
        self.now = 0.0
        self.handed_out = 0
        self.order: list[FlowKey] = []  # the model: half-open connections, oldest first

    def states(self) -> dict[FlowKey, ConnState]:
        return {record.key: record.state for record in self.table}

    def follow(self, before: dict[FlowKey, ConnState], after: dict[FlowKey, ConnState]) -> None:
        for connection in set(before) | set(after):
            was = before.get(connection) in HALF_OPEN_STATES
            now = after.get(connection) in HALF_OPEN_STATES
            if was and not now:
                self.order.remove(connection)
            elif now and not was:
                self.order.append(connection)

    @rule(
        port=st.integers(1000, 1005),
        from_client=st.booleans(),
        flags=st.sampled_from([SYN, SYN | ACK, ACK, 0x04]),
        is_udp=st.booleans(),
    )
    def packet(self, port: int, from_client: bool, flags: int, is_udp: bool) -> None:
        if is_udp:
            match = udp(CLIENT, port, SERVER, 53) if from_client else udp(SERVER, 53, CLIENT, port)
        elif from_client:
            match = tcp(CLIENT, port, SERVER, 80, flags)
        else:
            match = tcp(SERVER, 80, CLIENT, port, flags)
        before = self.states()
        full = len(before) >= self.MAX
        classification = self.table.track(ZONE, match, self.now)
        evicted = self.table.take_evicted()
        self.handed_out += len(evicted)
        assert self.handed_out == self.table.evicted
        opened = classification.verdict.value == "new"
        if evicted:
            assert len(evicted) == 1 and opened and full
            victim = evicted[0].key
            assert victim in before and victim not in self.states()
            if self.order:
                assert victim == self.order[0]
        elif opened and full:
            assert classification.key in before  # it took the place of its own dead entry
        self.follow(before, self.states())

    @rule(seconds=st.sampled_from([1.0, 29.0, 61.0, 200.0]))
    def advance(self, seconds: float) -> None:
        before = self.states()
        self.now += seconds
        self.table.expire(self.now)
        self.follow(before, self.states())

    @invariant()
    def bounded_and_consistent(self) -> None:
        assert len(self.table) <= self.MAX
        assert len(list(self.table)) == len(self.table)
        assert self.table._schedule.scheduled_count() == len(self.table)


TestBoundedConntrackMachine = BoundedConntrackMachine.TestCase
TestBoundedConntrackMachine.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)


class BoundedNatMachine(RuleBasedStateMachine):
    """Random SNATs, uses (touch, reply lookups), peer refreshes and time steps in a small NAT
    table. The model keeps the bindings never used since they were made, oldest first. After
    each step: at most `max_entries` bindings; a step that made a binding in a full table
    evicted exactly one, the model's oldest unused one when there is one; every binding holds
    its own port (the allocator counts exactly the table's) and translations stay unique and
    reversible."""

    MAX = 3

    def __init__(self) -> None:
        super().__init__()
        self.table, self.allocator = snat_table(self.MAX)
        self.now = 0.0
        self.unused: list[FlowKey] = []  # the model
        self.handed_out = 0

    def live(self) -> dict[FlowKey, NatRecord]:
        return {record.binding.original: record for record in self.table}

    def forget_gone(self) -> None:
        live = self.live()
        self.unused = [original for original in self.unused if original in live]

    @rule(port=st.integers(1000, 1006))
    def snat(self, port: int) -> None:
        before = self.live()
        live_before = {k for k, r in before.items() if r.expires_at > self.now}
        _, created = self.table.snat(ZONE, nat_key(port), [NAT_RANGE], self.now)
        evicted = self.table.take_evicted()
        self.handed_out += len(evicted)
        assert self.handed_out == self.table.evicted
        if not created:
            assert evicted == []
            self.unused = [k for k in self.unused if k != nat_key(port)]  # used again
            return
        if evicted:
            assert len(evicted) == 1 and len(before) >= self.MAX
            victim = evicted[0].binding.original
            candidates = [k for k in self.unused if k in live_before or k in before]
            if candidates:
                assert victim == candidates[0]
        self.forget_gone()
        self.unused = [k for k in self.unused if k != nat_key(port)] + [nat_key(port)]

    @rule(port=st.integers(1000, 1006))
    def use(self, port: int) -> None:
        if self.table.touch(ZONE, NatKind.SNAT, nat_key(port), self.now):
            self.unused = [k for k in self.unused if k != nat_key(port)]

    @rule(port=st.integers(1000, 1006))
    def reply(self, port: int) -> None:
        binding = self.table.lookup_original(ZONE, NatKind.SNAT, nat_key(port), self.now)
        if binding is not None:
            found = self.table.lookup_reply(
                ZONE, NatKind.SNAT, binding.translated.reversed(), self.now
            )
            assert found == binding
            self.unused = [k for k in self.unused if k != nat_key(port)]

    @rule(seconds=st.sampled_from([1.0, 100.0, 8000.0]))
    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.table.expire(self.now)
        self.forget_gone()

    @invariant()
    def bounded_and_consistent(self) -> None:
        records = list(self.table)
        assert len(records) == len(self.table) <= self.MAX
        assert self.allocator.in_use() == len(self.table)
        translated = [record.binding.translated for record in records]
        assert len(set(translated)) == len(translated)
        assert self.table._schedule.scheduled_count() == len(self.table)


TestBoundedNatMachine = BoundedNatMachine.TestCase
TestBoundedNatMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
