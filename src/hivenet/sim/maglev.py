"""Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software Network
Load Balancer", NSDI 2016), weighted.

Owns the lookup table: its size (a prime `M`), how it is populated from (member id, weight)
pairs, and `select(flow_hash) -> member id`. Also owns the stable hashes the table and the
load balancer use (`five_tuple_hash`, `source_ip_hash`), so every agent, in
every process, builds the same table and sends a flow to the same member without talking to
any other agent. Pure: no I/O, no clock, no randomness, never Python's salted `hash()`.
Must not know about pools, health or flow state (`sim/loadbalancer.py` does).

How the table is built. Every member gets a preference list over the M slots: the
permutation `offset, offset + skip, offset + 2*skip, ... (mod M)`, where offset and skip come
from a hash of the member id (M prime and 1 <= skip < M make it a full permutation). Members
take turns; on its turn a member claims the first slot of its list that nobody holds yet.
Weights decide how many turns a member gets: member i's target is its weight's share of M
(largest remainder, so the targets add up to exactly M) and the turns are interleaved so
that every member progresses at the speed of its target (member i's k-th turn comes at time
k / target_i), as equal members alternate in the paper. Weight 0 means no slot at all.

Why this gives minimal disruption: a member's preference list does not depend on the other
members, so when one member leaves, the others mostly re-claim the slots they held before
and take over the leaver's slots; only about 1/N of the table (plus a small ripple) changes.
The ripple grows as M / N shrinks: keep M above 100 N (on 65537 slots and up to 12 members
it stays under 1%). Two members never share a step (see `_permutation_parameters`); two
whose skips are in another small ratio (2, 3, 3/2...: ~22 / M per pair) ripple a few
percent (2.2-2.6% measured for a ratio of 3), left as is: rehashing one of them would move
its whole list whenever the other leaves.

Cost. Walking the preference lists slot by slot costs about M * ln(M) probes, most of them
at the end, when nearly every slot is taken (a coupon collector). So once only a small
fraction of the slots is free the build switches to an equivalent, cheaper search: member i's
rank of slot s is `(s - offset_i) * skip_i^-1 mod M`, and its next claim is simply the free
slot it ranks lowest (everything it ranks lower is taken already). Both phases yield the
same table; `build_lookup_table_reference` is the plain walk, kept for the tests to compare.
Measured: about 17 ms for M=65537 and 10 weighted members (`bench/loadbalancer.py`).
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

DEFAULT_TABLE_SIZE = 65537
# Small tables are useful in tests; below this the balance is meaningless.
MIN_TABLE_SIZE = 7
# 2**24 slots of 8-byte references is already 128 MiB per pool.
MAX_TABLE_SIZE = 16_777_213
MAX_WEIGHT = 256

_MASK64 = (1 << 64) - 1
# Keeps source-IP hashes apart from 5-tuple hashes of the same numbers.
_SOURCE_IP_DOMAIN = 0x5EED_50_1CE_0F_1D
# The build switches from walking preference lists to ranking the free slots when at most
# this fraction of the table is free (tuned by measurement, see the module docstring).
_TAIL_FREE_FRACTION = 1 / 32
# Turn times of the weighted schedule are multiples of 2**40 // target (see weighted_turn_order).
_TURN_TIME_SCALE = 1 << 40


class MaglevError(ValueError):
    """A table that cannot be built as asked; the message names the parameter and value."""


class NoMemberError(LookupError):
    """`select` on a table without any member of positive weight."""


def mix64(value: int) -> int:
    """SplitMix64's finalizer: a fast, well-spread 64-bit integer mixer (stable, unsalted)."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def _fold_address(address: int) -> int:
    """An IPv4 (32-bit) or IPv6 (128-bit) address folded to 64 bits."""
    return (address & _MASK64) ^ (address >> 64)


def five_tuple_hash(ip_src: int, ip_dst: int, ip_proto: int, tp_src: int, tp_dst: int) -> int:
    """The 64-bit hash of a flow's 5-tuple that Maglev looks up (addresses as ints)."""
    value = mix64(_fold_address(ip_src))
    value = mix64(value ^ _fold_address(ip_dst))
    return mix64(value ^ (ip_proto << 32) ^ (tp_src << 16) ^ tp_dst)


def source_ip_hash(ip_src: int) -> int:
    """The 64-bit hash of the source address alone (source-IP affinity)."""
    return mix64(mix64(_fold_address(ip_src)) ^ _SOURCE_IP_DOMAIN)


def is_prime(number: int) -> bool:
    """Deterministic Miller-Rabin, exact for every number below 3.3 * 10**24."""
    if number < 2:
        return False
    small_primes = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
    for prime in small_primes:
        if number % prime == 0:
            return number == prime
    odd_part, twos = number - 1, 0
    while odd_part % 2 == 0:
        odd_part //= 2
        twos += 1
    for witness in small_primes:
        x = pow(witness, odd_part, number)
        if x in (1, number - 1):
            continue
        for _ in range(twos - 1):
            x = x * x % number
            if x == number - 1:
                break
        else:
            return False
    return True


def check_table_size(table_size: int) -> int:
    if isinstance(table_size, bool) or not isinstance(table_size, int):
        raise MaglevError(f"table_size={table_size!r}: must be an integer")
    if not MIN_TABLE_SIZE <= table_size <= MAX_TABLE_SIZE:
        raise MaglevError(
            f"table_size={table_size}: must be between {MIN_TABLE_SIZE} and {MAX_TABLE_SIZE}"
        )
    if not is_prime(table_size):
        raise MaglevError(
            f"table_size={table_size}: must be a prime (e.g. 251, 4099, 65537, 655373) "
            "so that every member's preference list covers the whole table"
        )
    return table_size


@dataclass(frozen=True, slots=True)
class WeightedMember:
    """One candidate of a table: its id (what `select` returns) and weight (0..MAX_WEIGHT)."""

    member_id: str
    weight: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.member_id, str) or not self.member_id:
            raise MaglevError(f"member_id={self.member_id!r}: must be a non-empty string")
        if isinstance(self.weight, bool) or not isinstance(self.weight, int):
            raise MaglevError(f"weight={self.weight!r} of {self.member_id}: must be an integer")
        if not 0 <= self.weight <= MAX_WEIGHT:
            raise MaglevError(
                f"weight={self.weight} of {self.member_id}: must be between 0 and {MAX_WEIGHT}"
            )


def _checked_members(members: Iterable[WeightedMember]) -> list[WeightedMember]:
    """Members of positive weight, sorted by id (the turn order), without duplicates."""
    seen: set[str] = set()
    chosen: list[WeightedMember] = []
    for member in members:
        if member.member_id in seen:
            raise MaglevError(f"member_id={member.member_id!r}: appears more than once")
        seen.add(member.member_id)
        if member.weight > 0:
            chosen.append(member)
    chosen.sort(key=lambda member: member.member_id.encode())
    return chosen


def _targets(weights: Sequence[int], table_size: int) -> list[int]:
    """Slots per member: shares of `table_size` proportional to the weights, summing to it
    exactly (largest remainder; ties go to the earlier member in turn order)."""
    total = sum(weights)
    exact = [weight * table_size for weight in weights]
    targets = [share // total for share in exact]
    leftover = table_size - sum(targets)
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] % total), i))
    for index in by_remainder[:leftover]:
        targets[index] += 1
    return targets


def _permutation_parameters(member_ids: Sequence[str], table_size: int) -> list[tuple[int, int]]:
    """(offset, skip) of each member's preference list, from its id and M only, except that
    no two members walk the table with the same step in either direction (skip or M - skip):
    their lists would be shifts of one another and the table would fall into arcs that all
    move when a member joins or leaves. The later member in id order then rehashes (rare:
    about N / M per member)."""
    parameters: list[tuple[int, int]] = []
    steps_taken: set[int] = set()
    for member_id in member_ids:
        for attempt in itertools.count():
            salt = b"" if attempt == 0 else b"/" + str(attempt).encode()
            digest = hashlib.blake2b(
                member_id.encode() + salt, digest_size=16, person=b"hivenet-maglev"
            ).digest()
            offset = int.from_bytes(digest[:8], "big") % table_size
            skip = int.from_bytes(digest[8:], "big") % (table_size - 1) + 1
            step = min(skip, table_size - skip)
            if step not in steps_taken or len(steps_taken) >= (table_size - 1) // 2:
                break
        steps_taken.add(step)
        parameters.append((offset, skip))
    return parameters


def weighted_turn_order(targets: Sequence[int]) -> list[int]:
    """Member indices, member i appearing `targets[i]` times, interleaved so that every
    member progresses at the pace of its target: member i's k-th turn comes at time
    k / targets[i] (ties: lower index first), i.e. stride scheduling. Times are integers on a
    2**40 scale, so each member's times are one arithmetic progression and the merge runs
    at C speed. Used for the table's turns and for weighted round robin."""
    count = len(targets)
    keys: list[int] = []
    for index, target in enumerate(targets):
        if target:
            stride = (_TURN_TIME_SCALE // target) * count
            keys.extend(range(stride + index, stride * target + index + 1, stride))
    keys.sort()
    return [key % count for key in keys]


def _populate(
    parameters: Sequence[tuple[int, int]], schedule: Sequence[int], table_size: int
) -> list[int]:
    """Slot -> member index, every turn of `schedule` claiming one slot (the fast build)."""
    table = [-1] * table_size
    next_slot = [offset for offset, _skip in parameters]
    skips = [skip for _offset, skip in parameters]
    tail_turns = min(max(int(table_size * _TAIL_FREE_FRACTION), 1), len(schedule))
    walk_turns = len(schedule) - tail_turns
    # Phase 1: walk the preference lists while free slots are easy to find.
    for member in itertools.islice(schedule, walk_turns):
        slot = next_slot[member]
        skip = skips[member]
        while table[slot] >= 0:
            slot += skip
            if slot >= table_size:
                slot -= table_size
        table[slot] = member
        slot += skip
        next_slot[member] = slot - table_size if slot >= table_size else slot
    # Phase 2: a member's remaining claims are the free slots it ranks lowest, in rank order
    # (every slot it ranks below its walk position is taken already).
    free_slots = [slot for slot in range(table_size) if table[slot] < 0]
    preferences: list[list[int] | None] = [None] * len(parameters)
    cursors = [0] * len(parameters)
    for member in itertools.islice(schedule, walk_turns, None):
        ranked = preferences[member]
        if ranked is None:
            offset, skip = parameters[member]
            inverse_skip = pow(skip, -1, table_size)
            base = (-offset * inverse_skip) % table_size
            ranked = sorted(free_slots, key=lambda s: (s * inverse_skip + base) % table_size)
            preferences[member] = ranked
        cursor = cursors[member]
        while table[ranked[cursor]] >= 0:
            cursor += 1
        table[ranked[cursor]] = member
        cursors[member] = cursor + 1
    return table


def build_lookup_table_reference(
    members: Iterable[WeightedMember], table_size: int = DEFAULT_TABLE_SIZE
) -> list[str | None]:
    """The same table as `MaglevTable.build`, by the plain slot-by-slot walk (slow: tests)."""
    check_table_size(table_size)
    chosen = _checked_members(members)
    if not chosen:
        return [None] * table_size
    targets = _targets([member.weight for member in chosen], table_size)
    parameters = _permutation_parameters([member.member_id for member in chosen], table_size)
    table: list[str | None] = [None] * table_size
    walked = [0] * len(chosen)
    for index in weighted_turn_order(targets):
        offset, skip = parameters[index]
        while True:
            slot = (offset + walked[index] * skip) % table_size
            walked[index] += 1
            if table[slot] is None:
                table[slot] = chosen[index].member_id
                break
    return table


class MaglevTable:
    """A built lookup table: immutable after `build`. `select(flow_hash)` is one modulo and
    one list index. Tables built from equal inputs are equal in every process."""

    __slots__ = ("_slots", "members", "table_size")

    def __init__(
        self, members: tuple[WeightedMember, ...], table_size: int, slots: list[str] | None
    ) -> None:
        # Use `build`; this constructor trusts its arguments.
        self.members = members
        self.table_size = table_size
        self._slots = slots

    @classmethod
    def build(
        cls, members: Iterable[WeightedMember], table_size: int = DEFAULT_TABLE_SIZE
    ) -> MaglevTable:
        """The table for `members`. Members of weight 0 are never chosen; with no member of
        positive weight the table is empty and `select` raises `NoMemberError`."""
        check_table_size(table_size)
        chosen = _checked_members(members)
        if len(chosen) > table_size:
            raise MaglevError(
                f"table_size={table_size}: smaller than the {len(chosen)} members "
                "(use a prime at least 100 times the member count for a good balance)"
            )
        if not chosen:
            return cls((), table_size, None)
        targets = _targets([member.weight for member in chosen], table_size)
        parameters = _permutation_parameters([member.member_id for member in chosen], table_size)
        indices = _populate(parameters, weighted_turn_order(targets), table_size)
        ids = [member.member_id for member in chosen]
        return cls(tuple(chosen), table_size, [ids[index] for index in indices])

    @property
    def is_empty(self) -> bool:
        return self._slots is None

    def select(self, flow_hash: int) -> str:
        """The member id for a flow (any non-negative int hash, e.g. `five_tuple_hash`)."""
        slots = self._slots
        if slots is None:
            raise NoMemberError("the Maglev table has no member of positive weight")
        return slots[flow_hash % self.table_size]

    def slots(self) -> tuple[str, ...]:
        """Every slot's member id, in slot order (empty for an empty table)."""
        return tuple(self._slots or ())

    def slot_counts(self) -> dict[str, int]:
        """Member id -> how many slots it holds (members of weight 0 are absent)."""
        counts = {member.member_id: 0 for member in self.members}
        for member_id in self._slots or ():
            counts[member_id] += 1
        return counts

    def fingerprint(self) -> str:
        """A short digest of the whole table (compare tables across processes and hosts)."""
        digest = hashlib.blake2b(digest_size=16)
        digest.update(self.table_size.to_bytes(4, "big"))
        for member_id in self._slots or ():
            digest.update(member_id.encode() + b"\0")
        return digest.hexdigest()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MaglevTable):
            return NotImplemented
        return self.table_size == other.table_size and self._slots == other._slots

    def __hash__(self) -> int:
        return hash((self.table_size, self.fingerprint()))

    def __repr__(self) -> str:
        return f"MaglevTable(table_size={self.table_size}, members={len(self.members)})"


def moved_fraction(before: MaglevTable, after: MaglevTable) -> float:
    """The fraction of slots whose member differs (what share of flows would move)."""
    if before.table_size != after.table_size:
        raise MaglevError(
            f"table_size: cannot compare a {before.table_size}-slot table "
            f"with a {after.table_size}-slot one"
        )
    old, new = before.slots(), after.slots()
    if not old or not new:
        return 0.0 if old == new else 1.0
    changed = sum(1 for left, right in zip(old, new, strict=True) if left != right)
    return changed / before.table_size
