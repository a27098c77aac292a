"""The lab's store choice without root: the record keeps it, the agents' command line carries
the lease TTL, bad input is refused by name, `lab status` shows the etcd members, and
`hivenet.lab.etcd` refuses a client address it cannot listen on or a broken description."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from hivenet.lab import cli as lab_cli
from hivenet.lab import lab as lab_module
from hivenet.lab.etcd import (
    EtcdCluster,
    EtcdLabError,
    EtcdMemberStatus,
    check_client_host,
    start_cluster,
)
from hivenet.lab.lab import Lab, LabStatus
from hivenet.lab.netns import ROOT_UNDERLAY_ADDRESS, UNDERLAY_NETWORK, LabError, underlay_address
from hivenet.lab.record import LabRecord
from hivenet.lab.scenario import builtin_scenario


def etcd_lab(tmp_path: Path, lease_ttl: int | None = 3) -> Lab:
    return Lab(builtin_scenario(), state_dir=tmp_path, store="etcd", agent_lease_ttl=lease_ttl)


def test_root_underlay_address_is_in_the_underlay_and_no_host_can_get_it() -> None:
    assert ROOT_UNDERLAY_ADDRESS.network == UNDERLAY_NETWORK
    hosts = {underlay_address(index).ip for index in range(1, 254)}
    assert ROOT_UNDERLAY_ADDRESS.ip not in hosts
    with pytest.raises(LabError, match="host_index 254"):
        underlay_address(254)


def test_record_keeps_store_kind_and_lease_ttl_and_reads_old_records(tmp_path: Path) -> None:
    lab = etcd_lab(tmp_path)
    assert lab.record.store == "etcd" and lab.record.store_url == ""
    with pytest.raises(LabError, match="has no store yet"):
        _ = lab.store_url  # the cluster's ports are only known once it runs
    lab.record.store_url = "etcd://172.31.250.254:1,172.31.250.254:2,172.31.250.254:3"
    again = LabRecord.from_json(lab.record.to_json(), source="test")
    assert (again.store, again.agent_lease_ttl, again.store_url) == (
        "etcd",
        3,
        lab.record.store_url,
    )
    old = json.loads(lab.record.to_json())
    del old["store"], old["agent_lease_ttl"]  # a record written before the etcd option
    legacy = LabRecord.from_json(json.dumps(old), source="test")
    assert (legacy.store, legacy.agent_lease_ttl) == ("sqlite", None)


def test_agents_get_every_endpoint_and_the_lease_ttl(tmp_path: Path) -> None:
    lab = etcd_lab(tmp_path)
    lab.record.store_url = "etcd://172.31.250.254:11,172.31.250.254:12,172.31.250.254:13"
    argv = lab.agent_argv("h2")
    assert argv[argv.index("--store") + 1] == lab.record.store_url
    assert argv[argv.index("--lease-ttl") + 1] == "3"
    assert argv[argv.index("--underlay-ip") + 1] == "172.31.250.2"
    plain = Lab(builtin_scenario(), state_dir=tmp_path / "sqlite")
    assert "--lease-ttl" not in plain.agent_argv("h2")
    assert plain.agent_argv("h2")[plain.agent_argv("h2").index("--store") + 1].startswith(
        "sqlite://"
    )


@pytest.mark.parametrize("bad", [1, 0, -5, True, 2.5, "3"])
def test_bad_lease_ttl_is_refused_by_name(tmp_path: Path, bad: object) -> None:
    with pytest.raises(LabError, match=r"--lease-ttl .*expected whole seconds >= 2"):
        etcd_lab(tmp_path, bad)  # type: ignore[arg-type]


def test_unknown_store_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(LabError, match=r"--store 'zookeeper'.*sqlite, etcd"):
        Lab(builtin_scenario(), state_dir=tmp_path, store="zookeeper")


def test_cli_refuses_a_short_lease_ttl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lab_module.os, "geteuid", lambda: 0)
    result = CliRunner().invoke(
        lab_cli.app,
        ["up", "--store", "etcd", "--lease-ttl", "1", "--state-dir", str(tmp_path / "s")],
    )
    assert result.exit_code == 2, result.output
    assert "--lease-ttl" in result.output
    assert not (tmp_path / "s").exists()


def _status(members: list[EtcdMemberStatus], problem: str | None = None) -> LabStatus:
    return LabStatus(
        phase="up",
        api_url="http://127.0.0.1:1",
        api_healthy=True,
        namespaces={"hn-h1": True},
        processes=[],
        agents={"h1": None},
        store="etcd",
        store_url="etcd://172.31.250.254:11,172.31.250.254:12,172.31.250.254:13",
        store_members=members,
        store_problem=problem,
    )


def test_status_shows_members_and_is_unhealthy_when_one_is_gone(tmp_path: Path) -> None:
    healthy = [
        EtcdMemberStatus("hn-etcd1", "172.31.250.254:11", 101, True, False),
        EtcdMemberStatus("hn-etcd2", "172.31.250.254:12", 102, True, True),
        EtcdMemberStatus("hn-etcd3", "172.31.250.254:13", 103, True, False),
    ]
    output = io.StringIO()
    lab_cli.print_status(etcd_lab(tmp_path), _status(healthy), Console(file=output, width=200))
    text = output.getvalue()
    assert "hn-etcd2 │ 172.31.250.254:12 │ 102 │ healthy │ leader" in text
    assert "store: etcd etcd://172.31.250.254:11," in text
    assert lab_cli.is_healthy(_status(healthy))
    one_gone = [*healthy[:2], EtcdMemberStatus("hn-etcd3", "172.31.250.254:13", None, False, False)]
    output = io.StringIO()
    lab_cli.print_status(etcd_lab(tmp_path), _status(one_gone), Console(file=output, width=200))
    assert "hn-etcd3 │ 172.31.250.254:13 │ -   │ GONE" in output.getvalue()
    assert not lab_cli.is_healthy(_status(one_gone))
    assert not lab_cli.is_healthy(_status([], problem="no etcd cluster recorded under ..."))


@pytest.mark.parametrize("bad", ["localhost", "127.0.0.1:2379", "::1", "", 7])
def test_client_host_must_be_an_ipv4_address(bad: object) -> None:
    with pytest.raises(EtcdLabError, match="client_host"):
        check_client_host(bad)
    assert check_client_host("172.31.250.254") == "172.31.250.254"


def test_cluster_refuses_a_client_host_it_cannot_listen_on(tmp_path: Path) -> None:
    # Any executable passes the binary check; the refusal comes before anything is started.
    with pytest.raises(EtcdLabError, match=r"client_host '192\.0\.2\.77': cannot listen there"):
        start_cluster(tmp_path, client_host="192.0.2.77", binary=Path(sys.executable))
    assert not list((tmp_path / "etcd").glob("hn-etcd*.json"))


def test_load_names_a_missing_or_broken_description(tmp_path: Path) -> None:
    with pytest.raises(EtcdLabError, match="no etcd cluster recorded"):
        EtcdCluster.load(tmp_path)
    (tmp_path / "etcd").mkdir()
    (tmp_path / "etcd" / "cluster.json").write_text('{"members": "nope"}')
    with pytest.raises(EtcdLabError, match="not an etcd cluster description"):
        EtcdCluster.load(tmp_path)


def test_load_reads_members_and_finds_none_running(tmp_path: Path) -> None:
    directory = tmp_path / "etcd"
    directory.mkdir()
    description = {
        "token": "hn-etcd-test",
        "binary": "/usr/bin/etcd",
        "heartbeat_ms": 50,
        "election_ms": 500,
        "client_host": "172.31.250.254",
        "members": [
            {"name": f"hn-etcd{n}", "client_port": 20000 + n, "peer_port": 21000 + n}
            for n in (1, 2, 3)
        ],
    }
    (directory / "cluster.json").write_text(json.dumps(description))
    # A stale record: PID 1 is not the etcd it names (start time and command line differ).
    (directory / "hn-etcd1.json").write_text(
        json.dumps({"name": "hn-etcd1", "pid": 1, "start_time": 0, "argv": ["/usr/bin/etcd"]})
    )
    cluster = EtcdCluster.load(tmp_path)
    assert cluster.url == ("etcd://172.31.250.254:20001,172.31.250.254:20002,172.31.250.254:20003")
    assert cluster.member("hn-etcd2").peer_url == "http://127.0.0.1:21002"
    assert [cluster.pid(name) for name in cluster.names()] == [None, None, None]
    with pytest.raises(EtcdLabError, match="'hn-etcd1' is not running"):
        cluster.kill("hn-etcd1")
