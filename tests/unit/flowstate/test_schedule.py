"""The scheduler's timer wheels and `EntryOrder` (deques with lazy removal, compacted when
stale members outnumber live ones) against models: a dict of each entry's expiry time, a
dict used as an ordered set. Random moves, removals, expiries, pushes and evictions; the
compaction threshold is lowered so it runs often."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from hivenet.flowstate import schedule
from hivenet.flowstate.schedule import (
    TRACKED_SLOTS,
    EntryOrder,
    EntryScheduler,
    RefreshPolicy,
    TrackedEntry,
)


class _Entry(TrackedEntry):
    """A bare tracked entry: the tables' entries list `TRACKED_SLOTS` in their own slots."""

    __slots__ = TRACKED_SLOTS


ENTRIES = 12


class WheelMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.scheduler = EntryScheduler(RefreshPolicy(min_interval=1.0), granularity=1.0)
        self.entries = [_Entry(0.0, 1.0) for _ in range(ENTRIES)]
        self.expires: dict[int, float] = {}  # model: scheduled entry -> expires_at
        self.now = 0.0

    @rule(index=st.integers(0, ENTRIES - 1), delay=st.integers(1, 6))
    def set_expiry(self, index: int, delay: int) -> None:
        expires_at = self.now + delay + 0.5
        self.scheduler.set_expiry(self.entries[index], expires_at, float(delay))
        self.expires[index] = expires_at

    @rule(index=st.integers(0, ENTRIES - 1), at=st.sampled_from([0.0, 0.25, 0.9375]))
    def move_within_bucket(self, index: int, at: float) -> None:
        """A deadline moved inside its bucket (the expiry wheel keeps no bucket number: the
        entry stays where it is, due at the new time)."""
        if index in self.expires:
            expires_at = self.expires[index] // 1.0 + at
            self.scheduler.set_expiry(self.entries[index], expires_at, 1.0)
            self.expires[index] = expires_at

    @rule(index=st.integers(0, ENTRIES - 1))
    def forget(self, index: int) -> None:
        self.scheduler.forget(self.entries[index])
        self.expires.pop(index, None)

    @rule(index=st.integers(0, ENTRIES - 1))
    def pushed(self, index: int) -> None:
        if index in self.expires:
            self.scheduler.mark_known_to_peers(self.entries[index], self.now)

    @rule(step=st.integers(0, 3))
    def advance(self, step: int) -> None:
        self.now += step
        expired = self.scheduler.pop_expired(self.now)
        expected = {i for i, at in self.expires.items() if at <= self.now}
        got = [self.entries.index(entry) for entry in expired]
        assert len(got) == len(set(got)), "an entry expired twice"
        assert set(got) == expected
        for index in expected:
            del self.expires[index]
        self.scheduler.pop_due_for_push(self.now)

    @rule()
    def victim(self) -> None:
        victim, preferred = self.scheduler.victim((), ())
        assert not preferred
        if not self.expires:
            assert victim is None
            return
        assert victim is not None
        index = self.entries.index(victim)
        bucket = int(self.expires[index] // 1.0)
        assert bucket == min(int(at // 1.0) for at in self.expires.values())

    @invariant()
    def counts_and_bound(self) -> None:
        assert self.scheduler.scheduled_count() == len(self.expires)
        for entry_index, entry in enumerate(self.entries):
            scheduled = entry_index in self.expires
            assert bool(entry.flags & schedule.IN_EXPIRY) == scheduled
        for wheel in (self.scheduler._expiry, self.scheduler._refresh):
            members = sum(len(bucket) for bucket in wheel.buckets.values())
            assert members <= 2 * wheel.live + schedule._COMPACT_SLACK + 1
            assert wheel.live == len(wheel)
        refresh = self.scheduler._refresh
        assert set(refresh.numbers) == set(refresh.buckets)


@pytest.fixture(autouse=True)
def _small_slack(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(schedule, "_COMPACT_SLACK", 3)


TestWheel = WheelMachine.TestCase
TestWheel.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)


def test_many_moves_stay_bounded() -> None:
    """An entry moved between buckets a thousand times leaves no more than the slack behind."""
    scheduler = EntryScheduler(RefreshPolicy(), granularity=1.0)
    entries = [_Entry(0.0, 1.0) for _ in range(10)]
    for round_ in range(1000):
        for entry in entries:
            scheduler.set_expiry(entry, 100.0 + round_, 1.0)
    members = sum(len(bucket) for bucket in scheduler._expiry.buckets.values())
    assert members <= 2 * len(entries) + schedule._COMPACT_SLACK + 1
    assert scheduler.scheduled_count() == len(entries)
    assert set(scheduler.pop_expired(2000.0)) == set(entries)


@given(
    deadlines=st.lists(
        st.floats(min_value=0.0, max_value=1e6, allow_nan=False, allow_infinity=False),
        min_size=1,
        max_size=50,
    )
)
def test_deadlines_round_up_to_the_grid_and_share_one_float(deadlines: list[float]) -> None:
    """An entry expires no earlier than asked and less than a step later; entries given
    deadlines in one step hold the same float object, and expire together."""
    scheduler = EntryScheduler(RefreshPolicy(), granularity=1.0)
    entries = [_Entry(0.0, 1.0) for _ in deadlines]
    for entry, asked in zip(entries, deadlines, strict=True):
        scheduler.set_expiry(entry, asked, 1.0)
        assert 0 <= entry.expires_at - asked <= schedule.DEADLINE_STEP
        assert (entry.expires_at / schedule.DEADLINE_STEP).is_integer()
    by_value: dict[float, float] = {}
    for entry in entries:
        assert by_value.setdefault(entry.expires_at, entry.expires_at) is entry.expires_at
    for entry, asked in zip(entries, deadlines, strict=True):
        expired = scheduler.pop_expired(entry.expires_at)
        assert entry in expired or not entry.flags & schedule.IN_EXPIRY
        assert asked <= entry.expires_at


class OrderMachine(RuleBasedStateMachine):
    """`EntryOrder` (deque, lazy removal) against a dict used as an ordered set, with the
    push bits of the same `flags` changed in between (they must not disturb membership)."""

    def __init__(self) -> None:
        super().__init__()
        self.order = EntryOrder()
        self.scheduler = EntryScheduler(RefreshPolicy(), granularity=1.0)
        self.entries = [_Entry(100.0, 10.0) for _ in range(ENTRIES)]
        self.model: dict[int, None] = {}

    @rule(index=st.integers(0, ENTRIES - 1))
    def add(self, index: int) -> None:
        self.order.add(self.entries[index])
        self.model.setdefault(index, None)

    @rule(index=st.integers(0, ENTRIES - 1))
    def discard(self, index: int) -> None:
        self.order.discard(self.entries[index])
        self.model.pop(index, None)

    @rule(index=st.integers(0, ENTRIES - 1))
    def push_bits(self, index: int) -> None:
        entry = self.entries[index]
        self.scheduler.mark_changed(entry)
        self.scheduler.mark_known_to_peers(entry, 0.0)
        self.scheduler.mark_used(entry)

    @rule()
    def first_member(self) -> None:
        first = next(iter(self.order), None)
        expected = next(iter(self.model), None)
        assert first is (None if expected is None else self.entries[expected])

    @invariant()
    def same_members_in_order(self) -> None:
        assert [self.entries.index(entry) for entry in self.order] == list(self.model)
        assert len(self.order) == len(self.model)
        for index, entry in enumerate(self.entries):
            assert (entry in self.order) == (index in self.model)
        assert len(self.order._queue) <= 2 * len(self.model) + schedule._COMPACT_SLACK + 1


TestOrder = OrderMachine.TestCase
TestOrder.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
