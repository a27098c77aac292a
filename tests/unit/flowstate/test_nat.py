"""Unit tests for `hivenet.flowstate.nat` and `portblocks`: SNAT/DNAT bindings, reverse and
hairpin lookups, ICMP echo ids, ICMP error translation, expiry freeing ports, merges, and
the port block allocator (hypothesis: never the same port twice per destination, frees
correctly)."""

from __future__ import annotations

import copy
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from hivenet.flowstate.keys import FlowKey
from hivenet.flowstate.nat import (
    DEFAULT_NAT_TIMEOUTS,
    NatBinding,
    NatError,
    NatKind,
    NatPortsExhausted,
    NatRecord,
    NatTable,
    NatTargetsExhausted,
    key_rewrites,
)
from hivenet.flowstate.portblocks import (
    BLOCK_SIZE,
    AllocatedPort,
    Destination,
    NatRange,
    PortBlock,
    PortBlockAllocator,
    PortBlockError,
    parse_block_key,
)

from .helpers import ip, packet

ZONE = "router-1"
PRIVATE, PUBLIC_NAT, REMOTE = "10.0.0.5", "203.0.113.7", "198.51.100.20"
NAT_RANGE = NatRange.parse(PUBLIC_NAT, PUBLIC_NAT, 1024, 65535)


def snat_table(
    blocks: int = 1, block_size: int = BLOCK_SIZE
) -> tuple[NatTable, PortBlockAllocator]:
    allocator = PortBlockAllocator(block_size=block_size)
    for block in allocator.blocks_to_try(NAT_RANGE, limit=blocks):
        allocator.add_block(block)
    return NatTable(allocator), allocator


def test_snat_binding_and_reply_translation() -> None:
    table, _ = snat_table()
    key = FlowKey(4, ip(PRIVATE), ip(REMOTE), 6, 40000, 443)
    binding, created = table.snat(ZONE, key, [NAT_RANGE], 0.0)
    assert created
    translated = binding.translated
    assert (translated.ip_src, translated.ip_dst, translated.tp_dst) == (
        ip(PUBLIC_NAT),
        ip(REMOTE),
        443,
    )
    assert 1024 <= translated.tp_src <= 65535
    assert binding.forward_rewrites() == {"ip_src": ip(PUBLIC_NAT), "tp_src": translated.tp_src}
    reply = FlowKey(4, ip(REMOTE), ip(PUBLIC_NAT), 6, 443, translated.tp_src)
    assert table.lookup_reply(ZONE, NatKind.SNAT, reply, 1.0) == binding
    assert table.reverse(ZONE, NatKind.SNAT, reply, 1.0) == {"ip_dst": ip(PRIVATE), "tp_dst": 40000}
    # The same connection again: the same binding, not a new port.
    again, created_again = table.snat(ZONE, key, [NAT_RANGE], 1.0)
    assert again == binding and not created_again
    # Wrong kind or zone: nothing.
    assert table.lookup_reply(ZONE, NatKind.DNAT, reply, 1.0) is None
    assert table.lookup_reply("router-2", NatKind.SNAT, reply, 1.0) is None


def test_binding_is_found_from_either_side_for_hairpin() -> None:
    table, _ = snat_table()
    key = FlowKey(4, ip(PRIVATE), ip(REMOTE), 17, 5000, 53)
    binding, _ = table.snat(ZONE, key, [NAT_RANGE], 0.0)
    assert table.lookup_original(ZONE, NatKind.SNAT, key, 0.0) == binding
    assert table.lookup_translated(ZONE, NatKind.SNAT, binding.translated, 0.0) == binding
    assert table.lookup_reply(ZONE, NatKind.SNAT, binding.translated.reversed(), 0.0) == binding
    for side in (key, binding.translated, binding.translated.reversed()):
        assert table.touch(ZONE, NatKind.SNAT, side, 1.0)


def test_dnat_is_stable_and_reverses() -> None:
    table = NatTable()
    vip, backends = "192.0.2.100", NatRange.parse("10.1.0.10", "10.1.0.13", 8080, 8080)
    key = FlowKey(4, ip(REMOTE), ip(vip), 6, 51000, 80)
    binding, created = table.dnat(ZONE, key, [backends], 0.0)
    assert created
    assert binding.translated.tp_dst == 8080
    assert ip("10.1.0.10") <= binding.translated.ip_dst <= ip("10.1.0.13")
    assert binding.translated.ip_src == key.ip_src and binding.translated.tp_src == key.tp_src
    # Another table (another host) picks the same target for the same connection.
    other, _ = NatTable().dnat(ZONE, key, [backends], 5.0)
    assert other.translated == binding.translated
    reply = binding.translated.reversed()
    assert table.reverse(ZONE, NatKind.DNAT, reply, 1.0) == {"ip_src": ip(vip), "tp_src": 80}


def test_dnat_skips_targets_that_would_collide() -> None:
    table = NatTable()
    single = NatRange.parse("10.1.0.10", "10.1.0.11", 0, 0)
    first, _ = table.dnat(ZONE, FlowKey(4, ip(REMOTE), ip("192.0.2.1"), 6, 5000, 80), [single], 0.0)
    second, _ = table.dnat(
        ZONE, FlowKey(4, ip(REMOTE), ip("192.0.2.2"), 6, 5000, 80), [single], 0.0
    )
    assert first.translated != second.translated
    with pytest.raises(NatError, match="collides"):
        table.dnat(ZONE, FlowKey(4, ip(REMOTE), ip("192.0.2.3"), 6, 5000, 80), [single], 0.0)


def test_snat_icmp_echo_translates_the_id() -> None:
    table, _ = snat_table()
    key = FlowKey(4, ip(PRIVATE), ip(REMOTE), 1, 77, 77)
    binding, _ = table.snat(ZONE, key, [NAT_RANGE], 0.0)
    assert binding.translated.tp_src == binding.translated.tp_dst
    new_id = binding.translated.tp_src
    assert binding.forward_rewrites() == {"ip_src": ip(PUBLIC_NAT), "icmp_id": new_id}
    reply = FlowKey(4, ip(REMOTE), ip(PUBLIC_NAT), 1, new_id, new_id)
    assert table.reverse(ZONE, NatKind.SNAT, reply, 1.0) == {"ip_dst": ip(PRIVATE), "icmp_id": 77}


def test_snat_reuses_a_port_for_other_destinations_only() -> None:
    table, allocator = snat_table(blocks=1, block_size=4)
    # The first block of 1024..65535 with size 4 is ports 1024..1027.
    keys = [FlowKey(4, ip(PRIVATE), ip(REMOTE), 6, 40000 + n, 443) for n in range(4)]
    ports = {table.snat(ZONE, key, [NAT_RANGE], 0.0)[0].translated.tp_src for key in keys}
    assert ports == {1024, 1025, 1026, 1027}
    with pytest.raises(NatPortsExhausted) as raised:
        table.snat(ZONE, FlowKey(4, ip(PRIVATE), ip(REMOTE), 6, 40010, 443), [NAT_RANGE], 0.0)
    assert raised.value.destination == Destination(4, 6, ip(REMOTE), 443)
    # A different destination port may use the same NAT ports again.
    other, _ = table.snat(ZONE, FlowKey(4, ip(PRIVATE), ip(REMOTE), 6, 40000, 80), [NAT_RANGE], 0.0)
    assert other.translated.tp_src in ports
    # After leasing another block the exhausted destination gets a port.
    allocator.add_block(allocator.blocks_to_try(NAT_RANGE, limit=1)[0])
    extra, _ = table.snat(
        ZONE, FlowKey(4, ip(PRIVATE), ip(REMOTE), 6, 40010, 443), [NAT_RANGE], 0.0
    )
    assert extra.translated.tp_src not in ports


def test_snat_keep_port_range() -> None:
    keep = NatRange.parse(PUBLIC_NAT, PUBLIC_NAT)
    allocator = PortBlockAllocator()
    allocator.add_block(PortBlock(4, ip(PUBLIC_NAT), 40000 // BLOCK_SIZE))
    table = NatTable(allocator)
    binding, _ = table.snat(ZONE, FlowKey(4, ip(PRIVATE), ip(REMOTE), 17, 40000, 53), [keep], 0.0)
    assert binding.translated.tp_src == 40000
    assert binding.forward_rewrites() == {"ip_src": ip(PUBLIC_NAT)}
    with pytest.raises(NatPortsExhausted):  # same port, same destination, other private host
        table.snat(ZONE, FlowKey(4, ip("10.0.0.6"), ip(REMOTE), 17, 40000, 53), [keep], 0.0)


def test_expiry_and_removal_free_the_port() -> None:
    table, allocator = snat_table()
    key = FlowKey(4, ip(PRIVATE), ip(REMOTE), 17, 5000, 53)
    binding, _ = table.snat(ZONE, key, [NAT_RANGE], 0.0)
    assert allocator.in_use() == 1
    assert table.expire(299.0) == []
    expired = table.expire(300.0)  # UDP binding: 300 s
    assert [record.binding for record in expired] == [binding]
    assert allocator.in_use() == 0 and len(table) == 0
    table.snat(ZONE, key, [NAT_RANGE], 400.0)
    assert table.remove(ZONE, NatKind.SNAT, key)
    assert allocator.in_use() == 0
    assert not table.remove(ZONE, NatKind.SNAT, key)


def test_a_pushed_and_refreshed_binding_still_frees_its_port() -> None:
    """Owning the port is a bit of the entry's flags, next to the push's bits: pushing,
    using and refreshing the binding (which rewrite those bits) keep it."""
    table, allocator = snat_table()
    key = FlowKey(4, ip(PRIVATE), ip(REMOTE), 17, 5000, 53)
    binding, _ = table.snat(ZONE, key, [NAT_RANGE], 0.0)
    assert [record.binding for record, _ in table.due_for_push(0.0)] == [binding]
    table.snat(ZONE, key, [NAT_RANGE], 200.0)  # used: due for refresh
    assert [record.binding for record, _ in table.due_for_push(200.0)] == [binding]
    assert allocator.in_use() == 1
    assert [record.binding for record in table.expire(500.0)] == [binding]
    assert allocator.in_use() == 0


def test_touch_with_conntrack_timeout() -> None:
    table, _ = snat_table()
    key = FlowKey(4, ip(PRIVATE), ip(REMOTE), 6, 40000, 443)
    table.snat(ZONE, key, [NAT_RANGE], 0.0)
    assert table.touch(ZONE, NatKind.SNAT, key, 10.0, timeout=20.0)
    assert table.lookup_original(ZONE, NatKind.SNAT, key, 29.0) is not None
    assert table.lookup_original(ZONE, NatKind.SNAT, key, 30.0) is None


def test_icmp_error_translation_for_snat() -> None:
    table, _ = snat_table()
    key = FlowKey(4, ip(PRIVATE), ip(REMOTE), 17, 5000, 53)
    binding, _ = table.snat(ZONE, key, [NAT_RANGE], 0.0)
    nat_port = binding.translated.tp_src
    router = "192.0.2.254"
    # A router on the far side says the translated datagram is unreachable.
    error = packet(router, PUBLIC_NAT, 1, icmp_type=3)
    translation = table.icmp_error_translation(ZONE, NatKind.SNAT, error, binding.translated, 1.0)
    assert translation is not None and translation.binding == binding
    assert translation.outer_rewrites == {"ip_dst": ip(PRIVATE)}
    assert translation.inner_rewrites == {"ip_src": ip(PRIVATE), "tp_src": 5000}
    # An error the private host sends about a reply it could not take travels forwards.
    reply_as_delivered = key.reversed()
    error_back = packet(PRIVATE, REMOTE, 1, icmp_type=3)
    translation = table.icmp_error_translation(
        ZONE, NatKind.SNAT, error_back, reply_as_delivered, 1.0
    )
    assert translation is not None
    assert translation.outer_rewrites == {"ip_src": ip(PUBLIC_NAT)}
    assert translation.inner_rewrites == {"ip_dst": ip(PUBLIC_NAT), "tp_dst": nat_port}
    unrelated = FlowKey(4, ip(PUBLIC_NAT), ip(REMOTE), 17, 1, 53)
    assert table.icmp_error_translation(ZONE, NatKind.SNAT, error, unrelated, 1.0) is None


def test_icmp_error_translation_for_dnat_keeps_intermediate_router() -> None:
    table = NatTable()
    vip = "192.0.2.100"
    key = FlowKey(4, ip(REMOTE), ip(vip), 6, 51000, 80)
    binding, _ = table.dnat(ZONE, key, [NatRange.parse("10.1.0.10", "10.1.0.10", 8080, 8080)], 0.0)
    from_backend = packet("10.1.0.10", REMOTE, 1, icmp_type=3)
    translation = table.icmp_error_translation(
        ZONE, NatKind.DNAT, from_backend, binding.translated, 1.0
    )
    assert translation is not None
    assert translation.outer_rewrites == {"ip_src": ip(vip)}
    assert translation.inner_rewrites == {"ip_dst": ip(vip), "tp_dst": 80}
    from_router = packet("10.1.0.1", REMOTE, 1, icmp_type=11)
    translation = table.icmp_error_translation(
        ZONE, NatKind.DNAT, from_router, binding.translated, 1.0
    )
    assert translation is not None and translation.outer_rewrites == {}


def test_merge_installs_replaces_and_deletes() -> None:
    table = NatTable()
    key = FlowKey(4, ip(PRIVATE), ip(REMOTE), 6, 40000, 443)
    first = NatBinding(
        ZONE, NatKind.SNAT, key, FlowKey(4, ip(PUBLIC_NAT), ip(REMOTE), 6, 2000, 443)
    )
    assert table.merge(NatRecord(first, 100.0), 0.0) == first
    assert table.lookup_reply(ZONE, NatKind.SNAT, first.translated.reversed(), 1.0) == first
    assert table.due_for_push(1.0) == []  # a peer's binding is not echoed back
    second = NatBinding(
        ZONE, NatKind.SNAT, key, FlowKey(4, ip(PUBLIC_NAT), ip(REMOTE), 6, 2001, 443)
    )
    table.merge(NatRecord(second, 100.0), 2.0)
    assert table.lookup_reply(ZONE, NatKind.SNAT, first.translated.reversed(), 3.0) is None
    assert table.lookup_original(ZONE, NatKind.SNAT, key, 3.0) == second
    assert table.merge(NatRecord(second, 0.0), 4.0) is None
    assert len(table) == 0


def test_a_binding_whose_translated_key_a_newer_one_takes_is_handed_out_as_replaced() -> None:
    """A translated key is unique: the newer binding wins, and the one it replaced is handed
    out once by `take_replaced` (its flows carry only its own `nat_tag`, which the newer
    binding's tags do not name), not counted as evicted. So is a binding replaced by one of
    the same original key: its reply flows carry the old translated key's tag, and a newer
    binding made by a transaction may be rolled back."""
    table, _ = snat_table()
    ours, _ = table.snat(ZONE, FlowKey(4, ip(PRIVATE), ip(REMOTE), 6, 40000, 443), [NAT_RANGE], 0.0)
    (before,) = table.snapshot(0.0)
    theirs = NatBinding(
        ZONE, NatKind.SNAT, FlowKey(4, ip("10.0.0.6"), ip(REMOTE), 6, 40000, 443), ours.translated
    )
    assert table.merge(NatRecord(theirs, 100.0), 1.0) == theirs
    assert table.take_replaced() == [before]
    assert table.take_replaced() == []  # handed out once
    assert table.lookup_original(ZONE, NatKind.SNAT, ours.original, 1.0) is None
    assert table.lookup_translated(ZONE, NatKind.SNAT, ours.translated, 1.0) == theirs
    assert (len(table), table.evicted, table.take_evicted()) == (1, 0, [])
    moved = FlowKey(4, ip(PUBLIC_NAT), ip(REMOTE), 6, 2001, 443)
    (replaced,) = table.snapshot(2.0)
    table.merge(NatRecord(NatBinding(ZONE, NatKind.SNAT, theirs.original, moved), 100.0), 2.0)
    assert table.take_replaced() == [replaced]
    assert (len(table), table.evicted) == (1, 0)


def test_bindings_dropped_without_a_newer_one_are_handed_out_as_replaced() -> None:
    """The two ways a binding used to leave the table without a word: a SYN's DNAT rebinding
    whose targets are then exhausted, and a new binding over an expired, unswept one of the
    same original key that its transaction then rolls back (`remove`)."""
    table = NatTable()
    vip = ip("192.0.2.100")
    key = FlowKey(4, ip(REMOTE), vip, 6, 51000, 80)
    table.dnat(ZONE, key, [NatRange.parse("10.1.0.10", "10.1.0.10", 80, 80)], 0.0)
    (before,) = table.snapshot(0.0)
    # Another connection holds the only new target's reply key: the rebinding finds none.
    blocker = FlowKey(4, ip(REMOTE), vip, 6, 51000, 81)
    new_target = NatRange.parse("10.1.0.20", "10.1.0.20", 80, 80)
    table.dnat(ZONE, blocker, [new_target], 0.0)
    with pytest.raises(NatTargetsExhausted):
        table.dnat(ZONE, key, [new_target], 1.0, opening=True)
    assert table.lookup_original(ZONE, NatKind.DNAT, key, 1.0) is None
    assert table.take_replaced() == [before]
    # Expired, not swept: the next binding of its original key replaces it (handed out),
    # and removing the new one (a rollback) leaves no binding and nothing unreported.
    snat, _ = snat_table()
    original = FlowKey(4, ip(PRIVATE), ip(REMOTE), 6, 40000, 443)
    snat.snat(ZONE, original, [NAT_RANGE], 0.0)
    (expired,) = snat.snapshot(0.0)
    later = DEFAULT_NAT_TIMEOUTS.tcp + 1.0
    _, created = snat.snat(ZONE, original, [NAT_RANGE], later)
    assert created
    assert snat.take_replaced() == [expired]
    assert snat.remove(ZONE, NatKind.SNAT, original)
    assert snat.take_replaced() == [] and len(snat) == 0


@pytest.mark.parametrize(
    ("kind", "original", "translated", "message"),
    [
        (NatKind.SNAT, (4, 1, 2, 6, 10, 20), (4, 1, 3, 6, 10, 20), "keep the destination"),
        (NatKind.DNAT, (4, 1, 2, 6, 10, 20), (4, 5, 2, 6, 10, 20), "keep the source"),
        (NatKind.SNAT, (4, 1, 2, 6, 10, 20), (4, 1, 2, 17, 10, 20), "protocol"),
        (NatKind.SNAT, (4, 1, 2, 1, 10, 10), (4, 3, 2, 1, 11, 12), "id twice"),
        # An int equal to a kind is no kind: the zone's shared (zone, kind) pair would read
        # back as that int for every binding of the zone.
        (2, (4, 1, 2, 6, 10, 20), (4, 5, 2, 6, 10, 20), "kind must be a NatKind, got 2"),
    ],
)
def test_binding_validation(
    kind: NatKind, original: tuple[int, ...], translated: tuple[int, ...], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        NatBinding(ZONE, kind, FlowKey(*original), FlowKey(*translated))


def test_the_table_hands_out_its_entry_as_the_binding() -> None:
    """A binding in the table is one object (the entry is the binding, issue 16): every
    lookup returns that object, it equals and hashes as a plain `NatBinding` of the same
    fields, and it cannot be changed through the binding API."""
    table, _ = snat_table()
    key = FlowKey(4, ip(PRIVATE), ip(REMOTE), 6, 40000, 443)
    binding, _ = table.snat(ZONE, key, [NAT_RANGE], 0.0)
    reply = binding.translated.reversed()
    assert table.lookup_original(ZONE, NatKind.SNAT, key, 1.0) is binding
    assert table.lookup_translated(ZONE, NatKind.SNAT, binding.translated, 1.0) is binding
    assert table.lookup_reply(ZONE, NatKind.SNAT, reply, 1.0) is binding
    assert table.snat(ZONE, key, [NAT_RANGE], 1.0) == (binding, False)
    ((record, _),) = table.due_for_push(1.0)
    assert record.binding is binding
    plain = NatBinding(ZONE, NatKind.SNAT, key, binding.translated)
    assert plain == binding and binding == plain and hash(plain) == hash(binding)
    assert len({plain, binding}) == 1
    assert (
        repr(binding)
        == repr(plain)
        == (
            f"NatBinding(zone={ZONE!r}, kind={NatKind.SNAT!r}, original={key!r}, "
            f"translated={binding.translated!r})"
        )
    )
    assert binding != NatBinding(ZONE, NatKind.DNAT, key, key)
    assert binding != NatBinding("router-2", NatKind.SNAT, key, binding.translated)
    # A plain binding refuses writes at run time; the table's entry only to the type checker
    # (its fields are read-only properties there): its timers are written at C speed.
    with pytest.raises(AttributeError, match="immutable"):
        plain.zone = "router-2"  # type: ignore[misc]
    with pytest.raises(AttributeError, match="immutable"):
        del plain.translated  # type: ignore[misc]
    assert not hasattr(plain, "__dict__") and not hasattr(binding, "__dict__")
    # Copied and pickled as the value alone (the timers are the table's).
    for copied in (copy.copy(binding), copy.deepcopy(binding), pickle.loads(pickle.dumps(binding))):
        assert type(copied) is NatBinding and copied == binding
    # A merged (peer's) binding is the table's own entry too, equal to the record's.
    peer = NatTable()
    merged = peer.merge(NatRecord(plain, 100.0), 0.0)
    assert merged == plain and merged is not plain
    assert peer.lookup_original(ZONE, NatKind.SNAT, key, 1.0) is merged
    # Dropped and made again: a new object, the old one still equal to what it was.
    table.remove(ZONE, NatKind.SNAT, key)
    again, created = table.snat(ZONE, key, [NAT_RANGE], 2.0)
    assert created and again is not binding and binding == plain


def test_key_rewrites_of_identical_keys_is_empty() -> None:
    key = FlowKey(4, 1, 2, 6, 3, 4)
    assert key_rewrites(key, key) == {}


def test_snat_without_allocator_or_with_wrong_family_is_an_error() -> None:
    key = FlowKey(4, ip(PRIVATE), ip(REMOTE), 6, 1, 2)
    with pytest.raises(NatError, match="PortBlockAllocator"):
        NatTable().snat(ZONE, key, [NAT_RANGE], 0.0)
    table, _ = snat_table()
    with pytest.raises(NatError, match="IPv6"):
        table.snat(ZONE, key, [NatRange.parse("2001:db8::1", "2001:db8::1", 1, 2)], 0.0)
    with pytest.raises(NatError, match="at least one"):
        table.snat(ZONE, key, [], 0.0)


# --- port blocks --------------------------------------------------------------------------


def test_block_keys_round_trip() -> None:
    block = PortBlock(4, ip(PUBLIC_NAT), 17)
    assert block.store_key() == "/hivenet/v1/tables/nat/203.0.113.7/17"
    assert parse_block_key(block.store_key()) == block
    v6 = PortBlock(6, ip("2001:db8::7"), 1023)
    assert parse_block_key(v6.store_key()) == v6
    assert block.ports() == range(17 * 64, 18 * 64)


@pytest.mark.parametrize(
    "key",
    [
        "/hivenet/v1/tables/mac/1.2.3.4/1",
        "/hivenet/v1/tables/nat/1.2.3.400/1",
        "/hivenet/v1/tables/nat/1.2.3.4/1024",
        "/hivenet/v1/tables/nat/1.2.3.4/-1",
        "/hivenet/v1/tables/nat/1.2.3.4/x",
        "/hivenet/v1/tables/nat/1.2.3.4",
    ],
)
def test_bad_block_keys(key: str) -> None:
    with pytest.raises(PortBlockError):
        parse_block_key(key)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ((5, 1, 2), "ip_version"),
        ((4, 2, 1), "greater than ip_to"),
        ((4, 1, 1 << 32), "ip_to"),
        ((4, 1, 2, 10, 5), "port_from 10 is greater"),
        ((4, 1, 2, 0, 70000), "port_to"),
    ],
)
def test_nat_range_validation(arguments: tuple[int, ...], message: str) -> None:
    with pytest.raises(PortBlockError, match=message):
        NatRange(*arguments)


def test_blocks_to_try_spreads_hosts_and_skips_taken() -> None:
    two_addresses = NatRange.parse("203.0.113.1", "203.0.113.2", 1024, 2047)  # 16 blocks each
    first_host = PortBlockAllocator(seed=0).blocks_to_try(two_addresses, limit=3)
    other_host = PortBlockAllocator(seed=20).blocks_to_try(two_addresses, limit=3)
    assert first_host[0] == PortBlock(4, ip("203.0.113.1"), 16)
    assert other_host[0] == PortBlock(4, ip("203.0.113.2"), 20)
    allocator = PortBlockAllocator()
    allocator.add_block(first_host[0])
    taken = {first_host[1]}
    assert allocator.blocks_to_try(two_addresses, taken, limit=1) == [first_host[2]]
    everything = allocator.blocks_to_try(two_addresses, limit=1000)
    assert len(everything) == 31 and len(set(everything)) == 31


def test_claim_all_and_idle_blocks() -> None:
    allocator = PortBlockAllocator()
    assert allocator.claim_all(NatRange.parse("203.0.113.1", "203.0.113.1", 1, 200)) == 4
    assert len(allocator.idle_blocks()) == 4
    port = allocator.allocate(
        NatRange.parse("203.0.113.1", "203.0.113.1", 1, 200), Destination(4, 6, 1, 2)
    )
    assert port is not None and 1 <= port.port <= 200
    assert len(allocator.idle_blocks()) == 3
    with pytest.raises(PortBlockError, match="more than"):
        allocator.claim_all(NatRange.parse("2001:db8::", "2001:db8::ff", 1, 65535))


def test_release_of_unknown_port_and_removed_block() -> None:
    allocator = PortBlockAllocator()
    block = PortBlock(4, ip(PUBLIC_NAT), 20)
    allocator.add_block(block)
    destination = Destination(4, 6, ip(REMOTE), 443)
    allocated = allocator.allocate(NAT_RANGE, destination)
    assert allocated is not None
    assert not allocator.release(AllocatedPort(4, ip(PUBLIC_NAT), 9), destination)
    assert allocator.remove_block(block) == 1
    assert not allocator.release(allocated, destination)
    assert allocator.allocate(NAT_RANGE, destination) is None


class AllocatorMachine(RuleBasedStateMachine):
    """Allocate and release ports for a few destinations over blocks that come and go.

    Invariants: a (address, port) is never held twice for one destination; every port is
    inside a held block and the target range; the allocator's count matches the model; a
    release frees exactly what was allocated (and the port can be handed out again)."""

    TARGET = NatRange.parse("203.0.113.1", "203.0.113.2", 1000, 1100)
    DESTINATIONS = [Destination(4, 6, ip(REMOTE), port) for port in (80, 443)] + [
        Destination(4, 17, ip(REMOTE), 53)
    ]

    def __init__(self) -> None:
        super().__init__()
        self.allocator = PortBlockAllocator(block_size=16)
        self.held: dict[tuple[AllocatedPort, Destination], None] = {}

    @rule(choice=st.integers(0, 100))
    def add_block(self, choice: int) -> None:
        candidates = self.allocator.blocks_to_try(self.TARGET, limit=100)
        if candidates:
            self.allocator.add_block(candidates[choice % len(candidates)])

    @rule(destination=st.sampled_from(DESTINATIONS))
    def allocate(self, destination: Destination) -> None:
        allocated = self.allocator.allocate(self.TARGET, destination)
        if allocated is None:
            # Only when every held port of the range is in use for this destination.
            held_ports = {
                (block.ip, port)
                for block in self.allocator.blocks
                for port in block.ports(16)
                if 1000 <= port <= 1100
            }
            mine = {(a.ip, a.port) for a, d in self.held if d == destination}
            assert held_ports <= mine
            return
        assert (allocated, destination) not in self.held
        assert self.TARGET.contains_address(4, allocated.ip) and 1000 <= allocated.port <= 1100
        assert PortBlock(4, allocated.ip, allocated.port // 16) in self.allocator.blocks
        self.held[(allocated, destination)] = None

    @precondition(lambda self: bool(self.held))
    @rule(choice=st.integers(0, 1000))
    def release(self, choice: int) -> None:
        allocated, destination = list(self.held)[choice % len(self.held)]
        del self.held[(allocated, destination)]
        assert self.allocator.release(allocated, destination)
        assert not self.allocator.release(allocated, destination)
        assert not self.allocator.is_allocated(allocated, destination)

    @precondition(lambda self: bool(self.allocator.blocks))
    @rule(choice=st.integers(0, 100))
    def lose_block(self, choice: int) -> None:
        blocks = sorted(self.allocator.blocks)
        block = blocks[choice % len(blocks)]
        lost = [
            held
            for held in self.held
            if held[0].ip == block.ip and held[0].port // 16 == block.number
        ]
        assert self.allocator.remove_block(block) == len(lost)
        for held in lost:
            del self.held[held]

    @invariant()
    def counts_agree(self) -> None:
        assert self.allocator.in_use() == len(self.held)
        for allocated, destination in self.held:
            assert self.allocator.is_allocated(allocated, destination)


TestAllocatorMachine = AllocatorMachine.TestCase
TestAllocatorMachine.settings = settings(max_examples=150, stateful_step_count=50, deadline=None)


@settings(max_examples=150, deadline=None)
@given(
    private_ports=st.lists(st.integers(1, 65535), min_size=1, max_size=80, unique=True),
    destination_ports=st.lists(st.sampled_from([53, 80, 443]), min_size=80, max_size=80),
)
def test_snat_translations_are_unique_and_reversible(
    private_ports: list[int], destination_ports: list[int]
) -> None:
    table, _ = snat_table(blocks=2, block_size=32)
    bindings = []
    for private_port, destination_port in zip(private_ports, destination_ports, strict=False):
        key = FlowKey(4, ip(PRIVATE), ip(REMOTE), 6, private_port, destination_port)
        try:
            binding, _ = table.snat(ZONE, key, [NAT_RANGE], 0.0)
        except NatPortsExhausted:
            continue
        bindings.append(binding)
    translated = [binding.translated for binding in bindings]
    assert len(set(translated)) == len(translated)
    for binding in bindings:
        reply = binding.translated.reversed()
        assert table.lookup_reply(ZONE, NatKind.SNAT, reply, 1.0) == binding
        assert table.reverse(ZONE, NatKind.SNAT, reply, 1.0) == key_rewrites(
            reply, binding.original.reversed()
        )
