"""The megaflow table of one host's datapath, and the exact-match cache in front of it.

Owns: `Flow` (one installed megaflow with its counters), `FlowTable` (tuple space search: one
hash table per distinct mask, a tag index for invalidation, idle/hard expiry, an LRU size bound)
and `ExactMatchCache` (full FlowMatch tuple -> Flow, the userspace datapath's fast path).

Must not touch: the clock, sockets, threads or randomness (`now` is always passed in), packet
bytes (see `hivenet.flows.execute`), or the simulation that decides what to install.

How a lookup works (OVS-style tuple space search): every installed flow lives in the subtable
of its mask, keyed by its already-masked match. A lookup masks the packet's field values with
each subtable's mask and probes that subtable's dict; the first hit wins. Megaflows produced by
the simulation for one topology never disagree where they overlap, so, as in OVS, there are no
priorities: any matching flow is a correct answer. Subtables are probed in order of recent hit
count so the busiest masks are tried first.

Expiry: a flow expires when `now >= last_used + idle_timeout` (idle_timeout > 0) or when
`now >= created + hard_timeout` (hard_timeout > 0); a timeout of 0 means "never". `expire()`
reaps from a deadline heap (lazy: a popped entry whose flow was used since is pushed back with
its new deadline), so it touches only flows that are due. A lookup that lands on a flow that is
due but not yet reaped removes it and treats it as a miss, so a hard timeout always forces a
fresh simulation.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from operator import and_, attrgetter, itemgetter, le
from typing import Any

from hivenet.flows.actions import Action, DecTtl, Drop, Output, PopVlan, PushVlan, SetField, Tunnel
from hivenet.packets.flowmatch import FIELD_NAMES, FULL_MASKS, FlowMatch

# A flow tag: a str names something many flows share (a device, a chain, a host); an int
# names one connection's flow state (`flowstate.transaction`'s connection tags: 48 bytes
# where their text took ~95-130).
Tag = str | int

_ACTION_TYPES = (SetField, DecTtl, PushVlan, PopVlan, Output, Tunnel, Drop)
_FIELD_COUNT = len(FIELD_NAMES)
_INT_TYPE_ONLY = {int}
_FULL_MASK_BY_INDEX: tuple[int, ...] = tuple(FULL_MASKS[name] for name in FIELD_NAMES)

# FlowMatch -> tuple of its field values in FIELD_NAMES order, in one C call (much cheaper than
# dataclasses.astuple, which deep-copies).
flow_match_values: attrgetter[tuple[int, ...]] = attrgetter(*FIELD_NAMES)

# Re-sort the subtables by hit count every this many lookups (a power of two: tested with `&`).
_REORDER_INTERVAL = 4096

# Rebuild the expiry heap when stale entries outnumber live flows by this factor.
_HEAP_COMPACT_FACTOR = 2
# A flow's place in the expiry heap is its deadline rounded down to this grid (seconds, a
# power of two: exact in binary), one shared float per grid point (`_heap_time`): the flows
# installed or used within one grid step share it, where each held a float of its own (24
# bytes). Rounding down only makes `expire` look at a flow early; it checks the exact deadline.
_HEAP_GRID = 1 / 16
_HEAP_TIMES_MAX = 4096


class _TagGroup:
    """Tags shared by many flows (the devices, chains and ports a path crosses), held once for
    all the flows carrying exactly this set, with those flows. Interned by the table.

    `flows` is a list with lazy removal (8 bytes a flow where a dict costs ~60): a removed
    flow (`Flow.removed`) stays until the list holds more than twice `live` (+ slack), then
    the list is rebuilt; readers skip removed flows."""

    __slots__ = ("flows", "live", "tags")

    def __init__(self, tags: tuple[Tag, ...]) -> None:
        self.tags = tags
        self.flows: list[Flow] = []
        self.live = 0

    def add(self, flow: Flow) -> None:
        self.flows.append(flow)
        self.live += 1

    def discard(self, flow: Flow) -> None:
        """`flow` leaves the group (the table marks it removed)."""
        self.live -= 1
        if len(self.flows) > 2 * self.live + _GROUP_SLACK:
            self.flows = [held for held in self.flows if held is not flow and not held.removed]

    def live_flows(self) -> Iterator[Flow]:
        return (flow for flow in self.flows if not flow.removed)


_GROUP_SLACK = 16  # removed flows a group's list may hold beyond twice its live ones


_NO_TAGS: tuple[Tag, ...] = ()


class FlowLimits:
    """A flow's timeouts and MTU (see `Flow`), one object per distinct triple, shared by the
    flows of a table that have it (the simulation gives whole paths the same ones): two
    slots of every flow fewer (16 bytes of a ~160-byte flow)."""

    __slots__ = ("hard_timeout", "idle_timeout", "mtu")

    def __init__(self, idle_timeout: float, hard_timeout: float, mtu: int) -> None:
        self.idle_timeout = idle_timeout
        self.hard_timeout = hard_timeout
        self.mtu = mtu


class Flow:
    """One installed megaflow. Mutable (counters, last use); compared and hashed by identity.

    `removed` turns True when the table drops the flow (replaced, invalidated, expired,
    evicted), so holders of a reference such as the exact-match cache notice it is gone.

    Compact (issue 16, a table may hold a million): the flow keeps its subtable's dict key
    and subtable, not its own copy of the 23-field match and mask (`match` and `mask` are
    rebuilt from them on demand); its tags are the table's interned group of shared tags
    plus its own (a connection's), and `tags` joins them on demand. Its place in the table's
    LRU order is two links of its own (`_older`, `_newer`: 16 bytes, where an OrderedDict
    costs ~100 a flow).
    """

    __slots__ = (
        "_group",
        "_heap_at",
        "_key",
        "_newer",
        "_older",
        "_own",
        "_own2",
        "_subtable",
        "actions",
        "bytes",
        "created",
        "last_used",
        "limits",
        "packets",
        "removed",
    )

    def __init__(
        self,
        subtable: _Subtable,
        key: Hashable,
        actions: tuple[Action, ...],
        group: _TagGroup | None,
        own_tags: tuple[Tag, ...],
        created: float,
        limits: FlowLimits,
    ) -> None:
        self._subtable = subtable
        self._key = key
        self.actions = actions
        self._group = group
        # Its own tags without a tuple of their own (56 bytes a flow): none, one or two in
        # the slots (a connection's flow has two), three or more as a tuple in `_own`.
        self._own: Tag | tuple[Tag, ...] | None = None
        self._own2: Tag | None = None
        if len(own_tags) > 2:
            self._own = own_tags
        elif own_tags:
            self._own = own_tags[0]
            if len(own_tags) == 2:
                self._own2 = own_tags[1]
        self.created = created
        self.last_used = created
        self.limits = limits  # idle_timeout, hard_timeout, mtu (the table's shared object)
        self.packets = 0
        self.bytes = 0
        self.removed = False
        self._heap_at = math.inf  # the table's expiry heap orders flows by it (`__lt__`)
        # Neighbours in the table's LRU list (None: an end of it, or not in a table).
        self._older: Flow | None = None
        self._newer: Flow | None = None

    @property
    def idle_timeout(self) -> float:
        """Seconds without a packet after which the flow expires (0: never)."""
        return self.limits.idle_timeout

    @property
    def hard_timeout(self) -> float:
        """Seconds after its installation at which the flow expires (0: never)."""
        return self.limits.hard_timeout

    @property
    def mtu(self) -> int:
        """The largest IP packet (L3 bytes) this flow may carry; 0: no limit. A bigger IP
        packet does not take the flow: the datapath sends it to the agent (IPv4 with DF,
        IPv6: the simulation answers "fragmentation needed" / "packet too big") or drops it
        (IPv4 without DF, "too_big"; nothing fragments). See `hivenet.packets.mtu`."""
        return self.limits.mtu

    @property
    def match(self) -> tuple[int, ...]:
        """The masked match (one value per FlowMatch field, FIELD_NAMES order)."""
        return self._subtable.match_of(self._key)

    @property
    def mask(self) -> tuple[int, ...]:
        return self._subtable.mask

    @property
    def tags(self) -> tuple[Tag, ...]:
        group = self._group
        own = self.own_tags
        if group is None:
            return own
        return group.tags + own if own else group.tags

    @property
    def own_tags(self) -> tuple[Tag, ...]:
        """Its own tags (a connection's, `is_connection_tag` by default): the part of `tags`
        not shared with other flows through a group, without building `tags`."""
        own = self._own
        if own is None:
            return ()
        if type(own) is tuple:
            return own
        own2 = self._own2
        return (own,) if own2 is None else (own, own2)  # type: ignore[return-value]

    def __lt__(self, other: Flow) -> bool:
        return self._heap_at < other._heap_at

    def deadline(self) -> float:
        """When this flow expires if it is not used again (math.inf: never)."""
        limits = self.limits
        deadline = math.inf
        if limits.idle_timeout > 0:
            deadline = self.last_used + limits.idle_timeout
        if limits.hard_timeout > 0:
            deadline = min(deadline, self.created + limits.hard_timeout)
        return deadline

    def is_expired(self, now: float) -> bool:
        return now >= self.deadline()

    def matches(self, values: tuple[int, ...]) -> bool:
        """Whether a packet with these field values (FIELD_NAMES order) matches this flow."""
        return self._subtable.key_of(values) == self._key

    def __repr__(self) -> str:
        return (
            f"Flow(match={self.match}, mask={self.mask}, actions={self.actions}, "
            f"tags={self.tags}, created={self.created}, last_used={self.last_used}, "
            f"packets={self.packets}, removed={self.removed})"
        )


def _subtable_key_function(mask: tuple[int, ...]) -> Callable[[tuple[int, ...]], Hashable]:
    """The function that turns field values into a subtable's dict key under `mask`.

    Only the fields the mask covers go into the key, and a fully masked field is taken as is
    (FlowMatch fields are within their bit width), so the common megaflow (a few whole fields)
    costs one C-level itemgetter call instead of masking all fields.
    """
    covered = [index for index, field_mask in enumerate(mask) if field_mask]
    if not covered:
        return lambda values: ()
    partial = [index for index in covered if mask[index] != _FULL_MASK_BY_INDEX[index]]
    full = [index for index in covered if index not in partial]
    if not partial:
        # A single index makes itemgetter return a bare int: still a fine, consistent key.
        return itemgetter(*full)
    if len(partial) == 1:
        # The usual partial megaflow: whole fields plus one address prefix (2-3x cheaper than
        # masking every covered field).
        prefix_index, prefix_mask = partial[0], mask[partial[0]]
        if not full:
            return lambda values: values[prefix_index] & prefix_mask
        if len(full) == 1:
            (only,) = full
            return lambda values: (values[only], values[prefix_index] & prefix_mask)
        # One flat tuple (the whole fields, then the prefix), not a pair holding a tuple:
        # ~56 bytes less a flow for ~30 ns a probe.
        pick_full = itemgetter(*full)
        return lambda values: pick_full(values) + (values[prefix_index] & prefix_mask,)  # noqa: RUF005 (faster)
    pick_covered = itemgetter(*covered)
    covered_masks = tuple(mask[index] for index in covered)
    return lambda values: tuple(map(and_, pick_covered(values), covered_masks))


def _subtable_match_function(mask: tuple[int, ...]) -> Callable[[Hashable], tuple[int, ...]]:
    """The inverse of `_subtable_key_function(mask)` on masked matches: a key back to the
    masked match it was made from (every field the mask does not cover is 0)."""
    covered = [index for index, field_mask in enumerate(mask) if field_mask]
    partial = [index for index in covered if mask[index] != _FULL_MASK_BY_INDEX[index]]
    full = [index for index in covered if index not in partial]

    def as_values(key: Hashable) -> tuple[int, ...]:
        if not partial:
            return (key,) if len(full) == 1 else key  # type: ignore[return-value]
        if len(partial) == 1 and not full:
            return (key,)  # type: ignore[return-value]
        return key  # type: ignore[return-value]

    positions = full + partial if len(partial) == 1 else covered

    def match_of(key: Hashable) -> tuple[int, ...]:
        values = [0] * _FIELD_COUNT
        for index, value in zip(positions, as_values(key), strict=True):
            values[index] = value
        return tuple(values)

    return match_of


def _no_fields(values: tuple[int, ...]) -> tuple[()]:
    """The whole hoisted fields of a subtable that has none (its hoisted fields are partial)."""
    return ()


# What `_Subtable.key_of` returns for values whose hoisted fields differ from the subtable's:
# never a key of its dict, so the probe misses.
_NO_KEY = object()


class _Subtable:
    """All flows sharing one mask, keyed by `key_of(masked match)`.

    Fields every flow of the subtable has the same (masked) value in ("hoisted": at first
    every field the mask covers, with the first flow's values) are held once here and left out
    of the keys: a megaflow's key keeps only the fields its flows differ in (a 16-field key
    tuple is ~170 bytes a flow; the ports alone ~60, one port a shared int). Partly masked
    fields are hoisted too (a routed flow's `ip_ttl/0xfe`, the same for all): `key_of` checks
    them under their masks. `key_of` checks the hoisted fields first (a packet with other
    values there matches none of the subtable's flows). A flow that differs in a
    hoisted field makes the subtable `admit` it: that field goes back into the keys and every
    flow is re-keyed (at most once per field in the subtable's life)."""

    __slots__ = ("flows", "hits", "hoisted", "key_of", "mask", "match_of")

    def __init__(self, mask: tuple[int, ...], first: tuple[int, ...]) -> None:
        self.mask = mask
        self.flows: dict[Hashable, Flow] = {}
        self.hits = 0
        # Hoisted field index -> the (masked) value every flow has there.
        self.hoisted: dict[int, int] = {
            index: first[index] for index, field_mask in enumerate(mask) if field_mask
        }
        self._build()

    def _build(self) -> None:
        hoisted = self.hoisted
        keyed = tuple(0 if index in hoisted else m for index, m in enumerate(self.mask))
        key_of = _subtable_key_function(keyed)
        values_of = _subtable_match_function(keyed)
        if not hoisted:
            self.key_of, self.match_of = key_of, values_of
            return
        mask = self.mask
        whole = sorted(i for i in hoisted if mask[i] == _FULL_MASK_BY_INDEX[i])
        partial = sorted(i for i in hoisted if i not in whole)
        no_key = _NO_KEY
        pick = itemgetter(*whole) if whole else _no_fields
        expected = pick(tuple(hoisted.get(i, 0) for i in range(_FIELD_COUNT)))
        if not partial:
            self.key_of = lambda values: key_of(values) if pick(values) == expected else no_key
        elif len(partial) == 1:  # the usual: a routed flow's ip_ttl/0xfe
            (at,) = partial
            at_mask, at_value = mask[at], hoisted[at]
            self.key_of = lambda values: (
                key_of(values)
                if pick(values) == expected and values[at] & at_mask == at_value
                else no_key
            )
        else:
            pick_partial = itemgetter(*partial)  # two or more: a tuple
            partial_masks = tuple(mask[i] for i in partial)
            wanted = tuple(hoisted[i] for i in partial)
            self.key_of = lambda values: (
                key_of(values)
                if pick(values) == expected
                and tuple(map(and_, pick_partial(values), partial_masks)) == wanted
                else no_key
            )
        filled = tuple(hoisted.items())

        def match_of(key: Hashable) -> tuple[int, ...]:
            values = list(values_of(key))
            for index, value in filled:
                values[index] = value
            return tuple(values)

        self.match_of = match_of

    def admit(self, match: tuple[int, ...], share: Callable[[Any], Any]) -> None:
        """Make room for a flow with (masked) `match`: hoisted fields where it differs go
        back into the keys, and every flow is re-keyed (`share`: the table's key interning)."""
        hoisted = self.hoisted
        differing = [index for index, value in hoisted.items() if match[index] != value]
        if not differing:
            return
        matches = [(self.match_of(key), flow) for key, flow in self.flows.items()]
        for index in differing:
            del hoisted[index]
        self._build()
        self.flows = {}
        for values, flow in matches:
            flow._key = share(self.key_of(values))
            self.flows[flow._key] = flow


def _check_finite(name: str, value: float, *, allow_negative: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or (not allow_negative and value < 0):
        kind = "a finite number" if allow_negative else "a finite number >= 0"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return float(value)


def _check_key_tuple(name: str, values: object) -> tuple[int, ...]:
    if not isinstance(values, tuple):
        raise ValueError(f"{name} must be a tuple of ints, got {type(values).__name__}")
    if len(values) != _FIELD_COUNT:
        raise ValueError(
            f"{name} must have {_FIELD_COUNT} fields (one per FlowMatch field), got {len(values)}"
        )
    if set(map(type, values)) == _INT_TYPE_ONLY:  # fast path: C-level scan
        return values
    for index, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name}[{FIELD_NAMES[index]}] must be an int, got {value!r}")
    return values


def _raise_for_bad_field(match: tuple[int, ...], mask: tuple[int, ...]) -> None:
    """Name the first field whose mask is out of range or whose match is not masked."""
    for index, (value, field_mask) in enumerate(zip(match, mask, strict=True)):
        name = FIELD_NAMES[index]
        full = _FULL_MASK_BY_INDEX[index]
        if field_mask < 0 or field_mask > full:
            raise ValueError(f"mask[{name}]={field_mask:#x} is outside the field's {full:#x}")
        if value < 0 or value & ~field_mask:
            raise ValueError(
                f"match[{name}]={value:#x} is not masked by mask[{name}]={field_mask:#x}"
            )
    raise AssertionError("unreachable: the fast check found a bad field")


def _validate_flow(
    match: object, mask: object, actions: object, tags: object
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[Action, ...], frozenset[Tag]]:
    checked_mask = _check_key_tuple("mask", mask)
    checked_match = _check_key_tuple("match", match)
    well_formed = (
        min(checked_mask) >= 0
        and min(checked_match) >= 0
        and all(map(le, checked_mask, _FULL_MASK_BY_INDEX))
        and tuple(map(and_, checked_match, checked_mask)) == checked_match
    )
    if not well_formed:
        _raise_for_bad_field(checked_match, checked_mask)
    if isinstance(actions, str | bytes) or not isinstance(actions, Iterable):
        raise ValueError(f"actions must be a sequence of Action, got {actions!r}")
    checked_actions = tuple(actions)
    for position, action in enumerate(checked_actions):
        if not isinstance(action, _ACTION_TYPES):
            raise ValueError(f"actions[{position}] is not an Action: {action!r}")
    if isinstance(tags, str | bytes) or not isinstance(tags, Iterable):
        raise ValueError(f"tags must be an iterable of tags (not a bare string), got {tags!r}")
    checked_tags = frozenset(tags)
    for tag in checked_tags:
        if isinstance(tag, str) and tag:
            continue
        if type(tag) is not int or tag < 0:
            raise ValueError(
                f"tags must be non-empty strings or connection tags (ints >= 0), got {tag!r}"
            )
    return checked_match, checked_mask, checked_actions, checked_tags


def is_connection_tag(tag: Tag) -> bool:
    """Tags naming one connection's flow state (its conntrack entry, the NAT state of one
    of its keys: the ints `flowstate.transaction` makes): carried by one or two flows each,
    so kept per flow rather than in a shared group. Only a memory choice: invalidation is
    exact whichever way a tag is classed."""
    return type(tag) is int


_SHARED_VALUES_MAX = 1 << 17


class FlowTable:
    """Megaflow table: install, lookup, invalidate by tag, expire, LRU-bounded size.

    Tags are indexed twice: a flow's own tags (`own_tag`, by default a connection's) map to
    the flow itself; the rest of its tags form a group interned by the table and shared by
    every flow with the same set (the devices and chains of a path), and each of those tags
    maps to its groups. So a flow costs one entry in its group instead of one per shared tag.
    """

    def __init__(
        self, max_flows: int = 100_000, own_tag: Callable[[Tag], bool] = is_connection_tag
    ) -> None:
        if isinstance(max_flows, bool) or not isinstance(max_flows, int) or max_flows < 1:
            raise ValueError(f"max_flows must be an int >= 1, got {max_flows!r}")
        self.max_flows = max_flows
        self._own_tag = own_tag
        self._subtables: dict[tuple[int, ...], _Subtable] = {}
        # Probe order; reordered by hit count every _REORDER_INTERVAL lookups.
        self._probe_order: list[_Subtable] = []
        # Own tag -> the one flow carrying it, or an insertion-ordered set (a dict) of two or
        # more (a connection's tags are carried by one flow each way: a bare reference
        # instead of a one-entry dict saves ~200 bytes per tag).
        self._tag_index: dict[Tag, Flow | dict[Flow, None]] = {}
        # Shared tags: the interned groups (by their set of tags), and tag -> its groups.
        self._groups: dict[frozenset[Tag], _TagGroup] = {}
        self._group_index: dict[Tag, dict[_TagGroup, None]] = {}
        # The flows, least recently used first: a doubly linked list through the flows'
        # `_older`/`_newer` links (`_lru_append`, `_lru_unlink`), with its two ends.
        self._oldest: Flow | None = None
        self._newest: Flow | None = None
        self._count = 0
        # Flows by the deadline they had when pushed, rounded down to _HEAP_GRID
        # (`Flow._heap_at`, set only while out of the heap): the flow itself is the heap
        # entry, no (deadline, sequence, flow) tuple.
        self._expiry_heap: list[Flow] = []
        self._heap_times: dict[float, float] = {}  # one float object per grid point in use
        # Interned actions, counted so nothing outlives its flows: one tuple object per
        # distinct actions tuple, with the number of flows holding it (the connections of one
        # path and SNAT address have equal actions: their rewrites and outputs, and the same
        # translated address when the port is kept), and one object per distinct action held
        # by those tuples, with the number of tuple places holding it (a tuple of its own, as
        # a connection's port rewrite makes, still shares the path's other actions).
        self._action_tuples: dict[tuple[Action, ...], list[Any]] = {}
        self._actions: dict[Action, list[Any]] = {}
        # One FlowLimits per (idle_timeout, hard_timeout, mtu) in use; values only (nothing
        # can go stale), emptied at _SHARED_VALUES_MAX (flows already made keep theirs).
        self._limits: dict[tuple[float, float, int], FlowLimits] = {}
        # One int object per match value in the flows' tuple keys (a masked match's MACs,
        # addresses and ports are fresh ints, ~32 bytes each; a bare int key is not shared, see
        # `_shared_key`). Values only, so nothing can go stale;
        # emptied at _SHARED_VALUES_MAX values (keys already made keep theirs).
        self._values: dict[int, int] = {}
        self._lookups = 0
        self._hits = 0
        self._misses = 0
        self._installs = 0
        self._replaced = 0
        self._evictions = 0
        self._invalidated = 0
        self._expired = 0

    # ---- install / remove -------------------------------------------------------------------

    def install(
        self,
        match: tuple[int, ...],
        mask: tuple[int, ...],
        actions: Sequence[Action],
        tags: Iterable[Tag],
        now: float,
        *,
        idle_timeout: float = 60.0,
        hard_timeout: float = 0.0,
        mtu: int = 0,
    ) -> Flow:
        """Install a megaflow; a flow with the identical (match, mask) is replaced (the new flow
        starts with fresh counters and timers, the old one is marked removed). Installing beyond
        `max_flows` evicts the least recently used flows. `mtu`: see `Flow.mtu`."""
        checked_match, checked_mask, checked_actions, tag_set = _validate_flow(
            match, mask, actions, tags
        )
        now = _check_finite("now", now)
        idle_timeout = _check_finite("idle_timeout", idle_timeout, allow_negative=False)
        hard_timeout = _check_finite("hard_timeout", hard_timeout, allow_negative=False)
        if isinstance(mtu, bool) or not isinstance(mtu, int) or not 0 <= mtu <= 0xFFFF:
            raise ValueError(f"mtu must be an int in 0..65535 (0: no limit), got {mtu!r}")

        subtable = self._subtables.get(checked_mask)
        if subtable is None:
            subtable = _Subtable(checked_mask, checked_match)
            self._subtables[checked_mask] = subtable
            self._probe_order.append(subtable)
        else:
            subtable.admit(checked_match, self._shared_key)
            previous = subtable.flows.get(subtable.key_of(checked_match))
            if previous is not None:
                self._remove(previous)
                self._replaced += 1
                # _remove dropped the subtable if it emptied; put it back.
                if checked_mask not in self._subtables:
                    self._subtables[checked_mask] = subtable
                    self._probe_order.append(subtable)

        own_tag = self._own_tag
        own_tags = tuple(tag for tag in tag_set if own_tag(tag))
        shared = tag_set.difference(own_tags) if own_tags else tag_set
        group = self._group_of(shared) if shared else None
        key = self._shared_key(subtable.key_of(checked_match))
        flow = Flow(
            subtable,
            key,
            self._intern_actions(checked_actions),
            group,
            own_tags,
            now,
            self._limits_of(idle_timeout, hard_timeout, mtu),
        )
        subtable.flows[key] = flow
        if group is not None:
            group.add(flow)
        index = self._tag_index
        for tag in own_tags:
            held = index.get(tag)
            if held is None:
                index[tag] = flow
            elif isinstance(held, dict):
                held[flow] = None
            else:
                index[tag] = {held: None, flow: None}
        self._lru_append(flow)
        self._count += 1
        self._push_deadline(flow)
        self._installs += 1

        while self._count > self.max_flows:
            least_recent = self._oldest
            assert least_recent is not None
            self._remove(least_recent)
            self._evictions += 1
        return flow

    def _lru_append(self, flow: Flow) -> None:
        """Make `flow` the most recently used (it must not be in the list)."""
        newest = self._newest
        flow._older = newest
        flow._newer = None
        if newest is None:
            self._oldest = flow
        else:
            newest._newer = flow
        self._newest = flow

    def _lru_unlink(self, flow: Flow) -> None:
        older, newer = flow._older, flow._newer
        if older is None:
            self._oldest = newer
        else:
            older._newer = newer
        if newer is None:
            self._newest = older
        else:
            newer._older = older
        flow._older = flow._newer = None

    def _shared_key(self, key: Any) -> Any:
        """`key` (an int, or a tuple of ints and tuples) made of the table's shared ints.

        A bare int key is kept as it is: it differs from every other key of its subtable, so
        sharing it would save an int only when another subtable's key is equal by chance,
        and it cost a dict entry a flow (a connection's flow, keyed by its source port: ~30-50
        bytes, more than the int)."""
        if type(key) is tuple:
            values = self._values
            if len(values) >= _SHARED_VALUES_MAX:
                values.clear()
            shared = values.setdefault
            return tuple(
                shared(value, value) if type(value) is int else self._shared_key(value)
                for value in key
            )
        return key

    def _limits_of(self, idle_timeout: float, hard_timeout: float, mtu: int) -> FlowLimits:
        held = self._limits
        triple = (idle_timeout, hard_timeout, mtu)
        limits = held.get(triple)
        if limits is None:
            if len(held) >= _SHARED_VALUES_MAX:
                held.clear()
            limits = held[triple] = FlowLimits(idle_timeout, hard_timeout, mtu)
        return limits

    def _intern_actions(self, actions: tuple[Action, ...]) -> tuple[Action, ...]:
        use = self._action_tuples.get(actions)
        if use is None:
            held = self._actions
            out = []
            for action in actions:
                action_use = held.get(action)
                if action_use is None:
                    action_use = held[action] = [action, 0]
                action_use[1] += 1
                out.append(action_use[0])
            interned = tuple(out)
            use = self._action_tuples[interned] = [interned, 0]
        use[1] += 1
        return use[0]

    def _release_actions(self, actions: tuple[Action, ...]) -> None:
        use = self._action_tuples[actions]
        use[1] -= 1
        if use[1]:
            return
        del self._action_tuples[actions]
        held = self._actions
        for action in actions:
            action_use = held[action]
            action_use[1] -= 1
            if not action_use[1]:
                del held[action]

    def _group_of(self, tags: frozenset[Tag]) -> _TagGroup:
        group = self._groups.get(tags)
        if group is None:
            group = self._groups[tags] = _TagGroup(tuple(tags))
            for tag in group.tags:
                self._group_index.setdefault(tag, {})[group] = None
        return group

    def _remove(self, flow: Flow) -> None:
        subtable = flow._subtable
        del subtable.flows[flow._key]
        if not subtable.flows:
            del self._subtables[subtable.mask]
            self._probe_order.remove(subtable)
        group = flow._group
        if group is not None:
            group.discard(flow)
            if not group.live:
                del self._groups[frozenset(group.tags)]
                for tag in group.tags:
                    groups = self._group_index[tag]
                    del groups[group]
                    if not groups:
                        del self._group_index[tag]
        index = self._tag_index
        for tag in flow.own_tags:
            held = index[tag]
            if isinstance(held, dict):
                del held[flow]
                if len(held) == 1:
                    index[tag] = next(iter(held))
            else:
                del index[tag]
        self._lru_unlink(flow)
        self._count -= 1
        self._release_actions(flow.actions)
        flow.removed = True

    # ---- lookup -----------------------------------------------------------------------------

    def lookup(self, key: FlowMatch, now: float, *, packet_bytes: int = 0) -> Flow | None:
        """The flow matching `key`, with its counters and last use updated; None on a miss."""
        return self.lookup_values(flow_match_values(key), now, packet_bytes=packet_bytes)

    def lookup_values(
        self, values: tuple[int, ...], now: float, *, packet_bytes: int = 0
    ) -> Flow | None:
        """`lookup` for a key already turned into its field values (FIELD_NAMES order), as
        the exact-match cache holds them."""
        self._lookups += 1
        if not self._lookups & (_REORDER_INTERVAL - 1):
            self._reorder_subtables()
        while True:
            for subtable in self._probe_order:
                flow = subtable.flows.get(subtable.key_of(values))
                if flow is not None:
                    break
            else:
                self._misses += 1
                return None
            if self.record_use(flow, now, packet_bytes):
                subtable.hits += 1
                self._hits += 1
                return flow
            # The flow was due but not yet reaped; record_use removed it. Probe again: another
            # (live) flow may match too.

    def record_use(self, flow: Flow, now: float, packet_bytes: int = 0) -> bool:
        """Count one packet on `flow` (found via the table or the exact-match cache).

        False when the flow is no longer usable: already removed, or expired at `now`, in
        which case it is removed here (counted as expired)."""
        if flow.removed:
            return False
        # Flow.is_expired inlined: this runs once per forwarded packet.
        limits = flow.limits
        idle_timeout = limits.idle_timeout
        hard_timeout = limits.hard_timeout
        if (idle_timeout > 0 and now >= flow.last_used + idle_timeout) or (
            hard_timeout > 0 and now >= flow.created + hard_timeout
        ):
            self._remove(flow)
            self._expired += 1
            return False
        if now > flow.last_used:
            flow.last_used = now
        flow.packets += 1
        flow.bytes += packet_bytes
        if flow is not self._newest:  # move it to the end of the LRU list
            self._lru_unlink(flow)
            self._lru_append(flow)
        return True

    def _reorder_subtables(self) -> None:
        self._probe_order.sort(key=lambda subtable: subtable.hits, reverse=True)
        # Halve the counts so the order follows recent traffic, not all-time totals.
        for subtable in self._probe_order:
            subtable.hits >>= 1

    # ---- invalidate / expire ----------------------------------------------------------------

    def invalidate(self, tags: Iterable[Tag]) -> list[Flow]:
        """Remove every flow carrying any of `tags`; returns the removed flows."""
        if isinstance(tags, str | bytes):
            raise ValueError(f"tags must be an iterable of tags (not a bare string), got {tags!r}")
        doomed: dict[Flow, None] = {}
        index = self._tag_index
        group_index = self._group_index
        for tag in tags:
            held = index.get(tag)
            if isinstance(held, dict):
                doomed.update(held)
            elif held is not None:
                doomed[held] = None
            for group in group_index.get(tag, ()):
                doomed.update(dict.fromkeys(group.live_flows()))
        for flow in doomed:
            self._remove(flow)
        self._invalidated += len(doomed)
        return list(doomed)

    def expire(self, now: float) -> list[Flow]:
        """Remove and return every flow idle- or hard-expired at `now`."""
        now = _check_finite("now", now)
        heap = self._expiry_heap
        expired: list[Flow] = []
        later: list[tuple[Flow, float]] = []
        while heap and heap[0]._heap_at <= now:
            flow = heapq.heappop(heap)
            if flow.removed:
                continue
            deadline = flow.deadline()
            if deadline <= now:
                self._remove(flow)
                expired.append(flow)
            else:  # used since it was pushed, or due within the grid step: not yet
                later.append((flow, deadline))
        for flow, deadline in later:  # after the loop: its grid point may be <= now
            self._push_deadline(flow, deadline)
        self._expired += len(expired)
        if len(heap) > _HEAP_COMPACT_FACTOR * self._count + 1024:
            self._rebuild_expiry_heap()
        return expired

    def _push_deadline(self, flow: Flow, deadline: float | None = None) -> None:
        if deadline is None:
            deadline = flow.deadline()
        if deadline == math.inf:
            return
        flow._heap_at = self._heap_time(deadline)
        heapq.heappush(self._expiry_heap, flow)

    def _heap_time(self, deadline: float) -> float:
        point = deadline - deadline % _HEAP_GRID
        times = self._heap_times
        shared = times.get(point)
        if shared is None:
            if len(times) >= _HEAP_TIMES_MAX:
                times.clear()  # values only: flows already pushed keep theirs
            shared = times[point] = point
        return shared

    def _rebuild_expiry_heap(self) -> None:
        # Entries of removed flows pile up under churn (replacement, invalidation, eviction).
        live = [flow for flow in self._expiry_heap if not flow.removed]
        heapq.heapify(live)
        self._expiry_heap = live

    # ---- introspection ----------------------------------------------------------------------

    def flows(self) -> list[Flow]:
        """All installed flows, least recently used first."""
        out = []
        flow = self._oldest
        while flow is not None:
            out.append(flow)
            flow = flow._newer
        return out

    def __len__(self) -> int:
        return self._count

    def __contains__(self, flow: object) -> bool:
        if not isinstance(flow, Flow) or flow.removed:
            return False
        subtable = flow._subtable
        return (
            self._subtables.get(subtable.mask) is subtable and subtable.flows.get(flow._key) is flow
        )

    def masks(self) -> list[tuple[int, ...]]:
        """The distinct masks, in current probe order."""
        return [subtable.mask for subtable in self._probe_order]

    def stats(self) -> dict[str, int]:
        return {
            "flows": self._count,
            "masks": len(self._subtables),
            "tags": len(self._tag_index) + len(self._group_index),
            "tag_groups": len(self._groups),
            "lookups": self._lookups,
            "hits": self._hits,
            "misses": self._misses,
            "installs": self._installs,
            "replaced": self._replaced,
            "evictions": self._evictions,
            "invalidated": self._invalidated,
            "expired": self._expired,
        }


class ExactMatchCache:
    """Full FlowMatch field values -> Flow, bounded, first-in first-out.

    Never returns a flow the table removed (it checks `Flow.removed`). It does not check
    expiry: pass a hit to `FlowTable.record_use`, which refuses (and reaps) an expired flow.
    """

    def __init__(self, capacity: int) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
        self.capacity = capacity
        self._entries: OrderedDict[tuple[int, ...], Flow] = OrderedDict()
        self._hits = 0
        self._misses = 0
        self._stale = 0

    def get(self, values: tuple[int, ...]) -> Flow | None:
        flow = self._entries.get(values)
        if flow is None:
            self._misses += 1
            return None
        if flow.removed:
            del self._entries[values]
            self._stale += 1
            self._misses += 1
            return None
        self._hits += 1
        return flow

    def put(self, values: tuple[int, ...], flow: Flow) -> None:
        """Remember `flow` for these exact field values (it must match them)."""
        if flow.removed:
            return
        if not flow.matches(values):
            raise ValueError(f"flow with match {flow.match} does not match key {values}")
        entries = self._entries
        if values in entries:
            entries[values] = flow
            return
        if len(entries) >= self.capacity:
            entries.popitem(last=False)
        entries[values] = flow

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict[str, int]:
        return {
            "entries": len(self._entries),
            "hits": self._hits,
            "misses": self._misses,
            "stale": self._stale,
        }
