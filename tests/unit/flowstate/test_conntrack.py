"""Unit tests for `hivenet.flowstate.conntrack`: TCP state machine (table-driven sequences and
a hypothesis state machine), UDP/ICMP tracking, ICMP errors as related, idle expiry, touch,
TCP flag reports, peer merges and the push/refresh queue."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from hivenet.flowstate.conntrack import (
    DEFAULT_TIMEOUTS,
    TCP_TRANSITIONS,
    ConnState,
    ConntrackRecord,
    ConntrackTable,
    ConntrackTimeouts,
    Direction,
    TcpEvent,
    Verdict,
    tcp_event,
)
from hivenet.flowstate.keys import FlowKey, key_of_match
from hivenet.flowstate.schedule import RefreshPolicy
from hivenet.packets.flowmatch import FRAG_LATER, FlowMatch

from .helpers import ACK, FIN, PSH, RST, SYN, ip, packet, tcp, udp

ZONE = "router-1"
CLIENT, SERVER = "10.0.0.1", "192.0.2.10"
KEY = FlowKey(4, ip(CLIENT), ip(SERVER), 6, 40000, 80)
S = ConnState


def out(flags: int) -> FlowMatch:
    return tcp(CLIENT, 40000, SERVER, 80, flags)


def back(flags: int) -> FlowMatch:
    return tcp(SERVER, 80, CLIENT, 40000, flags)


# (packet, verdict, state after commit) sequences, one connection each.
TCP_SEQUENCES = {
    "handshake, data, orderly close": [
        (out(SYN), Verdict.NEW, S.SYN_SENT),
        (back(SYN | ACK), Verdict.RETURN, S.SYN_RECV),
        (out(ACK), Verdict.FORWARD, S.ESTABLISHED),
        (out(ACK | PSH), Verdict.FORWARD, S.ESTABLISHED),
        (back(ACK | PSH), Verdict.RETURN, S.ESTABLISHED),
        (out(FIN | ACK), Verdict.FORWARD, S.FIN_WAIT_ORIGINAL),
        (back(ACK), Verdict.RETURN, S.FIN_WAIT_ORIGINAL),
        (back(FIN | ACK), Verdict.RETURN, S.LAST_ACK),
        (out(ACK), Verdict.FORWARD, S.TIME_WAIT),
    ],
    "server closes first": [
        (out(SYN), Verdict.NEW, S.SYN_SENT),
        (back(SYN | ACK), Verdict.RETURN, S.SYN_RECV),
        (out(ACK), Verdict.FORWARD, S.ESTABLISHED),
        (back(FIN | ACK), Verdict.RETURN, S.FIN_WAIT_REPLY),
        (out(FIN | ACK), Verdict.FORWARD, S.LAST_ACK),
        (back(ACK), Verdict.RETURN, S.TIME_WAIT),
    ],
    "reset by server": [
        (out(SYN), Verdict.NEW, S.SYN_SENT),
        (back(RST | ACK), Verdict.RETURN, S.CLOSED),
    ],
    "reset mid-connection, then reopened": [
        (out(SYN), Verdict.NEW, S.SYN_SENT),
        (back(SYN | ACK), Verdict.RETURN, S.SYN_RECV),
        (out(ACK), Verdict.FORWARD, S.ESTABLISHED),
        (out(RST), Verdict.FORWARD, S.CLOSED),
        (out(SYN), Verdict.FORWARD, S.SYN_SENT),
    ],
    "SYN retransmitted": [
        (out(SYN), Verdict.NEW, S.SYN_SENT),
        (out(SYN), Verdict.FORWARD, S.SYN_SENT),
        (back(SYN | ACK), Verdict.RETURN, S.SYN_RECV),
        (back(SYN | ACK), Verdict.RETURN, S.SYN_RECV),
    ],
    "simultaneous open": [
        (out(SYN), Verdict.NEW, S.SYN_SENT),
        (back(SYN), Verdict.RETURN, S.SYN_RECV),
    ],
}


@pytest.mark.parametrize("name", sorted(TCP_SEQUENCES))
def test_tcp_sequence(name: str) -> None:
    table = ConntrackTable()
    now = 100.0
    for match, verdict, state in TCP_SEQUENCES[name]:
        classification = table.track(ZONE, match, now)
        assert classification.verdict is verdict, (match, classification)
        record = table.get(ZONE, KEY, now)
        assert record is not None
        assert record.state is state
        assert record.expires_at == now + DEFAULT_TIMEOUTS.timeout_for(6, state)
        now += 0.5
    assert len(table) == 1


@pytest.mark.parametrize(
    ("flags", "why"),
    [
        (ACK, "lone mid-stream ACK"),
        (ACK | PSH, "mid-stream data"),
        (RST, "RST"),
        (RST | ACK, "RST-ACK"),
        (SYN | ACK, "SYN-ACK without a SYN"),
        (FIN | ACK, "FIN"),
        (SYN | FIN, "SYN+FIN"),
        (0, "no flags"),
    ],
)
def test_tcp_packets_that_do_not_open(flags: int, why: str) -> None:
    table = ConntrackTable()
    classification = table.track(ZONE, out(flags), 0.0)
    assert classification.verdict is Verdict.INVALID, why
    assert classification.depends_on_tcp_flags
    assert not classification.is_return
    assert len(table) == 0
    assert table.due_for_push(0.0) == []


@pytest.mark.parametrize(
    ("flags", "event"),
    [
        (SYN, TcpEvent.SYN),
        (SYN | ACK, TcpEvent.SYN_ACK),
        (FIN, TcpEvent.FIN),
        (FIN | ACK, TcpEvent.FIN),
        (ACK, TcpEvent.ACK),
        (ACK | PSH, TcpEvent.ACK),
        (RST | ACK, TcpEvent.RST),
        (RST | SYN, TcpEvent.RST),
        (SYN | FIN, TcpEvent.INVALID),
        (PSH, TcpEvent.INVALID),
    ],
)
def test_tcp_event_of_flags(flags: int, event: TcpEvent) -> None:
    assert tcp_event(flags) is event


def test_transition_table_invariants() -> None:
    opening = [key for key in TCP_TRANSITIONS if key[0] is None]
    assert opening == [(None, Direction.ORIGINAL, TcpEvent.SYN)]
    for state in ConnState:
        if state in (S.UNREPLIED, S.REPLIED):
            continue
        for direction in Direction:
            assert TCP_TRANSITIONS[(state, direction, TcpEvent.RST)] is S.CLOSED
    assert all(target not in (S.UNREPLIED, S.REPLIED) for target in TCP_TRANSITIONS.values())


def test_return_only_in_zone_that_saw_forward() -> None:
    table = ConntrackTable()
    table.track(ZONE, out(SYN), 0.0)
    assert table.is_return_flow(ZONE, back(SYN | ACK), 1.0)
    assert not table.is_return_flow("router-2", back(SYN | ACK), 1.0)
    # Another connection (different source port) is not a return flow.
    assert not table.is_return_flow(ZONE, tcp(SERVER, 80, CLIENT, 40001, SYN | ACK), 1.0)


def test_classify_does_not_change_the_table() -> None:
    table = ConntrackTable()
    assert table.classify(ZONE, out(SYN), 0.0).verdict is Verdict.NEW
    assert len(table) == 0
    table.track(ZONE, out(SYN), 0.0)
    classification = table.classify(ZONE, back(SYN | ACK), 1.0)
    assert classification.next_state is S.SYN_RECV
    record = table.get(ZONE, KEY, 1.0)
    assert record is not None and record.state is S.SYN_SENT


def test_commit_after_connection_expired_is_a_no_op() -> None:
    table = ConntrackTable()
    table.track(ZONE, out(SYN), 0.0)
    classification = table.classify(ZONE, back(SYN | ACK), 1.0)
    table.expire(500.0)
    assert table.commit(classification, SYN | ACK, 500.0) is None
    assert len(table) == 0


def test_udp_unreplied_then_replied_with_linux_timeouts() -> None:
    table = ConntrackTable()
    request = udp(CLIENT, 5353, SERVER, 53)
    reply = udp(SERVER, 53, CLIENT, 5353)
    key = key_of_match(request)
    assert key is not None
    assert table.track(ZONE, request, 0.0).verdict is Verdict.NEW
    record = table.get(ZONE, key, 0.0)
    assert record is not None and (record.state, record.expires_at) == (S.UNREPLIED, 30.0)
    assert table.track(ZONE, reply, 10.0).verdict is Verdict.RETURN
    record = table.get(ZONE, key, 10.0)
    assert record is not None and (record.state, record.expires_at) == (S.REPLIED, 130.0)
    assert table.track(ZONE, request, 20.0).verdict is Verdict.FORWARD
    assert table.get(ZONE, key, 139.9) is not None  # refreshed to 20 + 120
    assert table.get(ZONE, key, 140.0) is None


def test_icmp_echo_uses_the_id_and_only_a_request_opens() -> None:
    table = ConntrackTable()
    request = packet(CLIENT, SERVER, 1, icmp_type=8, icmp_id=77)
    reply = packet(SERVER, CLIENT, 1, icmp_type=0, icmp_id=77)
    other_id = packet(SERVER, CLIENT, 1, icmp_type=0, icmp_id=78)
    assert table.track(ZONE, reply, 0.0).verdict is Verdict.INVALID
    assert len(table) == 0
    assert table.track(ZONE, request, 0.0).verdict is Verdict.NEW
    assert table.classify(ZONE, reply, 1.0).verdict is Verdict.RETURN
    assert table.classify(ZONE, other_id, 1.0).verdict is Verdict.INVALID
    # A request travelling the reply way is not an answer.
    reverse_request = packet(SERVER, CLIENT, 1, icmp_type=8, icmp_id=77)
    assert table.classify(ZONE, reverse_request, 1.0).verdict is Verdict.INVALID
    record = table.get(ZONE, FlowKey(4, ip(CLIENT), ip(SERVER), 1, 77, 77), 0.0)
    assert record is not None and record.expires_at == DEFAULT_TIMEOUTS.icmp


def test_icmpv6_echo() -> None:
    table = ConntrackTable()
    request = packet("2001:db8::1", "2001:db8::2", 58, icmp_type=128, icmp_id=5)
    reply = packet("2001:db8::2", "2001:db8::1", 58, icmp_type=129, icmp_id=5)
    table.track(ZONE, request, 0.0)
    assert table.is_return_flow(ZONE, reply, 1.0)


def test_icmp_error_is_related_to_the_connection_it_quotes() -> None:
    table = ConntrackTable()
    table.track(ZONE, udp(CLIENT, 5000, SERVER, 53), 0.0)
    router = "198.51.100.1"
    error = packet(router, CLIENT, 1, icmp_type=3, icmp_id=0)  # port unreachable
    quoted = FlowKey(4, ip(CLIENT), ip(SERVER), 17, 5000, 53)
    related = table.classify(ZONE, error, 1.0, embedded=quoted)
    assert related.verdict is Verdict.RELATED and related.is_return
    assert related.key == quoted and related.direction is Direction.REPLY
    # An error about a reply packet travels the original way.
    about_reply = table.classify(ZONE, error, 1.0, embedded=quoted.reversed())
    assert about_reply.verdict is Verdict.RELATED
    assert about_reply.direction is Direction.ORIGINAL
    # Untracked quote, or no quote: invalid, and never opens.
    stranger = FlowKey(4, ip(CLIENT), ip(SERVER), 17, 5001, 53)
    assert table.track(ZONE, error, 1.0, embedded=stranger).verdict is Verdict.INVALID
    assert table.track(ZONE, error, 1.0).verdict is Verdict.INVALID
    assert len(table) == 1


def test_untracked_packets() -> None:
    table = ConntrackTable()
    arp = FlowMatch(eth_type=0x0806)
    fragment = udp(CLIENT, 1, SERVER, 2).with_fields(ip_frag=FRAG_LATER)
    assert table.track(ZONE, arp, 0.0).verdict is Verdict.UNTRACKED
    assert table.track(ZONE, fragment, 0.0).verdict is Verdict.UNTRACKED
    assert len(table) == 0


def test_other_protocols_use_generic_timeout() -> None:
    table = ConntrackTable()
    gre = packet(CLIENT, SERVER, 47)
    table.track(ZONE, gre, 0.0)
    record = table.get(ZONE, FlowKey(4, ip(CLIENT), ip(SERVER), 47, 0, 0), 0.0)
    assert record is not None and record.expires_at == 600.0
    assert table.is_return_flow(ZONE, packet(SERVER, CLIENT, 47), 1.0)


def test_expire_removes_exactly_the_idle_entries() -> None:
    table = ConntrackTable(granularity=1.0)
    table.track(ZONE, udp(CLIENT, 1000, SERVER, 53), 0.0)  # expires at 30
    table.track(ZONE, udp(CLIENT, 1001, SERVER, 53), 10.0)  # expires at 40
    assert table.expire(29.9) == []
    expired = table.expire(30.0)
    assert [record.key.tp_src for record in expired] == [1000]
    assert len(table) == 1
    assert table.expire(35.0) == []
    assert [record.key.tp_src for record in table.expire(1000.0)] == [1001]
    assert len(table) == 0


def test_touch_extends_and_works_from_either_direction() -> None:
    table = ConntrackTable()
    request = udp(CLIENT, 1000, SERVER, 53)
    key = key_of_match(request)
    assert key is not None
    table.track(ZONE, request, 0.0)
    assert table.touch(ZONE, key.reversed(), 25.0)
    assert table.expire(40.0) == []
    assert table.get(ZONE, key, 54.9) is not None
    assert not table.touch(ZONE, key, 60.0)  # gone by then
    assert not table.touch("other-zone", key, 1.0)


def test_observe_tcp_flags_from_flow_stats() -> None:
    table = ConntrackTable()
    table.track(ZONE, out(SYN), 0.0)
    table.track(ZONE, back(SYN | ACK), 0.1)
    record = table.observe_tcp_flags(ZONE, KEY, ACK | PSH, 1.0)
    assert record is not None and record.state is S.ESTABLISHED
    record = table.observe_tcp_flags(ZONE, KEY, FIN | ACK, 2.0)
    assert record is not None and record.state is S.FIN_WAIT_ORIGINAL
    record = table.observe_tcp_flags(ZONE, KEY.reversed(), FIN | ACK, 3.0)
    assert record is not None and record.state is S.TIME_WAIT  # FIN then the final ACK
    record = table.observe_tcp_flags(ZONE, KEY, RST, 4.0)
    assert record is not None and record.state is S.CLOSED
    assert table.observe_tcp_flags(ZONE, FlowKey(4, 1, 2, 6, 3, 4), ACK, 4.0) is None


@pytest.mark.parametrize(
    ("local", "incoming", "merged"),
    [
        (S.SYN_SENT, S.ESTABLISHED, S.ESTABLISHED),
        (S.ESTABLISHED, S.SYN_RECV, S.ESTABLISHED),  # a late push never moves backwards
        (S.FIN_WAIT_ORIGINAL, S.FIN_WAIT_REPLY, S.LAST_ACK),
        (S.ESTABLISHED, S.CLOSED, S.CLOSED),
        (S.TIME_WAIT, S.SYN_SENT, S.SYN_SENT),  # port reuse reopens
        (S.CLOSED, S.SYN_SENT, S.SYN_SENT),
    ],
)
def test_merge_keeps_the_furthest_state(
    local: ConnState, incoming: ConnState, merged: ConnState
) -> None:
    table = ConntrackTable()
    table.merge(ConntrackRecord(ZONE, KEY, local, 100.0), 0.0)
    result = table.merge(ConntrackRecord(ZONE, KEY, incoming, 50.0), 1.0)
    assert result is not None and result.state is merged
    pushed_back = [record.state for record, _ in table.due_for_push(1.0)]
    assert pushed_back == ([merged] if merged is not incoming else [])


def test_merge_of_expired_record_deletes() -> None:
    table = ConntrackTable()
    table.merge(ConntrackRecord(ZONE, KEY, S.ESTABLISHED, 100.0), 0.0)
    assert table.merge(ConntrackRecord(ZONE, KEY, S.ESTABLISHED, 0.0), 1.0) is None
    assert len(table) == 0


def test_new_and_changed_entries_are_pushed_once_then_refreshed_when_used() -> None:
    table = ConntrackTable(refresh=RefreshPolicy(fraction=0.5, max_interval=600, min_interval=1))
    request = udp(CLIENT, 1000, SERVER, 53)
    key = key_of_match(request)
    assert key is not None
    table.track(ZONE, request, 0.0)
    table.set_peers(ZONE, key, frozenset({"host-b"}))
    due = table.due_for_push(0.0)
    assert [(record.state, peers) for record, peers in due] == [
        (S.UNREPLIED, frozenset({"host-b"}))
    ]
    assert table.due_for_push(0.5) == []
    # Used, but the refresh check (timeout 30 * 0.5 = 15 s after the push) is not due yet.
    table.touch(ZONE, key, 5.0)
    assert table.due_for_push(10.0) == []
    assert [record.key for record, _ in table.due_for_push(15.0)] == [key]
    # Not used after that push: the check at 30 finds nothing; the next use makes it due.
    assert table.due_for_push(31.0) == []
    table.touch(ZONE, key, 32.0)
    assert [record.key for record, _ in table.due_for_push(32.0)] == [key]
    # A state change is pushed at once.
    table.track(ZONE, udp(SERVER, 53, CLIENT, 1000), 33.0)
    assert [record.state for record, _ in table.due_for_push(33.0)] == [S.REPLIED]


def test_merged_entries_are_not_pushed_back_unless_used() -> None:
    table = ConntrackTable()
    table.merge(ConntrackRecord(ZONE, KEY, S.ESTABLISHED, 1000.0), 0.0)
    assert table.due_for_push(0.0) == []
    assert table.due_for_push(700.0) == []  # refresh check (max 600 s) found it unused
    table.touch(ZONE, KEY.reversed(), 701.0)
    assert len(table.due_for_push(701.0)) == 1


def test_timeouts_reject_bad_values() -> None:
    with pytest.raises(ValueError, match="tcp_established"):
        ConntrackTimeouts(tcp_established=0)
    with pytest.raises(ValueError, match="udp_replied"):
        ConntrackTimeouts(udp_replied=1e9)


def test_record_rejects_state_of_the_wrong_protocol() -> None:
    with pytest.raises(ValueError, match="ESTABLISHED"):
        ConntrackRecord(ZONE, FlowKey(4, 1, 2, 17, 3, 4), S.ESTABLISHED, 1.0)
    with pytest.raises(ValueError, match="zone"):
        ConntrackRecord("", KEY, S.ESTABLISHED, 1.0)


# --- hypothesis: the TCP state machine under random traffic ---------------------------------

FLAG_CHOICES = st.sampled_from([SYN, SYN | ACK, ACK, ACK | PSH, FIN | ACK, RST, RST | ACK, 0])


class TcpConntrackMachine(RuleBasedStateMachine):
    """Random segments of a few connections in both directions, random time steps.

    Invariants: no entry exists unless a SYN from its originator was committed while the
    connection was absent; an entry's key is the direction of that SYN; a RST leaves CLOSED;
    the table's count, iteration and timer wheel agree; expired entries are never found."""

    def __init__(self) -> None:
        super().__init__()
        self.table = ConntrackTable()
        self.now = 0.0
        self.opened_by: dict[int, FlowKey] = {}  # client port -> key of the opening SYN

    @rule(
        client_port=st.integers(1000, 1002),
        from_client=st.booleans(),
        flags=FLAG_CHOICES,
    )
    def segment(self, client_port: int, from_client: bool, flags: int) -> None:
        match = (
            tcp(CLIENT, client_port, SERVER, 80, flags)
            if from_client
            else tcp(SERVER, 80, CLIENT, client_port, flags)
        )
        key = key_of_match(match)
        assert key is not None
        before = self.table.find(ZONE, key, self.now)
        expected_return = self.table.classify(ZONE, match, self.now).is_return
        assert self.table.is_return_flow(ZONE, match, self.now) == expected_return
        classification = self.table.track(ZONE, match, self.now)
        after = self.table.find(ZONE, key, self.now)
        if before is None:
            if flags == SYN:
                assert classification.verdict is Verdict.NEW
                assert after is not None and after[0].key == key
                assert after[0].state is S.SYN_SENT
                self.opened_by[client_port] = key
            else:
                assert classification.verdict is Verdict.INVALID
                assert after is None
        else:
            assert after is not None
            assert after[0].key == before[0].key
            expected = Verdict.FORWARD if after[1] is Direction.ORIGINAL else Verdict.RETURN
            assert classification.verdict is expected
            if flags & RST:
                assert after[0].state is S.CLOSED

    @rule(seconds=st.sampled_from([0.5, 5.0, 31.0, 61.0, 121.0, 500_000.0]))
    def advance(self, seconds: float) -> None:
        self.now += seconds
        for record in self.table.expire(self.now):
            assert record.expires_at <= self.now

    @precondition(lambda self: len(self.table) > 0)
    @rule()
    def push(self) -> None:
        for record, _ in self.table.due_for_push(self.now):
            assert record.expires_at > self.now

    @invariant()
    def consistent(self) -> None:
        records = list(self.table)
        assert len(records) == len(self.table)
        assert self.table._schedule.scheduled_count() == len(self.table)
        for record in records:
            client_port = (
                record.key.tp_src if record.key.ip_src == ip(CLIENT) else record.key.tp_dst
            )
            assert record.key == self.opened_by[client_port]
            found = self.table.get(ZONE, record.key, self.now)
            if record.expires_at > self.now:
                assert found == record
            else:
                assert found is None


TestTcpConntrackMachine = TcpConntrackMachine.TestCase
TestTcpConntrackMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), FLAG_CHOICES), max_size=30))
def test_state_is_always_reachable_through_the_table(steps: list[tuple[bool, int]]) -> None:
    """Replaying any segment sequence, every state change is one of TCP_TRANSITIONS."""
    table = ConntrackTable()
    for index, (from_client, flags) in enumerate(steps):
        before = table.get(ZONE, KEY, float(index))
        table.track(ZONE, out(flags) if from_client else back(flags), float(index))
        after = table.get(ZONE, KEY, float(index))
        if after is None:
            continue
        previous = before.state if before is not None else None
        if previous is not after.state:
            direction = Direction.ORIGINAL if from_client else Direction.REPLY
            assert TCP_TRANSITIONS[(previous, direction, tcp_event(flags))] is after.state
