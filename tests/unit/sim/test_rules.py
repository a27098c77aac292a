"""Rule chains: every condition (and its inversion) against an independent reference, every
action, jumps and jump loops, chain attachment points, and the flow-state placeholder."""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hivenet.flows.actions import Drop, Output
from hivenet.model import FragmentPolicy, IpAddrGroup, NatTarget, PortRange, Rule, RuleAction
from hivenet.model.types import mac_to_int
from hivenet.packets import parse_frame
from hivenet.packets.flowmatch import FIELD_NAMES, FlowMatch
from hivenet.sim.engine import PacketState
from hivenet.sim.rules import compile_chain, describe_rule, rule_matches_reference
from tests.unit.sim.topo import Sim, Topo, mac, ping, port_mac, tcp, udp

GROUPS = {
    "g1": IpAddrGroup(
        id="g1", addresses=(ipaddress.ip_address("10.0.0.1"), ipaddress.ip_address("2001:db8::1"))
    ),
}

# (condition kwargs, packet fields that satisfy it, packet fields that do not)
CONDITIONS: list[tuple[str, dict[str, Any], dict[str, int], dict[str, int]]] = [
    (
        "dl_src",
        {"dl_src": mac(1)},
        {"eth_src": mac_to_int(mac(1))},
        {"eth_src": mac_to_int(mac(2))},
    ),
    (
        "dl_src_mask",
        {"dl_src": "02:00:00:00:00:00", "dl_src_mask": "ff:00:00:00:00:00"},
        {"eth_src": mac_to_int(mac(77))},
        {"eth_src": 0x04_00_00_00_00_01},
    ),
    (
        "dl_dst",
        {"dl_dst": mac(3)},
        {"eth_dst": mac_to_int(mac(3))},
        {"eth_dst": mac_to_int(mac(4))},
    ),
    ("dl_type", {"dl_type": 0x0806}, {"eth_type": 0x0806}, {"eth_type": 0x0800}),
    ("vlan", {"vlan_id": 10}, {"vlan": 10}, {"vlan": 11}),
    (
        "nw_src",
        {"nw_src": ipaddress.ip_network("10.1.0.0/16")},
        {"ip_src": 0x0A01_0203},
        {"ip_src": 0x0A02_0203},
    ),
    (
        "nw_dst",
        {"nw_dst": ipaddress.ip_network("10.0.0.5/32")},
        {"ip_dst": 0x0A00_0005},
        {"ip_dst": 0x0A00_0006},
    ),
    (
        "nw_dst_v6",
        {"nw_dst": ipaddress.ip_network("2001:db8::/32")},
        {"eth_type": 0x86DD, "ip_dst": 0x2001_0DB8 << 96},
        {"eth_type": 0x86DD, "ip_dst": 0x2001_0DB9 << 96},
    ),
    ("nw_proto", {"nw_proto": 17}, {"ip_proto": 17}, {"ip_proto": 6}),
    ("nw_tos", {"nw_tos": 0x10}, {"ip_tos": 0x10}, {"ip_tos": 0}),
    ("tp_src", {"tp_src": PortRange(start=1000, end=2000)}, {"tp_src": 1500}, {"tp_src": 2001}),
    ("tp_dst", {"tp_dst": PortRange(start=22, end=22)}, {"tp_dst": 22}, {"tp_dst": 23}),
    (
        "icmp",
        {"icmp_type": 8, "icmp_code": 0},
        {"ip_proto": 1, "icmp_type": 8},
        {"ip_proto": 1, "icmp_type": 0},
    ),
    ("in_port", {"in_port_ids": ("p1",)}, {}, {}),
    ("out_port", {"out_port_ids": ("p2",)}, {}, {}),
    ("port_group", {"port_group_id": "pg"}, {}, {}),
    (
        "ip_addr_group_src",
        {"ip_addr_group_src_id": "g1"},
        {"ip_src": 0x0A00_0001},
        {"ip_src": 0x0A00_0002},
    ),
    (
        "ip_addr_group_dst",
        {"ip_addr_group_dst_id": "g1"},
        {"ip_dst": 0x0A00_0001},
        {"ip_dst": 0x0A00_0002},
    ),
]
INVERT_FLAG = {
    "dl_src": "inv_dl_src",
    "dl_src_mask": "inv_dl_src",
    "dl_dst": "inv_dl_dst",
    "dl_type": "inv_dl_type",
    "vlan": "inv_vlan",
    "nw_src": "inv_nw_src",
    "nw_dst": "inv_nw_dst",
    "nw_dst_v6": "inv_nw_dst",
    "nw_proto": "inv_nw_proto",
    "nw_tos": "inv_nw_tos",
    "tp_src": "inv_tp_src",
    "tp_dst": "inv_tp_dst",
    "icmp": "inv_icmp",
    "in_port": "inv_in_port",
    "out_port": "inv_out_port",
    "port_group": "inv_port_group",
    "ip_addr_group_src": "inv_ip_addr_group_src",
    "ip_addr_group_dst": "inv_ip_addr_group_dst",
}
BASE = {"eth_type": 0x0800, "ip_proto": 17, "tp_src": 1, "tp_dst": 1}


def run_matcher(
    rule: Rule, fields: dict[str, int], in_port: str, out_port: str | None, groups: frozenset[str]
) -> bool:
    chain = compile_chain("c", "c", [rule], GROUPS)
    packet = PacketState.of(FlowMatch(**{**BASE, **fields}))
    return chain.matcher(packet, 0, in_port, out_port, groups) == 0


@pytest.mark.parametrize(
    ("name", "kwargs", "hit", "miss"), CONDITIONS, ids=[c[0] for c in CONDITIONS]
)
@pytest.mark.parametrize("inverted", [False, True])
def test_each_condition_and_its_inversion(
    name: str, kwargs: dict[str, Any], hit: dict[str, int], miss: dict[str, int], inverted: bool
) -> None:
    rule = Rule(chain_id="c", action=RuleAction.ACCEPT, **kwargs, **{INVERT_FLAG[name]: inverted})
    # Context conditions: "hit" is p1 / p2 / member of pg, "miss" is another port / no group.
    hit_ctx = ("p1", "p2", frozenset({"pg"}))
    miss_ctx = ("p9", "p9", frozenset())
    assert run_matcher(rule, hit, *hit_ctx) is not inverted
    assert run_matcher(rule, miss, *miss_ctx) is inverted


@pytest.mark.parametrize(
    ("policy", "matches"),
    [
        (FragmentPolicy.ANY, (True, True, True)),
        (FragmentPolicy.HEADER, (True, True, False)),
        (FragmentPolicy.NONHEADER, (False, False, True)),
        (FragmentPolicy.UNFRAGMENTED, (True, False, False)),
    ],
)
def test_fragment_policy(policy: FragmentPolicy, matches: tuple[bool, bool, bool]) -> None:
    rule = Rule(chain_id="c", action=RuleAction.ACCEPT, fragment_policy=policy)
    got = tuple(run_matcher(rule, {"ip_frag": frag}, "p", None, frozenset()) for frag in (0, 1, 2))
    assert got == matches


def test_tp_condition_never_matches_a_later_fragment() -> None:
    rule = Rule(chain_id="c", action=RuleAction.ACCEPT, tp_dst=PortRange(start=0, end=100))
    assert not run_matcher(rule, {"ip_frag": 2, "tp_dst": 0}, "p", None, frozenset())


# --- compiled matcher == reference, on random rules and packets ------------------------------

macs = st.sampled_from([mac(1), mac(2), "02:00:00:00:00:00"])
networks = st.sampled_from(
    [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "10.0.0.1/32", "0.0.0.0/0", "2001:db8::/32")]
)
port_ranges = st.builds(
    lambda a, b: PortRange(start=min(a, b), end=max(a, b)), st.integers(0, 70), st.integers(0, 70)
)


@st.composite
def random_rules(draw: st.DrawFn) -> Rule:
    kw: dict[str, Any] = {}
    if draw(st.booleans()):
        kw["dl_src"] = draw(macs)
        if draw(st.booleans()):
            kw["dl_src_mask"] = "ff:ff:ff:ff:ff:00"
    for name, strategy in (
        ("dl_dst", macs),
        ("dl_type", st.sampled_from([0x0800, 0x86DD, 0x0806])),
        ("vlan_id", st.integers(1, 3)),
        ("nw_src", networks),
        ("nw_proto", st.sampled_from([0, 1, 6, 17, 58])),
        ("nw_tos", st.integers(0, 2)),
        ("tp_src", port_ranges),
        ("tp_dst", port_ranges),
        ("icmp_type", st.integers(0, 8)),
        ("in_port_ids", st.sampled_from([("p1",), ("p1", "p2")])),
        ("out_port_ids", st.sampled_from([("p2",), ("p3",)])),
        ("port_group_id", st.just("pg")),
        ("ip_addr_group_src_id", st.sampled_from(["g1", "missing"])),
        ("ip_addr_group_dst_id", st.sampled_from(["g1", "missing"])),
        ("fragment_policy", st.sampled_from(list(FragmentPolicy))),
    ):
        if draw(st.integers(0, 3)) == 0:
            kw[name] = draw(strategy)
    if "nw_src" in kw and draw(st.booleans()):
        kw["nw_dst"] = draw(networks.filter(lambda n: n.version == kw["nw_src"].version))
    if "icmp_type" in kw and draw(st.booleans()):
        kw["icmp_code"] = draw(st.integers(0, 1))
    for flag in set(INVERT_FLAG.values()):
        if draw(st.integers(0, 2)) == 0:
            kw[flag] = True
    return Rule(chain_id="c", action=RuleAction.ACCEPT, **kw)


@st.composite
def packets(draw: st.DrawFn) -> FlowMatch:
    """Packets whose addresses fit their ethertype (an IPv4 packet never has a 128-bit
    address: the datapath cannot produce one, so the matchers need not agree on it)."""
    eth_type = draw(st.sampled_from([0x0800, 0x86DD, 0x0806]))
    v6 = eth_type == 0x86DD
    sources = [0x2001_0DB8 << 96, (0x2001_0DB8 << 96) | 1] if v6 else [0x0A00_0001, 0x0B00_0001]
    targets = [0x2001_0DB8 << 96, (0x2001_0DB8 << 96) | 2] if v6 else [0x0A00_0001, 0x0A00_0002]
    return FlowMatch(
        eth_src=draw(
            st.sampled_from([mac_to_int(mac(1)), mac_to_int(mac(2)), mac_to_int(mac(1)) | 0x55])
        ),
        eth_dst=draw(st.sampled_from([mac_to_int(mac(1)), mac_to_int(mac(2))])),
        eth_type=eth_type,
        vlan=draw(st.integers(0, 3)),
        ip_src=draw(st.sampled_from(sources)),
        ip_dst=draw(st.sampled_from(targets)),
        ip_proto=draw(st.sampled_from([0, 1, 6, 17, 58])),
        ip_tos=draw(st.integers(0, 2)),
        ip_frag=draw(st.integers(0, 2)),
        tp_src=draw(st.integers(0, 70)),
        tp_dst=draw(st.integers(0, 70)),
        icmp_type=draw(st.integers(0, 8)),
        icmp_code=draw(st.integers(0, 1)),
    )


@settings(max_examples=300, deadline=None)
@given(
    rule=random_rules(),
    packet=packets(),
    in_port=st.sampled_from(["p1", "p2"]),
    out_port=st.sampled_from([None, "p2", "p3"]),
    grouped=st.booleans(),
)
def test_compiled_matcher_agrees_with_reference(
    rule: Rule, packet: FlowMatch, in_port: str, out_port: str | None, grouped: bool
) -> None:
    groups = frozenset({"pg"}) if grouped else frozenset()
    chain = compile_chain("c", "c", [rule], GROUPS)
    compiled = chain.matcher(PacketState.of(packet), 0, in_port, out_port, groups) == 0
    values = {name: getattr(packet, name) for name in FIELD_NAMES}
    assert compiled == rule_matches_reference(rule, values, in_port, out_port, groups, GROUPS)


@settings(max_examples=100, deadline=None)
@given(
    rules=st.lists(random_rules(), min_size=1, max_size=4),
    packet_list=st.lists(packets(), min_size=1, max_size=4),
    in_port=st.sampled_from(["p1", "p2"]),
)
def test_matcher_compiled_on_first_call_is_the_one_every_call_uses(
    rules: list[Rule], packet_list: list[FlowMatch], in_port: str
) -> None:
    """The matcher is compiled when first called (agent start-up compiles every chain): the
    first call answers as the reference does, and from then on the chain holds that compiled
    function itself, answering every packet as a fresh compile of the same rules does.
    Rule descriptions, also made on first use, are `describe_rule`'s."""
    rules = [r.model_copy(update={"chain_id": "c", "position": i}) for i, r in enumerate(rules)]
    chain = compile_chain("c", "c", rules, GROUPS)
    first = chain.matcher
    state = PacketState.of(packet_list[0])
    answer = chain.matcher(state, 0, in_port, None, frozenset())
    compiled = chain.matcher
    assert compiled is not first and chain.matcher is compiled  # replaced once, then kept
    for packet in packet_list:
        state = PacketState.of(packet)
        fresh = compile_chain("c", "c", rules, GROUPS)
        assert compiled(state, 0, in_port, None, frozenset()) == fresh.matcher(
            state, 0, in_port, None, frozenset()
        )
    values = {name: getattr(packet_list[0], name) for name in FIELD_NAMES}
    matching = [
        i
        for i, r in enumerate(rules)
        if rule_matches_reference(r, values, in_port, None, frozenset(), GROUPS)
    ]
    assert answer == (matching[0] if matching else -1)
    assert [r.description for r in chain.rules] == [describe_rule(r) for r in rules]


# --- actions, through the engine -------------------------------------------------------------


def chained_bridge(*rules: tuple[str, dict[str, Any]], where: str = "port_in") -> tuple[Topo, Sim]:
    """b1 with vm1 -> vm2; chain "c" attached at `where`; extra chains "j1", "j2" exist."""
    topo = Topo()
    for chain_id in ("c", "j1", "j2"):
        topo.chain(chain_id)
    topo.bridge(
        "b1",
        inbound_chain_id="c" if where == "bridge_in" else None,
        outbound_chain_id="c" if where == "bridge_out" else None,
    )
    topo.vm_port("b1", "vm1", "h1", mac_n=1, inbound_chain_id="c" if where == "port_in" else None)
    topo.vm_port("b1", "vm2", "h1", mac_n=2, outbound_chain_id="c" if where == "port_out" else None)
    for position, (chain_id, kw) in enumerate(rules):
        topo.rule(chain_id, kw.pop("action"), position=kw.pop("position", position), **kw)
    sim = Sim(topo.view())
    sim.tables.macs[("b1", 0, mac_to_int(mac(2)))] = "vm2"
    return topo, sim


def send(sim: Sim, dport: int = 80) -> Any:
    return sim.run(udp(mac(1), mac(2), "10.0.0.1", "10.0.0.2", dport=dport), "vm1")


@pytest.mark.parametrize("where", ["port_in", "bridge_in", "bridge_out", "port_out"])
def test_drop_rule_at_every_attachment_point(where: str) -> None:
    topo, sim = chained_bridge(
        ("c", {"action": "drop", "tp_dst": PortRange(start=80, end=80)}), where=where
    )
    assert send(sim, 80).drop_reason == "rule_drop"
    assert send(sim, 81).actions == (Output(topo.ports["vm2"].tunnel_key),)
    assert "chain:c" in send(sim, 81).tags


def test_accept_stops_evaluation() -> None:
    _, sim = chained_bridge(("c", {"action": "accept"}), ("c", {"action": "drop"}))
    assert send(sim).drop_reason is None


def test_continue_goes_on_to_the_next_rule() -> None:
    _, sim = chained_bridge(("c", {"action": "continue"}), ("c", {"action": "drop"}))
    assert send(sim).drop_reason == "rule_drop"


def test_jump_then_return_resumes_the_caller() -> None:
    _, sim = chained_bridge(
        ("c", {"action": "jump", "jump_chain_id": "j1"}),
        ("c", {"action": "drop", "tp_dst": PortRange(start=80, end=80)}),
        ("j1", {"action": "return", "tp_dst": PortRange(start=80, end=80)}),
        ("j1", {"action": "accept"}),
    )
    assert send(sim, 80).drop_reason == "rule_drop"  # j1 returned; c dropped
    result = send(sim, 81)
    assert result.drop_reason is None  # j1 accepted
    assert {"chain:c", "chain:j1"} <= result.tags


def test_jump_target_falling_off_the_end_resumes_the_caller() -> None:
    _, sim = chained_bridge(
        ("c", {"action": "jump", "jump_chain_id": "j1"}),
        ("c", {"action": "drop"}),
        ("j1", {"action": "accept", "tp_dst": PortRange(start=1, end=1)}),
    )
    assert send(sim).drop_reason == "rule_drop"


def test_top_level_return_continues_processing() -> None:
    _, sim = chained_bridge(("c", {"action": "return"}), ("c", {"action": "drop"}))
    assert send(sim).drop_reason is None


def test_jump_loop_is_detected_and_dropped() -> None:
    _, sim = chained_bridge(
        ("c", {"action": "jump", "jump_chain_id": "j1"}),
        ("j1", {"action": "jump", "jump_chain_id": "j2"}),
        ("j2", {"action": "jump", "jump_chain_id": "c"}),
    )
    result = send(sim)
    assert result.drop_reason == "jump_loop"
    assert "c -> j1 -> j2 -> c" in result.format_trace()


def test_jump_to_missing_chain_drops() -> None:
    _, sim = chained_bridge(("c", {"action": "jump", "jump_chain_id": "nowhere"}))
    assert send(sim).drop_reason == "unknown_chain"


def test_reject_tcp_gets_rst_and_udp_gets_admin_prohibited() -> None:
    topo, sim = chained_bridge(("c", {"action": "reject"}))
    result = send(sim)
    assert result.drop_reason == "rule_reject" and not result.install
    error = parse_frame(result.generated[0].frame)
    assert error.icmp is not None and (error.icmp.type, error.icmp.code) == (3, 13)
    # Sent on behalf of the destination, back out of the ingress port.
    assert error.ipv4 is not None and error.ipv4.src == int(ipaddress.IPv4Address("10.0.0.2"))
    assert result.generated[0].actions == (Output(topo.ports["vm1"].tunnel_key),)
    rst = sim.run(tcp(mac(1), mac(2), "10.0.0.1", "10.0.0.2"), "vm1")
    segment = parse_frame(rst.generated[0].frame).tcp
    assert segment is not None and segment.flags & 0x04


def test_reject_on_a_router_chain_answers_from_the_router_port() -> None:
    topo = Topo()
    topo.chain("c")
    topo.rule("c", "reject", icmp_type=8)
    topo.bridge("b1")
    topo.router("r1", inbound_chain_id="c")
    topo.vm_port("b1", "vm1", "h1", mac_n=1)
    topo.link("b1", "r1", "10.0.1.1/24")
    result = Sim(topo.view()).run(
        ping(mac(1), port_mac(topo, "r1-b1"), "10.0.1.10", "10.0.9.9"), "vm1"
    )
    error = parse_frame(result.generated[0].frame)
    assert error.icmp is not None and error.icmp.code == 13
    assert error.ethernet.src == port_mac(topo, "r1-b1")


def test_rule_reads_only_the_bits_it_tests() -> None:
    _, sim = chained_bridge(
        ("c", {"action": "drop", "nw_src": ipaddress.ip_network("10.0.0.0/16")}),
    )
    wildcard = send(sim).wildcard()
    assert wildcard["ip_src"] == 0xFFFF0000
    assert "tp_dst" not in wildcard


def test_conntrack_and_nat_rules_drop_as_unsupported_and_are_not_cached() -> None:
    _, sim = chained_bridge(("c", {"action": "accept", "match_return_flow": True}))
    result = send(sim)
    assert result.drop_reason == "unsupported" and not result.install
    assert "not supported yet" in result.format_trace()
    target = NatTarget(
        address_from=ipaddress.ip_address("1.1.1.1"), address_to=ipaddress.ip_address("1.1.1.1")
    )
    _, sim = chained_bridge(("c", {"action": "dnat", "nat_targets": (target,)}))
    result = send(sim)
    assert result.drop_reason == "unsupported" and result.actions == (Drop("unsupported"),)


# --- the dispatched matcher (by protocol and destination port) -------------------------------

DISPATCH_PORTS = (5, 22, 23, 70)


@st.composite
def dispatch_rules(draw: st.DrawFn) -> Rule:
    """Rules a dispatched matcher buckets: mostly a protocol and/or an exact destination
    port (sometimes inverted, sometimes a range), on a bare rule (so that many match) or
    over `random_rules`' other conditions."""
    bare = Rule(chain_id="c", action=RuleAction.ACCEPT)
    rule = draw(st.one_of(st.just(bare), st.just(bare), random_rules()))
    update: dict[str, Any] = {
        "nw_proto": draw(st.sampled_from([None, 1, 6, 6, 17, 17, 58])),
        "inv_nw_proto": draw(st.integers(0, 5)) == 0,
        "tp_dst": draw(
            st.one_of(
                st.none(),
                st.sampled_from([PortRange(start=p, end=p) for p in DISPATCH_PORTS]),
                st.sampled_from([PortRange(start=p, end=p) for p in DISPATCH_PORTS]),
                port_ranges,
            )
        ),
        "inv_tp_dst": draw(st.integers(0, 5)) == 0,
    }
    if draw(st.integers(0, 3)) == 0:
        update["nw_src"] = ipaddress.ip_network(draw(st.sampled_from(["10.0.0.0/8", "::/0"])))
    return rule.model_copy(update=update)


def dispatch_packets() -> st.SearchStrategy[FlowMatch]:
    """`packets`, mostly TCP/UDP to one of the ports `dispatch_rules` name."""
    return st.builds(
        lambda packet, proto, port, frag: replace(
            packet, ip_proto=proto, tp_dst=port, ip_frag=frag
        ),
        packets(),
        st.sampled_from([6, 6, 17, 17, 1, 58, 0]),
        st.sampled_from([*DISPATCH_PORTS, *DISPATCH_PORTS, 0, 71]),
        st.sampled_from([0, 0, 0, 1, 2]),
    )


def first_match_reference(
    rules: list[Rule], values: dict[str, int], start: int, in_port: str, groups: frozenset[str]
) -> int:
    for index, rule in enumerate(rules):
        if index >= start and rule_matches_reference(rule, values, in_port, None, groups, GROUPS):
            return index
    return -1


def merged(packet: FlowMatch, other: FlowMatch, mask: dict[str, int]) -> FlowMatch:
    """`other` with the bits of `mask` taken from `packet`: a packet the megaflow installed
    for `packet` with that mask also matches."""
    return FlowMatch(
        *(
            (getattr(packet, name) & mask.get(name, 0))
            | (getattr(other, name) & ~mask.get(name, 0))
            for name in FIELD_NAMES
        )
    )


def well_formed(packet: FlowMatch) -> bool:
    """An address that fits the ethertype (see `packets`)."""
    return packet.eth_type == 0x86DD or max(packet.ip_src, packet.ip_dst) < 1 << 32


@settings(max_examples=400, deadline=None)
@given(
    rule_list=st.lists(dispatch_rules(), min_size=1, max_size=12),
    packet=dispatch_packets(),
    other=dispatch_packets(),
    start=st.integers(0, 12),
    in_port=st.sampled_from(["p1", "p2"]),
    grouped=st.booleans(),
)
def test_dispatched_matcher_gives_the_reference_verdict_and_a_sound_mask(
    rule_list: list[Rule],
    packet: FlowMatch,
    other: FlowMatch,
    start: int,
    in_port: str,
    grouped: bool,
) -> None:
    """The dispatched matcher (forced on, whatever the chain's length) returns the
    reference's first match at or after `start`; the straight-line matcher of the same rules
    agrees; and any packet agreeing with this one on the bits the chain says the verdict
    read (`reads_through`) gets the same verdict, from both matchers and the reference: a
    megaflow installed from that mask is sound."""
    rules = [r.model_copy(update={"chain_id": "c", "position": i}) for i, r in enumerate(rule_list)]
    groups = frozenset({"pg"}) if grouped else frozenset()
    dispatched = compile_chain("c", "c", rules, GROUPS, dispatch_min_rules=1)
    linear = compile_chain("c", "c", rules, GROUPS, dispatch_min_rules=len(rules) + 1)
    assert "found = -1" not in linear.source

    def verdicts(p: FlowMatch) -> tuple[int, int]:
        state = PacketState.of(p)
        return (
            dispatched.matcher(state, start, in_port, None, groups),
            linear.matcher(state, start, in_port, None, groups),
        )

    values = {name: getattr(packet, name) for name in FIELD_NAMES}
    expected = first_match_reference(rules, values, start, in_port, groups)
    assert verdicts(packet) == (expected, expected)
    mask = dict(dispatched.reads_through[expected if expected >= 0 else -1])
    assert mask == dict(linear.reads_through[expected if expected >= 0 else -1])
    lookalike = merged(packet, other, mask)
    assert verdicts(lookalike) == (expected, expected)
    if well_formed(lookalike):
        lookalike_values = {name: getattr(lookalike, name) for name in FIELD_NAMES}
        assert first_match_reference(rules, lookalike_values, start, in_port, groups) == expected


def test_a_security_group_sized_chain_is_dispatched_by_protocol_and_port() -> None:
    """50 rules of one protocol and port each (bench/simulation.py's chains): dispatched,
    and the verdict for every port and protocol is the straight-line matcher's."""
    rules = [
        Rule(
            chain_id="c",
            position=i,
            action=RuleAction.DROP if i % 3 else RuleAction.ACCEPT,
            nw_proto=(6, 17)[i % 2],
            tp_dst=PortRange(start=9000 + i, end=9000 + i),
            nw_src=ipaddress.ip_network(f"10.{i % 4}.0.0/16"),
        )
        for i in range(49)
    ]
    rules.append(Rule(chain_id="c", position=49, action=RuleAction.ACCEPT))
    dispatched = compile_chain("c", "c", rules, GROUPS)
    linear = compile_chain("c", "c", rules, GROUPS, dispatch_min_rules=1000)
    assert "tp_dst < " in dispatched.source and "tp_dst < " not in linear.source
    for proto in (1, 6, 17):
        for port in (80, *range(8999, 9051)):
            for source in (0x0A00_0001, 0x0A03_0001):
                state = PacketState.of(
                    FlowMatch(eth_type=0x0800, ip_proto=proto, tp_dst=port, ip_src=source)
                )
                got = dispatched.matcher(state, 0, "p1", None, frozenset())
                assert got == linear.matcher(state, 0, "p1", None, frozenset())
                if (
                    proto in (6, 17)
                    and 9000 <= port < 9049
                    and (port - 9000) % 2 == (proto == 17)
                    and (port - 9000) % 4 == source >> 16 & 3
                ):
                    assert got == port - 9000
                else:
                    assert got == 49


def test_a_rule_change_recompiles_the_dispatched_matcher() -> None:
    """No stale matcher: a rule added to (then removed from) a dispatched chain of the view
    decides the next packets at once."""
    from hivenet.model import Chain
    from hivenet.sim import TopologyView

    rules = [
        Rule(
            chain_id="c",
            position=i,
            action=RuleAction.ACCEPT,
            nw_proto=6,
            tp_dst=PortRange(start=9000 + i, end=9000 + i),
        )
        for i in range(20)
    ]
    view = TopologyView.from_objects([Chain(id="c", name="c"), *rules])
    state = PacketState.of(FlowMatch(eth_type=0x0800, ip_proto=6, tp_dst=80))
    assert "tp_dst < " in view.chains["c"].source
    assert view.chains["c"].matcher(state, 0, "p1", None, frozenset()) == -1
    drop = Rule(
        chain_id="c",
        position=50,
        action=RuleAction.DROP,
        nw_proto=6,
        tp_dst=PortRange(start=80, end=80),
    )
    view.apply(drop)
    chain = view.chains["c"]
    assert chain.rules[chain.matcher(state, 0, "p1", None, frozenset())].id == drop.id
    view.remove("rule", drop.id)
    assert view.chains["c"].matcher(state, 0, "p1", None, frozenset()) == -1
