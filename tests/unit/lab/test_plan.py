"""The lab plan (names), the topology a scenario becomes, ping parsing and the CLI's refusals,
all without root."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hivenet.lab import cli as lab_cli
from hivenet.lab import lab as lab_module
from hivenet.lab.netns import MAX_LINK_NAME_LEN, LabError, LabScope
from hivenet.lab.plan import assign_macs, plan_lab, topology_objects
from hivenet.lab.probes import parse_ping
from hivenet.lab.record import LabRecord
from hivenet.lab.scenario import builtin_scenario, parse_scenario
from hivenet.model import Port, Route
from hivenet.store import open_store
from hivenet.store.topology import TopologyRepository

EXTERNAL_SCENARIO = """
hosts: [h1, h2]
networks:
  - {name: net1, subnet: 10.0.1.0/24, tenant: blue}
  - {name: net2, subnet: 10.0.2.0/24, tenant: blue}
routers:
  - name: r1
    tenant: blue
    interfaces: [{network: net1, ip: 10.0.1.1/24}, {network: net2, ip: 10.0.2.1/24}]
    routes: [{dst: 10.0.9.0/24, gateway: 10.0.2.20}]
vms:
  - {name: vm1, host: h1, network: net1, ip: 10.0.1.10/24}
  - {name: longname, host: h2, network: net2, ip: 10.0.2.20/24, mac: "02:00:00:00:00:99"}
external: {host: h2, router: r1, router_ip: 192.0.2.1/24, ip: 192.0.2.2/24}
"""


@pytest.mark.parametrize("tag", ["", "ab12"])
def test_plan_names_fit_and_carry_the_scope(tag: str) -> None:
    scenario = parse_scenario(EXTERNAL_SCENARIO)
    plan = plan_lab(scenario, LabScope(tag))
    prefix = f"hn{tag}"
    links = (
        plan.root_links() + [vm.port_link for vm in plan.vms] + [vm.setup_link for vm in plan.vms]
    )
    assert plan.external is not None
    links += [plan.external.port_link, plan.external.setup_link]
    assert len(set(links)) == len(links)
    for link in links:
        assert link.startswith(prefix) and len(link) <= MAX_LINK_NAME_LEN, link
    assert plan.namespaces() == [
        f"{prefix}-h1",
        f"{prefix}-h2",
        f"{prefix}-vm1",
        f"{prefix}-longname",
        f"{prefix}-ext",
    ]
    assert plan.api_namespace == f"{prefix}-api"
    assert [h.underlay_ip for h in plan.hosts] == ["172.31.250.1", "172.31.250.2"]
    assert plan.expected_ports() == {"h1": ["vm.vm1"], "h2": ["vm.longname", "ext.r1"]}
    assert plan.vm(f"{prefix}-vm1").name == "vm1"
    assert plan.namespace_of("h2") == f"{prefix}-h2"
    assert plan.namespace_of("ext") == f"{prefix}-ext"
    with pytest.raises(LabError, match="'vm7': no VM, host or external"):
        plan.namespace_of("vm7")
    with pytest.raises(LabError, match="is the external network, not a VM"):
        plan.vm("ext")


def test_topology_objects_are_what_the_scenario_says_and_the_store_accepts_them() -> None:
    scenario = parse_scenario(EXTERNAL_SCENARIO)
    plan = plan_lab(scenario, LabScope())
    macs = assign_macs(scenario, LabScope())
    assert macs["longname"] == "02:00:00:00:00:99"
    assert int(macs["vm1"].split(":")[0], 16) & 0x02  # locally administered
    objects = topology_objects(scenario, plan, macs)

    ports = {o.id: o for o in objects if isinstance(o, Port)}
    vm_port = ports["vm.vm1"]
    assert vm_port.host_id == "h1" and vm_port.interface_name == "hnvm1p"
    assert vm_port.mac == macs["vm1"] and vm_port.tenant_id == "blue"
    assert ports["bp.net1.r1"].peer_id == "rp.r1.net1"
    assert ports["rp.r1.net2"].addresses == (ipaddress.ip_interface("10.0.2.1/24"),)
    assert ports["ext.r1"].host_id == "h2" and ports["ext.r1"].interface_name == "hnextp"
    (route,) = [o for o in objects if isinstance(o, Route)]
    assert route.next_hop_port_id == "rp.r1.net2"
    assert str(route.next_hop_gateway) == "10.0.2.20"

    async def create_all() -> dict[str, int]:
        store = open_store("memory://")
        try:
            repository = TopologyRepository(store)
            keys = {}
            for obj in objects:  # in order: every reference already exists
                stored = (await repository.create(obj)).obj
                if isinstance(stored, Port):
                    keys[stored.id] = stored.tunnel_key
            peer = (await repository.get(Port, "rp.r1.net1")).obj
            assert isinstance(peer, Port) and peer.peer_id == "bp.net1.r1"  # linked both ways
            return keys
        finally:
            await store.close()

    keys = asyncio.run(create_all())
    assert all(key > 0 for key in keys.values()) and len(set(keys.values())) == len(keys)


def test_lab_record_round_trip_and_bad_records() -> None:
    scenario = builtin_scenario()
    record = LabRecord(
        tag="ab12", scenario=scenario.model_dump(mode="json"), store_url="sqlite:///x.db"
    )
    record.macs["vm1"] = "02:00:00:00:00:01"
    again = LabRecord.from_json(record.to_json(), source="lab.json")
    assert again == record
    with pytest.raises(LabError, match=r"lab\.json: not a lab record"):
        LabRecord.from_json('{"version": 99}', source="lab.json")
    with pytest.raises(LabError, match="not a lab record"):
        LabRecord.from_json("[1, 2", source="lab.json")


def test_parse_ping_first_and_steady() -> None:
    output = """PING 10.0.1.11 (10.0.1.11) 56(84) bytes of data.
64 bytes from 10.0.1.11: icmp_seq=2 ttl=64 time=0.512 ms
64 bytes from 10.0.1.11: icmp_seq=3 ttl=64 time=0.210 ms
64 bytes from 10.0.1.11: icmp_seq=4 ttl=64 time=0.190 ms
64 bytes from 10.0.1.11: icmp_seq=5 ttl=64 time=0.300 ms

--- 10.0.1.11 ping statistics ---
5 packets transmitted, 4 received, 20% packet loss, time 81ms
"""
    result = parse_ping(output, 5)
    assert (result.sent, result.received) == (5, 4)
    assert not result.ok
    assert result.first_ms == 0.512
    assert result.steady_p50_ms == 0.210
    nothing = parse_ping("ping: connect: Network is unreachable\n", 3)
    assert (nothing.sent, nothing.received, nothing.first_ms, nothing.steady_p50_ms) == (
        3,
        0,
        None,
        None,
    )


def test_cli_refuses_without_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lab_module.os, "geteuid", lambda: 1000)
    runner = CliRunner()
    for args in (["up"], ["down"], ["clean"], ["exec", "vm1", "true"]):
        result = runner.invoke(lab_cli.app, args)
        assert result.exit_code == 1, (args, result.output)
        assert "needs root" in result.output
        assert "network namespaces" in result.output


def test_cli_names_a_bad_scenario_and_a_missing_lab(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lab_module.os, "geteuid", lambda: 0)
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "hosts: [h1]\nnetworks: [{name: n1, subnet: 10.0.1.0/24}]\nvms: [{name: vm1, host: h2, network: n1, ip: 10.0.1.5/24}]\n"
    )
    runner = CliRunner()
    result = runner.invoke(
        lab_cli.app, ["up", "--scenario", str(bad), "--state-dir", str(tmp_path / "s")]
    )
    assert result.exit_code == 1
    assert "vms[0].host: 'h2' is not in hosts ['h1']" in result.output
    result = runner.invoke(
        lab_cli.app, ["up", "--tag", "TOOLONG", "--state-dir", str(tmp_path / "s")]
    )
    assert result.exit_code == 1 and "lab tag 'TOOLONG'" in result.output
    result = runner.invoke(
        lab_cli.app, ["up", "--store", "zookeeper", "--state-dir", str(tmp_path / "s")]
    )
    assert result.exit_code == 1 and "--store 'zookeeper'" in result.output
    result = runner.invoke(lab_cli.app, ["status", "--state-dir", str(tmp_path / "none")])
    assert result.exit_code == 1 and "no lab in" in result.output
