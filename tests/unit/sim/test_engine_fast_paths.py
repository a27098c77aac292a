"""The engine's shortcuts against what they stand for: the one-emission action list against
the general ordering, the megaflow mask builder against a plain loop, the result builder
against the dataclass constructor, and a plain chain's fast evaluation against the general
evaluator."""

from __future__ import annotations

import dataclasses
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from hivenet.flows.actions import SETTABLE_FIELDS, Output, Tunnel
from hivenet.model import PortRange
from hivenet.packets.flowmatch import FIELD_NAMES, FULL_MASKS, FlowMatch
from hivenet.sim import MemoryTables, SimContext, TopologyView
from hivenet.sim.engine import _result
from hivenet.sim.result import SimulationResult
from hivenet.sim.walk import PacketState, Walk, _mask_of
from tests.unit.sim.topo import Sim, Topo, mac, tcp, udp

SETTABLE = sorted(name for name in FIELD_NAMES if name in SETTABLE_FIELDS and name != "vlan")


def empty_walk(match: FlowMatch) -> Walk:
    ctx = SimContext(
        topology=TopologyView.from_objects([]), tables=MemoryTables(), local_host_id="h1"
    )
    return Walk(ctx, 0.0, b"", match)


@settings(max_examples=200, deadline=None)
@given(
    original_vlan=st.sampled_from([0, 5]),
    vlan=st.sampled_from([0, 5, 7]),
    rewrites=st.dictionaries(st.sampled_from(SETTABLE), st.integers(0, 3), max_size=4),
    decrements=st.integers(0, 2),
    out=st.sampled_from([Output(3), Tunnel("192.0.2.1", 9)]),
)
def test_one_emission_gives_the_general_action_list_and_reads(
    original_vlan: int, vlan: int, rewrites: dict[str, int], decrements: int, out: Any
) -> None:
    match = FlowMatch(vlan=original_vlan, eth_type=0x0800)
    results = []
    for builder in ("_one_emission_actions", "_ordered_actions"):
        walk = empty_walk(match)
        packet = PacketState.of(match)
        for field, value in rewrites.items():
            packet.set(field, value)
        packet.vlan = vlan
        packet.ttl_decrements = decrements
        walk.emissions.append((packet, out))
        results.append((getattr(walk, builder)(), dict(walk.reads)))
    assert results[0] == results[1]


@given(
    reads=st.dictionaries(
        st.sampled_from(FIELD_NAMES), st.integers(0, (1 << 140) - 1), max_size=len(FIELD_NAMES)
    )
)
def test_mask_builder_is_each_field_cut_to_its_width(reads: dict[str, int]) -> None:
    assert _mask_of(reads) == tuple(reads.get(name, 0) & FULL_MASKS[name] for name in FIELD_NAMES)


def test_result_builder_equals_the_constructor() -> None:
    values: dict[str, Any] = {
        "actions": (Output(1),),
        "match": FlowMatch(in_port=1),
        "mask": (1,) * len(FIELD_NAMES),
        "tags": frozenset({"port:a"}),
    }
    assert _result(**values) == SimulationResult(**values)
    everything = {
        **values,
        "install": False,
        "idle_timeout": 2.0,
        "drop_reason": "x",
        "frame": b"f",
        "handoff": "bgp",
        "mtu": 1400,
    }
    built = _result(**everything)
    assert built == SimulationResult(**everything)
    assert {f.name for f in dataclasses.fields(SimulationResult)} <= set(dir(built))


def chain_topology(actions: list[str]) -> Topo:
    """vm1 -> vm2 on one bridge, a chain "c" on vm1's inbound side with one rule per action
    (TCP to port 22+i), then an accept."""
    topo = Topo()
    topo.chain("c")
    for position, action in enumerate(actions):
        topo.rule(
            "c",
            action,
            position=position,
            nw_proto=6,
            tp_dst=PortRange(start=22 + position, end=22 + position),
        )
    topo.rule("c", "accept", position=len(actions))
    topo.bridge("b1")
    topo.vm_port("b1", "vm1", mac_n=1, inbound_chain_id="c")
    topo.vm_port("b1", "vm2", mac_n=2)
    return topo


@settings(max_examples=40, deadline=None)
@given(
    actions=st.lists(st.sampled_from(["accept", "drop", "reject", "return"]), max_size=6),
    port=st.integers(20, 30),
    proto=st.sampled_from(["tcp", "udp"]),
)
def test_plain_chain_fast_path_is_the_general_evaluation(
    actions: list[str], port: int, proto: str
) -> None:
    """A chain whose rules all end it runs through `run_chain`'s fast path; with the chain
    marked not plain, the general evaluator gives the same actions, trace, tags and mask."""
    topo = chain_topology(actions)
    frame = (tcp if proto == "tcp" else udp)(mac(1), mac(2), "10.0.0.1", "10.0.0.2", 1000, port)
    results = []
    for plain in (True, False):
        sim = Sim(topo.view())
        chain = sim.view.chains["c"]
        assert chain.plain
        object.__setattr__(chain, "plain", plain)
        results.append(sim.run(frame, "vm1", learn=False))
    fast, general = results
    assert fast.actions == general.actions
    assert fast.trace == general.trace
    assert fast.tags == general.tags
    assert fast.mask == general.mask
    assert fast.generated == general.generated


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["set", "vlan", "copy", "ask"]),
            st.sampled_from(FIELD_NAMES),
            st.integers(0, 3),
        ),
        max_size=12,
    )
)
def test_to_match_is_always_the_packets_current_fields(
    steps: list[tuple[str, str, int]],
) -> None:
    """`PacketState.to_match` hands out the FlowMatch it made last (or the walk's own match)
    while the fields are unchanged: whatever is set, directly or by `set`, on the packet or
    a copy, what it returns equals a FlowMatch of the current fields."""
    match = FlowMatch(in_port=1, eth_type=0x0800, ip_src=2, tp_dst=80)
    packets = [PacketState.of(match)]
    assert packets[0].to_match() is match
    for action, field, value in steps:
        packet = packets[-1] if value % 2 else packets[0]
        if action == "set":
            packet.set(field, value)
        elif action == "vlan":
            packet.vlan = value  # as ports and bridges set it, outside `set`
        elif action == "copy":
            packets.append(packet.copy())
        for each in packets:
            current = FlowMatch(*(getattr(each, name) for name in FIELD_NAMES))
            made = each.to_match()
            assert made == current and type(made) is FlowMatch
            assert each.to_match() is made  # unchanged since: the same object
