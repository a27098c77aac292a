"""The real OpenStack clients against a running `hivenet serve`: the `openstack` CLI
(python-openstackclient + python-octaviaclient) and `openstack.connect(...)` (openstacksdk),
through a generated clouds.yaml with `auth_type: none` and endpoint overrides."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
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


def test_cli_the_issue_scenario(served: Served) -> None:
    """Every command of the scenario exits 0 and reads back what it set; then every object is
    listed, shown and deleted with the CLI."""
    cli = served.cli
    host = httpx.post(
        f"{served.base_url}/v1/hosts",
        json={"id": "hv1"},
        headers={"Authorization": f"Bearer {served.admin_token}"},
    )
    assert host.status_code == 201, host.text
    public = cli("network", "create", "--external", "public", "-f", "json")
    assert public["router:external"] is True
    public_subnet = cli(
        "subnet", "create", "--network", "public", "--subnet-range", "203.0.113.0/24",
        "--allocation-pool", "start=203.0.113.10,end=203.0.113.99", "public-subnet",
        "-f", "json",
    )  # fmt: skip
    network = cli("network", "create", "tenant", "-f", "json")
    subnet = cli(
        "subnet", "create", "--network", "tenant", "--subnet-range", "10.20.0.0/24",
        "--allocation-pool", "start=10.20.0.100,end=10.20.0.200",
        "--dns-nameserver", "192.0.2.53", "tenant-subnet", "-f", "json",
    )  # fmt: skip
    assert subnet["allocation_pools"] == [{"start": "10.20.0.100", "end": "10.20.0.200"}]
    assert subnet["dns_nameservers"] == ["192.0.2.53"] and subnet["gateway_ip"] == "10.20.0.1"
    port = cli(
        "port", "create", "--network", "tenant", "--fixed-ip",
        "subnet=tenant-subnet,ip-address=10.20.0.150", "--host", "hv1", "vm1-port",
        "-f", "json",
    )  # fmt: skip
    assert port.get("binding_host_id", port.get("binding:host_id")) == "hv1"
    assert port["status"] == "DOWN"  # until hv1's agent binds tap<id[:11]>
    assert port["fixed_ips"] == [{"subnet_id": subnet["id"], "ip_address": "10.20.0.150"}]
    router = cli("router", "create", "edge", "-f", "json")
    cli("router", "add", "subnet", "edge", "tenant-subnet")
    cli("router", "set", "--external-gateway", "public", "edge")
    shown = cli("router", "show", "edge", "-f", "json")
    gateway = shown["external_gateway_info"]
    assert gateway["network_id"] == public["id"] and gateway["enable_snat"] is True
    assert gateway["external_fixed_ips"][0]["subnet_id"] == public_subnet["id"]
    interfaces = cli("port", "list", "--router", "edge", "-f", "json")
    assert {p["Fixed IP Addresses"][0]["ip_address"] for p in interfaces} >= {"10.20.0.1"}

    fip = cli("floating", "ip", "create", "public", "-f", "json")
    cli("floating", "ip", "set", "--port", "vm1-port", fip["floating_ip_address"])
    fip_shown = cli("floating", "ip", "show", fip["id"], "-f", "json")
    assert fip_shown["port_id"] == port["id"] and fip_shown["fixed_ip_address"] == "10.20.0.150"
    assert fip_shown["router_id"] == router["id"]

    rule = cli(
        "security", "group", "rule", "create", "default", "--protocol", "tcp", "--dst-port",
        "22", "-f", "json",
    )  # fmt: skip
    assert rule["port_range_min"] == 22

    lb = cli(
        "loadbalancer", "create", "--vip-subnet-id", "tenant-subnet", "--name", "lb1", "-f", "json"
    )
    assert lb["vip_subnet_id"] == subnet["id"] and lb["provisioning_status"] == "ACTIVE"
    listener = cli(
        "loadbalancer", "listener", "create", "--protocol", "TCP", "--protocol-port", "80",
        "--name", "web", "lb1", "-f", "json",
    )  # fmt: skip
    assert listener["protocol_port"] == 80
    pool = cli(
        "loadbalancer", "pool", "create", "--listener", "web", "--protocol", "TCP",
        "--lb-algorithm", "SOURCE_IP_PORT", "--name", "web-pool", "-f", "json",
    )  # fmt: skip
    assert pool["lb_algorithm"] == "SOURCE_IP_PORT"
    members = [
        cli(
            "loadbalancer",
            "member",
            "create",
            "--address",
            address,
            "--protocol-port",
            "8080",
            "--subnet-id",
            "tenant-subnet",
            "--name",
            name,
            "web-pool",
            "-f",
            "json",
        )
        for name, address in (("m1", "10.20.0.11"), ("m2", "10.20.0.12"))
    ]
    monitor = cli(
        "loadbalancer", "healthmonitor", "create", "--delay", "5", "--timeout", "3",
        "--max-retries", "2", "--type", "HTTP", "--url-path", "/health", "web-pool",
        "--name", "hm", "-f", "json",
    )  # fmt: skip
    assert monitor["url_path"] == "/health"

    # list / show of everything
    assert {m["id"] for m in cli("loadbalancer", "member", "list", "web-pool", "-f", "json")} == {
        m["id"] for m in members
    }
    assert cli("loadbalancer", "show", "lb1", "-f", "json")["vip_address"] == lb["vip_address"]
    assert (
        cli("loadbalancer", "listener", "show", "web", "-f", "json")["default_pool_id"]
        == pool["id"]
    )
    assert (
        cli("loadbalancer", "pool", "show", "web-pool", "-f", "json")["healthmonitor_id"]
        == monitor["id"]
    )
    assert cli("loadbalancer", "healthmonitor", "show", "hm", "-f", "json")["type"] == "HTTP"
    assert (
        cli("loadbalancer", "member", "show", "web-pool", "m1", "-f", "json")["address"]
        == "10.20.0.11"
    )
    for command in (
        ("loadbalancer", "list"), ("loadbalancer", "listener", "list"),
        ("loadbalancer", "pool", "list"), ("loadbalancer", "healthmonitor", "list"),
        ("floating", "ip", "list"), ("router", "list"), ("subnet", "list"), ("port", "list"),
    ):  # fmt: skip
        assert cli(*command, "-f", "json"), command
    status = cli("loadbalancer", "status", "show", "lb1")
    assert status["loadbalancer"]["listeners"][0]["pools"][0]["id"] == pool["id"]
    assert "active_connections" in cli("loadbalancer", "stats", "show", "lb1", "-f", "json")
    assert cli("subnet", "show", "tenant-subnet", "-f", "json")["cidr"] == "10.20.0.0/24"

    # delete everything, in the order a user would
    cli("loadbalancer", "healthmonitor", "delete", "hm")
    for member in members:
        cli("loadbalancer", "member", "delete", "web-pool", member["id"])
    cli("loadbalancer", "pool", "delete", "web-pool")
    cli("loadbalancer", "listener", "delete", "web")
    cli("loadbalancer", "delete", "lb1")
    cli("floating", "ip", "delete", fip["id"])
    cli("security", "group", "rule", "delete", rule["id"])
    cli("router", "unset", "--external-gateway", "edge")
    cli("router", "remove", "subnet", "edge", "tenant-subnet")
    cli("router", "delete", "edge")
    cli("port", "delete", "vm1-port")
    cli("subnet", "delete", "tenant-subnet")
    cli("network", "delete", network["id"])
    cli("subnet", "delete", "public-subnet")
    cli("network", "delete", "public")
    assert cli("port", "list", "-f", "json") == []
    assert cli("loadbalancer", "list", "-f", "json") == []


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


def test_sdk_the_issue_scenario(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(served.clouds_yaml))
    conn = openstack.connect(cloud=ROOT_CLOUD)
    try:
        net = conn.network
        public = net.create_network(name="sdk-public", is_router_external=True)
        net.create_subnet(network_id=public.id, cidr="198.18.0.0/24", ip_version=4)
        tenant = net.create_network(name="sdk-tenant")
        subnet = net.create_subnet(
            name="sdk-subnet",
            network_id=tenant.id,
            cidr="10.30.0.0/24",
            ip_version=4,
            dns_nameservers=["192.0.2.53"],
        )
        assert net.find_subnet("sdk-subnet").id == subnet.id
        port = net.create_port(
            network_id=tenant.id, name="sdk-vm", fixed_ips=[{"subnet_id": subnet.id}]
        )
        assert port.fixed_ips[0]["ip_address"] == "10.30.0.2"
        router = net.create_router(
            name="sdk-router", external_gateway_info={"network_id": public.id}
        )
        net.add_interface_to_router(router, subnet_id=subnet.id)
        router = net.get_router(router.id)
        assert router.external_gateway_info["enable_snat"] is True
        fip = net.create_ip(floating_network_id=public.id)
        fip = net.update_ip(fip, port_id=port.id)
        assert fip.router_id == router.id and fip.fixed_ip_address == "10.30.0.2"
        assert net.find_security_group("default") is not None

        lbaas = conn.load_balancer
        lb = lbaas.create_load_balancer(name="sdk-lb", vip_subnet_id=subnet.id)
        assert lbaas.find_load_balancer("sdk-lb").id == lb.id
        listener = lbaas.create_listener(
            name="sdk-listener", loadbalancer_id=lb.id, protocol="TCP", protocol_port=443
        )
        pool = lbaas.create_pool(
            name="sdk-pool", listener_id=listener.id, protocol="TCP", lb_algorithm="ROUND_ROBIN"
        )
        member = lbaas.create_member(pool, address="10.30.0.40", protocol_port=8443)
        monitor = lbaas.create_health_monitor(
            pool_id=pool.id, type="TCP", delay=3, timeout=2, max_retries=3
        )
        assert lbaas.find_pool("sdk-pool").lb_algorithm == "ROUND_ROBIN"
        assert [m.id for m in lbaas.members(pool)] == [member.id]
        assert lbaas.get_health_monitor(monitor.id).pools == [{"id": pool.id}]
        stats = lbaas.get_load_balancer_statistics(lb.id)
        assert stats.active_connections == 0
        lbaas.delete_load_balancer(lb.id, cascade=True)
        assert lbaas.find_load_balancer("sdk-lb") is None

        net.delete_ip(fip)
        net.remove_interface_from_router(router, subnet_id=subnet.id)
        net.update_router(router, external_gateway_info={})
        net.delete_router(router)
        net.delete_port(port)
        net.delete_network(tenant)  # its subnet goes with it
        assert net.find_subnet("sdk-subnet") is None
    finally:
        conn.close()
