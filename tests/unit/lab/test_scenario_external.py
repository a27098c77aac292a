"""The scenario's outside world: SNAT networks, the floating range, VMs' floating IPs, the
built-in `nat` scenario, and the topology objects the lab writes for them (chains and rules on
the router, the uplink's addresses, FloatingIp objects, the store accepting all of them)."""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

import pytest
import yaml

from hivenet.lab.netns import LabScope
from hivenet.lab.plan import (
    assign_macs,
    floating_ip_id,
    nat_chain_ids,
    plan_lab,
    snat_rule_id,
    topology_objects,
)
from hivenet.lab.scenario import (
    ScenarioError,
    builtin_scenario,
    builtin_scenario_names,
    resolve_scenario,
    scenario_from_data,
)
from hivenet.model import FloatingIp, Port, Router, Rule, RuleAction
from hivenet.store import open_store
from hivenet.store.topology import TopologyRepository

BASE: dict[str, Any] = {
    "hosts": ["h1", "h2"],
    "networks": [
        {"name": "net1", "subnet": "10.0.1.0/24"},
        {"name": "net2", "subnet": "10.0.2.0/24"},
        {"name": "lone", "subnet": "10.0.9.0/24"},
    ],
    "routers": [
        {
            "name": "r1",
            "interfaces": [
                {"network": "net1", "ip": "10.0.1.1/24"},
                {"network": "net2", "ip": "10.0.2.1/24"},
            ],
        }
    ],
    "vms": [
        {"name": "vm1", "host": "h1", "network": "net1", "ip": "10.0.1.10/24"},
        {"name": "vm2", "host": "h2", "network": "net2", "ip": "10.0.2.10/24"},
    ],
    "external": {
        "host": "h2",
        "router": "r1",
        "router_ip": "192.0.2.1/24",
        "ip": "192.0.2.2/24",
    },
}


def variant(external: dict[str, Any] | None = None, **vm_fields: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(yaml.safe_dump(BASE))
    data["external"].update(external or {})
    for vm in data["vms"]:
        vm.update(vm_fields.get(vm["name"], {}))
    return data


def error_of(data: dict[str, Any]) -> str:
    with pytest.raises(ScenarioError) as caught:
        scenario_from_data(data)
    return str(caught.value)


def test_floating_ips_on_link_and_routed() -> None:
    on_link = scenario_from_data(variant(vm2={"floating_ip": "192.0.2.50"}))
    assert on_link.external is not None
    assert on_link.external.floating_gateway is None
    assert on_link.external.routed_prefixes == ()
    routed = scenario_from_data(
        variant({"floating_range": "198.51.100.0/24"}, vm2={"floating_ip": "198.51.100.7"})
    )
    assert routed.external is not None
    assert routed.external.floating_gateway == ipaddress.IPv4Interface("198.51.100.1/24")
    assert routed.external.routed_prefixes == (ipaddress.IPv4Network("198.51.100.0/24"),)


@pytest.mark.parametrize(
    ("external", "vm_fields", "expected"),
    [
        (
            {},
            {"vm1": {"floating_ip": "198.51.100.7"}},
            "vms[0].floating_ip: 198.51.100.7 is not in",
        ),
        (
            {},
            {"vm1": {"floating_ip": "192.0.2.1"}},
            "vms[0].floating_ip: 192.0.2.1 is external.router_ip",
        ),
        ({}, {"vm1": {"floating_ip": "192.0.2.2"}}, "vms[0].floating_ip: 192.0.2.2 is external.ip"),
        ({}, {"vm1": {"floating_ip": "192.0.2.255"}}, "is the broadcast address of 192.0.2.0/24"),
        (
            {},
            {"vm1": {"floating_ip": "192.0.2.9"}, "vm2": {"floating_ip": "192.0.2.9"}},
            "vms[1].floating_ip: 192.0.2.9 is the floating IP of VM vm1",
        ),
        (
            {"floating_range": "198.51.100.0/24"},
            {"vm1": {"floating_ip": "198.51.100.1"}},
            "vms[0].floating_ip: 198.51.100.1 is the router's address in 198.51.100.0/24",
        ),
        (
            {"floating_range": "192.0.2.0/23"},
            {},
            "external.floating_range: 192.0.2.0/23 must lie inside router_ip's subnet",
        ),
        (
            {"floating_range": "10.0.2.0/24"},
            {},
            "external.floating_range: 10.0.2.0/24 overlaps network net2",
        ),
        ({"floating_range": "198.51.100.0/31"}, {}, "at most /30"),
        ({"snat": ["lone"]}, {}, "external.snat[0]: 'lone' is not a network of router r1"),
        ({"snat": ["net1", "net1"]}, {}, "external.snat[1]: duplicate name 'net1'"),
        ({"snat": ["Net1"]}, {}, "external.snat[0]: 'Net1' is not a network/router name"),
    ],
)
def test_external_errors_name_the_field_and_value(
    external: dict[str, Any], vm_fields: dict[str, dict[str, Any]], expected: str
) -> None:
    assert expected in error_of(variant(external, **vm_fields))


def test_floating_ip_needs_an_external_router_that_reaches_the_vm() -> None:
    data = variant(vm1={"floating_ip": "192.0.2.9"})
    data["vms"].append(
        {
            "name": "vm3",
            "host": "h1",
            "network": "lone",
            "ip": "10.0.9.5/24",
            "floating_ip": "192.0.2.10",
        }
    )
    assert "vms[2].floating_ip: VM vm3's network lone is not on the external router r1" in (
        error_of(data)
    )
    del data["external"]
    data["vms"].pop()
    assert "vms[0].floating_ip: 192.0.2.9 needs an external section" in error_of(data)


def test_builtin_nat_scenario_and_how_up_finds_scenarios(tmp_path: Any) -> None:
    assert {"default", "nat"} <= set(builtin_scenario_names())
    nat = builtin_scenario("nat")
    assert nat.external is not None and nat.external.snat
    hosts_with_snat_vms = {vm.host for vm in nat.vms if vm.network in nat.external.snat}
    assert len(hosts_with_snat_vms) >= 2  # SNAT from two hosts at once
    assert any(vm.floating_ip is not None and vm.host != nat.external.host for vm in nat.vms)
    assert nat.external.host not in {vm.host for vm in nat.vms}  # a pure gateway host
    assert scenario_from_data(nat.model_dump(mode="json")) == nat  # lab.json round trip
    assert resolve_scenario(None) == builtin_scenario()
    assert resolve_scenario("nat") == nat
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(BASE))
    assert resolve_scenario(str(path)).external is not None
    with pytest.raises(
        ScenarioError, match=r"no built-in scenario named .nope. \(built in: default"
    ):
        resolve_scenario("nope")
    with pytest.raises(ScenarioError, match="cannot read"):
        resolve_scenario("missing.yaml")


def test_topology_objects_for_snat_and_floating_ips_are_accepted_by_the_store() -> None:
    scenario = scenario_from_data(
        variant(
            {"floating_range": "198.51.100.0/24", "snat": ["net1"]},
            vm2={"floating_ip": "198.51.100.7"},
        )
    )
    scope = LabScope("unit")
    plan = plan_lab(scenario, scope)
    assert plan.vm("vm2").floating_ip == "198.51.100.7" and plan.vm("vm1").floating_ip is None
    assert plan.external is not None and plan.external.routes == ("198.51.100.0/24",)
    objects = topology_objects(scenario, plan, assign_macs(scenario, scope))
    by_id = {(obj.KIND, obj.id): obj for obj in objects}
    inbound, outbound = nat_chain_ids("r1")
    router = by_id[("router", "r1")]
    assert isinstance(router, Router)
    assert (router.inbound_chain_id, router.outbound_chain_id) == (inbound, outbound)
    uplink = by_id[("port", plan.external.port_id)]
    assert isinstance(uplink, Port)
    assert [str(a) for a in uplink.addresses] == ["192.0.2.1/24", "198.51.100.1/24"]
    snat = by_id[("rule", snat_rule_id("r1", "net1"))]
    assert isinstance(snat, Rule) and snat.action is RuleAction.SNAT
    assert snat.chain_id == outbound and snat.out_port_ids == (plan.external.port_id,)
    assert str(snat.nw_src) == "10.0.1.0/24"
    (target,) = snat.nat_targets
    assert str(target.address_from) == str(target.address_to) == "192.0.2.1"
    assert (target.port_from, target.port_to) == (1024, 65535)
    reverse = [o for o in objects if isinstance(o, Rule) and o.action is RuleAction.REV_SNAT]
    assert [r.chain_id for r in reverse] == [inbound]
    floating = by_id[("floating_ip", floating_ip_id("vm2"))]
    assert isinstance(floating, FloatingIp) and floating.port_id == "vm.vm2"
    assert floating.router_id == "r1"

    async def store_accepts_in_order() -> None:
        store = open_store("memory://")
        repo = TopologyRepository(store)
        try:
            for obj in objects:  # references must exist first: the order matters
                await repo.create(obj)
        finally:
            await store.close()

    asyncio.run(store_accepts_in_order())


def test_no_nat_objects_without_snat_or_floating_ips() -> None:
    scenario = scenario_from_data(variant())
    scope = LabScope("unit")
    objects = topology_objects(scenario, plan_lab(scenario, scope), assign_macs(scenario, scope))
    kinds = {obj.KIND for obj in objects}
    assert not kinds & {"chain", "rule", "floating_ip"}
    router = next(obj for obj in objects if isinstance(obj, Router))
    assert router.inbound_chain_id is None and router.outbound_chain_id is None
