"""Maglev lookup tables: validation, determinism (also across processes), weighted balance,
and minimal disruption when a member leaves or joins."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from hivenet.sim.maglev import (
    DEFAULT_TABLE_SIZE,
    MaglevError,
    MaglevTable,
    NoMemberError,
    WeightedMember,
    _permutation_parameters,
    build_lookup_table_reference,
    five_tuple_hash,
    is_prime,
    moved_fraction,
    source_ip_hash,
)

SMALL_TABLE = 4099  # prime; keeps property tests fast
REPO_ROOT = Path(__file__).resolve().parents[3]

member_ids = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12).map(
    lambda text: f"m-{text}"
)
weighted_members = st.lists(
    st.builds(WeightedMember, member_ids, st.integers(min_value=1, max_value=256)),
    min_size=1,
    max_size=12,
    unique_by=lambda member: member.member_id,
)


def equal_members(count: int) -> list[WeightedMember]:
    return [WeightedMember(f"backend-{index}") for index in range(count)]


# ---- validation


@pytest.mark.parametrize(
    ("table_size", "message"),
    [
        (65536, "must be a prime"),
        (1, "between 7 and"),
        (20_000_003, "between 7 and"),
        (True, "must be an integer"),
        (65537.0, "must be an integer"),
    ],
)
def test_table_size_is_checked(table_size: object, message: str) -> None:
    with pytest.raises(MaglevError, match=message) as caught:
        MaglevTable.build(equal_members(2), table_size)  # type: ignore[arg-type]
    assert "table_size=" in str(caught.value)


@pytest.mark.parametrize(
    ("member_id", "weight", "message"),
    [
        ("", 1, "member_id=''"),
        ("a", -1, "weight=-1 of a"),
        ("a", 257, "weight=257 of a"),
        ("a", 1.5, "weight=1.5 of a"),
        ("a", True, "weight=True of a"),
    ],
)
def test_member_is_checked(member_id: str, weight: object, message: str) -> None:
    with pytest.raises(MaglevError, match=message):
        WeightedMember(member_id, weight)  # type: ignore[arg-type]


def test_duplicate_members_and_too_small_tables_are_refused() -> None:
    with pytest.raises(MaglevError, match="member_id='a': appears more than once"):
        MaglevTable.build([WeightedMember("a"), WeightedMember("a", 2)], SMALL_TABLE)
    with pytest.raises(MaglevError, match="table_size=7: smaller than the 8 members"):
        MaglevTable.build(equal_members(8), 7)


def test_primality_matches_trial_division() -> None:
    def trial(number: int) -> bool:
        return number >= 2 and all(number % d for d in range(2, int(number**0.5) + 1))

    assert [n for n in range(5000) if is_prime(n)] == [n for n in range(5000) if trial(n)]
    assert is_prime(65537) and is_prime(16_777_213) and not is_prime(65537 * 65539)


def test_an_empty_table_selects_nothing() -> None:
    table = MaglevTable.build([WeightedMember("idle", 0)], SMALL_TABLE)
    assert table.is_empty and table.slots() == () and table.slot_counts() == {}
    with pytest.raises(NoMemberError):
        table.select(12345)


# ---- determinism


@settings(max_examples=40, deadline=None)
@given(members=weighted_members, seed=st.randoms(use_true_random=False))
def test_same_members_in_any_order_give_the_same_table(
    members: list[WeightedMember], seed: random.Random
) -> None:
    shuffled = list(members)
    seed.shuffle(shuffled)
    first = MaglevTable.build(members, SMALL_TABLE)
    again = MaglevTable.build(shuffled, SMALL_TABLE)
    assert first == again and first.fingerprint() == again.fingerprint()


@settings(max_examples=30, deadline=None)
@given(members=weighted_members, table_size=st.sampled_from([7, 101, 1009, SMALL_TABLE]))
def test_fast_build_equals_the_plain_walk(members: list[WeightedMember], table_size: int) -> None:
    if len(members) > table_size:
        return
    table = MaglevTable.build(members, table_size)
    assert list(table.slots()) == build_lookup_table_reference(members, table_size)


def test_tables_and_hashes_are_the_same_in_another_process() -> None:
    """Other agents run in other processes, with other `hash()` salts: they must agree."""
    members = [WeightedMember(f"backend-{index}", index + 1) for index in range(10)]
    here = MaglevTable.build(members)
    script = (
        "from hivenet.sim.maglev import MaglevTable, WeightedMember, five_tuple_hash, "
        "source_ip_hash\n"
        "members = [WeightedMember(f'backend-{i}', i + 1) for i in range(10)]\n"
        "print(MaglevTable.build(members).fingerprint())\n"
        "print(five_tuple_hash(0x0A000001, 0xCB00710A, 6, 40000, 443))\n"
        "print(source_ip_hash(0x20010DB8 << 96 | 1))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO_ROOT / "src")}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        here.fingerprint(),
        str(five_tuple_hash(0x0A000001, 0xCB00710A, 6, 40000, 443)),
        str(source_ip_hash(0x20010DB8 << 96 | 1)),
    ]


# ---- balance


@settings(max_examples=60, deadline=None)
@given(members=weighted_members)
def test_slots_are_shared_in_proportion_to_weight(members: list[WeightedMember]) -> None:
    table = MaglevTable.build(members, SMALL_TABLE)
    counts = table.slot_counts()
    total_weight = sum(member.weight for member in members)
    assert sum(counts.values()) == SMALL_TABLE
    for member in members:
        exact = SMALL_TABLE * member.weight / total_weight
        assert abs(counts[member.member_id] - exact) < 1, (member, counts)


@settings(max_examples=40, deadline=None)
@given(
    members=weighted_members,
    idle=st.lists(member_ids.map(lambda text: f"idle-{text}"), max_size=3, unique=True),
)
def test_weight_zero_is_never_chosen(members: list[WeightedMember], idle: list[str]) -> None:
    table = MaglevTable.build([*members, *(WeightedMember(i, 0) for i in idle)], SMALL_TABLE)
    assert set(table.slots()) == {member.member_id for member in members}


def test_flows_spread_by_weight_on_the_default_table() -> None:
    members = [WeightedMember(f"backend-{index}", 10 * (index + 1)) for index in range(10)]
    table = MaglevTable.build(members)
    assert table.table_size == DEFAULT_TABLE_SIZE
    flows = Counter(
        table.select(five_tuple_hash(0x0A000000 + n % 5000, 0xCB00710A, 6, 1024 + n // 5000, 80))
        for n in range(200_000)
    )
    total_weight = sum(member.weight for member in members)
    for member in members:
        expected = 200_000 * member.weight / total_weight
        assert abs(flows[member.member_id] / expected - 1) < 0.05, (member, flows)


# ---- disruption


def test_removing_one_of_ten_moves_about_a_tenth() -> None:
    members = equal_members(10)
    full = MaglevTable.build(members)
    for leaving in range(10):
        rest = members[:leaving] + members[leaving + 1 :]
        moved = moved_fraction(full, MaglevTable.build(rest))
        assert 0.1 - 1e-4 < moved < 0.105, (leaving, moved)


# Disruption properties run on the default table: Maglev's ripple beyond the ideal share
# grows as M / N shrinks (the paper sizes M at 100 N or more), and on 65537 slots it stays
# well under 1% for up to 12 members (measured over 600 random cases: at most 0.6%), unless
# two members' skips are in a small ratio (below).
RIPPLE_BOUND = 0.02


def _skips_in_small_ratio(
    members: list[WeightedMember], table_size: int = DEFAULT_TABLE_SIZE
) -> bool:
    """Whether two members' skips are in a ratio p/q (mod M, either sign) with p, q <= 4: one
    preference list then walks a subsequence of the other's, and a member leaving or joining
    moves a few percent more than its share. About 22 / M per pair of members (3e-4 on the
    default table). `_permutation_parameters` keeps only equal steps apart: rehashing a
    member for a ratio would change its whole list when the other member leaves."""
    ids = sorted((m.member_id for m in members if m.weight > 0), key=str.encode)
    skips = [skip for _offset, skip in _permutation_parameters(ids, table_size)]
    related = {
        skip * p * pow(q, -1, table_size) % table_size
        for skip in skips
        for p in range(1, 5)
        for q in range(1, 5)
        if p != q
    }
    related |= {table_size - value for value in related}
    return any(skip in related for skip in skips)


def test_skips_in_a_small_ratio_ripple_more_but_boundedly() -> None:
    """The case hypothesis found: m-w's skip is 3x m--1's (mod 65537). m--1 or m-w leaving
    moves ~2-2.6% beyond its share, where unrelated members move < 1%."""
    members = [WeightedMember("m-0"), WeightedMember("m-w"), WeightedMember("m--1")]
    assert _skips_in_small_ratio(members)
    full = MaglevTable.build(members)
    ripples = []
    for leaver in members:
        after = MaglevTable.build([m for m in members if m != leaver])
        share = full.slot_counts()[leaver.member_id] / full.table_size
        ripples.append(moved_fraction(full, after) - share)
    assert max(ripples) > RIPPLE_BOUND  # the weakness is real
    assert all(0 <= ripple < 0.05 for ripple in ripples), ripples


@settings(max_examples=25, deadline=None)
@given(members=weighted_members.filter(lambda ms: len(ms) >= 2), data=st.data())
def test_removal_moves_the_leavers_share_and_little_more(
    members: list[WeightedMember], data: st.DataObject
) -> None:
    assume(not _skips_in_small_ratio(members))
    full = MaglevTable.build(members)
    leaver = data.draw(st.sampled_from(members))
    after = MaglevTable.build([m for m in members if m != leaver])
    share = full.slot_counts()[leaver.member_id] / full.table_size
    moved = moved_fraction(full, after)
    # Every slot of the leaver must move; others move only through the ripple.
    assert share <= moved <= share + RIPPLE_BOUND, (share, moved)
    assert leaver.member_id not in after.slots()


@settings(max_examples=25, deadline=None)
@given(members=weighted_members, weight=st.integers(min_value=1, max_value=256))
def test_addition_moves_about_the_newcomers_share(
    members: list[WeightedMember], weight: int
) -> None:
    newcomer = WeightedMember("zz-newcomer", weight)
    assume(not _skips_in_small_ratio([*members, newcomer]))
    before = MaglevTable.build(members)
    after = MaglevTable.build([*members, newcomer])
    share = after.slot_counts()[newcomer.member_id] / after.table_size
    assert share <= moved_fraction(before, after) <= share + RIPPLE_BOUND


def test_members_with_the_same_step_do_not_fall_into_arcs() -> None:
    """These two ids hash to the same skip for M=4099: unless one of them is moved to
    another step, their preference lists are shifts of each other, the table splits into
    two arcs and a third member moves 58% of the flows instead of a third."""
    pair = [WeightedMember("m-s"), WeightedMember("m-sl9ec3t4-7dd")]
    before = MaglevTable.build(pair, SMALL_TABLE)
    after = MaglevTable.build([*pair, WeightedMember("zz-newcomer")], SMALL_TABLE)
    share = after.slot_counts()["zz-newcomer"] / SMALL_TABLE
    assert share <= moved_fraction(before, after) <= share + RIPPLE_BOUND


def test_hashes_are_64_bit_and_distinguish_their_inputs() -> None:
    base = five_tuple_hash(0x0A000001, 0x0A000002, 6, 1000, 80)
    variants = {
        five_tuple_hash(0x0A000002, 0x0A000001, 6, 1000, 80),
        five_tuple_hash(0x0A000001, 0x0A000002, 17, 1000, 80),
        five_tuple_hash(0x0A000001, 0x0A000002, 6, 1001, 80),
        five_tuple_hash(0x0A000001, 0x0A000002, 6, 1000, 81),
        five_tuple_hash(0x0A000001 | 1 << 100, 0x0A000002, 6, 1000, 80),
    }
    assert base not in variants and len(variants) == 5
    assert all(0 <= value < 1 << 64 for value in (base, *variants))
    assert source_ip_hash(0x0A000001) != source_ip_hash(0x0A000002)
