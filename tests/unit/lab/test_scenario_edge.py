"""The `edge` scenario: several uplinks of one router on different gateway hosts, BGP with the
outside router; its validation, its plan (uplink ports in a stateful group, SNAT to the
router's address in the floating range through every uplink, one bgp_peer per uplink), the
store accepting it in order, and hn-ext's BIRD configuration."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest
import yaml

from hivenet.lab.netns import LabScope
from hivenet.lab.outside import outside_bird_config
from hivenet.lab.plan import assign_macs, plan_lab, topology_objects
from hivenet.lab.scenario import (
    ScenarioError,
    builtin_scenario,
    builtin_scenario_text,
    scenario_from_data,
)
from hivenet.model import BgpPeer, Port, PortGroup, Rule, RuleAction
from hivenet.store import open_store
from hivenet.store.topology import TopologyRepository


def edge_data() -> dict[str, Any]:
    data = yaml.safe_load(builtin_scenario_text("edge"))
    assert isinstance(data, dict)
    return data


def test_the_edge_plan_has_two_uplinks_sharing_state_and_snat_through_both() -> None:
    scenario = builtin_scenario("edge")
    scope = LabScope.unique()
    plan = plan_lab(scenario, scope)
    assert plan.external is not None
    assert [u.host for u in plan.external.all_uplinks()] == ["gw1", "gw2"]
    assert plan.expected_ports()["gw2"] == ["ext.r1.2"]
    objects = topology_objects(scenario, plan, assign_macs(scenario, scope))
    uplinks = [o for o in objects if isinstance(o, Port) and o.id.startswith("ext.")]
    (group,) = [o for o in objects if isinstance(o, PortGroup)]
    assert group.stateful
    assert {(u.host_id, group.id in u.port_group_ids) for u in uplinks} == {
        ("gw1", True),
        ("gw2", True),
    }
    (snat,) = [o for o in objects if isinstance(o, Rule) and o.action is RuleAction.SNAT]
    assert set(snat.out_port_ids) == {"ext.r1", "ext.r1.2"}
    assert str(snat.nat_targets[0].address_from) == "198.51.100.1"
    peers = {o.port_id: o for o in objects if isinstance(o, BgpPeer)}
    assert {port: str(p.peer_ip) for port, p in peers.items()} == {
        "ext.r1": "192.0.2.2",
        "ext.r1.2": "192.0.2.130",
    }
    assert all([str(a) for a in p.advertise] == ["198.51.100.0/24"] for p in peers.values())
    assert plan.external.routes == ()  # hn-ext learns the floating range by BGP

    async def store_accepts_in_order() -> None:
        store = open_store("memory://")
        try:
            repo = TopologyRepository(store)
            for obj in objects:
                await repo.create(obj)
        finally:
            await store.close()

    asyncio.run(store_accepts_in_order())
    config = outside_bird_config(plan.external, scenario.external.bgp)  # type: ignore[union-attr, arg-type]
    assert "neighbor 192.0.2.1 as 65001;" in config
    assert "neighbor 192.0.2.129 as 65001;" in config
    assert "merge paths on;" in config


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda e: e.pop("floating_range"), "external.uplinks: several uplinks need a routed"),
        (lambda e: e["uplinks"][0].update(host="gw1"), "external.uplinks[0].host: 'gw1' already"),
        (lambda e: e["uplinks"][0].update(host="nope"), "external.uplinks[0].host: 'nope' is not"),
        (
            lambda e: e["uplinks"][0].update(ip="192.0.2.3/25"),
            "external.uplinks[0].ip: 192.0.2.3/25 is not in router_ip's subnet",
        ),
        (
            lambda e: e["uplinks"][0].update(router_ip="192.0.2.5/25", ip="192.0.2.6/25"),
            "external.uplinks[0].router_ip: 192.0.2.0/25 overlaps 192.0.2.0/25",
        ),
    ],
)
def test_bad_uplinks_are_refused_naming_the_field(change: Any, message: str) -> None:
    data = copy.deepcopy(edge_data())
    change(data["external"])
    with pytest.raises(ScenarioError) as caught:
        scenario_from_data(data)
    assert message in str(caught.value)
