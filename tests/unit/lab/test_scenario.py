"""Scenario files: the shipped default, and every kind of bad input named by field and value."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
import yaml

from hivenet.lab.scenario import (
    ScenarioError,
    builtin_scenario,
    load_scenario,
    parse_scenario,
    scenario_from_data,
)

VALID = {
    "name": "t",
    "hosts": ["h1", "h2"],
    "networks": [{"name": "net1", "subnet": "10.0.1.0/24", "tenant": "blue"}],
    "routers": [{"name": "r1", "interfaces": [{"network": "net1", "ip": "10.0.1.1/24"}]}],
    "vms": [
        {"name": "vm1", "host": "h1", "network": "net1", "ip": "10.0.1.10/24"},
        {"name": "vm2", "host": "h2", "network": "net1", "ip": "10.0.1.11/24"},
    ],
}


def with_changes(**changes: object) -> dict[str, object]:
    data = yaml.safe_load(yaml.safe_dump(VALID))  # deep copy
    data.update(changes)
    return data


def error_of(data: object) -> str:
    with pytest.raises(ScenarioError) as caught:
        scenario_from_data(data)
    return str(caught.value)


def test_default_scenario_has_every_kind_of_path() -> None:
    scenario = builtin_scenario()
    assert len(scenario.hosts) == 3 and len(scenario.vms) == 4
    assert {str(n.subnet) for n in scenario.networks} == {"10.0.1.0/24", "10.0.2.0/24"}
    assert len(scenario.routers) == 1
    first = scenario.vms[0]
    others = scenario.vms[1:]
    assert any(vm.host == first.host and vm.network == first.network for vm in others)
    assert any(vm.host != first.host and vm.network == first.network for vm in others)
    assert any(vm.network != first.network for vm in others)
    for vm in scenario.vms:  # every VM gets the router as its gateway
        assert scenario.gateway_of(vm) is not None


def test_default_gateway_is_the_router_interface_unless_given() -> None:
    scenario = scenario_from_data(VALID)
    assert scenario.gateway_of(scenario.vms[0]) == ipaddress.IPv4Address("10.0.1.1")
    vms = VALID["vms"]
    assert isinstance(vms, list)
    own = with_changes(vms=[{**vms[0], "gateway": "10.0.1.254"}, vms[1]])
    scenario = scenario_from_data(own)
    assert scenario.gateway_of(scenario.vms[0]) == ipaddress.IPv4Address("10.0.1.254")
    no_router = scenario_from_data(with_changes(routers=[]))
    assert no_router.gateway_of(no_router.vms[0]) is None


def test_two_tenants_may_share_a_subnet() -> None:
    data = with_changes(
        networks=[
            {"name": "blue", "subnet": "10.0.1.0/24", "tenant": "blue"},
            {"name": "green", "subnet": "10.0.1.0/24", "tenant": "green"},
        ],
        routers=[],
        vms=[
            {"name": "b1", "host": "h1", "network": "blue", "ip": "10.0.1.10/24"},
            {"name": "g1", "host": "h1", "network": "green", "ip": "10.0.1.10/24"},
        ],
    )
    scenario = scenario_from_data(data)
    assert [n.tenant for n in scenario.networks] == ["blue", "green"]


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"hosts": ["h1", "h1"]}, "hosts[1]: duplicate name 'h1'"),
        ({"hosts": ["H1"]}, "hosts[0]: "),
        ({"hosts": ["api"]}, "reserved"),
        ({"hosts": ["verylonghost"]}, "hosts[0]: "),
        ({"hosts": []}, "hosts: "),
        ({"networks": [{"name": "net1", "subnet": "10.0.1.0/33"}]}, "networks[0].subnet"),
        ({"networks": [{"name": "net1", "subnet": "10.0.1.0/24", "vlan": 3}]}, "networks[0].vlan"),
        ({"unknown": 1}, "unknown: Extra inputs are not permitted"),
    ],
)
def test_field_errors_name_the_field(changes: dict[str, object], expected: str) -> None:
    assert expected in error_of(with_changes(**changes))


def _vm(**fields: object) -> dict[str, object]:
    return {"name": "vm9", "host": "h1", "network": "net1", "ip": "10.0.1.99/24", **fields}


@pytest.mark.parametrize(
    ("extra_vm", "expected"),
    [
        (_vm(host="h7"), "vms[2].host: 'h7' is not in hosts"),
        (_vm(network="nope"), "vms[2].network: 'nope' is not a declared network"),
        (_vm(ip="10.0.2.5/24"), "vms[2].ip: 10.0.2.5/24 is not in network net1's subnet"),
        (_vm(ip="10.0.1.5/16"), "vms[2].ip: 10.0.1.5/16 is not in network net1's subnet"),
        (_vm(ip="10.0.1.255/24"), "vms[2].ip: 10.0.1.255 is the network or broadcast address"),
        (_vm(ip="10.0.1.10/24"), "vms[2].ip: 10.0.1.10 on net1 is already used by VM vm1"),
        (_vm(ip="10.0.1.1/24"), "vms[2].ip: 10.0.1.1 on net1 is already used by r1"),
        (_vm(gateway="10.0.9.1"), "vms[2].gateway: 10.0.9.1 is not in network net1's subnet"),
        (_vm(mac="03:00:00:00:00:01"), "vms[2].mac: 03:00:00:00:00:01 is a multicast address"),
        (_vm(mac="zz:00:00:00:00:01"), "vms[2].mac"),
        (_vm(name="h1"), "vms[2].name: 'h1' is also a host name"),
        (_vm(name="vm1"), "vms[2]: duplicate name 'vm1'"),
    ],
)
def test_vm_errors_name_the_field_and_value(extra_vm: dict[str, object], expected: str) -> None:
    vms = VALID["vms"]
    assert isinstance(vms, list)
    assert expected in error_of(with_changes(vms=[*vms, extra_vm]))


def test_router_errors() -> None:
    data = with_changes(
        networks=[
            {"name": "net1", "subnet": "10.0.1.0/24"},
            {"name": "net2", "subnet": "10.0.0.0/16"},
        ],
        routers=[
            {
                "name": "r1",
                "interfaces": [
                    {"network": "net1", "ip": "10.0.1.1/24"},
                    {"network": "net2", "ip": "10.0.2.1/16"},
                    {"network": "net1", "ip": "10.0.1.2/24"},
                    {"network": "net9", "ip": "10.9.0.1/24"},
                ],
                "routes": [{"dst": "192.168.0.0/16", "gateway": "172.16.0.1"}],
            }
        ],
    )
    message = error_of(data)
    assert "routers[0].interfaces[1].network: net2 (10.0.0.0/16) overlaps net1" in message
    assert "routers[0].interfaces[2].network: router r1 already has an interface on net1" in message
    assert "routers[0].interfaces[3].network: 'net9' is not a declared network" in message
    assert "routers[0].routes[0].gateway: 172.16.0.1 is on none of router r1's networks" in message


def test_external_errors() -> None:
    external = {"host": "h9", "router": "r1", "router_ip": "10.0.1.200/24", "ip": "10.0.1.201/24"}
    message = error_of(with_changes(external=external))
    assert "external.host: 'h9' is not in hosts" in message
    assert "external.router_ip: 10.0.1.0/24 overlaps network net1" in message
    external = {"host": "h1", "router": "r9", "router_ip": "192.0.2.1/24", "ip": "192.0.2.2/24"}
    assert "external.router: 'r9' is not a declared router" in error_of(
        with_changes(external=external)
    )
    external = {"host": "h1", "router": "r1", "router_ip": "192.0.2.1/24", "ip": "198.51.100.2/24"}
    assert "external.ip: 198.51.100.2/24 is not in router_ip's subnet" in error_of(
        with_changes(external=external)
    )
    external = {"host": "h1", "router": "r1", "router_ip": "192.0.2.1/24", "ip": "192.0.2.2/24"}
    assert scenario_from_data(with_changes(external=external)).external is not None


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="cannot read"):
        load_scenario(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("hosts: [h1\n")
    with pytest.raises(ScenarioError, match="not valid YAML"):
        load_scenario(bad)
    with pytest.raises(ScenarioError, match="expected a mapping"):
        parse_scenario("- just a list")
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(VALID))
    assert load_scenario(good).name == "t"


def test_round_trip_through_json() -> None:
    """`lab.json` stores the scenario as JSON; it must load back to the same scenario."""
    scenario = builtin_scenario()
    assert scenario_from_data(scenario.model_dump(mode="json")) == scenario
