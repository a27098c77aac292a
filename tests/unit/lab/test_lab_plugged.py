"""A lab of hosts only (its networks come later through the API, e.g. the `openstack` CLI)
and the VMs `Lab.plug_vm` adds after `up`: kept in lab.json, so a later `Lab.load` (and
`down`) finds their namespaces and processes; without root, nothing is created."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from hivenet.lab.lab import Lab
from hivenet.lab.netns import LabError, LabScope
from hivenet.lab.plan import VmPlan
from hivenet.lab.record import LabRecord, save_record
from hivenet.lab.scenario import builtin_scenario, scenario_from_data


def _hosts_only() -> Lab:
    return Lab(scenario_from_data({"hosts": ["h1", "h2"]}), state_dir=Path("/nonexistent"))


def test_a_scenario_of_hosts_only_plans_host_namespaces_and_no_ports() -> None:
    lab = _hosts_only()
    assert lab.plan.vms == () and lab.plan.external is None
    assert lab.plan.expected_ports() == {"h1": [], "h2": []}
    assert len(lab.namespaces()) == 2


def test_plugged_vms_survive_the_record_and_are_this_labs(tmp_path: Path) -> None:
    lab = Lab(builtin_scenario(), state_dir=tmp_path, scope=LabScope("ab12"))
    vm = VmPlan(
        name="web",
        host="h1",
        network="",
        namespace=lab.scope.namespace("web"),
        port_id="",
        port_link="tap0123456789a",
        setup_link=lab.scope.link("webi"),
        ip="10.20.0.5/24",
        gateway=None,
        dhcp_client="udhcpc",
    )
    lab.record.plugged["web"] = dataclasses.asdict(vm)
    save_record(tmp_path, lab.record)
    again = Lab.load(tmp_path)
    assert again.plugged_vm("web") == vm
    assert again.namespace_of("web") == again.namespace_of(vm.namespace) == "hnab12-web"
    assert "hnab12-web" in again.namespaces()
    assert again.exec_argv("web", ["true"])[3] == "hnab12-web"
    with pytest.raises(LabError, match="not plugged"):
        again.plugged_vm("nope")
    # Records written before plug_vm existed read as none plugged.
    old = json.loads(lab.record.to_json())
    del old["plugged"]
    assert LabRecord.from_json(json.dumps(old), source="test").plugged == {}


def test_plug_vm_refuses_a_taken_name_before_touching_anything(tmp_path: Path) -> None:
    lab = Lab(builtin_scenario(), state_dir=tmp_path)
    taken = lab.plan.vms[0].name
    with pytest.raises(LabError, match="already"):
        lab.plug_vm(taken, host="h1", interface="tapx", mac="02:00:00:00:00:01", ip="")
    assert lab.record.plugged == {}
