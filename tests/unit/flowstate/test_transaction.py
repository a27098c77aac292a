"""Unit tests for `hivenet.flowstate.transaction`: one simulated packet's conntrack and NAT
decisions, committed when the packet passes and rolled back when it is dropped; replies
translated back; tags and cacheability; the push queue after a commit."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hivenet.flows.table import is_connection_tag
from hivenet.flowstate.conntrack import ConnState, ConntrackTable
from hivenet.flowstate.keys import FlowKey, PackedKeys, key_text
from hivenet.flowstate.nat import NatBinding, NatKind, NatTable
from hivenet.flowstate.portblocks import NatRange, PortBlockAllocator
from hivenet.flowstate.transaction import (
    CONNTRACK_TAG_KIND,
    NAT_TAG_KINDS,
    ConnectionTags,
    FlowStateTransaction,
    NatAction,
    conntrack_tag,
    nat_key_tag,
    nat_reply_tag,
    nat_tag,
    split_tag,
    tag_text,
    zone_hash,
)
from hivenet.packets.flowmatch import FlowMatch

from .helpers import ACK, SYN, ip, packet, tcp

ROUTER = "router-1"
PRIVATE, PUBLIC_NAT, REMOTE = "10.0.0.5", "203.0.113.7", "198.51.100.20"
NAT_RANGE = NatRange.parse(PUBLIC_NAT, PUBLIC_NAT, 1024, 65535)


@pytest.fixture
def tables() -> tuple[ConntrackTable, NatTable, PortBlockAllocator]:
    allocator = PortBlockAllocator()
    allocator.add_block(allocator.blocks_to_try(NAT_RANGE, limit=1)[0])
    return ConntrackTable(), NatTable(allocator), allocator


def test_snat_gateway_round_trip(
    tables: tuple[ConntrackTable, NatTable, PortBlockAllocator],
) -> None:
    conntrack, nat, _ = tables
    syn = tcp(PRIVATE, 40000, REMOTE, 443, SYN)
    outbound = FlowStateTransaction(conntrack, nat)
    assert not outbound.is_return_flow(ROUTER, syn, 0.0)
    outcome = outbound.nat(ROUTER, NatAction.SNAT, syn, [NAT_RANGE], 0.0)
    assert outcome.binding is not None
    nat_port = outcome.rewrites["tp_src"]
    assert outcome.rewrites == {"ip_src": ip(PUBLIC_NAT), "tp_src": nat_port}
    result = outbound.commit(0.0, peers=frozenset({"h2"}))
    assert [record.state for record in result.connections] == [ConnState.SYN_SENT]
    assert result.nat_bindings == (outcome.binding,)
    assert result.tags == {
        conntrack_tag(ROUTER, FlowKey(4, ip(PRIVATE), ip(REMOTE), 6, 40000, 443)),
        nat_tag(outcome.binding),
    }
    assert outbound.cacheable
    # Everything the packet created is due for a push, to the peers given at commit.
    pushed_peers = [peers for _, peers in conntrack.due_for_push(0.0)]
    pushed_peers += [peers for _, peers in nat.due_for_push(0.0)]
    assert pushed_peers == [frozenset({"h2"})] * 2

    # The reply enters (on the router's uplink): rev_snat, then the conntrack check sees the
    # packet as translated back, a return flow of the connection.
    syn_ack = tcp(REMOTE, 443, PUBLIC_NAT, nat_port, SYN | ACK)
    inbound = FlowStateTransaction(conntrack, nat)
    reverse = inbound.nat(ROUTER, NatAction.REV_SNAT, syn_ack, [], 1.0)
    assert reverse.rewrites == {"ip_dst": ip(PRIVATE), "tp_dst": 40000}
    translated_back = syn_ack.with_fields(ip_dst=ip(PRIVATE), tp_dst=40000)
    assert inbound.is_return_flow(ROUTER, translated_back, 1.0)
    inbound.commit(1.0)
    record = conntrack.get(ROUTER, FlowKey(4, ip(PRIVATE), ip(REMOTE), 6, 40000, 443), 1.0)
    assert record is not None and record.state is ConnState.SYN_RECV


def test_one_transactions_conntrack_entry_and_binding_hold_one_key() -> None:
    """Tables sharing one `PackedKeys` (as an agent's do): the connection's conntrack entry
    and the SNAT binding of the same key hold one plain int, not a FlowKey each."""
    allocator = PortBlockAllocator()
    allocator.add_block(allocator.blocks_to_try(NAT_RANGE, limit=1)[0])
    packed = PackedKeys()
    conntrack = ConntrackTable(packed_keys=packed)
    nat = NatTable(allocator, packed_keys=packed)
    syn = tcp(PRIVATE, 40000, REMOTE, 443, SYN)
    transaction = FlowStateTransaction(conntrack, nat)
    assert not transaction.is_return_flow(ROUTER, syn, 0.0)
    outcome = transaction.nat(ROUTER, NatAction.SNAT, syn, [NAT_RANGE], 0.0)
    transaction.commit(0.0)
    assert outcome.binding is not None
    (entry,) = [entry for zone in conntrack._zones.values() for entry in zone.values()]
    assert type(entry.packed) is int and entry.packed is outcome.binding.original_packed


def test_rollback_frees_the_port_and_opens_nothing(
    tables: tuple[ConntrackTable, NatTable, PortBlockAllocator],
) -> None:
    conntrack, nat, allocator = tables
    syn = tcp(PRIVATE, 40000, REMOTE, 443, SYN)
    transaction = FlowStateTransaction(conntrack, nat)
    transaction.is_return_flow(ROUTER, syn, 0.0)
    transaction.nat(ROUTER, NatAction.SNAT, syn, [NAT_RANGE], 0.0)
    assert allocator.in_use() == 1
    transaction.rollback()
    assert allocator.in_use() == 0
    assert len(nat) == 0 and len(conntrack) == 0
    with pytest.raises(RuntimeError, match="already"):
        transaction.commit(0.0)


def test_rollback_keeps_bindings_it_did_not_create(
    tables: tuple[ConntrackTable, NatTable, PortBlockAllocator],
) -> None:
    conntrack, nat, _ = tables
    syn = tcp(PRIVATE, 40000, REMOTE, 443, SYN)
    first = FlowStateTransaction(conntrack, nat)
    first.nat(ROUTER, NatAction.SNAT, syn, [NAT_RANGE], 0.0)
    first.commit(0.0)
    second = FlowStateTransaction(conntrack, nat)
    second.nat(ROUTER, NatAction.SNAT, syn, [NAT_RANGE], 1.0)
    second.rollback()
    assert len(nat) == 1


def test_mid_stream_packet_is_forward_but_not_cacheable(
    tables: tuple[ConntrackTable, NatTable, PortBlockAllocator],
) -> None:
    conntrack, nat, _ = tables
    transaction = FlowStateTransaction(conntrack, nat)
    assert not transaction.is_return_flow(ROUTER, tcp(PRIVATE, 1, REMOTE, 2, ACK), 0.0)
    assert not transaction.cacheable
    assert transaction.commit(0.0).connections == ()
    assert len(conntrack) == 0


def test_rev_nat_on_untranslated_packet_changes_nothing(
    tables: tuple[ConntrackTable, NatTable, PortBlockAllocator],
) -> None:
    conntrack, nat, _ = tables
    transaction = FlowStateTransaction(conntrack, nat)
    outcome = transaction.nat(ROUTER, NatAction.REV_DNAT, tcp(REMOTE, 1, PRIVATE, 2, ACK), [], 0.0)
    assert outcome.rewrites == {} and outcome.binding is None


def test_icmp_error_through_snat_is_related_and_translated(
    tables: tuple[ConntrackTable, NatTable, PortBlockAllocator],
) -> None:
    conntrack, nat, _ = tables
    request = packet(PRIVATE, REMOTE, 17, 5000, 53)
    outbound = FlowStateTransaction(conntrack, nat)
    outbound.is_return_flow(ROUTER, request, 0.0)
    binding = outbound.nat(ROUTER, NatAction.SNAT, request, [NAT_RANGE], 0.0).binding
    outbound.commit(0.0)
    assert binding is not None
    error = packet("192.0.2.254", PUBLIC_NAT, 1, icmp_type=3)
    inbound = FlowStateTransaction(conntrack, nat, embedded=binding.translated)
    outcome = inbound.nat(ROUTER, NatAction.REV_SNAT, error, [], 1.0)
    assert outcome.rewrites == {"ip_dst": ip(PRIVATE)}
    assert not inbound.cacheable
    # After the rewrite the quoted datagram is the original one: related to the connection.
    related = FlowStateTransaction(conntrack, nat, embedded=binding.original)
    assert related.is_return_flow(ROUTER, error.with_fields(ip_dst=ip(PRIVATE)), 1.0)


def test_dnat_load_balancer_with_conntrack(
    tables: tuple[ConntrackTable, NatTable, PortBlockAllocator],
) -> None:
    conntrack, nat, _ = tables
    vip = "192.0.2.100"
    backends = NatRange.parse("10.1.0.10", "10.1.0.12", 8080, 8080)
    syn = tcp(REMOTE, 51000, vip, 80, SYN)
    inbound = FlowStateTransaction(conntrack, nat)
    outcome = inbound.nat(ROUTER, NatAction.DNAT, syn, [backends], 0.0)
    assert set(outcome.rewrites) == {"ip_dst", "tp_dst"}
    after_dnat = syn.with_fields(**outcome.rewrites)
    assert not inbound.is_return_flow(ROUTER, after_dnat, 0.0)
    inbound.commit(0.0)
    reply = tcp(PRIVATE, 0, REMOTE, 0, 0).with_fields(
        ip_src=outcome.rewrites["ip_dst"], tp_src=8080, tp_dst=51000, tcp_flags=SYN | ACK
    )
    back = FlowStateTransaction(conntrack, nat)
    assert back.is_return_flow(ROUTER, reply, 1.0)
    assert back.nat(ROUTER, NatAction.REV_DNAT, reply, [], 1.0).rewrites == {
        "ip_src": ip(vip),
        "tp_src": 80,
    }


VIP = "10.0.9.100"
MEMBER_A, MEMBER_B = "10.0.2.11", "10.0.2.12"


def _member(address: str) -> NatRange:
    return NatRange.parse(address, address, 8080, 8080)


def _dnat(nat: NatTable, flags: int, member: str, now: float) -> tuple[str, bool]:
    """(the member the packet went to, whether the decision may be cached)."""
    transaction = FlowStateTransaction(ConntrackTable(), nat)
    outcome = transaction.nat(
        ROUTER, NatAction.DNAT, tcp(PRIVATE, 40000, VIP, 80, flags), [_member(member)], now
    )
    transaction.commit(now)
    chosen = outcome.rewrites["ip_dst"]
    return next(a for a in (MEMBER_A, MEMBER_B) if ip(a) == chosen), transaction.cacheable


def test_a_connection_keeps_its_member_and_a_reused_port_gets_the_new_choice() -> None:
    """A load balancer's binding sticks to the connection (the pool changing later moves no
    packet of it), but a SYN on the same ports after the member left the pool opens a new
    connection and goes to the member chosen now, as conntrack reopens a closed connection."""
    nat = NatTable(PortBlockAllocator())
    assert _dnat(nat, SYN, MEMBER_A, 0.0) == (MEMBER_A, True)
    # The pool changed (A removed, B chosen): the established connection stays on A, and
    # that packet's flow may not be cached (a SYN with the same 5-tuple would go elsewhere).
    assert _dnat(nat, ACK, MEMBER_B, 1.0) == (MEMBER_A, False)
    # A retransmitted SYN while A is still chosen keeps A.
    assert _dnat(nat, SYN, MEMBER_A, 2.0) == (MEMBER_A, True)
    # The client reuses the port after A left: the new connection goes to B, and stays.
    assert _dnat(nat, SYN, MEMBER_B, 3.0) == (MEMBER_B, True)
    assert _dnat(nat, ACK, MEMBER_B, 4.0) == (MEMBER_B, True)


@given(
    zone=st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z"),
    version=st.sampled_from([4, 6]),
    ip_src=st.integers(0, (1 << 32) - 1),
    ip_dst=st.integers(0, (1 << 128) - 1),
    ports=st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF)),
)
def test_a_connection_tag_reads_back_its_zone_kind_and_key(
    zone: str, version: int, ip_src: int, ip_dst: int, ports: tuple[int, int]
) -> None:
    """Object ids (the zones) with IPv4 and IPv6 keys: `tag_text` finds the zone among the
    ids it is given (else its hash), the kind and the key (the lower direction for
    conntrack)."""
    key = FlowKey(version, ip_src, ip_dst if version == 6 else ip_dst >> 96, 6, *ports)
    lower = min(key, key.reversed())
    for tag in (conntrack_tag(zone, key), conntrack_tag(zone, key.reversed())):
        assert tag_text(tag, ["other", zone]) == f"conntrack:{zone}:{key_text(lower)}"
        assert tag_text(tag).startswith("conntrack:#")
        assert tag_text(tag).endswith(f":{key_text(lower)}")
    for kind, name in ((NatKind.SNAT, "snat"), (NatKind.DNAT, "dnat")):
        assert (
            tag_text(nat_key_tag(zone, kind, key), [zone]) == f"nat:{zone}:{name}:{key_text(key)}"
        )
    # What the agent's refresh scan reads back: kind, zone hash, key (a FlowKey again).
    code, hashed, read = split_tag(conntrack_tag(zone, key.reversed()))
    assert (code, hashed, read) == (CONNTRACK_TAG_KIND, zone_hash(zone), lower)
    assert type(read) is FlowKey and tuple(read) == tuple(lower)
    for kind in NatKind:
        code, hashed, read = split_tag(nat_key_tag(zone, kind, key))
        assert (NAT_TAG_KINDS[code], hashed, read) == (kind, zone_hash(zone), key)
        assert read.reversed() == key.reversed()


# --- tags spelled once ----------------------------------------------------------------------


@st.composite
def _keys(draw: st.DrawFn) -> FlowKey:
    version = draw(st.sampled_from([4, 6]))
    bits = 32 if version == 4 else 128
    proto = draw(st.sampled_from([1, 6, 17, 58, 47]))
    tp_src = draw(st.integers(0, 0xFFFF))
    tp_dst = tp_src if proto in (1, 58) else draw(st.integers(0, 0xFFFF))  # echo id twice
    return FlowKey(
        version,
        draw(st.integers(0, (1 << bits) - 1)),
        draw(st.integers(0, (1 << bits) - 1)),
        proto,
        tp_src,
        tp_dst,
    )


@settings(max_examples=300, deadline=None)
@given(
    st.tuples(st.sampled_from(["port-9", "router-1", "r"]), st.integers(0, 2)),
    st.tuples(st.sampled_from(["port-9", "router-1", "r"]), st.integers(0, 2)),
    _keys(),
    _keys(),
)
def test_connection_tags_are_equal_only_for_the_same_zone_kind_and_key(
    first: tuple[str, int], second: tuple[str, int], key: FlowKey, other: FlowKey
) -> None:
    """Tags are ints: a tag names one (zone, kind, key) (a conntrack tag both directions of
    its key), and two different ones never share a tag (but for a 64-bit zone hash
    collision, which these zones do not have)."""

    def tag(zone: str, kind: int, k: FlowKey) -> int:
        if kind == 0:
            return conntrack_tag(zone, k)
        return nat_key_tag(zone, (NatKind.SNAT, NatKind.DNAT)[kind - 1], k)

    def named(zone: str, kind: int, k: FlowKey) -> tuple[str, int, FlowKey]:
        return (zone, kind, min(k, k.reversed()) if kind == 0 else k)

    (zone_a, kind_a), (zone_b, kind_b) = first, second
    same = named(zone_a, kind_a, key) == named(zone_b, kind_b, other)
    assert (tag(zone_a, kind_a, key) == tag(zone_b, kind_b, other)) == same
    assert type(tag(zone_a, kind_a, key)) is int and is_connection_tag(tag(zone_a, kind_a, key))


@settings(max_examples=200, deadline=None)
@given(_keys(), _keys(), st.sampled_from(["router-1", "port-9"]), st.sampled_from(list(NatKind)))
def test_connection_tags_make_what_the_tag_functions_make(
    key: FlowKey, other: FlowKey, zone: str, kind: NatKind
) -> None:
    """`ConnectionTags` reuses NAT tag objects (values only: per transaction or message,
    nothing that can change under it): each tag equals its function's, in any order of
    asking, for both directions of a key."""
    texts = ConnectionTags()
    binding = NatBinding(zone, kind, key, key)
    for _ in range(2):  # the second round is answered from the texts kept
        assert texts.conntrack(zone, key) == conntrack_tag(zone, key)
        assert texts.conntrack(zone, key.reversed()) == conntrack_tag(zone, key)
        assert texts.conntrack(zone, other) == conntrack_tag(zone, other)
        assert texts.nat(binding) == nat_tag(binding)
        assert texts.nat_reply(zone, kind, other) == nat_reply_tag(zone, kind, other)
        assert texts.nat_reply(zone, kind, key) == nat_reply_tag(zone, kind, key)
        assert texts.nat_key(zone, kind, other) == nat_key_tag(zone, kind, other)
    # One NAT tag family: a key's forward tag is the reply tag of its reverse, and the
    # texts hand out one object for both (a flow and the refresh map keep the same int).
    assert nat_reply_tag(zone, kind, key.reversed()) == nat_tag(binding)
    assert texts.nat_reply(zone, kind, key.reversed()) is texts.nat(binding)
    assert texts.nat_key(zone, kind, key) is texts.nat(binding)


_V4 = FlowKey(4, 0x0A000005, 0xCB007109, 6, 40000, 443)
_V6 = FlowKey(6, 0x20010DB8 << 96 | 1, 0x20010DB8 << 96 | 0xAB, 17, 5353, 53)


@pytest.mark.parametrize(
    ("spelled", "expected"),
    [
        (conntrack_tag("port-9", _V4), "conntrack:port-9:6:10.0.0.5:40000-203.0.113.9:443"),
        (
            conntrack_tag("port-9", _V4.reversed()),
            "conntrack:port-9:6:10.0.0.5:40000-203.0.113.9:443",
        ),
        (
            conntrack_tag("port-9", _V6),
            "conntrack:port-9:17:2001:db8::1:5353-2001:db8::ab:53",
        ),
        (
            nat_tag(NatBinding("r1", NatKind.SNAT, _V4, _V4)),
            "nat:r1:snat:6:10.0.0.5:40000-203.0.113.9:443",
        ),
        (
            nat_tag(NatBinding("r1", NatKind.DNAT, _V4, _V4)),
            "nat:r1:dnat:6:10.0.0.5:40000-203.0.113.9:443",
        ),
        # The reply lookup's tag is the NAT tag of the reply's key (one family, see
        # `transaction.py`): it was `natr:` and the translated key itself.
        (nat_reply_tag("r1", NatKind.SNAT, _V4), "nat:r1:snat:6:203.0.113.9:443-10.0.0.5:40000"),
        (
            nat_reply_tag("r1", NatKind.DNAT, _V6),
            "nat:r1:dnat:17:2001:db8::ab:53-2001:db8::1:5353",
        ),
        (nat_key_tag("r1", NatKind.SNAT, _V4), "nat:r1:snat:6:10.0.0.5:40000-203.0.113.9:443"),
    ],
    # A tag's value holds a str hash, which differs between processes (xdist workers).
    ids=lambda value: value if isinstance(value, str) else "tag",
)
def test_tags_read_as_they_were_spelled(spelled: int, expected: str) -> None:
    """A trace shows the tags as text (`tag_text`): the spelling the tags had when they were
    strings (before they were ints, issue 16)."""
    assert tag_text(spelled, ["port-9", "r1", "r2"]) == expected
    assert tag_text("router:r1") == "router:r1"


def test_the_flow_table_classes_the_connection_tags_as_its_own() -> None:
    """flows/ may not import flowstate/: it tells a connection's tags by their type (ints),
    so they stay per flow."""
    for tag in (
        conntrack_tag("p", _V4),
        nat_tag(NatBinding("r", NatKind.SNAT, _V4, _V4)),
        nat_reply_tag("r", NatKind.DNAT, _V4),
    ):
        assert is_connection_tag(tag)
    assert not is_connection_tag("router:natr")


def test_classify_records_once_and_gives_the_connection_tag(
    tables: tuple[ConntrackTable, NatTable, PortBlockAllocator],
) -> None:
    conntrack, nat, _ = tables
    syn = tcp(PRIVATE, 40000, REMOTE, 443, SYN)
    transaction = FlowStateTransaction(conntrack, nat)
    classification, tag = transaction.classify(ROUTER, syn, 0.0)
    assert classification == conntrack.classify(ROUTER, syn, 0.0)
    assert tag == conntrack_tag(ROUTER, FlowKey(4, ip(PRIVATE), ip(REMOTE), 6, 40000, 443))
    assert transaction.tags == {tag}
    # A key given to `nat` is the packet's own: the same outcome as deriving it.
    key = FlowKey(4, ip(PRIVATE), ip(REMOTE), 6, 40000, 443)
    outcome = transaction.nat(ROUTER, NatAction.SNAT, syn, [NAT_RANGE], 0.0, key=key)
    assert outcome.binding is not None and outcome.binding.original == key
    assert outcome.tags == {nat_tag(outcome.binding)}
    result = transaction.commit(0.0)
    assert [record.key for record in result.connections] == [key]  # one classification
    assert len(conntrack) == 1
    # No key (not IP): no tag, and nothing recorded that a commit would open.
    other = FlowStateTransaction(conntrack, nat)
    classification, tag = other.classify(ROUTER, FlowMatch(eth_type=0x0806), 0.0)
    assert classification.key is None and tag is None
    assert other.commit(0.0).connections == ()
