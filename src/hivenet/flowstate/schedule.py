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
from collections import deque
from collections.abc import Container, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING


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


NEEDS_PUSH, USED_SINCE_PUSH, AWAITING_USE = 1, 2, 4  # `TrackedEntry.flags`: the push's
PUSH_FLAGS = NEEDS_PUSH | USED_SINCE_PUSH | AWAITING_USE
IN_ORDER, QUEUED = 8, 16  # `EntryOrder`'s: a member; has its one place in the queue
TABLE_FLAG = 32  # the owning table's own bit (NAT: the entry owns its translated port)
IN_EXPIRY = 64  # in the expiry wheel, in the bucket its `expires_at` falls in


# `TrackedEntry`'s fields: each concrete entry class lists them in its own `__slots__` (so a
# NAT entry can also be a `NatBinding`, whose slots a second slotted base would conflict with).
TRACKED_SLOTS = ("expires_at", "flags", "peers", "refresh_bucket", "timeout")


class TrackedEntry:
    """Timing fields of one table entry (slots of the subclass: `TRACKED_SLOTS`). The push
    queue holds entries as keys of an insertion-ordered dict: a conntrack entry is hashed by
    identity, a NAT entry by its binding's value (it is one; no two live entries are equal)."""

    if not TYPE_CHECKING:  # mypy cannot see the subclasses' slots from here
        __slots__ = ()
    expires_at: float
    flags: int
    peers: frozenset[str]
    refresh_bucket: int
    timeout: float

    def __init__(self, expires_at: float, timeout: float) -> None:
        self.expires_at = expires_at
        self.timeout = timeout
        self.refresh_bucket = -1
        # NEEDS_PUSH | USED_SINCE_PUSH | AWAITING_USE | IN_ORDER | QUEUED | TABLE_FLAG |
        # IN_EXPIRY (one small int instead of seven slots).
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


# How far (a fraction of its timeout) a used entry's deadline may lag its last use before the
# periodic scan of used flows moves it (`EntryScheduler.note_use`): an established TCP entry
# (5 days) is moved at most every ~2 h of use, a UDP one (30 s) every ~0.5 s, i.e. every tick.
USE_SLACK = 1 / 64


# Entry deadlines are rounded up to this grid (seconds, a power of two: exact in a float), so
# the entries set within one step share one float object; an entry may outlive its timeout
# by up to a step (a peer's copy, rounded again on arrival, by up to a step more). Up to
# `_DEADLINES_KEPT` recent grid points are kept for sharing (~64 s of a 1/16 s grid: a
# peer's refresh pushes bring deadlines spread over the timeouts), then they start again.
DEADLINE_STEP = 1 / 16
_DEADLINES_KEPT = 1024


# Stale bucket members tolerated beyond the live ones before a wheel is compacted.
_COMPACT_SLACK = 1024


class EntryOrder:
    """Entries in the order they were (last) added, as a dict used as an ordered set keeps
    them, for ~9 bytes an entry instead of ~40: a deque with lazy removal. Membership is a
    bit of the entry's `flags` (an entry is in at most one `EntryOrder`); `discard` leaves
    the entry's place in the queue behind, skipped when read and dropped at the front or
    when stale places outnumber members (so the queue holds at most about twice the members).
    An entry added again while its old place is still queued moves to the end (O(n), rare:
    a connection half-open again after it closed)."""

    __slots__ = ("_live", "_queue", "_stale")

    def __init__(self) -> None:
        self._queue: deque[TrackedEntry] = deque()
        self._live = 0
        self._stale = 0

    def __len__(self) -> int:
        return self._live

    def __contains__(self, entry: TrackedEntry) -> bool:
        return bool(entry.flags & IN_ORDER)

    def add(self, entry: TrackedEntry) -> None:
        flags = entry.flags
        if flags & IN_ORDER:
            return
        if flags & QUEUED:  # its old place is still in the queue: it joins at the end
            self._queue.remove(entry)
            self._stale -= 1
        entry.flags = flags | IN_ORDER | QUEUED
        self._queue.append(entry)
        self._live += 1

    def discard(self, entry: TrackedEntry) -> None:
        if not entry.flags & IN_ORDER:
            return
        entry.flags &= ~IN_ORDER
        self._live -= 1
        self._stale += 1
        if self._stale > self._live + _COMPACT_SLACK:
            kept: deque[TrackedEntry] = deque()
            for queued in self._queue:
                if queued.flags & IN_ORDER:
                    kept.append(queued)
                else:
                    queued.flags &= ~QUEUED
            self._queue, self._stale = kept, 0

    def __iter__(self) -> Iterator[TrackedEntry]:
        """Members, oldest first (stale places at the front are dropped on the way)."""
        queue = self._queue
        while queue and not queue[0].flags & IN_ORDER:
            queue.popleft().flags &= ~QUEUED
            self._stale -= 1
        return (entry for entry in queue if entry.flags & IN_ORDER)


class _Wheel:
    """Entries bucketed by `floor(time / granularity)`; a heap of bucket numbers finds the
    earliest. Each entry sits in at most one bucket of a wheel: the one `bucket_of_entry`
    names (-1: none), which the subclass keeps in the entry (`_SlotWheel`: a slot holding the
    bucket number; `_ExpiryWheel`: a flag, the bucket being the one `expires_at` falls in).

    A bucket is a deque (~8 bytes a member, where a dict as an ordered set costs ~40), and
    removal is lazy: `discard` only counts the entry as stale (the caller then changes what
    `bucket_of_entry` says), and a member that now names another bucket is skipped when the
    bucket is read. When the stale members outnumber the live ones, every bucket is
    compacted, so the lists hold at most about twice the live entries whatever the timers do."""

    __slots__ = ("buckets", "granularity", "heap", "live", "stale")

    def __init__(self, granularity: float) -> None:
        self.granularity = granularity
        self.buckets: dict[int, deque[TrackedEntry]] = {}
        self.heap: list[int] = []
        self.live = 0  # entries `bucket_of_entry` places in a bucket of this wheel
        self.stale = 0  # members left behind by `discard` (an upper bound)

    def bucket_of(self, at: float) -> int:
        return int(at // self.granularity)

    def bucket_of_entry(self, entry: TrackedEntry) -> int:
        """The bucket `entry` is a live member of (-1: none)."""
        raise NotImplementedError

    def leave(self, entry: TrackedEntry) -> None:
        """Mark `entry` as in no bucket of this wheel (it was popped)."""
        raise NotImplementedError

    def _dropped(self, bucket: int) -> None:
        """`bucket` left the wheel (for a subclass's per-bucket data)."""

    def _append(self, entry: TrackedEntry, bucket: int) -> None:
        """Put `entry` in `bucket` (the caller makes `bucket_of_entry` say so)."""
        members = self.buckets.get(bucket)
        if members is None:
            members = self.buckets[bucket] = deque()
            heapq.heappush(self.heap, bucket)
        members.append(entry)
        self.live += 1

    def discard(self, entry: TrackedEntry) -> None:
        """`entry` leaves its bucket (called before the caller changes its bucket or flag)."""
        self.live -= 1
        self.stale += 1
        if self.stale > self.live + _COMPACT_SLACK:
            self._compact(entry)

    def _members(self, bucket: int, members: Iterable[TrackedEntry]) -> list[TrackedEntry]:
        """The live members of `bucket`, each once, in the order they were added."""
        where = self.bucket_of_entry
        return list(dict.fromkeys(entry for entry in members if where(entry) == bucket))

    def _compact(self, leaving: TrackedEntry | None = None) -> None:
        """Drop every stale member (`leaving` is being discarded: it still names its bucket)."""
        for bucket, members in list(self.buckets.items()):
            kept = [entry for entry in self._members(bucket, members) if entry is not leaving]
            if kept:
                self.buckets[bucket] = deque(kept)
            else:
                del self.buckets[bucket]
                self._dropped(bucket)
        self.heap = list(self.buckets)
        heapq.heapify(self.heap)
        self.stale = 0

    def pop_through(self, last_bucket: int) -> list[TrackedEntry]:
        """Remove and return every entry in buckets <= last_bucket (each then in none)."""
        out: list[TrackedEntry] = []
        heap, leave = self.heap, self.leave
        while heap and heap[0] <= last_bucket:
            bucket = heapq.heappop(heap)
            members = self.buckets.pop(bucket, None)
            if members:
                live = self._members(bucket, members)
                self.stale -= min(self.stale, len(members) - len(live))
                for entry in live:
                    leave(entry)
                out.extend(live)
            self._dropped(bucket)
        self.live -= len(out)
        if self.stale > self.live + _COMPACT_SLACK:  # the popped entries' other places
            self._compact()
        return out

    def first(self, skip: Container[TrackedEntry]) -> TrackedEntry | None:
        """A live entry of the earliest non-empty bucket not in `skip` (None: none left).
        Stale members at the front of that bucket are dropped on the way (O(1) each), so
        evicting a bucket's entries one after the other does not rescan them."""
        heap, where = self.heap, self.bucket_of_entry
        while heap:
            bucket = heap[0]
            members = self.buckets.get(bucket)
            while members and where(members[0]) != bucket:
                members.popleft()
                self.stale -= self.stale > 0
            if members:
                break
            heapq.heappop(heap)  # emptied by discard(): drop it now
            self.buckets.pop(bucket, None)
            self._dropped(bucket)
        if not heap:
            return None
        for bucket in [heap[0], *sorted(heap)[1:]]:  # later buckets: rare, all skipped
            for entry in self.buckets.get(bucket, ()):
                if where(entry) == bucket and entry not in skip:
                    return entry
        return None

    def __len__(self) -> int:
        """Live entries (counted from the buckets: for consistency checks)."""
        return sum(len(self._members(b, members)) for b, members in self.buckets.items())


class _SlotWheel(_Wheel):
    """The refresh wheel: an entry's bucket is its `refresh_bucket` slot (-1: none)."""

    __slots__ = ("numbers",)

    def __init__(self, granularity: float) -> None:
        super().__init__(granularity)
        # One int object per live bucket number, shared by every entry in the bucket (each
        # entry keeps its bucket number; a fresh int per entry would be 32 bytes each).
        self.numbers: dict[int, int] = {}

    def bucket_of_entry(self, entry: TrackedEntry) -> int:
        return entry.refresh_bucket

    def leave(self, entry: TrackedEntry) -> None:
        entry.refresh_bucket = -1

    def add(self, entry: TrackedEntry, bucket: int) -> None:
        """Put `entry` (in no bucket of this wheel) in `bucket`."""
        if bucket not in self.buckets:
            self.numbers[bucket] = bucket
        self._append(entry, bucket)
        entry.refresh_bucket = self.numbers[bucket]

    def remove(self, entry: TrackedEntry) -> None:
        if entry.refresh_bucket >= 0:
            self.discard(entry)
            entry.refresh_bucket = -1

    def _dropped(self, bucket: int) -> None:
        self.numbers.pop(bucket, None)


class _ExpiryWheel(_Wheel):
    """The idle-expiry wheel: an entry flagged `IN_EXPIRY` is in the bucket its `expires_at`
    falls in, so the entry needs no slot for it (8 bytes an entry). Moving an entry's
    deadline within its bucket costs nothing here; across buckets, it leaves a stale member."""

    __slots__ = ()

    def bucket_of_entry(self, entry: TrackedEntry) -> int:
        if entry.flags & IN_EXPIRY:
            return int(entry.expires_at // self.granularity)
        return -1

    def leave(self, entry: TrackedEntry) -> None:
        entry.flags &= ~IN_EXPIRY

    def place(self, entry: TrackedEntry, expires_at: float) -> None:
        """Set `entry.expires_at`, moving it to that time's bucket if it is not there yet."""
        bucket = int(expires_at // self.granularity)
        if entry.flags & IN_EXPIRY:
            if int(entry.expires_at // self.granularity) == bucket:
                entry.expires_at = expires_at
                return
            self.discard(entry)
        entry.expires_at = expires_at
        self._append(entry, bucket)
        entry.flags |= IN_EXPIRY

    def remove(self, entry: TrackedEntry) -> None:
        if entry.flags & IN_EXPIRY:
            self.discard(entry)
            entry.flags &= ~IN_EXPIRY


class EntryScheduler:
    """Idle expiry, refresh checks and the push queue for one table's entries."""

    __slots__ = ("_deadlines", "_due", "_expiry", "_refresh", "policy")

    def __init__(self, policy: RefreshPolicy, granularity: float = 1.0) -> None:
        if not granularity > 0:
            raise ValueError(f"granularity must be > 0 seconds, got {granularity!r}")
        self.policy = policy
        self._expiry = _ExpiryWheel(granularity)
        self._refresh = _SlotWheel(granularity)
        # Entries to push at the next `pop_due_for_push` (a dict as an insertion-ordered set).
        self._due: dict[TrackedEntry, None] = {}
        # Recent deadlines (on the `DEADLINE_STEP` grid), one float object each, shared by the
        # entries given that deadline (24 bytes an entry each otherwise).
        self._deadlines: dict[float, float] = {}

    # --- expiry -----------------------------------------------------------------------------

    def set_expiry(self, entry: TrackedEntry, expires_at: float, timeout: float) -> None:
        """The entry expires at `expires_at` rounded up to the `DEADLINE_STEP` grid (one
        float object per grid point, shared by the entries set in one step)."""
        entry.timeout = timeout
        rounded = -(-expires_at // DEADLINE_STEP) * DEADLINE_STEP
        deadlines = self._deadlines
        shared = deadlines.get(rounded)
        if shared is None:
            if len(deadlines) >= _DEADLINES_KEPT:
                deadlines.clear()
            shared = deadlines[rounded] = rounded
        self._expiry.place(entry, shared)

    def pop_expired(self, now: float) -> list[TrackedEntry]:
        """Entries whose `expires_at <= now`, removed from every schedule (the caller removes
        them from its indexes). Entries of the current bucket not yet expired stay."""
        current = self._expiry.bucket_of(now)
        expired: list[TrackedEntry] = []
        for entry in self._expiry.pop_through(current):
            if entry.expires_at <= now:
                self._forget_push(entry)
                expired.append(entry)
            else:
                self._expiry.place(entry, entry.expires_at)
        return expired

    def forget(self, entry: TrackedEntry) -> None:
        """Drop `entry` from every schedule (it was removed from its table)."""
        self._expiry.remove(entry)
        self._forget_push(entry)

    def _forget_push(self, entry: TrackedEntry) -> None:
        self._refresh.remove(entry)
        self._due.pop(entry, None)

    # --- push and refresh -------------------------------------------------------------------

    def mark_changed(self, entry: TrackedEntry) -> None:
        """The entry is new or its state changed: push it at the next opportunity."""
        entry.flags |= NEEDS_PUSH
        self._due[entry] = None

    def note_use(self, entry: TrackedEntry, now: float) -> bool:
        """A live flow used `entry` (the agent's periodic scan of used flows): its idle timer
        restarts at `now`, to within `USE_SLACK` of its timeout, and the use is noted for the
        next refresh push. The reset is skipped when the use is already noted and it would
        move the deadline by less than the slack, as Linux's conntrack skips timeout updates
        of under a jiffy: a scan then costs a few attribute reads per entry, not a wheel move.
        Returns whether the entry changed."""
        timeout = entry.timeout
        expires_at = now + timeout
        if (
            entry.flags & (USED_SINCE_PUSH | AWAITING_USE) == USED_SINCE_PUSH
            and expires_at - entry.expires_at < timeout * USE_SLACK
        ):
            return False
        self.set_expiry(entry, expires_at, timeout)
        self.mark_used(entry)
        return True

    def mark_used(self, entry: TrackedEntry) -> None:
        """A live flow used the entry (its expiry is extended by the table)."""
        flags = entry.flags
        entry.flags = (flags | USED_SINCE_PUSH) & ~AWAITING_USE
        if flags & AWAITING_USE:
            self._due[entry] = None

    def mark_known_to_peers(self, entry: TrackedEntry, now: float) -> None:
        """The peers hold this entry as of `now` (we pushed it, or a peer pushed it to us):
        the next refresh check is due `refresh_after(timeout)` from now."""
        entry.flags &= ~PUSH_FLAGS
        self._due.pop(entry, None)
        refresh = self._refresh
        refresh.remove(entry)
        refresh.add(entry, refresh.bucket_of(now + self.policy.refresh_after(entry.timeout)))

    def pop_due_for_push(self, now: float) -> list[TrackedEntry]:
        """Entries to push at `now` (new, changed, or used and due for refresh), in the order
        they became due. Each is then considered pushed at `now`."""
        for entry in self._refresh.pop_through(self._refresh.bucket_of(now)):
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
