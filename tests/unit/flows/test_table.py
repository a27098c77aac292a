"""Unit tests for `hivenet.flows.table`: FlowTable (megaflow lookup, tags, expiry, LRU bound)
and ExactMatchCache. Table-driven cases plus hypothesis properties against naive models."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from hivenet.flows.actions import Action, Drop, Output, SetField, Tunnel
from hivenet.flows.table import ExactMatchCache, Flow, FlowTable, flow_match_values
from hivenet.packets.flowmatch import (
    EMPTY_MASK,
    EXACT_MASK,
    FIELD_INDEX,
    FIELD_NAMES,
    FULL_MASKS,
    FlowMatch,
    mask_from,
)

PORT_AND_DST = mask_from({"in_port": FULL_MASKS["in_port"], "eth_dst": FULL_MASKS["eth_dst"]})
PORT_ONLY = mask_from({"in_port": FULL_MASKS["in_port"]})
OUT_1 = (Output(1),)


def install_for(
    table: FlowTable,
    key: FlowMatch,
    mask: tuple[int, ...],
    *,
    tags: tuple[str, ...] = (),
    now: float = 0.0,
    actions: tuple[Action, ...] = OUT_1,
    idle_timeout: float = 60.0,
    hard_timeout: float = 0.0,
) -> Flow:
    return table.install(
        key.masked(mask),
        mask,
        actions,
        tags,
        now,
        idle_timeout=idle_timeout,
        hard_timeout=hard_timeout,
    )


# ---- validation ---------------------------------------------------------------------------

GOOD_MATCH = FlowMatch(in_port=1).masked(PORT_ONLY)


def _replace(values: tuple[int, ...], field: str, value: object) -> tuple[object, ...]:
    changed: list[object] = list(values)
    changed[FIELD_INDEX[field]] = value
    return tuple(changed)


@pytest.mark.parametrize(
    ("match", "mask", "actions", "tags", "message"),
    [
        (GOOD_MATCH, PORT_ONLY[:-1], OUT_1, (), "mask must have 23 fields"),
        (GOOD_MATCH[:-1], PORT_ONLY, OUT_1, (), "match must have 23 fields"),
        (list(GOOD_MATCH), PORT_ONLY, OUT_1, (), "match must be a tuple"),
        (_replace(GOOD_MATCH, "eth_dst", 5), PORT_ONLY, OUT_1, (), r"match\[eth_dst\]=0x5"),
        (_replace(GOOD_MATCH, "in_port", -1), PORT_ONLY, OUT_1, (), r"match\[in_port\]"),
        (GOOD_MATCH, _replace(PORT_ONLY, "vlan", 0x1FFF), OUT_1, (), r"mask\[vlan\]=0x1fff"),
        (GOOD_MATCH, _replace(PORT_ONLY, "vlan", "x"), OUT_1, (), r"mask\[vlan\] must be an int"),
        (GOOD_MATCH, _replace(PORT_ONLY, "vlan", True), OUT_1, (), r"mask\[vlan\] must be an int"),
        (GOOD_MATCH, PORT_ONLY, (Output(1), "drop"), (), r"actions\[1\] is not an Action"),
        (GOOD_MATCH, PORT_ONLY, "output", (), "actions must be a sequence"),
        (GOOD_MATCH, PORT_ONLY, OUT_1, "bridge:1", "not a bare string"),
        (GOOD_MATCH, PORT_ONLY, OUT_1, ("ok", 7.0), "tags must be non-empty strings or"),
        (GOOD_MATCH, PORT_ONLY, OUT_1, ("ok", -7), r"connection tags \(ints >= 0\), got -7"),
        (GOOD_MATCH, PORT_ONLY, OUT_1, ("ok", True), "got True"),
        (GOOD_MATCH, PORT_ONLY, OUT_1, ("",), "tags must be non-empty strings"),
    ],
)
def test_install_rejects_bad_flow(
    match: object, mask: object, actions: object, tags: object, message: str
) -> None:
    table = FlowTable()
    with pytest.raises(ValueError, match=message):
        table.install(match, mask, actions, tags, 0.0)  # type: ignore[arg-type]
    assert len(table) == 0
    assert table.stats()["installs"] == 0


@pytest.mark.parametrize(
    ("keyword", "value", "message"),
    [
        ("idle_timeout", -1.0, "idle_timeout must be a finite number >= 0, got -1.0"),
        ("hard_timeout", float("nan"), "hard_timeout must be a finite number >= 0"),
        ("hard_timeout", "5", "hard_timeout must be a number, got '5'"),
    ],
)
def test_install_rejects_bad_timeouts(keyword: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FlowTable().install(GOOD_MATCH, PORT_ONLY, OUT_1, (), 0.0, **{keyword: value})  # type: ignore[arg-type]


def test_install_rejects_non_finite_now() -> None:
    with pytest.raises(ValueError, match="now must be a finite number, got inf"):
        FlowTable().install(GOOD_MATCH, PORT_ONLY, OUT_1, (), float("inf"))


@pytest.mark.parametrize("bad", [0, -5, 1.5, True, "10"])
def test_capacities_must_be_positive_ints(bad: object) -> None:
    with pytest.raises(ValueError, match="max_flows must be an int >= 1"):
        FlowTable(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="capacity must be an int >= 1"):
        ExactMatchCache(bad)  # type: ignore[arg-type]


def test_invalidate_rejects_bare_string() -> None:
    with pytest.raises(ValueError, match="not a bare string"):
        FlowTable().invalidate("bridge:1")


# ---- install / lookup -----------------------------------------------------------------------


def test_install_keeps_actions_tags_and_times() -> None:
    table = FlowTable()
    actions: list[Action] = [SetField("eth_dst", 0xAA), Tunnel("10.0.0.2", 77)]
    flow = table.install(
        GOOD_MATCH, PORT_ONLY, actions, ["port:1", "port:1", "bridge:9"], 12.5, hard_timeout=30
    )
    assert flow.actions == tuple(actions)
    assert sorted(flow.tags) == ["bridge:9", "port:1"]
    assert (flow.created, flow.last_used, flow.idle_timeout, flow.hard_timeout) == (
        12.5,
        12.5,
        60.0,
        30.0,
    )
    assert (flow.packets, flow.bytes, flow.removed) == (0, 0, False)
    assert table.flows() == [flow]
    assert flow in table


@pytest.mark.parametrize(
    ("mask", "key", "expect_hit"),
    [
        (PORT_AND_DST, FlowMatch(in_port=1, eth_dst=0xA), True),
        (PORT_AND_DST, FlowMatch(in_port=1, eth_dst=0xA, ip_src=99, tp_dst=80), True),
        (PORT_AND_DST, FlowMatch(in_port=1, eth_dst=0xB), False),
        (PORT_AND_DST, FlowMatch(in_port=2, eth_dst=0xA), False),
        (PORT_ONLY, FlowMatch(in_port=1, eth_dst=0xB), True),
        (EXACT_MASK, FlowMatch(in_port=1, eth_dst=0xA, ip_dst=0x0A000101), True),
        (EXACT_MASK, FlowMatch(in_port=1, eth_dst=0xA, ip_dst=0x0A000101, ip_ttl=64), False),
        (EMPTY_MASK, FlowMatch(in_port=7, eth_dst=0xFFFF), True),
        (mask_from({"ip_dst": 0xFFFFFF00}), FlowMatch(ip_dst=0x0A000105), True),
        (mask_from({"ip_dst": 0xFFFFFF00}), FlowMatch(ip_dst=0x0A000205), False),
    ],
)
def test_lookup_matches_only_masked_fields(
    mask: tuple[int, ...], key: FlowMatch, expect_hit: bool
) -> None:
    table = FlowTable()
    installed_from = FlowMatch(in_port=1, eth_dst=0xA, ip_dst=0x0A000101)
    flow = install_for(table, installed_from, mask)
    found = table.lookup(key, 1.0, packet_bytes=100)
    assert (found is flow) if expect_hit else (found is None)
    stats = table.stats()
    assert (stats["lookups"], stats["hits"], stats["misses"]) == (
        1,
        int(expect_hit),
        int(not expect_hit),
    )
    assert (flow.packets, flow.bytes, flow.last_used) == (
        (1, 100, 1.0) if expect_hit else (0, 0, 0.0)
    )


@pytest.mark.parametrize(
    "field_masks",
    [
        {},
        {"in_port": FULL_MASKS["in_port"]},
        {"in_port": FULL_MASKS["in_port"], "eth_dst": FULL_MASKS["eth_dst"], "tp_dst": 0xFFFF},
        {"ip_dst": 0xFFFF0000},
        {"in_port": FULL_MASKS["in_port"], "ip_dst": 0xFFFFFF00},
        {"in_port": FULL_MASKS["in_port"], "ip_src": 0xFF000000, "ip_dst": 0xFFFFFF00},
    ],
    ids=["empty", "one-whole-field", "whole-fields", "one-prefix", "fields+prefix", "prefixes"],
)
def test_lookup_for_every_mask_shape(field_masks: dict[str, int]) -> None:
    mask = mask_from(field_masks)
    installed_from = FlowMatch(
        in_port=7, eth_dst=0xA, ip_src=0x0B0C0D0E, ip_dst=0x0A000101, tp_dst=443
    )
    table = FlowTable()
    flow = install_for(table, installed_from, mask)
    uncovered_change = installed_from.with_fields(ip_ttl=3, tp_src=9, ip_dst=0x0A000102)
    expect_uncovered_hit = field_masks.get("ip_dst", 0) & 0xFF == 0
    assert (table.lookup(uncovered_change, 1.0) is flow) is expect_uncovered_hit
    assert table.lookup(installed_from, 1.0) is flow
    for name, field_mask in field_masks.items():
        top_bit = 1 << (field_mask.bit_length() - 1)
        changed = installed_from.with_fields(**{name: getattr(installed_from, name) ^ top_bit})
        assert table.lookup(changed, 1.0) is None, name


def test_lookup_on_empty_table_misses() -> None:
    table = FlowTable()
    assert table.lookup(FlowMatch(), 0.0) is None
    assert table.stats()["misses"] == 1


def test_lookup_counts_packets_and_bytes() -> None:
    table = FlowTable()
    flow = install_for(table, FlowMatch(in_port=1), PORT_ONLY)
    for size in (60, 1500, 9000):
        assert table.lookup(FlowMatch(in_port=1, tp_dst=size), 5.0, packet_bytes=size) is flow
    assert (flow.packets, flow.bytes) == (3, 10560)


def test_last_used_never_moves_backwards() -> None:
    table = FlowTable()
    flow = install_for(table, FlowMatch(in_port=1), PORT_ONLY, now=10.0)
    table.lookup(FlowMatch(in_port=1), 20.0)
    table.lookup(FlowMatch(in_port=1), 15.0)
    assert flow.last_used == 20.0


def test_install_replaces_identical_match_and_mask() -> None:
    table = FlowTable()
    old = install_for(table, FlowMatch(in_port=1), PORT_ONLY, tags=("old",), now=1.0)
    table.lookup(FlowMatch(in_port=1), 2.0)
    new = install_for(
        table, FlowMatch(in_port=1), PORT_ONLY, tags=("new",), actions=(Drop("rule"),), now=3.0
    )
    assert old.removed and not new.removed
    assert len(table) == 1
    assert table.lookup(FlowMatch(in_port=1), 4.0) is new
    assert new.packets == 1 and new.created == 3.0
    assert table.invalidate(["old"]) == []
    assert table.stats()["replaced"] == 1
    assert table.masks() == [PORT_ONLY]


def test_same_match_different_mask_is_a_different_flow() -> None:
    table = FlowTable()
    coarse = install_for(table, FlowMatch(in_port=1), PORT_ONLY)
    fine = install_for(table, FlowMatch(in_port=1), PORT_AND_DST)
    assert len(table) == 2 and not coarse.removed and not fine.removed
    assert set(table.masks()) == {PORT_ONLY, PORT_AND_DST}


def test_emptied_subtables_are_dropped() -> None:
    table = FlowTable()
    install_for(table, FlowMatch(in_port=1), PORT_ONLY, tags=("a",))
    install_for(table, FlowMatch(in_port=2), PORT_ONLY, tags=("b",))
    install_for(table, FlowMatch(in_port=1, eth_dst=3), PORT_AND_DST, tags=("a",))
    table.invalidate(["a"])
    assert table.masks() == [PORT_ONLY]
    table.invalidate(["b"])
    assert table.masks() == []
    assert table.stats()["masks"] == 0 and table.stats()["tags"] == 0
    assert table.lookup(FlowMatch(in_port=2), 1.0) is None


def test_busiest_subtable_is_probed_first() -> None:
    table = FlowTable()
    for port in range(1, 21):  # twenty masks whose flows never match the traffic below
        install_for(table, FlowMatch(in_port=port), mask_from({"in_port": (1 << (port + 5)) - 1}))
    busy = install_for(table, FlowMatch(eth_dst=0xBEEF), mask_from({"eth_dst": 0xFFFF}))
    assert table.masks()[0] != busy.mask
    for _ in range(5000):
        assert table.lookup(FlowMatch(in_port=1 << 30, eth_dst=0xBEEF), 1.0) is busy
    assert table.masks()[0] == busy.mask


# ---- invalidation -------------------------------------------------------------------------


def test_invalidate_removes_exactly_tagged_flows() -> None:
    table = FlowTable()
    bridge = install_for(table, FlowMatch(in_port=1), PORT_ONLY, tags=("bridge:1", "port:1"))
    both = install_for(table, FlowMatch(in_port=2), PORT_ONLY, tags=("bridge:1", "router:1"))
    router = install_for(table, FlowMatch(in_port=3), PORT_ONLY, tags=("router:1",))
    untagged = install_for(table, FlowMatch(in_port=4), PORT_ONLY)
    removed = table.invalidate(["bridge:1", "nothing-has-this"])
    assert removed == [bridge, both]
    assert bridge.removed and both.removed
    assert table.flows() == [router, untagged]
    assert table.lookup(FlowMatch(in_port=1), 1.0) is None
    assert table.lookup(FlowMatch(in_port=3), 1.0) is router
    assert table.invalidate(["bridge:1"]) == []
    assert table.invalidate(("router:1",)) == [router]
    assert table.stats()["invalidated"] == 3


# ---- expiry -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("idle", "hard", "used_at", "now", "expired"),
    [
        (10.0, 0.0, [], 9.999, False),
        (10.0, 0.0, [], 10.0, True),
        (10.0, 0.0, [5.0], 14.9, False),
        (10.0, 0.0, [5.0], 15.0, True),
        (10.0, 0.0, [5.0, 9.0], 18.0, False),
        (10.0, 0.0, [5.0, 9.0], 19.0, True),
        (0.0, 0.0, [], 1e12, False),
        (0.0, 30.0, [10.0, 20.0, 29.0], 29.9, False),
        (0.0, 30.0, [10.0, 20.0, 29.0], 30.0, True),
        (60.0, 30.0, [25.0], 30.0, True),
        (5.0, 30.0, [], 5.0, True),
    ],
)
def test_expire_at_the_right_time(
    idle: float, hard: float, used_at: list[float], now: float, expired: bool
) -> None:
    table = FlowTable()
    flow = install_for(table, FlowMatch(in_port=1), PORT_ONLY, idle_timeout=idle, hard_timeout=hard)
    keeper = install_for(table, FlowMatch(in_port=2), PORT_ONLY, idle_timeout=0.0)
    for when in used_at:
        assert table.lookup(FlowMatch(in_port=1), when) is flow
    assert table.expire(now) == ([flow] if expired else [])
    assert flow.removed is expired
    assert table.flows() == ([keeper] if expired else [keeper, flow] if used_at else [flow, keeper])
    assert table.stats()["expired"] == int(expired)


def test_expire_twice_and_after_other_removal() -> None:
    table = FlowTable()
    first = install_for(table, FlowMatch(in_port=1), PORT_ONLY, tags=("x",), idle_timeout=5)
    second = install_for(table, FlowMatch(in_port=2), PORT_ONLY, idle_timeout=8)
    table.invalidate(["x"])
    assert table.expire(6.0) == []  # `first` is gone already: not reported again
    assert table.expire(8.0) == [second]
    assert table.expire(100.0) == []
    assert first.removed and second.removed and len(table) == 0


def test_expire_returns_only_due_flows_in_deadline_order() -> None:
    table = FlowTable()
    flows = [
        install_for(table, FlowMatch(in_port=port), PORT_ONLY, idle_timeout=float(timeout))
        for port, timeout in enumerate([30, 10, 20, 40])
    ]
    assert table.expire(25.0) == [flows[1], flows[2]]
    assert table.flows() == [flows[0], flows[3]]


def test_lookup_treats_due_flow_as_miss_and_removes_it() -> None:
    table = FlowTable()
    flow = install_for(table, FlowMatch(in_port=1), PORT_ONLY, hard_timeout=10.0)
    assert table.lookup(FlowMatch(in_port=1), 9.0) is flow
    assert table.lookup(FlowMatch(in_port=1), 10.0) is None
    assert flow.removed and len(table) == 0
    assert table.stats()["expired"] == 1 and table.stats()["misses"] == 1


def test_lookup_falls_through_a_due_flow_to_a_live_one() -> None:
    table = FlowTable()
    stale = install_for(table, FlowMatch(in_port=1), PORT_ONLY, hard_timeout=5.0)
    live = install_for(table, FlowMatch(in_port=1, eth_dst=2), PORT_AND_DST, idle_timeout=0.0)
    assert table.lookup(FlowMatch(in_port=1, eth_dst=2), 6.0) is live
    assert stale.removed


def test_expiry_heap_stays_bounded_under_churn() -> None:
    table = FlowTable(max_flows=10)
    for index in range(20_000):
        install_for(table, FlowMatch(in_port=index), PORT_ONLY, idle_timeout=1e6)
        if index % 100 == 0:
            table.expire(float(index))
    assert len(table) == 10
    assert len(table._expiry_heap) <= 2 * 10 + 1024 + 100


# ---- eviction -----------------------------------------------------------------------------


def test_eviction_keeps_bound_and_evicts_least_recently_used() -> None:
    table = FlowTable(max_flows=3)
    a, b, c = (install_for(table, FlowMatch(in_port=p), PORT_ONLY, now=p) for p in (1, 2, 3))
    table.lookup(FlowMatch(in_port=1), 4.0)  # a is now the most recently used
    d = install_for(table, FlowMatch(in_port=4), PORT_ONLY, now=5.0)
    assert b.removed and not (a.removed or c.removed or d.removed)
    assert table.flows() == [c, a, d]
    table.lookup(FlowMatch(in_port=3), 6.0)
    e = install_for(table, FlowMatch(in_port=5), PORT_ONLY, now=7.0)
    assert a.removed
    assert table.flows() == [d, c, e]
    assert table.stats()["evictions"] == 2
    assert table.lookup(FlowMatch(in_port=2), 8.0) is None


def test_lru_order_and_membership_after_removals() -> None:
    """The LRU list is the flows' own links: removing the oldest, the newest or one in the
    middle keeps the order of the others, and a removed flow (or another table's) is not in
    the table."""
    table, other = FlowTable(max_flows=10), FlowTable(max_flows=10)
    flows = [
        install_for(table, FlowMatch(in_port=p), PORT_ONLY, now=p, tags=(f"t{p}",))
        for p in range(1, 6)
    ]
    stranger = install_for(other, FlowMatch(in_port=1), PORT_ONLY, now=1.0)
    table.lookup(FlowMatch(in_port=2), 6.0)  # 2 moves to the end
    table.lookup(FlowMatch(in_port=2), 6.5)  # already the newest: stays
    assert table.flows() == [flows[0], flows[2], flows[3], flows[4], flows[1]]
    table.invalidate(["t1", "t4", "t2"])  # the oldest, one in the middle, the newest
    assert table.flows() == [flows[2], flows[4]]
    assert len(table) == 2 and table.stats()["flows"] == 2
    assert [flow in table for flow in flows] == [False, False, True, False, True]
    assert stranger not in table and stranger in other and "t3" not in table  # type: ignore[operator]
    table.invalidate(["t3", "t5"])
    assert table.flows() == [] and len(table) == 0
    again = install_for(table, FlowMatch(in_port=7), PORT_ONLY, now=7.0)
    assert table.flows() == [again] and again in table


def test_replacement_does_not_evict() -> None:
    table = FlowTable(max_flows=2)
    a = install_for(table, FlowMatch(in_port=1), PORT_ONLY)
    b = install_for(table, FlowMatch(in_port=2), PORT_ONLY)
    b2 = install_for(table, FlowMatch(in_port=2), PORT_ONLY, now=1.0)
    assert not a.removed and b.removed and table.flows() == [a, b2]
    assert table.stats()["evictions"] == 0


# ---- exact-match cache --------------------------------------------------------------------


def test_emc_hit_and_capacity_fifo() -> None:
    table = FlowTable()
    flow = install_for(table, FlowMatch(in_port=1), PORT_ONLY, idle_timeout=0.0)
    cache = ExactMatchCache(2)
    keys = [flow_match_values(FlowMatch(in_port=1, tp_src=port)) for port in range(3)]
    for key in keys:
        cache.put(key, flow)
    assert len(cache) == 2
    assert cache.get(keys[0]) is None  # first in, first out
    assert cache.get(keys[1]) is flow and cache.get(keys[2]) is flow
    assert cache.stats() == {"entries": 2, "hits": 2, "misses": 1, "stale": 0}
    cache.clear()
    assert len(cache) == 0 and cache.get(keys[1]) is None


def test_emc_rejects_a_flow_that_does_not_match_the_key() -> None:
    table = FlowTable()
    flow = install_for(table, FlowMatch(in_port=1), PORT_ONLY)
    with pytest.raises(ValueError, match="does not match key"):
        ExactMatchCache(4).put(flow_match_values(FlowMatch(in_port=2)), flow)


REMOVALS = {
    "invalidate": lambda table, flow: table.invalidate(["t"]),
    "replace": lambda table, flow: install_for(table, FlowMatch(in_port=1), PORT_ONLY, now=1.0),
    "expire": lambda table, flow: table.expire(1000.0),
    "evict": lambda table, flow: [
        install_for(table, FlowMatch(in_port=p), PORT_ONLY) for p in (10, 11)
    ],
}


@pytest.mark.parametrize("removal", sorted(REMOVALS))
def test_emc_never_returns_a_removed_flow(removal: str) -> None:
    table = FlowTable(max_flows=2)
    flow = install_for(table, FlowMatch(in_port=1), PORT_ONLY, tags=("t",), idle_timeout=10)
    key = flow_match_values(FlowMatch(in_port=1, ip_src=5))
    cache = ExactMatchCache(8)
    cache.put(key, flow)
    assert cache.get(key) is flow
    REMOVALS[removal](table, flow)
    assert flow.removed
    assert cache.get(key) is None
    assert cache.stats()["stale"] == 1 and len(cache) == 0
    cache.put(key, flow)  # a removed flow is never cached
    assert len(cache) == 0


def test_record_use_refuses_expired_flow_found_in_emc() -> None:
    table = FlowTable()
    flow = install_for(table, FlowMatch(in_port=1), PORT_ONLY, idle_timeout=10)
    key = flow_match_values(FlowMatch(in_port=1))
    cache = ExactMatchCache(8)
    cache.put(key, flow)
    hit = cache.get(key)
    assert hit is flow and table.record_use(hit, 5.0, 64)
    assert (flow.packets, flow.bytes, flow.last_used) == (1, 64, 5.0)
    assert not table.record_use(flow, 15.0)
    assert flow.removed and len(table) == 0 and cache.get(key) is None
    assert not table.record_use(flow, 16.0)


# ---- properties ---------------------------------------------------------------------------

# Small domains on a few fields (one with a partial mask) so that flows overlap and keys hit.
PROPERTY_FIELDS = ("in_port", "eth_dst", "ip_dst", "tp_dst")
FIELD_MASK_CHOICES = st.sampled_from([0, 0b110, -1])  # -1: the field's full mask


@st.composite
def masks(draw: st.DrawFn) -> tuple[int, ...]:
    field_masks = {}
    for name in PROPERTY_FIELDS:
        choice = draw(FIELD_MASK_CHOICES)
        field_masks[name] = FULL_MASKS[name] if choice == -1 else choice
    return mask_from(field_masks)


keys = st.builds(
    FlowMatch, **{name: st.integers(0, 7) for name in PROPERTY_FIELDS}, ip_ttl=st.integers(0, 255)
)


class HasMatchAndMask(Protocol):
    match: tuple[int, ...]
    mask: tuple[int, ...]


FlowLike = TypeVar("FlowLike", bound=HasMatchAndMask)


def naive_matches(flows: Sequence[FlowLike], key: FlowMatch) -> list[FlowLike]:
    values = key.as_tuple()
    return [
        flow
        for flow in flows
        if all(values[i] & flow.mask[i] == flow.match[i] for i in range(len(FIELD_NAMES)))
    ]


@settings(max_examples=200, deadline=None)
@given(
    flows=st.lists(st.tuples(keys, masks()), max_size=40),
    lookups=st.lists(keys, min_size=1, max_size=30),
)
def test_lookup_agrees_with_linear_scan(
    flows: list[tuple[FlowMatch, tuple[int, ...]]], lookups: list[FlowMatch]
) -> None:
    table = FlowTable()
    for key, mask in flows:
        install_for(table, key, mask, idle_timeout=0.0)
    for key in lookups:
        candidates = naive_matches(table.flows(), key)
        found = table.lookup(key, 1.0)
        if candidates:
            assert found is not None and any(found is flow for flow in candidates)
        else:
            assert found is None


@dataclass(frozen=True)
class _Installed:
    match: tuple[int, ...]
    mask: tuple[int, ...]


@settings(max_examples=200, deadline=None)
@given(
    flows=st.lists(st.tuples(keys, masks()), max_size=40),
    lookups=st.lists(keys, min_size=1, max_size=30),
)
def test_flows_keep_their_match_while_subtables_rekey(
    flows: list[tuple[FlowMatch, tuple[int, ...]]], lookups: list[FlowMatch]
) -> None:
    """Subtables keep fields all their flows share out of the keys and put them back when a
    flow differs there: whatever the order, every flow reads back the match it was installed
    with, and lookups agree with a scan of what was installed (not of what the table says)."""
    table = FlowTable()
    installed: dict[tuple[tuple[int, ...], tuple[int, ...]], Flow] = {}
    for key, mask in flows:
        flow = install_for(table, key, mask, idle_timeout=0.0)
        installed[(_masked(key, mask), mask)] = flow
    assert {(flow.match, flow.mask) for flow in table.flows()} == set(installed)
    assert all(flow.match == match for (match, _), flow in installed.items())
    model = [_Installed(match, mask) for match, mask in installed]
    for key in lookups:
        expected = {(entry.match, entry.mask) for entry in naive_matches(model, key)}
        found = table.lookup(key, 1.0)
        assert (found is None) == (not expected)
        assert found is None or (found.match, found.mask) in expected


def _masked(key: FlowMatch, mask: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(value & field_mask for value, field_mask in zip(key.as_tuple(), mask, strict=True))


def test_a_bare_int_key_is_not_interned_and_tuple_keys_share_their_ints() -> None:
    """Flows differing in one field are keyed by that int alone, which no other key of the
    subtable shares: the table keeps no interning entry for it (a connection's flow paid a
    dict entry for nothing). Once the keys are tuples, equal values are one object."""
    table = FlowTable()
    flows = [
        install_for(table, FlowMatch(in_port=1, eth_dst=1000 + n), PORT_AND_DST) for n in range(4)
    ]
    assert table._values == {}
    assert all(
        table.lookup(FlowMatch(in_port=1, eth_dst=1000 + n), 1.0) is flows[n] for n in range(4)
    )
    other = install_for(table, FlowMatch(in_port=2, eth_dst=1000), PORT_AND_DST)  # now tuples
    assert table._values and table.lookup(FlowMatch(in_port=2, eth_dst=1000), 1.0) is other
    values = [value for key in table._subtables[PORT_AND_DST].flows for value in key]
    assert len({id(value) for value in values if value == 1000}) == 1


def test_subtable_puts_a_shared_field_back_into_the_keys() -> None:
    """Two flows of one mask that share in_port and differ in eth_dst, then a third with
    another in_port: all three are found by their own packets only, before and after."""
    table = FlowTable()
    a = install_for(table, FlowMatch(in_port=1, eth_dst=10), PORT_AND_DST)
    b = install_for(table, FlowMatch(in_port=1, eth_dst=11), PORT_AND_DST)
    assert table.lookup(FlowMatch(in_port=2, eth_dst=10), 1.0) is None
    c = install_for(table, FlowMatch(in_port=2, eth_dst=10), PORT_AND_DST)
    for flow, (port, dst) in ((a, (1, 10)), (b, (1, 11)), (c, (2, 10))):
        assert table.lookup(FlowMatch(in_port=port, eth_dst=dst), 1.0) is flow
        assert flow.match == _masked(FlowMatch(in_port=port, eth_dst=dst), PORT_AND_DST)
    assert table.lookup(FlowMatch(in_port=2, eth_dst=11), 1.0) is None
    a2 = install_for(table, FlowMatch(in_port=1, eth_dst=10), PORT_AND_DST)  # replaces a
    assert a.removed and table.lookup(FlowMatch(in_port=1, eth_dst=10), 1.0) is a2
    assert table.stats()["replaced"] == 1 and len(table) == 3


@settings(max_examples=150, deadline=None)
@given(
    flows=st.lists(
        st.tuples(keys, masks(), st.sets(st.sampled_from("abcdef"), max_size=3)), max_size=30
    ),
    doomed=st.sets(st.sampled_from("abcdefg"), max_size=3),
)
def test_invalidate_removes_exactly_flows_with_any_tag(
    flows: list[tuple[FlowMatch, tuple[int, ...], set[str]]], doomed: set[str]
) -> None:
    table = FlowTable()
    for key, mask, tags in flows:
        install_for(table, key, mask, tags=tuple(tags))
    before = table.flows()
    removed = table.invalidate(doomed)
    assert {id(f) for f in removed} == {id(f) for f in before if doomed.intersection(f.tags)}
    assert all(flow.removed for flow in removed)
    assert table.flows() == [f for f in before if not doomed.intersection(f.tags)]
    assert table.stats()["tags"] == len({t for f in table.flows() for t in f.tags})


@dataclass
class ModelFlow:
    match: tuple[int, ...]
    mask: tuple[int, ...]
    tags: frozenset[str]
    created: float
    last_used: float
    idle_timeout: float
    hard_timeout: float

    def expired(self, now: float) -> bool:
        idle = self.idle_timeout > 0 and now >= self.last_used + self.idle_timeout
        hard = self.hard_timeout > 0 and now >= self.created + self.hard_timeout
        return idle or hard


class FlowTableMachine(RuleBasedStateMachine):
    """Drives a small FlowTable and a naive model (a list in LRU order) side by side. Tags
    "a", "b" and "f" are the flows' own (as a connection's: none to three of them, kept in the
    flow's slots or, three, as a tuple), "c".."e" go into shared groups, so
    both indexes and the groups' interning and release are exercised."""

    MAX_FLOWS = 6

    def __init__(self) -> None:
        super().__init__()
        self.table = FlowTable(max_flows=self.MAX_FLOWS, own_tag=lambda tag: tag in "abf")
        self.model: list[ModelFlow] = []  # least recently used first
        self.now = 0.0
        self.emc = ExactMatchCache(4)

    def _model_index(self, match: tuple[int, ...], mask: tuple[int, ...]) -> int | None:
        for index, flow in enumerate(self.model):
            if flow.match == match and flow.mask == mask:
                return index
        return None

    @rule(advance=st.sampled_from([0.0, 0.5, 1.0, 3.0, 10.0]))
    def tick(self, advance: float) -> None:
        self.now += advance

    @rule(
        key=keys,
        mask=masks(),
        tags=st.sets(st.sampled_from("abcdf"), max_size=4),
        idle=st.sampled_from([0.0, 2.0, 5.0]),
        hard=st.sampled_from([0.0, 4.0, 9.0]),
        port=st.sampled_from([1024, 1025, 2000]),
    )
    def install(
        self,
        key: FlowMatch,
        mask: tuple[int, ...],
        tags: set[str],
        idle: float,
        hard: float,
        port: int,
    ) -> None:
        match = key.masked(mask)
        # Equal actions in fresh objects (as each simulation makes them): interned by value.
        actions = (SetField("tp_src", int(str(port))), Tunnel("192.0.2.2", 7), Output(1))
        install_for(
            self.table,
            key,
            mask,
            tags=tuple(tags),
            now=self.now,
            idle_timeout=idle,
            hard_timeout=hard,
            actions=actions,
        )
        index = self._model_index(match, mask)
        if index is not None:
            del self.model[index]
        self.model.append(ModelFlow(match, mask, frozenset(tags), self.now, self.now, idle, hard))
        if len(self.model) > self.MAX_FLOWS:
            del self.model[0]

    @rule(key=keys, via_emc=st.booleans())
    def lookup(self, key: FlowMatch, via_emc: bool) -> None:
        values = flow_match_values(key)
        found: Flow | None = None
        if via_emc:
            cached = self.emc.get(values)
            assert cached is None or not cached.removed, "the EMC returned a removed flow"
            if cached is not None and self.table.record_use(cached, self.now):
                found = cached
        if found is None:
            found = self.table.lookup(key, self.now)
            if found is not None:
                self.emc.put(values, found)
        # The table may have reaped due flows it landed on; each must be due and match.
        live = {(f.match, f.mask) for f in self.table.flows()}
        for flow in [f for f in self.model if (f.match, f.mask) not in live]:
            assert flow.expired(self.now)
            assert naive_matches([flow], key)
            self.model.remove(flow)
        candidates = [f for f in naive_matches(self.model, key) if not f.expired(self.now)]
        if found is None:
            assert not candidates
            return
        assert not found.removed and found.matches(values)
        index = self._model_index(found.match, found.mask)
        assert index is not None
        model_flow = self.model.pop(index)
        assert not model_flow.expired(self.now)
        model_flow.last_used = max(model_flow.last_used, self.now)
        self.model.append(model_flow)

    @rule(tags=st.sets(st.sampled_from("abcdef"), max_size=2))
    def invalidate(self, tags: set[str]) -> None:
        removed = self.table.invalidate(tags)
        expected = [f for f in self.model if tags.intersection(f.tags)]
        assert sorted((f.match, f.mask) for f in removed) == sorted(
            (f.match, f.mask) for f in expected
        )
        self.model = [f for f in self.model if not tags.intersection(f.tags)]

    @rule()
    def expire(self) -> None:
        removed = self.table.expire(self.now)
        expected = [f for f in self.model if f.expired(self.now)]
        assert sorted((f.match, f.mask) for f in removed) == sorted(
            (f.match, f.mask) for f in expected
        )
        self.model = [f for f in self.model if not f.expired(self.now)]

    @invariant()
    def table_agrees_with_model(self) -> None:
        flows = self.table.flows()
        assert len(flows) <= self.MAX_FLOWS
        assert [(f.match, f.mask, frozenset(f.tags), f.last_used) for f in flows] == [
            (f.match, f.mask, frozenset(f.tags), f.last_used) for f in self.model
        ]
        assert len(self.table) == len(flows)
        assert set(self.table.masks()) == {f.mask for f in flows}
        # Groups exist exactly for the shared tag sets in use, each holding its flows.
        own = frozenset("abf")
        for flow in flows:
            assert set(flow.own_tags) == own.intersection(flow.tags)
            assert len(flow.own_tags) == len(set(flow.own_tags))
        shared_sets = {frozenset(f.tags) - own for f in self.model} - {frozenset()}
        assert set(self.table._groups) == shared_sets
        for tags, group in self.table._groups.items():
            members = {f for f in flows if frozenset(f.tags) - own == tags}
            assert set(group.live_flows()) == members and group.live == len(members)
        assert set(self.table._group_index) == {tag for tags in shared_sets for tag in tags}
        # Interned actions: exactly the tuples the live flows hold, one object each, counted
        # per flow; and exactly the actions those tuples hold, one object each, counted per
        # place in a distinct tuple.
        tuples: dict[tuple[Action, ...], int] = {}
        for flow in flows:
            tuples[flow.actions] = tuples.get(flow.actions, 0) + 1
            assert self.table._action_tuples[flow.actions][0] is flow.actions
        assert {t: use[1] for t, use in self.table._action_tuples.items()} == tuples
        held: dict[Action, int] = {}
        for actions in tuples:
            for action in actions:
                held[action] = held.get(action, 0) + 1
                assert self.table._actions[action][0] is action
        assert {action: use[1] for action, use in self.table._actions.items()} == held


FlowTableMachine.TestCase.settings = settings(
    max_examples=120, stateful_step_count=40, deadline=None
)
test_flow_table_against_model = FlowTableMachine.TestCase


@pytest.mark.parametrize(
    "full_fields",
    [(), ("in_port",), ("in_port", "eth_dst"), ("in_port", "eth_dst", "tp_src", "tp_dst")],
)
def test_one_prefix_field_keys_are_flat_and_round_trip(full_fields: tuple[str, ...]) -> None:
    """Whole fields plus one address prefix (the usual megaflow): the stored key is one flat
    tuple (or a bare int), the flow gives back its masked match, and lookups find it only
    inside the prefix."""
    mask = mask_from(
        {name: FULL_MASKS[name] for name in full_fields} | {"ip_dst": FULL_MASKS["ip_dst"] << 8}
    )
    packet = FlowMatch(
        in_port=3, eth_dst=0x020000000001, eth_type=0x0800, ip_dst=0x0A000105, tp_src=7, tp_dst=9
    )
    table = FlowTable()
    flow = install_for(table, packet, mask)
    assert flow.match == packet.masked(mask)
    assert type(flow._key) is int or all(type(value) is int for value in flow._key)
    assert table.lookup(packet, 1.0) is flow
    assert table.lookup(dataclasses.replace(packet, ip_dst=0x0A0001FE), 1.0) is flow
    assert table.lookup(dataclasses.replace(packet, ip_dst=0x0A000205), 1.0) is None


def test_a_shared_tag_group_forgets_removed_flows() -> None:
    """Flows sharing a group come and go (expired, replaced, invalidated by their own tags):
    the group's list stays within twice its live flows plus slack, and invalidating by a
    shared tag removes exactly the live ones."""
    table = FlowTable()
    live: list[Flow] = []
    for round_ in range(40):
        for n in range(10):
            packet = FlowMatch(in_port=1 + n, eth_dst=round_ + 1)
            live.append(install_for(table, packet, PORT_AND_DST, tags=("bridge:b", n)))
        table.invalidate(range(8))  # eight of the ten go (own tags: connection tags are ints)
        live = [flow for flow in live if not flow.removed]
    (group,) = table._groups.values()
    assert group.live == len(live) == 80
    assert len(group.flows) <= 2 * group.live + 16
    assert set(table.invalidate(["bridge:b"])) == set(live)
    assert len(table) == 0 and not table._groups


def test_flows_with_equal_actions_share_one_tuple_until_the_last_goes() -> None:
    """Connections of one path hold equal actions (made afresh by each simulation): the table
    keeps one tuple of them; a flow with a rewrite of its own gets its own tuple that still
    shares the common actions; removing flows releases both once no flow holds them."""
    table = FlowTable(own_tag=lambda tag: tag.startswith("conn"))
    mask = mask_from({"in_port": FULL_MASKS["in_port"], "tp_src": FULL_MASKS["tp_src"]})

    def fresh(port: int) -> tuple[Action, ...]:
        return (SetField("ip_src", int("3405803778")), Tunnel("192.0.2.2", 7), Output(port))

    flows = [
        install_for(table, FlowMatch(in_port=1, tp_src=src), mask, actions=fresh(1), tags=(tag,))
        for src, tag in ((1024, "conn1"), (1025, "conn2"))
    ]
    own = install_for(
        table, FlowMatch(in_port=1, tp_src=1026), mask, actions=fresh(2), tags=("conn3",)
    )
    assert flows[0].actions is flows[1].actions
    assert own.actions is not flows[0].actions and own.actions == fresh(2)
    assert own.actions[:2] == flows[0].actions[:2]
    assert all(a is b for a, b in zip(own.actions[:2], flows[0].actions[:2], strict=True))
    table.invalidate({"conn1"})
    assert flows[1].actions in table._action_tuples
    table.invalidate({"conn2", "conn3"})
    assert not table._action_tuples and not table._actions
