"""`note_use`: the agent's periodic scan of used flows restarts an entry's idle timer to
within `USE_SLACK` of its timeout (a scan that would move the deadline by less leaves the
entry alone, once its use is noted for the next refresh push); the tables find the entry by
the key a flow's tag names (either direction of a connection, a forward or reply key of a
binding), so a connection opened again uses its new entry."""

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


def test_conntrack_use_by_either_direction_of_its_key() -> None:
    table = ConntrackTable()  # UDP unreplied: 30 s, slack ~0.47 s
    request = udp("10.0.0.5", 1000, "198.51.100.20", 53)
    key = key_of_match(request)
    assert key is not None
    table.track(ZONE, request, 0.0)
    assert table.note_use(ZONE, key.reversed(), 10.0)  # either direction
    assert table.note_use(ZONE, int(key.reversed()), 20.0)  # a plain int, as a tag holds it
    assert table.find(ZONE, key, 10.0) is not None
    assert table.expire(39.9) == []
    assert not table.note_use(ZONE, key, 10.2)  # within the slack
    assert not table.note_use("another-zone", key, 20.0)
    # The connection is removed and opened again by a peer: the new entry is used.
    assert table.remove(ZONE, key)
    table.merge(ConntrackRecord(ZONE, key, ConnState.UNREPLIED, 25.0), 20.0)
    assert table.note_use(ZONE, key, 20.0)
    record = table.get(ZONE, key, 20.0)
    assert record is not None and record.expires_at == 50.0
    # Gone for good: nothing to use.
    assert table.remove(ZONE, key)
    assert not table.note_use(ZONE, key, 21.0)


def test_conntrack_use_of_an_expired_unswept_entry_does_not_revive_it() -> None:
    table = ConntrackTable()
    request = udp("10.0.0.5", 1000, "198.51.100.20", 53)
    table.track(ZONE, request, 0.0)
    key = key_of_match(request)
    assert key is not None
    assert not table.note_use(ZONE, key, 30.0)  # past its 30 s, before any expire() sweep
    assert [record.key for record in table.expire(30.0)] == [key]


def _expires(table: NatTable, original: FlowKey, now: float) -> float:
    (at,) = [r.expires_at for r in table.snapshot(now) if r.binding.original == original]
    return at


def test_nat_use_by_the_key_its_tag_names_forward_or_reply() -> None:
    """A NAT tag's key is a forward packet's (the binding's original key) or a reply's (the
    reverse of its translated key): either finds the binding."""
    table, _ = snat_table()  # TCP: 7440 s, slack 116.25 s
    key = FlowKey(4, ip(PRIVATE), ip(REMOTE), 6, 40000, 443)
    binding, _ = table.snat(ZONE, key, [NAT_RANGE], 0.0)
    assert table.note_use(ZONE, NatKind.SNAT, key, 10.0)
    assert _expires(table, key, 10.0) == 7450.0
    assert not table.note_use(ZONE, NatKind.SNAT, key, 100.0)  # within the slack
    assert _expires(table, key, 100.0) == 7450.0
    assert table.note_use(ZONE, NatKind.SNAT, binding.translated.reversed(), 200.0)  # reply
    assert _expires(table, key, 200.0) == 7640.0
    # A plain int, as the scan reads it from a tag: forward, then reply.
    assert table.note_use(ZONE, NatKind.SNAT, int(key), 400.0)
    assert table.note_use(ZONE, NatKind.SNAT, int(binding.translated.reversed()), 600.0)
    assert _expires(table, key, 600.0) == 8040.0
    assert not table.note_use(ZONE, NatKind.SNAT, int(binding.translated.reversed()), 601.0)
    assert not table.note_use(ZONE, NatKind.DNAT, key, 300.0)  # another kind: no binding
    assert not table.note_use(ZONE, NatKind.SNAT, binding.translated, 300.0)
    # Removed and pushed back by a peer: the new entry is used.
    assert table.remove(ZONE, NatKind.SNAT, key)
    table.merge(NatRecord(binding, 300.0), 250.0)
    assert table.note_use(ZONE, NatKind.SNAT, key, 260.0)
    assert _expires(table, key, 260.0) == 7700.0
    assert table.remove(ZONE, NatKind.SNAT, key)
    assert not table.note_use(ZONE, NatKind.SNAT, key, 270.0)
