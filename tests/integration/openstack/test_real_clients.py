"""The real OpenStack clients against a running `hivenet serve`: the `openstack` CLI
(python-openstackclient + python-octaviaclient) and `openstack.connect(...)` (openstacksdk),
through a generated clouds.yaml with `auth_type: none` and endpoint overrides."""

from __future__ import annotations

from collections.abc import Iterator

import openstack
import pytest

from tests.integration.openstack.served import (
    NOAUTH_PROJECT,
    ROOT_CLOUD,
    VERSIONED_CLOUD,
    Served,
    serve,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serve(tmp_path_factory.mktemp("hn-openstack")) as running:
        yield running


def test_cli_network_port_router_security_group(served: Served) -> None:
    network = served.cli("network", "create", "cli-net", "-f", "json")
    assert network["name"] == "cli-net" and network["project_id"] == NOAUTH_PROJECT
    # Both endpoint override forms discover the API.
    for cloud in (ROOT_CLOUD, VERSIONED_CLOUD):
        listed = served.cli("network", "list", "-f", "json", cloud=cloud)
        assert "cli-net" in {n["Name"] for n in listed}
    shown = served.cli("network", "show", "cli-net", "-f", "json")
    assert shown["id"] == network["id"] and shown["mtu"] == 1450

    port = served.cli("port", "create", "--network", "cli-net", "cli-port", "-f", "json")
    assert port["network_id"] == network["id"] and port["status"] == "DOWN"
    ports = served.cli("port", "list", "--network", "cli-net", "-f", "json")
    assert [p["ID"] for p in ports] == [port["id"]]

    router = served.cli("router", "create", "cli-router", "-f", "json")
    assert served.cli("router", "show", "cli-router", "-f", "json")["id"] == router["id"]

    rule = served.cli(
        "security", "group", "rule", "create", "default", "--protocol", "tcp", "--dst-port", "22",
        "-f", "json",
    )  # fmt: skip
    assert (rule["protocol"], rule["port_range_min"], rule["port_range_max"]) == ("tcp", 22, 22)
    rules = served.cli("security", "group", "rule", "list", "default", "-f", "json")
    assert rule["id"] in {r["ID"] for r in rules}

    served.cli("security", "group", "rule", "delete", rule["id"])
    served.cli("port", "delete", "cli-port")
    served.cli("router", "delete", "cli-router")
    served.cli("network", "delete", "cli-net")
    assert "cli-net" not in {n["Name"] for n in served.cli("network", "list", "-f", "json")}
    missing = served.cli("network", "show", "cli-net", check=False)
    assert missing.returncode != 0


def test_sdk_find_and_paging(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(served.clouds_yaml))
    conn = openstack.connect(cloud=ROOT_CLOUD)
    try:
        names = [f"sdk-net-{i}" for i in range(5)]
        for name in names:
            conn.network.create_network(name=name)
        found = conn.network.find_network("sdk-net-3")
        assert found is not None and found.name == "sdk-net-3"
        assert conn.network.find_network("no-such-net") is None
        paged = [n.name for n in conn.network.networks(limit=2, sort_key="name") if n.name in names]
        assert paged == names
        port = conn.network.create_port(network_id=found.id, name="sdk-port")
        assert conn.network.get_port(port.id).network_id == found.id
        group = conn.network.find_security_group("default")
        assert group is not None and len(group.security_group_rules) == 4
        conn.network.delete_port(port.id)
        for name in names:
            conn.network.delete_network(conn.network.find_network(name))
        assert conn.network.find_network("sdk-net-0") is None
    finally:
        conn.close()
