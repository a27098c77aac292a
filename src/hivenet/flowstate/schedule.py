"""Expiry and refresh bookkeeping shared by the conntrack and NAT tables.

Owns `TrackedEntry` (the per-entry timing fields), `RefreshPolicy` and `EntryScheduler`: two
timer wheels (idle expiry, refresh check) and the queue of entries to push to peers. The
tables own their indexes; this module only says which entries expired at `now` and which are
due for a push. Pure: no I/O, no clock (every method takes `now`).

Push and refresh model (MidoNet's): an entry is pushed to its peers when it is created or its
state changes, and again ("refreshed") while live flows use it, so peers' copies, which expire
on their own after the timeout they were sent with, never lapse while the connection is in
use. The refresh check for an entry runs `RefreshPolicy.refresh_after(timeout)` after its
last push: if the entry was used since, it is due at once; if not, it becomes due at its next
use (the peers' copy may be near its end by then). An unused entry is never re-pushed: it
expires here and on the peers at about the same time.
"""

from __future__ import annotations

import heapq
from collections.abc import Container, Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RefreshPolicy:
    """When a used entry is re-pushed: `fraction` of its timeout after the last push, but at
    most `max_interval` seconds after it (so a lost push of a 5-day TCP entry is repaired in
    minutes, not days) and at least `min_interval` (no push storms for short timeouts)."""

    fraction: float = 0.5
    max_interval: float = 600.0
    min_interval: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction < 1.0:
            raise ValueError(f"RefreshPolicy.fraction must be in (0, 1), got {self.fraction!r}")
        if not 0.0 < self.min_interval <= self.max_interval:
            raise ValueError(
                f"RefreshPolicy needs 0 < min_interval <= max_interval, got "
                f"min_interval={self.min_interval!r} max_interval={self.max_interval!r}"
            )

    def refresh_after(self, timeout: float) -> float:
        return max(self.min_interval, min(timeout * self.fraction, self.max_interval))


# One shared empty peer set: CPython makes a new 216-byte object for every `frozenset()`.
NO_PEERS: frozenset[str] = frozenset()


NEEDS_PUSH, USED_SINCE_PUSH, AWAITING_USE = 1, 2, 4  # `TrackedEntry.flags`


class TrackedEntry:
    """Timing fields of one table entry. Identity-hashed: the wheels hold entries as keys of
    insertion-ordered dicts (a dict grows by 2-3x where a set grows by 4x: fewer bytes per
    entry)."""

    __slots__ = ("expires_at", "expiry_bucket", "flags", "peers", "refresh_bucket", "timeout")

    def __init__(self, expires_at: float, timeout: float) -> None:
        self.expires_at = expires_at
        self.timeout = timeout
        self.expiry_bucket = -1
        self.refresh_bucket = -1
        # NEEDS_PUSH | USED_SINCE_PUSH | AWAITING_USE (one small int instead of three slots).
        self.flags = 0
        # Hosts this entry is pushed to, as the agent last told the table (empty: unknown).
        self.peers: frozenset[str] = NO_PEERS

    @property
    def needs_push(self) -> bool:
        """New or changed since its last push."""
        return bool(self.flags & NEEDS_PUSH)

    @property
    def used_since_push(self) -> bool:
        return bool(self.flags & USED_SINCE_PUSH)

    @property
    def awaiting_use(self) -> bool:
        """Its refresh check found it unused: it is due at its next use."""
        return bool(self.flags & AWAITING_USE)


class _Wheel:
    """Entries bucketed by `floor(time / granularity)`; a heap of bucket numbers finds the
    earliest. Each entry sits in at most one bucket of a wheel (the caller keeps its number)."""

    __slots__ = ("buckets", "granularity", "heap", "numbers")

    def __init__(self, granularity: float) -> None:
        self.granularity = granularity
        self.buckets: dict[int, dict[TrackedEntry, None]] = {}
        self.heap: list[int] = []
        # One int object per live bucket number, shared by every entry in the bucket (each
        # entry keeps its bucket number; a fresh int per entry would be 32 bytes each).
        self.numbers: dict[int, int] = {}

    def bucket_of(self, at: float) -> int:
        return int(at // self.granularity)

    def add(self, entry: TrackedEntry, bucket: int) -> int:
        """Put `entry` in `bucket`; returns the bucket number to keep (a shared int)."""
        members = self.buckets.get(bucket)
        if members is None:
            members = self.buckets[bucket] = {}
            self.numbers[bucket] = bucket
            heapq.heappush(self.heap, bucket)
        members[entry] = None
        return self.numbers[bucket]

    def discard(self, entry: TrackedEntry, bucket: int) -> None:
        members = self.buckets.get(bucket)
        if members is not None:
            members.pop(entry, None)
            # Empty buckets stay in the heap; pop() drops them when they come due.

    def pop_through(self, last_bucket: int) -> list[TrackedEntry]:
        """Remove and return every entry in buckets <= last_bucket."""
        out: list[TrackedEntry] = []
        heap = self.heap
        while heap and heap[0] <= last_bucket:
            bucket = heapq.heappop(heap)
            members = self.buckets.pop(bucket, None)
            self.numbers.pop(bucket, None)
            if members:
                out.extend(members)
        return out

    def first(self, skip: Container[TrackedEntry]) -> TrackedEntry | None:
        """An entry of the earliest non-empty bucket not in `skip` (None: none left)."""
        heap = self.heap
        while heap:
            members = self.buckets.get(heap[0])
            if members:
                break
            bucket = heapq.heappop(heap)  # emptied by discard(): drop it now
            self.buckets.pop(bucket, None)
            self.numbers.pop(bucket, None)
        if not heap:
            return None
        for entry in self.buckets[heap[0]]:
            if entry not in skip:
                return entry
        for bucket in sorted(heap)[1:]:  # rare: every entry of the first bucket is skipped
            for entry in self.buckets.get(bucket, ()):
                if entry not in skip:
                    return entry
        return None

    def __len__(self) -> int:
        return sum(len(members) for members in self.buckets.values())


class EntryScheduler:
    """Idle expiry, refresh checks and the push queue for one table's entries."""

    __slots__ = ("_due", "_expiry", "_refresh", "policy")

    def __init__(self, policy: RefreshPolicy, granularity: float = 1.0) -> None:
        if not granularity > 0:
            raise ValueError(f"granularity must be > 0 seconds, got {granularity!r}")
        self.policy = policy
        self._expiry = _Wheel(granularity)
        self._refresh = _Wheel(granularity)
        # Entries to push at the next `pop_due_for_push` (a dict as an insertion-ordered set).
        self._due: dict[TrackedEntry, None] = {}

    # --- expiry -----------------------------------------------------------------------------

    def set_expiry(self, entry: TrackedEntry, expires_at: float, timeout: float) -> None:
        entry.expires_at = expires_at
        entry.timeout = timeout
        bucket = self._expiry.bucket_of(expires_at)
        if bucket != entry.expiry_bucket:
            if entry.expiry_bucket >= 0:
                self._expiry.discard(entry, entry.expiry_bucket)
            entry.expiry_bucket = self._expiry.add(entry, bucket)

    def pop_expired(self, now: float) -> list[TrackedEntry]:
        """Entries whose `expires_at <= now`, removed from every schedule (the caller removes
        them from its indexes). Entries of the current bucket not yet expired stay."""
        current = self._expiry.bucket_of(now)
        expired: list[TrackedEntry] = []
        for entry in self._expiry.pop_through(current):
            if entry.expires_at <= now:
                entry.expiry_bucket = -1
                self._forget_push(entry)
                expired.append(entry)
            else:
                entry.expiry_bucket = self._expiry.add(entry, entry.expiry_bucket)
        return expired

    def forget(self, entry: TrackedEntry) -> None:
        """Drop `entry` from every schedule (it was removed from its table)."""
        if entry.expiry_bucket >= 0:
            self._expiry.discard(entry, entry.expiry_bucket)
            entry.expiry_bucket = -1
        self._forget_push(entry)

    def _forget_push(self, entry: TrackedEntry) -> None:
        if entry.refresh_bucket >= 0:
            self._refresh.discard(entry, entry.refresh_bucket)
            entry.refresh_bucket = -1
        self._due.pop(entry, None)

    # --- push and refresh -------------------------------------------------------------------

    def mark_changed(self, entry: TrackedEntry) -> None:
        """The entry is new or its state changed: push it at the next opportunity."""
        entry.flags |= NEEDS_PUSH
        self._due[entry] = None

    def mark_used(self, entry: TrackedEntry) -> None:
        """A live flow used the entry (its expiry is extended by the table)."""
        flags = entry.flags
        entry.flags = (flags | USED_SINCE_PUSH) & ~AWAITING_USE
        if flags & AWAITING_USE:
            self._due[entry] = None

    def mark_known_to_peers(self, entry: TrackedEntry, now: float) -> None:
        """The peers hold this entry as of `now` (we pushed it, or a peer pushed it to us):
        the next refresh check is due `refresh_after(timeout)` from now."""
        entry.flags = 0
        self._due.pop(entry, None)
        if entry.refresh_bucket >= 0:
            self._refresh.discard(entry, entry.refresh_bucket)
        bucket = self._refresh.bucket_of(now + self.policy.refresh_after(entry.timeout))
        entry.refresh_bucket = self._refresh.add(entry, bucket)

    def pop_due_for_push(self, now: float) -> list[TrackedEntry]:
        """Entries to push at `now` (new, changed, or used and due for refresh), in the order
        they became due. Each is then considered pushed at `now`."""
        for entry in self._refresh.pop_through(self._refresh.bucket_of(now)):
            entry.refresh_bucket = -1
            if entry.flags & USED_SINCE_PUSH:
                self._due[entry] = None
            else:
                entry.flags |= AWAITING_USE
        due = [entry for entry in self._due if entry.expires_at > now]
        self._due.clear()
        for entry in due:
            self.mark_known_to_peers(entry, now)
        return due

    def victim(
        self, preferred: Iterable[TrackedEntry], kept: Container[TrackedEntry]
    ) -> tuple[TrackedEntry | None, bool]:
        """What a full table evicts: the first of `preferred` (its half-open entries, oldest
        first) not kept, else one of the earliest expiry bucket (closest to its idle timeout,
        to a bucket's granularity) not kept; and whether it was preferred.
        (None, False): only kept entries are left."""
        victim = next((entry for entry in preferred if entry not in kept), None)
        if victim is not None:
            return victim, True
        return self._expiry.first(kept), False

    def scheduled_count(self) -> int:
        """Entries in the expiry wheel (for consistency checks in tests)."""
        return len(self._expiry)
