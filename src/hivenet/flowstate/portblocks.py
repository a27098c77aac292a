"""SNAT port blocks: how hosts share NAT addresses without coordinating per connection.

Each agent leases BLOCKS of `BLOCK_SIZE` ports of one NAT address through the store (key
`/hivenet/v1/tables/nat/<ip>/<block index>`, written on the host's lease so it vanishes with
the host) and hands out ports only from blocks it holds, so two hosts never pick the same
(address, port). Inside its blocks a host may reuse a port for different destinations: a
translated connection is unique as long as (address, port, destination) is.

Owns `PortBlock`, `NatRange` (where a rule may translate to), `PortBlockAllocator` (the pure
part: which ports of the held blocks are free, which block keys to try next, which ranges
are running low and should get another block ahead of need) and the block key spelling. The agent does the store transaction (create-if-absent on the key, on its
lease) and tells the allocator with `add_block`/`remove_block`.
Pure: no I/O, no clock; imports only the standard library and `hivenet.flowstate.keys`.
"""

from __future__ import annotations

import ipaddress
from bisect import bisect_right
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from hivenet.flowstate.keys import format_address

BLOCK_SIZE = 64
_LOW_COUNTS_MAX = 1024  # `PortBlockAllocator._low_counts` entries before it is emptied
NAT_BLOCK_PREFIX = "/hivenet/v1/tables/nat/"
MAX_BLOCKS_PER_CLAIM = 1 << 16
_ADDRESS_BITS = {4: 32, 6: 128}


class PortBlockError(ValueError):
    """A port block, NAT range or block key is invalid; the message names field and value."""


@dataclass(frozen=True, slots=True)
class NatRange:
    """Addresses `ip_from..ip_to` and ports `port_from..port_to` (inclusive) a NAT rule may
    translate to; ports 0-0 mean "keep the original port". Mirrors `model.NatTarget`, as
    ints (flowstate may not import the model)."""

    ip_version: int
    ip_from: int
    ip_to: int
    port_from: int = 0
    port_to: int = 0

    def __post_init__(self) -> None:
        bits = _ADDRESS_BITS.get(self.ip_version)
        if bits is None:
            raise PortBlockError(f"NatRange.ip_version must be 4 or 6, got {self.ip_version!r}")
        for name in ("ip_from", "ip_to"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < (1 << bits):
                raise PortBlockError(
                    f"NatRange.{name} {value!r} is not an IPv{self.ip_version} address"
                )
        if self.ip_from > self.ip_to:
            raise PortBlockError(
                f"NatRange.ip_from {format_address(self.ip_version, self.ip_from)} is greater "
                f"than ip_to {format_address(self.ip_version, self.ip_to)}"
            )
        for name in ("port_from", "port_to"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value <= 0xFFFF:
                raise PortBlockError(f"NatRange.{name} must be 0..65535, got {value!r}")
        if self.port_from > self.port_to:
            raise PortBlockError(
                f"NatRange.port_from {self.port_from} is greater than port_to {self.port_to}"
            )

    @classmethod
    def parse(cls, ip_from: str, ip_to: str, port_from: int = 0, port_to: int = 0) -> NatRange:
        """From address text (as `model.NatTarget` holds them)."""
        start, end = ipaddress.ip_address(ip_from), ipaddress.ip_address(ip_to)
        if start.version != end.version:
            raise PortBlockError(
                f"NatRange mixes IPv{start.version} {ip_from} and IPv{end.version} {ip_to}"
            )
        return cls(start.version, int(start), int(end), port_from, port_to)

    @property
    def keeps_port(self) -> bool:
        return self.port_from == 0 and self.port_to == 0

    @property
    def address_count(self) -> int:
        return self.ip_to - self.ip_from + 1

    def contains_address(self, ip_version: int, ip: int) -> bool:
        return ip_version == self.ip_version and self.ip_from <= ip <= self.ip_to


class PortBlock(NamedTuple):
    """Ports `number * BLOCK_SIZE .. (number + 1) * BLOCK_SIZE - 1` of one NAT address."""

    ip_version: int
    ip: int
    number: int

    def ports(self, block_size: int = BLOCK_SIZE) -> range:
        return range(self.number * block_size, (self.number + 1) * block_size)

    def store_key(self) -> str:
        return f"{NAT_BLOCK_PREFIX}{format_address(self.ip_version, self.ip)}/{self.number}"


def parse_block_key(key: str, block_size: int = BLOCK_SIZE) -> PortBlock:
    """The block a `/hivenet/v1/tables/nat/<ip>/<index>` key names; PortBlockError otherwise."""
    if not key.startswith(NAT_BLOCK_PREFIX):
        raise PortBlockError(f"not a NAT block key: {key!r}")
    address_text, _, index_text = key[len(NAT_BLOCK_PREFIX) :].rpartition("/")
    try:
        address = ipaddress.ip_address(address_text)
        index = int(index_text)
    except ValueError as error:
        raise PortBlockError(f"not a NAT block key: {key!r} ({error})") from None
    if not index_text.isdigit() or not 0 <= index < (0x10000 // block_size):
        raise PortBlockError(f"NAT block key {key!r}: block index {index_text!r} out of range")
    return PortBlock(address.version, int(address), index)


class Destination(NamedTuple):
    """Where translated connections go: a port may serve several destinations at once."""

    ip_version: int
    ip_proto: int
    ip_dst: int
    tp_dst: int


class AllocatedPort(NamedTuple):
    ip_version: int
    ip: int
    port: int


class _Span(NamedTuple):
    """Ports `first..last` of one held block of `ip`, inside a target's port range (`block`:
    the held block itself, the key of its use count)."""

    ip_version: int
    ip: int
    block: PortBlock
    first: int
    last: int


class _PortSet:
    """A set of `ip << 16 | port` pairs kept as 64-bit words (`pair >> 6` -> a bit per
    pair): ~1.5 bytes a pair when a destination's ports are dense, as a gateway's SNAT ports
    towards a busy destination are, where a set of ints costs ~140 (its slot and the int).
    Iterates in no particular order."""

    __slots__ = ("_count", "_words")

    def __init__(self) -> None:
        self._words: dict[int, int] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __contains__(self, pair: int) -> bool:
        return bool(self._words.get(pair >> 6, 0) >> (pair & 63) & 1)

    def add(self, pair: int) -> None:
        word, bit = pair >> 6, 1 << (pair & 63)
        bits = self._words.get(word, 0)
        if not bits & bit:
            self._words[word] = bits | bit
            self._count += 1

    def discard(self, pair: int) -> None:
        word, bit = pair >> 6, 1 << (pair & 63)
        bits = self._words.get(word, 0)
        if bits & bit:
            if bits ^ bit:
                self._words[word] = bits ^ bit
            else:
                del self._words[word]
            self._count -= 1

    def __iter__(self) -> Iterator[int]:
        for word, bits in self._words.items():
            base = word << 6
            while bits:
                low = bits & -bits
                yield base | (low.bit_length() - 1)
                bits ^= low

    def remove_range(self, first: int, last: int) -> None:
        """Discard every pair in first..last."""
        for pair in [pair for pair in self if first <= pair <= last]:
            self.discard(pair)


class PortBlockAllocator:
    """Hands out (address, port) from the blocks this host holds, never the same one twice
    for a destination until it is released.

    `seed` (e.g. a hash of the host id) spreads hosts over the candidate blocks so they do not
    all race for the same first block. The search for a free port starts where the previous
    one ended (a cursor over all held ports of the target), so a port just released is not
    the next handed out (the peer may still hold the old connection) and a busy destination
    costs O(1) per allocation instead of a scan of the ports it already uses.

    Low-water mark: after an allocation leaves fewer than `low_water` (a fraction) of the
    target's held ports free for that destination, the target is noted in `running_low`; the
    agent leases another block in the background so the next packets find a port.
    """

    def __init__(
        self, block_size: int = BLOCK_SIZE, seed: int = 0, low_water: float = 0.25
    ) -> None:
        if not isinstance(block_size, int) or block_size < 1 or 0x10000 % block_size:
            raise PortBlockError(f"block_size must divide 65536, got {block_size!r}")
        if not isinstance(low_water, int | float) or not 0.0 <= low_water < 1.0:
            raise PortBlockError(f"low_water must be a fraction in [0, 1), got {low_water!r}")
        self.block_size = block_size
        self.seed = seed
        self.low_water = float(low_water)
        self._blocks_by_address: dict[tuple[int, int], list[int]] = {}
        self._block_use: dict[PortBlock, int] = {}
        # Per destination, the (address, port) pairs in use, packed as `ip << 16 | port`, in
        # 64-bit words (`_PortSet`: a host may track millions).
        self._used: dict[Destination, _PortSet] = {}
        self._cursor = 0
        # Per target range: its held spans and their cumulative start offsets (rebuilt when a
        # block comes or goes).
        self._spans: dict[NatRange, tuple[tuple[_Span, ...], tuple[int, ...], int]] = {}
        # Targets whose free ports for some destination fell below the low-water mark, with
        # that destination (the agent drains this: `take_running_low`).
        self.running_low: dict[NatRange, Destination] = {}
        # `used_for` counts of targets found running low, with `_changes` when counted: each
        # allocation or release since moves a count by at most one, so a count that many
        # above the mark still proves "running low" without a rescan (a scan per allocation
        # once a destination passed the mark made new connections O(ports in use) each).
        # Emptied when a block comes or goes.
        self._low_counts: dict[tuple[NatRange, Destination], tuple[int, int]] = {}
        self._changes = 0

    # --- blocks ----------------------------------------------------------------------------

    @property
    def blocks(self) -> frozenset[PortBlock]:
        return frozenset(self._block_use)

    def add_block(self, block: PortBlock) -> None:
        """This host now holds `block` (its lease was created in the store)."""
        if block.ip_version not in _ADDRESS_BITS or not 0 <= block.ip < (
            1 << _ADDRESS_BITS[block.ip_version]
        ):
            raise PortBlockError(f"PortBlock address {block.ip!r} is not IPv{block.ip_version}")
        if not 0 <= block.number < 0x10000 // self.block_size:
            raise PortBlockError(
                f"PortBlock.number must be 0..{0x10000 // self.block_size - 1}, got {block.number!r}"
            )
        if block in self._block_use:
            return
        self._block_use[block] = 0
        self._spans.clear()
        self._low_counts.clear()
        indexes = self._blocks_by_address.setdefault((block.ip_version, block.ip), [])
        indexes.append(block.number)
        indexes.sort()

    def remove_block(self, block: PortBlock) -> int:
        """This host lost `block` (lease gone). Returns how many ports of it were in use;
        their later `release` calls return False."""
        in_use = self._block_use.pop(block, None)
        if in_use is None:
            return 0
        self._spans.clear()
        self._low_counts.clear()
        address = (block.ip_version, block.ip)
        self._blocks_by_address[address].remove(block.number)
        if not self._blocks_by_address[address]:
            del self._blocks_by_address[address]
        first = block.ip << 16 | block.number * self.block_size
        last = first + self.block_size - 1
        for destination in list(self._used):
            if destination.ip_version != block.ip_version:
                continue
            used = self._used[destination]
            used.remove_range(first, last)
            if not used:
                del self._used[destination]
        return in_use

    def idle_blocks(self) -> list[PortBlock]:
        """Held blocks with no port in use (the agent may give their leases back)."""
        return sorted(block for block, in_use in self._block_use.items() if in_use == 0)

    def claim_all(self, target: NatRange) -> int:
        """Hold every block of `target` (a single host with the range to itself, e.g. a test
        or one-process simulation). Refuses ranges of more than MAX_BLOCKS_PER_CLAIM blocks."""
        blocks = list(self._candidate_blocks(target, limit=MAX_BLOCKS_PER_CLAIM + 1))
        if len(blocks) > MAX_BLOCKS_PER_CLAIM:
            raise PortBlockError(f"NAT range {target} has more than {MAX_BLOCKS_PER_CLAIM} blocks")
        for block in blocks:
            self.add_block(block)
        return len(blocks)

    def blocks_to_try(
        self,
        target: NatRange,
        taken: frozenset[PortBlock] | set[PortBlock] = frozenset(),
        limit: int = 8,
    ) -> list[PortBlock]:
        """Up to `limit` blocks of `target` this host does not hold and that are not known to
        be `taken` by others, in the order to try leasing them (starting at a place set by
        `seed`, wrapping around)."""
        return list(self._candidate_blocks(target, limit, skip=taken, start=self.seed))

    def _block_span(self, target: NatRange) -> tuple[int, int]:
        low, high = (1, 0xFFFF) if target.keeps_port else (target.port_from, target.port_to)
        return low // self.block_size, high // self.block_size

    def _candidate_blocks(
        self,
        target: NatRange,
        limit: int,
        skip: frozenset[PortBlock] | set[PortBlock] = frozenset(),
        start: int = 0,
    ) -> Iterator[PortBlock]:
        first, last = self._block_span(target)
        per_address = last - first + 1
        total = target.address_count * per_address
        produced = 0
        offset = start % total
        for step in range(total):
            if produced >= limit:
                return
            position = (offset + step) % total
            block = PortBlock(
                target.ip_version,
                target.ip_from + position // per_address,
                first + position % per_address,
            )
            if block in self._block_use or block in skip:
                continue
            produced += 1
            yield block

    # --- ports -----------------------------------------------------------------------------

    def _port_bounds(self, target: NatRange, original_port: int) -> tuple[int, int]:
        if target.keeps_port:
            if not 0 < original_port <= 0xFFFF:
                raise PortBlockError(
                    f"a port-keeping NAT range needs original_port 1..65535, got {original_port!r}"
                )
            return original_port, original_port
        return max(target.port_from, 1), target.port_to

    def _target_spans(
        self, target: NatRange, low: int, high: int
    ) -> tuple[tuple[_Span, ...], tuple[int, ...], int]:
        """The held ports of `target` between `low` and `high`, as spans in a fixed order,
        with each span's offset in their concatenation and the total port count."""
        size = self.block_size
        spans: list[_Span] = []
        for (version, ip), indexes in self._blocks_by_address.items():
            if not target.contains_address(version, ip):
                continue
            for index in indexes:
                first, last = max(index * size, low), min(index * size + size - 1, high)
                if first <= last:
                    spans.append(_Span(version, ip, PortBlock(version, ip, index), first, last))
        offsets: list[int] = []
        total = 0
        for span in spans:
            offsets.append(total)
            total += span.last - span.first + 1
        return tuple(spans), tuple(offsets), total

    def _spans_of(self, target: NatRange) -> tuple[tuple[_Span, ...], tuple[int, ...], int]:
        """`_target_spans` of a range that does not keep ports (its ports do not depend on the
        packet), kept until a block comes or goes."""
        cached = self._spans.get(target)
        if cached is None:
            low, high = self._port_bounds(target, 0)
            cached = self._spans[target] = self._target_spans(target, low, high)
        return cached

    def capacity(self, target: NatRange) -> int:
        """How many ports of `target` the held blocks cover (per destination: a port may
        serve several destinations). A port-keeping range has no fixed capacity: 0."""
        if target.keeps_port:
            return 0
        return self._spans_of(target)[2]

    def used_for(self, target: NatRange, destination: Destination) -> int:
        """How many ports of `target`'s held blocks are in use towards `destination`."""
        used = self._used.get(destination)
        if not used:
            return 0
        low, high = (1, 0xFFFF) if target.keeps_port else self._port_bounds(target, 0)
        version, size, held = target.ip_version, self.block_size, self._block_use
        return sum(
            1
            for pair in used
            if target.contains_address(version, pair >> 16)
            and low <= (port := pair & 0xFFFF) <= high
            and PortBlock(version, pair >> 16, port // size) in held
        )

    def free_for(self, target: NatRange, destination: Destination) -> int:
        """Held ports of `target` still free towards `destination`."""
        return self.capacity(target) - self.used_for(target, destination)

    def is_running_low(self, target: NatRange, destination: Destination) -> bool:
        """Fewer than `low_water` of `target`'s held ports are free towards `destination`
        (always True when none is held). Port-keeping ranges never run low: the port they
        need depends on the packet, so there is nothing to lease ahead."""
        if target.keeps_port:
            return False
        return self._runs_low(target, destination, self.capacity(target))

    def _runs_low(self, target: NatRange, destination: Destination, capacity: int) -> bool:
        """`is_running_low` of a range that does not keep ports, whose held ports number
        `capacity` (the caller has it at hand)."""
        threshold = capacity * (1.0 - self.low_water)
        used = self._used.get(destination)
        # Cheap bound first: every port used towards the destination, whatever the target.
        if used is None or len(used) < threshold:
            return capacity == 0
        known = self._low_counts.get((target, destination))
        if known is not None and known[0] - (self._changes - known[1]) >= threshold:
            return True
        count = self.used_for(target, destination)
        if len(self._low_counts) >= _LOW_COUNTS_MAX:
            self._low_counts.clear()
        self._low_counts[(target, destination)] = (count, self._changes)
        return count >= threshold

    def take_running_low(self) -> dict[NatRange, Destination]:
        """The targets noted as running low since the last call (and forget them)."""
        noted, self.running_low = self.running_low, {}
        return noted

    def allocate(
        self,
        target: NatRange,
        destination: Destination,
        original_port: int = 0,
        is_taken: Callable[[int, int], bool] | None = None,
    ) -> AllocatedPort | None:
        """A free (address, port) of `target` for `destination` from the held blocks, or None
        when every candidate is in use (lease another block: `blocks_to_try`, then retry).

        A range that keeps ports (0-0) can only give `original_port`. `is_taken(ip, port)`
        lets the caller veto a candidate (e.g. a binding a peer pushed to us)."""
        if destination.ip_version != target.ip_version:
            raise PortBlockError(
                f"destination is IPv{destination.ip_version}, NAT range IPv{target.ip_version}"
            )
        keeps_port = target.keeps_port
        if keeps_port:
            low, high = self._port_bounds(target, original_port)
            if low > high:
                return None
            spans, offsets, total = self._target_spans(target, low, high)
        else:
            # The total is the range's capacity (for `_runs_low`).
            spans, offsets, total = self._spans_of(target)
        if not total:
            if not keeps_port:
                self.running_low[target] = destination
            return None
        used = self._used.get(destination)
        start = self._cursor % total
        span_index = bisect_right(offsets, start) - 1
        position = start
        checked = 0
        while checked < total:
            span = spans[span_index]
            span_end = offsets[span_index] + span.last - span.first + 1
            base = span.ip << 16
            port = span.first + (position - offsets[span_index])
            while position < span_end and checked < total:
                pair = base | port
                if (used is None or pair not in used) and (
                    is_taken is None or not is_taken(span.ip, port)
                ):
                    if used is None:
                        used = self._used[destination] = _PortSet()
                    used.add(pair)
                    self._changes += 1
                    self._block_use[span.block] += 1
                    self._cursor = position + 1
                    if not keeps_port and self._runs_low(target, destination, total):
                        self.running_low[target] = destination
                    return AllocatedPort(span.ip_version, span.ip, port)
                position += 1
                port += 1
                checked += 1
            span_index += 1
            if span_index == len(spans):
                span_index = position = 0
        if not keeps_port:
            self.running_low[target] = destination
        return None

    def mark(self) -> int:
        """Where the next allocation starts looking (for `rewind`)."""
        return self._cursor

    def rewind(self, mark: int) -> None:
        """Start the next allocation where it would have started at `mark`: the ports
        allocated since were released unused (a rolled-back transaction), so the allocations
        that follow are those that would have followed without them."""
        self._cursor = mark

    def release(self, allocated: AllocatedPort, destination: Destination) -> bool:
        """Give back a port allocated for `destination`. False when it was not allocated
        (already released, or its block was removed)."""
        used = self._used.get(destination)
        pair = allocated.ip << 16 | allocated.port
        if used is None or pair not in used:
            return False
        used.discard(pair)
        self._changes += 1
        if not used:
            del self._used[destination]
        block = PortBlock(allocated.ip_version, allocated.ip, allocated.port // self.block_size)
        self._block_use[block] -= 1
        return True

    def in_use(self) -> int:
        return sum(self._block_use.values())

    def is_allocated(self, allocated: AllocatedPort, destination: Destination) -> bool:
        used = self._used.get(destination)
        return used is not None and (allocated.ip << 16 | allocated.port) in used
