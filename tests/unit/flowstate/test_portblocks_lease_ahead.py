"""The port-block allocator's search cursor, capacity and low-water mark: what tells the agent
to lease another block before a packet finds none free."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hivenet.flowstate import BLOCK_SIZE, NatRange, PortBlock, PortBlockAllocator
from hivenet.flowstate.portblocks import AllocatedPort, Destination, PortBlockError
from tests.unit.flowstate.helpers import ip

SNAT_IP = ip("203.0.113.2")
OTHER_IP = ip("203.0.113.9")
TARGET = NatRange(4, SNAT_IP, SNAT_IP, 1024, 65535)
OTHER_TARGET = NatRange(4, OTHER_IP, OTHER_IP, 1024, 65535)
SERVER = Destination(4, 6, ip("198.51.100.7"), 443)
ELSEWHERE = Destination(4, 6, ip("198.51.100.8"), 443)


def allocator_with(blocks: int, target: NatRange = TARGET) -> PortBlockAllocator:
    allocator = PortBlockAllocator()
    for block in allocator.blocks_to_try(target, limit=blocks):
        allocator.add_block(block)
    return allocator


def test_capacity_counts_held_ports_inside_the_range() -> None:
    allocator = PortBlockAllocator()
    assert allocator.capacity(TARGET) == 0
    allocator.add_block(PortBlock(4, SNAT_IP, 16))  # ports 1024..1087, all in range
    allocator.add_block(PortBlock(4, SNAT_IP, 15))  # ports 960..1023, all below 1024
    allocator.add_block(PortBlock(4, OTHER_IP, 20))  # another address
    assert allocator.capacity(TARGET) == BLOCK_SIZE
    assert allocator.capacity(OTHER_TARGET) == BLOCK_SIZE
    allocator.remove_block(PortBlock(4, SNAT_IP, 16))
    assert allocator.capacity(TARGET) == 0
    # Port-keeping ranges have no capacity to lease ahead for.
    assert allocator.capacity(NatRange(4, SNAT_IP, SNAT_IP)) == 0


def test_running_low_is_noted_past_the_low_water_mark_per_destination() -> None:
    allocator = allocator_with(1)
    threshold = int(BLOCK_SIZE * 0.75)  # 25% low-water mark: note at 48 of 64 in use
    for n in range(threshold - 1):
        assert allocator.allocate(TARGET, SERVER) is not None
        assert not allocator.running_low, n
    # Other destinations reuse the same ports: they do not make SERVER's supply run low.
    for _ in range(BLOCK_SIZE):
        assert allocator.allocate(TARGET, ELSEWHERE) is not None
    assert allocator.take_running_low() == {TARGET: ELSEWHERE}
    assert allocator.allocate(TARGET, SERVER) is not None
    assert allocator.take_running_low() == {TARGET: SERVER}
    assert allocator.take_running_low() == {}
    assert allocator.free_for(TARGET, SERVER) == BLOCK_SIZE - threshold
    # A second block brings SERVER back above the mark.
    allocator.add_block(allocator.blocks_to_try(TARGET, limit=1)[0])
    assert not allocator.is_running_low(TARGET, SERVER)
    assert allocator.free_for(TARGET, SERVER) == 2 * BLOCK_SIZE - threshold


def test_a_target_without_blocks_runs_low_and_an_exhausted_one_is_noted() -> None:
    allocator = PortBlockAllocator()
    assert allocator.is_running_low(TARGET, SERVER)
    assert allocator.allocate(TARGET, SERVER) is None
    assert allocator.take_running_low() == {TARGET: SERVER}


def test_ports_used_through_another_target_do_not_count_against_this_one() -> None:
    allocator = allocator_with(1)
    for block in allocator.blocks_to_try(OTHER_TARGET, limit=4):
        allocator.add_block(block)
    for _ in range(4 * BLOCK_SIZE):
        assert allocator.allocate(OTHER_TARGET, SERVER) is not None
    allocator.take_running_low()
    assert allocator.used_for(TARGET, SERVER) == 0
    assert not allocator.is_running_low(TARGET, SERVER)
    assert allocator.allocate(TARGET, SERVER) is not None
    assert TARGET not in allocator.take_running_low()


def test_a_busy_destination_does_not_rescan_its_used_ports() -> None:
    """20 blocks, one destination: the cursor continues where the last search ended, so
    each allocation checks about one candidate, not the ports already handed out."""
    allocator = allocator_with(20)
    checks = 0

    def is_taken(_ip: int, _port: int) -> bool:
        nonlocal checks
        checks += 1
        return False

    ports = set()
    for _ in range(20 * BLOCK_SIZE):
        allocated = allocator.allocate(TARGET, SERVER, is_taken=is_taken)
        assert allocated is not None
        ports.add(allocated.port)
    assert len(ports) == 20 * BLOCK_SIZE
    assert checks == 20 * BLOCK_SIZE
    assert allocator.allocate(TARGET, SERVER) is None


def test_past_the_low_water_mark_allocations_do_not_recount_the_used_ports() -> None:
    """Every allocation past the mark asks whether the target runs low; the allocator
    recounts its used ports only when its last count no longer proves it (a few times per
    destination), not once per allocation."""
    allocator = allocator_with(1000)
    recounts = 0
    used_for = allocator.used_for

    def counting_used_for(target: NatRange, destination: Destination) -> int:
        nonlocal recounts
        recounts += 1
        return used_for(target, destination)

    allocator.used_for = counting_used_for  # type: ignore[method-assign]
    for _ in range(1000 * BLOCK_SIZE):
        assert allocator.allocate(TARGET, SERVER) is not None
        assert allocator.take_running_low() in ({}, {TARGET: SERVER})
    assert allocator.is_running_low(TARGET, SERVER)
    assert 1 <= recounts <= 40


def test_releases_below_the_mark_end_running_low_despite_the_remembered_count() -> None:
    """Ports used through another target keep the destination's total past the mark, so
    only a count of this target's ports (or a remembered one still valid) can answer."""
    allocator = allocator_with(1)  # 64 ports of TARGET: the mark is at 48 in use
    for block in allocator.blocks_to_try(OTHER_TARGET, limit=2):
        allocator.add_block(block)
    for _ in range(100):
        assert allocator.allocate(OTHER_TARGET, SERVER) is not None
    taken = [allocator.allocate(TARGET, SERVER) for _ in range(50)]
    assert allocator.is_running_low(TARGET, SERVER)
    for allocated in taken[:2]:
        assert allocated is not None and allocator.release(allocated, SERVER)
    assert allocator.is_running_low(TARGET, SERVER)  # 48 in use: still at the mark
    for allocated in taken[2:10]:
        assert allocated is not None and allocator.release(allocated, SERVER)
    assert not allocator.is_running_low(TARGET, SERVER)  # 40 in use


def test_a_released_port_is_not_handed_out_next() -> None:
    allocator = allocator_with(1)
    first = allocator.allocate(TARGET, SERVER)
    assert first is not None
    assert allocator.release(first, SERVER)
    again = allocator.allocate(TARGET, SERVER)
    assert again is not None and again.port != first.port


def test_low_water_must_be_a_fraction() -> None:
    with pytest.raises(PortBlockError, match="low_water"):
        PortBlockAllocator(low_water=1.5)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["allocate", "release", "add", "remove"]), st.integers(0, 5)),
        max_size=150,
    )
)
def test_allocations_stay_unique_and_counts_exact(operations: list[tuple[str, int]]) -> None:
    """Whatever the order of allocations, releases and block changes: a (address, port) is
    never given twice to one destination, and `used_for`/`capacity` match a recount."""
    allocator = allocator_with(1)
    destinations = [SERVER, ELSEWHERE, Destination(4, 17, ip("198.51.100.7"), 53)]
    live: dict[Destination, list[tuple[int, int]]] = {d: [] for d in destinations}
    for operation, n in operations:
        destination = destinations[n % len(destinations)]
        if operation == "allocate":
            allocated = allocator.allocate(TARGET, destination)
            if allocated is not None:
                pair = (allocated.ip, allocated.port)
                assert pair not in live[destination]
                live[destination].append(pair)
        elif operation == "release" and live[destination]:
            address, port = live[destination].pop(n % len(live[destination]))
            assert allocator.release(AllocatedPort(4, address, port), destination)
        elif operation == "add":
            candidates = allocator.blocks_to_try(TARGET, limit=1)
            if candidates:
                allocator.add_block(candidates[0])
        elif operation == "remove" and allocator.blocks:
            block = sorted(allocator.blocks)[n % len(allocator.blocks)]
            allocator.remove_block(block)
            span = block.ports()
            for pairs in live.values():
                pairs[:] = [p for p in pairs if not (p[0] == block.ip and p[1] in span)]
        held = {(b.ip, p) for b in allocator.blocks for p in b.ports() if 1024 <= p <= 65535}
        assert allocator.capacity(TARGET) == len(held)
        capacity = allocator.capacity(TARGET)
        for each in destinations:
            assert allocator.used_for(TARGET, each) == len(live[each])
            # The low-water mark as defined, whatever `is_running_low` remembered meanwhile.
            below_mark = len(live[each]) >= capacity * (1.0 - allocator.low_water)
            assert allocator.is_running_low(TARGET, each) == (capacity == 0 or below_mark)
    for destination in destinations:
        for address, port in live[destination]:
            assert allocator.is_allocated(AllocatedPort(4, address, port), destination)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 4),
    st.lists(st.tuples(st.booleans(), st.sampled_from([SERVER, ELSEWHERE])), max_size=300),
)
def test_an_allocation_notes_running_low_exactly_when_is_running_low_says_so(
    blocks: int, steps: list[tuple[bool, Destination]]
) -> None:
    """`allocate` decides "running low" from the spans it already has (their total is the
    range's capacity): the same answer `is_running_low` gives after it, and the blocks' use
    counts follow every allocation and release."""
    allocator = allocator_with(blocks)
    held: dict[Destination, list[AllocatedPort]] = {SERVER: [], ELSEWHERE: []}
    for allocate, destination in steps:
        if allocate or not held[destination]:
            port = allocator.allocate(TARGET, destination)
            noted = allocator.take_running_low()
            if port is None:
                assert noted == {TARGET: destination}
                continue
            held[destination].append(port)
            assert (TARGET in noted) == allocator.is_running_low(TARGET, destination)
        else:
            assert allocator.release(held[destination].pop(0), destination)
        assert allocator.in_use() == sum(map(len, held.values()))
