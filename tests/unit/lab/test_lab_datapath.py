"""The lab's datapath choice without root: ebpf by default, the record keeps it (old records
read as userspace, what their agents ran), every agent's command line carries it, and bad
input is refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hivenet.lab import cli as lab_cli
from hivenet.lab import lab as lab_module
from hivenet.lab.lab import Lab
from hivenet.lab.netns import LabError
from hivenet.lab.record import LabRecord
from hivenet.lab.scenario import builtin_scenario


def _datapath_of(argv: list[str]) -> str:
    return argv[argv.index("--datapath") + 1]


def test_record_keeps_the_datapath_and_old_records_read_as_userspace(tmp_path: Path) -> None:
    lab = Lab(builtin_scenario(), state_dir=tmp_path, datapath="userspace")
    again = LabRecord.from_json(lab.record.to_json(), source="test")
    assert again.datapath == "userspace"
    old = json.loads(lab.record.to_json())
    del old["datapath"]  # a record written before the option: its agents ran userspace
    assert LabRecord.from_json(json.dumps(old), source="test").datapath == "userspace"


def test_every_agent_runs_the_chosen_datapath_ebpf_by_default(tmp_path: Path) -> None:
    default = Lab(builtin_scenario(), state_dir=tmp_path / "e")
    userspace = Lab(builtin_scenario(), state_dir=tmp_path / "u", datapath="userspace")
    hosts = list(builtin_scenario().hosts)
    assert {_datapath_of(default.agent_argv(host)) for host in hosts} == {"ebpf"}
    assert {_datapath_of(userspace.agent_argv(host)) for host in hosts} == {"userspace"}


def test_unknown_datapath_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(LabError, match=r"--datapath 'dpdk'.*userspace or ebpf"):
        Lab(builtin_scenario(), state_dir=tmp_path, datapath="dpdk")


def test_cli_refuses_an_unknown_datapath(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lab_module.os, "geteuid", lambda: 0)
    result = CliRunner().invoke(
        lab_cli.app, ["up", "--datapath", "dpdk", "--state-dir", str(tmp_path / "s")]
    )
    assert result.exit_code == 1, result.output  # as for --store: the lab refuses it
    assert "--datapath 'dpdk'" in result.output
    assert not (tmp_path / "s").exists()
