"""`note_use`: the agent's periodic scan of used flows restarts an entry's idle timer to
within `USE_SLACK` of its timeout (a scan that would move the deadline by less leaves the
entry alone, once its use is noted for the next refresh push), and a holder of a dropped
entry falls back to the connection's live entry, if any."""

from __future__ import annotations

from hivenet.flowstate.conntrack import ConnState, ConntrackRecord, ConntrackTable
from hivenet.flowstate.keys import FlowKey, key_of_match
from hivenet.flowstate.nat import NatKind, NatRecord, NatTable
from hivenet.flowstate.schedule import (
    TRACKED_SLOTS,
    USE_SLACK,
    EntryScheduler,
    RefreshPolicy,
    TrackedEntry,
)

from .helpers import ip, udp
from .test_nat import NAT_RANGE, PRIVATE, REMOTE, snat_table

ZONE = "router-1"


class _Entry(TrackedEntry):
    __slots__ = TRACKED_SLOTS


def test_a_use_within_the_slack_moves_nothing_once_noted() -> None:
    timeout = 64.0  # slack: 1 s
    assert timeout * USE_SLACK == 1.0
    scheduler = EntryScheduler(RefreshPolicy(min_interval=1.0, max_interval=600.0))
    entry = _Entry(0.0, timeout)
    scheduler.set_expiry(entry, timeout, timeout)
    assert scheduler.note_use(entry, 0.5)  # the first use is always noted
    assert entry.expires_at == 64.5 and entry.used_since_push
    assert not scheduler.note_use(entry, 1.0)  # would move it by 0.5 s
    assert entry.expires_at == 64.5
    assert scheduler.note_use(entry, 1.625)  # by 1.125 s
    assert entry.expires_at == 65.625
    # Pushed: the next use is noted (for the next refresh push) even within the slack.
    scheduler.mark_known_to_peers(entry, 2.0)
    assert not entry.used_since_push
    assert scheduler.note_use(entry, 2.125)
    assert entry.used_since_push and entry.expires_at == 66.125


def test_an_entry_awaiting_use_is_pushed_at_its_next_use_even_within_the_slack() -> None:
    scheduler = EntryScheduler(RefreshPolicy(fraction=0.5, min_interval=1.0, max_interval=600.0))
    entry = _Entry(0.0, 640.0)  # slack 10 s, refresh check 320 s after a push
    scheduler.set_expiry(entry, 640.0, 640.0)
    scheduler.mark_known_to_peers(entry, 0.0)
    assert scheduler.note_use(entry, 1.0)
    assert scheduler.pop_due_for_push(320.0) == [entry]  # used since the push: refreshed
    assert scheduler.pop_due_for_push(640.0) == []  # not used since: awaits its next use
    assert entry.awaiting_use
    assert scheduler.note_use(entry, 640.5)
    assert scheduler.pop_due_for_push(640.5) == [entry]


def test_conntrack_handle_is_used_while_live_and_falls_back_to_a_newer_entry() -> None:
    table = ConntrackTable()  # UDP unreplied: 30 s, slack ~0.47 s
    request = udp("10.0.0.5", 1000, "198.51.100.20", 53)
    key = key_of_match(request)
    assert key is not None
    table.track(ZONE, request, 0.0)
    handle = table.handle(ZONE, key.reversed(), 0.0)  # either direction
    assert handle is not None
    assert table.note_use(handle, 10.0)
    assert table.find(ZONE, key, 10.0) is not None
    assert table.expire(39.9) == []
    assert not table.note_use(handle, 10.2)  # within the slack
    # The connection is removed and opened again: a new entry; the old handle finds it.
    assert table.remove(ZONE, key)
    table.merge(ConntrackRecord(ZONE, key, ConnState.UNREPLIED, 25.0), 20.0)
    assert table.note_use(handle, 20.0)
    record = table.get(ZONE, key, 20.0)
    assert record is not None and record.expires_at == 50.0
    # Gone for good: nothing to use.
    assert table.remove(ZONE, key)
    assert not table.note_use(handle, 21.0)
    assert table.handle(ZONE, key, 21.0) is None


def test_conntrack_handle_of_an_expired_unswept_entry_is_not_revived() -> None:
    table = ConntrackTable()
    request = udp("10.0.0.5", 1000, "198.51.100.20", 53)
    table.track(ZONE, request, 0.0)
    key = key_of_match(request)
    assert key is not None
    handle = table.handle(ZONE, key, 0.0)
    assert handle is not None
    assert not table.note_use(handle, 30.0)  # past its 30 s, before any expire() sweep
    assert [record.key for record in table.expire(30.0)] == [key]


def _expires(table: NatTable, original: FlowKey, now: float) -> float:
    (at,) = [r.expires_at for r in table.snapshot(now) if r.binding.original == original]
    return at


def test_nat_binding_is_used_while_live_and_falls_back_by_its_original_key() -> None:
    table, _ = snat_table()  # TCP: 7440 s, slack 116.25 s
    key = FlowKey(4, ip(PRIVATE), ip(REMOTE), 6, 40000, 443)
    binding, _ = table.snat(ZONE, key, [NAT_RANGE], 0.0)
    assert table.note_use(binding, 10.0)
    assert _expires(table, key, 10.0) == 7450.0
    assert not table.note_use(binding, 100.0)  # within the slack
    assert _expires(table, key, 100.0) == 7450.0
    assert table.note_use(binding, 200.0)
    assert _expires(table, key, 200.0) == 7640.0
    # Removed and pushed back by a peer: an equal binding in a new entry; the old one finds it.
    assert table.remove(ZONE, NatKind.SNAT, key)
    table.merge(NatRecord(binding, 300.0), 250.0)
    assert table.note_use(binding, 260.0)
    assert _expires(table, key, 260.0) == 7700.0
    assert table.remove(ZONE, NatKind.SNAT, key)
    assert not table.note_use(binding, 270.0)
