"""Unit tests for `hivenet.flowstate.keys` (FlowKey validation, keys of matches and of the
datagram an ICMP error quotes, built with the real packet codecs) and `peers` (push sets)."""

from __future__ import annotations

import copy
import ipaddress
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hivenet.flowstate.keys import (
    FlowKey,
    FlowKeyError,
    PackedKeys,
    key_of_embedded,
    key_of_match,
    key_text,
    proto_of,
)
from hivenet.flowstate.peers import group_by_peer, hosts_of_stateful_groups, push_targets
from hivenet.flowstate.schedule import RefreshPolicy
from hivenet.packets import (
    build_echo_request,
    build_icmp_dest_unreachable,
    build_udp_datagram,
    embedded_datagram,
    extract_flow_match,
    parse_frame,
)

from .helpers import ip, packet

MAC_A, MAC_B = "02:00:00:00:00:01", "02:00:00:00:00:02"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ((5, 1, 2, 6, 1, 2), "ip_version must be 4 or 6"),
        ((4, 1 << 32, 2, 6, 1, 2), "ip_src"),
        ((4, 1, -1, 6, 1, 2), "ip_dst"),
        ((6, 1, 1 << 128, 6, 1, 2), "ip_dst"),
        ((4, 1, 2, 256, 1, 2), "ip_proto"),
        ((4, 1, 2, 6, 70000, 2), "tp_src"),
        ((4, 1, 2, 6, 1, -2), "tp_dst"),
    ],
)
def test_flow_key_rejects_bad_fields(arguments: tuple[int, ...], message: str) -> None:
    with pytest.raises(FlowKeyError, match=message):
        FlowKey(*arguments)


def test_flow_key_reversed_and_repr() -> None:
    key = FlowKey(4, ip("10.0.0.1"), ip("10.0.0.2"), 6, 1000, 80)
    assert key.reversed() == FlowKey(4, ip("10.0.0.2"), ip("10.0.0.1"), 6, 80, 1000)
    assert key.reversed().reversed() == key
    assert repr(key) == "FlowKey(10.0.0.1:1000 -> 10.0.0.2:80 proto 6)"
    assert "[2001:db8::1]" in repr(FlowKey(6, ip("2001:db8::1"), 1, 17, 1, 2))


@st.composite
def key_fields(draw: st.DrawFn) -> tuple[int, int, int, int, int, int]:
    version = draw(st.sampled_from([4, 6]))
    address = st.integers(0, (1 << (32 if version == 4 else 128)) - 1)
    port = st.integers(0, 0xFFFF)
    return (
        version,
        draw(address),
        draw(address),
        draw(st.integers(0, 255)),
        draw(port),
        draw(port),
    )


@given(first=key_fields(), second=key_fields())
def test_flow_key_reads_and_orders_as_its_tuple(
    first: tuple[int, ...], second: tuple[int, ...]
) -> None:
    """A key is one packed int that reads back as the 6-tuple it was made from (by name, by
    index, by iteration), reverses as the tuple would, equals and orders as the tuples do
    (keys of one IP version: a connection's tag spells the lower of a key and its reverse),
    and survives pickling and copying."""
    key, other = FlowKey(*first), FlowKey(*second)
    names = ("ip_version", "ip_src", "ip_dst", "ip_proto", "tp_src", "tp_dst")
    assert tuple(key) == first == tuple(key[i] for i in range(6)) == key.fields()
    assert repr(tuple(key)) == repr(first)  # DNAT picks its target by a hash of this
    assert tuple(getattr(key, name) for name in names) == first and len(key) == 6
    assert all(type(getattr(key, name)) is int for name in names)  # plain ints, not keys
    version, src, dst, proto, sport, dport = first
    assert tuple(key.reversed()) == (version, dst, src, proto, dport, sport)
    assert key.reversed().reversed() == key and type(key.reversed()) is FlowKey
    assert FlowKey.unchecked(*first) == key and hash(FlowKey.unchecked(*first)) == hash(key)
    assert (key == other) == (first == second)
    if first[0] == second[0]:
        assert (key <= other) == (first <= second) and (key < other) == (first < second)
    for copied in (pickle.loads(pickle.dumps(key)), copy.deepcopy(key), copy.copy(key)):
        assert copied == key and type(copied) is FlowKey and tuple(copied) == first
    # The IPv4 repr is spelled from the packed value: the same text as `ipaddress` spells.
    src_text, dst_text = (
        str(ipaddress.ip_address(a)) if version == 4 else f"[{ipaddress.IPv6Address(a)}]"
        for a in (src, dst)
    )
    assert (
        repr(key)
        == str(key)
        == (f"FlowKey({src_text}:{sport} -> {dst_text}:{dport} proto {proto})")
    )


def test_packed_keys_share_one_plain_int_per_recent_value() -> None:
    packed = PackedKeys(max_recent=2)
    key = FlowKey(4, 0x0A000001, 0x0A000002, 6, 40000, 443)
    first = packed(key)
    assert type(first) is int and first == key
    assert packed(FlowKey(4, 0x0A000001, 0x0A000002, 6, 40000, 443)) is first
    assert packed(int(key)) is first and proto_of(first) == 6
    # Full: emptied, so a value packed before is a new object (equal: values only).
    packed(FlowKey(4, 1, 2, 17, 1, 2))
    packed(FlowKey(4, 1, 3, 17, 1, 2))
    again = packed(key)
    assert again == first and again is not first
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match=f"max_recent must be an int >= 1, got {bad!r}"):
            PackedKeys(max_recent=bad)  # type: ignore[arg-type]


def test_key_of_match_per_protocol() -> None:
    assert key_of_match(packet("10.0.0.1", "10.0.0.2", 17, 5, 6)) == FlowKey(
        4, ip("10.0.0.1"), ip("10.0.0.2"), 17, 5, 6
    )
    echo = packet("10.0.0.1", "10.0.0.2", 1, icmp_type=8, icmp_id=9)
    assert key_of_match(echo) == FlowKey(4, ip("10.0.0.1"), ip("10.0.0.2"), 1, 9, 9)
    error = packet("10.0.0.1", "10.0.0.2", 1, icmp_type=3, icmp_id=9)
    assert key_of_match(error) == FlowKey(4, ip("10.0.0.1"), ip("10.0.0.2"), 1, 0, 0)


def test_key_of_embedded_udp_from_a_real_icmp_error() -> None:
    offending = build_udp_datagram(
        eth_src=MAC_A,
        eth_dst=MAC_B,
        ip_src="10.0.0.1",
        ip_dst="192.0.2.9",
        src_port=5000,
        dst_port=53,
    )
    error = build_icmp_dest_unreachable(offending, 3, src_ip="192.0.2.9")
    key = key_of_embedded(embedded_datagram(parse_frame(error)))
    assert key == FlowKey(4, ip("10.0.0.1"), ip("192.0.2.9"), 17, 5000, 53)
    match = extract_flow_match(error, 1)
    assert key_of_match(match) == FlowKey(4, ip("192.0.2.9"), ip("10.0.0.1"), 1, 0, 0)


def test_key_of_embedded_echo_request() -> None:
    offending = build_echo_request(
        eth_src=MAC_A,
        eth_dst=MAC_B,
        ip_src="10.0.0.1",
        ip_dst="192.0.2.9",
        identifier=4242,
        sequence=1,
    )
    error = build_icmp_dest_unreachable(offending, 1, src_ip="192.0.2.1")
    key = key_of_embedded(embedded_datagram(parse_frame(error)))
    assert key == FlowKey(4, ip("10.0.0.1"), ip("192.0.2.9"), 1, 4242, 4242)


@pytest.mark.parametrize(
    ("ingress", "egress", "group_hosts", "expected"),
    [
        ("h1", ["h2"], [], {"h2"}),
        ("h1", ["h1"], [], set()),  # same-host flow: nobody to tell
        ("h1", ["h2", "h3", None], [], {"h2", "h3"}),  # flooded; an unbound port skipped
        ("h1", ["h2"], ["h1", "h4", "h5"], {"h2", "h4", "h5"}),  # stateful port group members
        (None, ["h2"], [], {"h2"}),
    ],
)
def test_push_targets(
    ingress: str | None, egress: list[str | None], group_hosts: list[str], expected: set[str]
) -> None:
    assert push_targets(
        local_host="h1", ingress_host=ingress, egress_hosts=egress, stateful_group_hosts=group_hosts
    ) == frozenset(expected)


def test_push_targets_from_the_return_side_includes_the_original_ingress() -> None:
    # h2 refreshes an entry its return flow uses: the original ingress host h1 needs it.
    assert push_targets(local_host="h2", ingress_host="h2", egress_hosts=["h1"]) == {"h1"}


def test_push_targets_rejects_bad_host_ids() -> None:
    with pytest.raises(ValueError, match="local_host"):
        push_targets(local_host="", ingress_host="h1")
    with pytest.raises(ValueError, match="egress_hosts entry"):
        push_targets(local_host="h1", ingress_host="h1", egress_hosts=[""])


def test_hosts_of_stateful_groups() -> None:
    hosts = hosts_of_stateful_groups(
        ["uplink-1", "vm-port"],
        {"uplink-1": ["uplinks", "monitoring"], "vm-port": ["web"]},
        stateful_groups={"uplinks", "web"},
        hosts_of_group={"uplinks": ["gw1", "gw2"], "monitoring": ["m1"], "web": ["h7"]},
    )
    assert hosts == {"gw1", "gw2", "h7"}


def test_group_by_peer() -> None:
    due = [("a", frozenset({"h2", "h3"})), ("b", frozenset()), ("c", frozenset({"h3"}))]
    assert group_by_peer(due, default_peers=frozenset({"h9"})) == {
        "h2": ["a"],
        "h3": ["a", "c"],
        "h9": ["b"],
    }


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"fraction": 0.0}, "fraction"),
        ({"fraction": 1.0}, "fraction"),
        ({"min_interval": 0.0}, "min_interval"),
        ({"min_interval": 10.0, "max_interval": 5.0}, "min_interval"),
    ],
)
def test_refresh_policy_validation(arguments: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RefreshPolicy(**arguments)


@pytest.mark.parametrize(("timeout", "after"), [(30.0, 15.0), (432_000.0, 600.0), (1.0, 1.0)])
def test_refresh_after(timeout: float, after: float) -> None:
    assert RefreshPolicy().refresh_after(timeout) == after


@given(fields=key_fields())
def test_key_text_spells_the_fields_as_ipaddress_does(fields: tuple[int, ...]) -> None:
    """The tags' key spelling, read off the packed key, against the fields and `ipaddress`."""
    version, src, dst, proto, sport, dport = fields
    address = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
    assert key_text(FlowKey(*fields)) == f"{proto}:{address(src)}:{sport}-{address(dst)}:{dport}"
