"""Invalidation: a change to a route, rule, port or table entry removes exactly the cached
flows that depended on it (through the tags the simulation put on them)."""

from __future__ import annotations

import ipaddress

import pytest

from hivenet.flows.table import FlowTable
from hivenet.model import Route, RouteType
from hivenet.model.types import mac_to_int
from hivenet.packets import extract_flow_match
from tests.unit.sim.topo import Sim, Topo, mac, port_mac, udp


def cloud() -> tuple[Topo, Sim, FlowTable, dict[str, bytes]]:
    topo = Topo()
    topo.chain("vm1-in")
    topo.rule("vm1-in", "accept")
    topo.bridge("b1")
    topo.bridge("b2")
    topo.router("r1")
    topo.vm_port("b1", "vm1", "h1", mac_n=1, inbound_chain_id="vm1-in")
    topo.vm_port("b1", "vm2", "h1", mac_n=2)
    topo.vm_port("b2", "vm3", "h1", mac_n=3)
    topo.vm_port("b2", "vm4", "h1", mac_n=4)
    topo.link("b1", "r1", "10.0.1.1/24")
    topo.link("b2", "r1", "10.0.2.1/24")
    sim = Sim(topo.view())
    for n, bridge in ((1, "b1"), (2, "b1"), (3, "b2"), (4, "b2")):
        sim.tables.macs[(bridge, 0, mac_to_int(mac(n)))] = f"vm{n}"
    sim.tables.neighbours[("r1", 4, int(ipaddress.IPv4Address("10.0.2.3")))] = mac_to_int(mac(3))
    frames = {
        "vm1->vm2": ("vm1", udp(mac(1), mac(2), "10.0.1.1", "10.0.1.2")),
        "vm2->vm1": ("vm2", udp(mac(2), mac(1), "10.0.1.2", "10.0.1.1")),
        "vm1->vm3 routed": ("vm1", udp(mac(1), port_mac(topo, "r1-b1"), "10.0.1.1", "10.0.2.3")),
        "vm3->vm4": ("vm3", udp(mac(3), mac(4), "10.0.2.3", "10.0.2.4")),
    }
    flows = FlowTable()
    for port_id, frame in frames.values():
        result = sim.run(frame, port_id)
        assert result.install and not result.drop_reason, result.format_trace()
        flows.install(result.masked_match, result.mask, result.actions, result.tags, 0.0)
    return topo, sim, flows, {name: frame for name, (_, frame) in frames.items()}


def surviving(topo: Topo, flows: FlowTable, frames: dict[str, bytes]) -> set[str]:
    ports = {"vm1->vm2": "vm1", "vm2->vm1": "vm2", "vm1->vm3 routed": "vm1", "vm3->vm4": "vm3"}
    return {
        name
        for name, frame in frames.items()
        if flows.lookup(extract_flow_match(frame, topo.ports[ports[name]].tunnel_key), 0.0)
        is not None
    }


ALL = {"vm1->vm2", "vm2->vm1", "vm1->vm3 routed", "vm3->vm4"}


def change_route(topo: Topo, sim: Sim) -> frozenset[str]:
    return sim.view.apply(
        Route(
            router_id="r1", dst_prefix=ipaddress.ip_network("10.7.0.0/16"), type=RouteType.BLACKHOLE
        )
    )


def change_rule(topo: Topo, sim: Sim) -> frozenset[str]:
    rule = next(o for o in topo.objects if o.KIND == "rule")
    return sim.view.apply(rule.model_copy(update={"position": 1}))


def change_port(topo: Topo, sim: Sim) -> frozenset[str]:
    return sim.view.apply(topo.ports["vm4"].model_copy(update={"name": "renamed"}))


def move_mac(topo: Topo, sim: Sim) -> frozenset[str]:
    tag = sim.tables.forget_mac("b1", 0, mac_to_int(mac(2)))
    assert tag is not None
    return frozenset({tag})


def forget_neighbour(topo: Topo, sim: Sim) -> frozenset[str]:
    tag = sim.tables.forget_neighbour("r1", 4, int(ipaddress.IPv4Address("10.0.2.3")))
    assert tag is not None
    return frozenset({tag})


@pytest.mark.parametrize(
    ("change", "invalidated"),
    [
        (change_route, {"vm1->vm3 routed"}),
        (change_rule, {"vm1->vm2", "vm1->vm3 routed"}),
        (change_port, {"vm3->vm4"}),
        # vm2's entry is read by the flow towards vm2 and, as the learned source, by vm2's own.
        (move_mac, {"vm1->vm2", "vm2->vm1"}),
        (forget_neighbour, {"vm1->vm3 routed"}),
    ],
    ids=["route", "rule", "port", "mac", "arp"],
)
def test_change_invalidates_exactly_the_dependent_flows(change, invalidated: set[str]) -> None:  # type: ignore[no-untyped-def]
    topo, sim, flows, frames = cloud()
    assert surviving(topo, flows, frames) == ALL
    flows.invalidate(change(topo, sim))
    assert surviving(topo, flows, frames) == ALL - invalidated
