"""The pure half of health monitoring: who probes a member (rendezvous over live hosts), the
probe state machine (a table) and how every agent derives a member's status from reports."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hivenet.model import HealthMonitor, OperatingStatus
from hivenet.sim.loadbalancer import (
    PROBE_TRANSITIONS,
    MemberProbe,
    PersistedChoice,
    PersistenceTable,
    ProbeState,
    choose_probers,
    derive_member_status,
)

HOSTS = [f"h{n}" for n in range(1, 9)]
MONITOR = HealthMonitor(id="hm", pool_id="p", type="tcp", max_retries=2, max_retries_down=3)


def run_probes(outcomes: list[bool], monitor: HealthMonitor = MONITOR) -> list[ProbeState]:
    probe = MemberProbe()
    states = []
    for succeeded in outcomes:
        probe = probe.advance(succeeded, monitor)
        states.append(probe.state)
    return states


def test_probers_are_k_distinct_live_hosts_chosen_the_same_everywhere() -> None:
    chosen = choose_probers("member-1", HOSTS, 2)
    assert len(set(chosen)) == 2 and set(chosen) <= set(HOSTS)
    assert choose_probers("member-1", reversed(HOSTS), 2) == chosen  # order does not matter
    assert choose_probers("member-1", HOSTS[:1], 2) == (HOSTS[0],)  # fewer hosts than k
    with pytest.raises(ValueError, match="count=0"):
        choose_probers("member-1", HOSTS, 0)


@settings(max_examples=200, deadline=None)
@given(member=st.text(min_size=1, max_size=12), gone=st.sampled_from(HOSTS))
def test_a_host_leaving_moves_only_its_own_probing(member: str, gone: str) -> None:
    before = choose_probers(member, HOSTS, 2)
    after = choose_probers(member, [h for h in HOSTS if h != gone], 2)
    if gone in before:
        kept = set(before) - {gone}
        assert kept <= set(after) and len(after) == 2
    else:
        assert after == before


def test_members_spread_over_probers() -> None:
    load = {h: 0 for h in HOSTS}
    for n in range(800):
        for host in choose_probers(f"member-{n}", HOSTS, 2):
            load[host] += 1
    assert min(load.values()) > 140 and max(load.values()) < 260, load


@pytest.mark.parametrize(
    ("outcomes", "expected"),
    [
        ([True], [ProbeState.ONLINE]),  # a first success proves it serves
        ([False, False], [ProbeState.UNKNOWN, ProbeState.UNKNOWN]),
        ([False, False, False], [ProbeState.UNKNOWN] * 2 + [ProbeState.OFFLINE]),
        # online: down only after max_retries_down failures IN A ROW
        ([True, False, False, True, False, False], [ProbeState.ONLINE] * 6),
        ([True, False, False, False], [ProbeState.ONLINE] * 3 + [ProbeState.OFFLINE]),
        # offline: back only after max_retries successes in a row
        (
            [False, False, False, True, False, True, True],
            [ProbeState.UNKNOWN] * 2 + [ProbeState.OFFLINE] * 4 + [ProbeState.ONLINE],
        ),
    ],
)
def test_probe_state_machine(outcomes: list[bool], expected: list[ProbeState]) -> None:
    assert run_probes(outcomes) == expected


def test_transition_table_is_total() -> None:
    assert set(PROBE_TRANSITIONS) == {(s, ok) for s in ProbeState for ok in (True, False)}


@settings(max_examples=200, deadline=None)
@given(outcomes=st.lists(st.booleans(), max_size=30))
def test_state_changes_only_after_a_long_enough_streak(outcomes: list[bool]) -> None:
    states = run_probes(outcomes)
    previous = ProbeState.UNKNOWN
    for index, state in enumerate(states):
        if state is not previous and state is ProbeState.OFFLINE:
            assert outcomes[max(0, index - 2) : index + 1] == [False] * 3
        if state is not previous and previous is ProbeState.OFFLINE:
            assert outcomes[index - 1 : index + 1] == [True, True]
        previous = state


def test_derived_status_needs_every_report_to_say_offline() -> None:
    online, offline = OperatingStatus.ONLINE, OperatingStatus.OFFLINE
    assert derive_member_status([]) is None
    assert derive_member_status([offline]) is offline
    assert derive_member_status([offline, offline]) is offline
    assert derive_member_status([offline, online]) is online
    assert derive_member_status([online]) is online


def test_persistence_table_expires_bounds_and_forgets_pools() -> None:
    table = PersistenceTable(max_entries=2)
    table.remember(PersistedChoice("p", 1, "m1", expires_at=10.0))
    assert table.get("p", 1, now=9.0) is not None
    assert table.get("p", 1, now=10.0) is None and len(table) == 0  # expired: gone
    for source in (1, 2, 3):
        table.remember(PersistedChoice("p", source, "m1", expires_at=50.0))
    assert len(table) == 2 and table.get("p", 1, now=0.0) is None  # oldest evicted
    assert table.forget_pool("p") == 2 and len(table) == 0
    with pytest.raises(ValueError, match="max_entries=0"):
        PersistenceTable(max_entries=0)
