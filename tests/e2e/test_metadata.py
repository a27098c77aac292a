"""End-to-end: lab VMs read their own metadata from http://169.254.169.254/, answered by
their host's agent (no metadata server per network, nothing crosses the underlay): with
curl and busybox wget, in the OpenStack and EC2 layouts, after a change made through the
API, through the router's gateway or on-link (ARP answered by the agent); a source address
that is not the VM's own gets nothing."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest

from hivenet.lab.lab import Lab
from hivenet.lab.scenario import parse_scenario
from tests.e2e.common import running_lab, wait_applied

pytestmark = pytest.mark.e2e

SCENARIO = """
name: metadata
hosts: [h1, h2]
networks:
  - {name: net1, subnet: 10.0.1.0/24, tenant: demo}
routers:
  - name: r1
    tenant: demo
    interfaces: [{network: net1, ip: 10.0.1.1/24}]
vms:
  - {name: vm1, host: h1, network: net1, ip: 10.0.1.10/24}
  - {name: vm2, host: h2, network: net1, ip: 10.0.1.20/24, dhcp_client: dhclient}
"""
BASE = "http://169.254.169.254"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHiveNetLabKey alice@lab"
USER_DATA = "#cloud-config\nhostname: web-1\n"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with running_lab(parse_scenario(SCENARIO), tmp_path_factory.mktemp("metadata")) as lab:
        yield lab


def curl(lab: Lab, vm: str, path: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return lab.run(
        vm,
        ["curl", "-sS", "--max-time", "10", "--retry", "2", *extra, f"{BASE}{path}"],
        check=False,
    )


def test_each_vm_reads_its_own_documents(lab: Lab) -> None:
    for vm in ("vm1", "vm2"):
        port_id = lab.plan.vm(vm).port_id
        result = curl(lab, vm, "/openstack/latest/meta_data.json")
        assert result.returncode == 0, result.stderr
        meta = json.loads(result.stdout)
        assert meta["uuid"] == port_id and meta["hostname"]
        assert curl(lab, vm, "/latest/meta-data/instance-id").stdout == port_id
        network = json.loads(curl(lab, vm, "/openstack/latest/network_data.json").stdout)
        assert network["links"][0]["mtu"] == 1450
        assert network["networks"][0]["ip_address"] == lab.plan.vm(vm).ip.split("/")[0]
    # busybox wget, the other client a small image carries
    fetched = lab.run(
        "vm1", ["busybox", "wget", "-q", "-O", "-", f"{BASE}/latest/meta-data/local-ipv4"]
    )
    assert fetched.stdout == "10.0.1.10"


def test_a_change_through_the_api_is_what_the_vm_reads_next(lab: Lab) -> None:
    port_id = lab.plan.vm("vm1").port_id
    with lab.client() as client:
        written = client.update(
            "port",
            port_id,
            {
                "metadata": {
                    "instance_id": "i-web-1",
                    "hostname": "web-1",
                    "public_keys": {"alice": KEY},
                    "user_data": USER_DATA,
                }
            },
        )
    wait_applied(lab, written, ("h1",))
    assert curl(lab, "vm1", "/latest/meta-data/instance-id").stdout == "i-web-1"
    assert curl(lab, "vm1", "/latest/meta-data/public-keys/0/openssh-key").stdout == KEY
    assert curl(lab, "vm1", "/openstack/latest/user_data").stdout == USER_DATA
    assert curl(lab, "vm1", "/latest/user-data").stdout == USER_DATA
    # vm2 still sees only its own: no user data, its own id.
    assert (
        curl(lab, "vm2", "/latest/user-data", "-o", "/dev/null", "-w", "%{http_code}").stdout
        == "404"
    )
    assert curl(lab, "vm2", "/latest/meta-data/instance-id").stdout == lab.plan.vm("vm2").port_id


def test_on_link_route_uses_the_agents_arp_answer(lab: Lab) -> None:
    """A VM whose route to the service is on-link (a subnet without a gateway) ARPs for
    169.254.169.254 itself: its host's agent answers."""
    lab.run("vm1", ["ip", "route", "replace", "169.254.169.254/32", "dev", "eth0"])
    try:
        lab.run("vm1", ["ip", "neigh", "flush", "dev", "eth0"])
        assert curl(lab, "vm1", "/latest/meta-data/local-ipv4").stdout == "10.0.1.10"
        neighbours = lab.run("vm1", ["ip", "neigh", "show", "169.254.169.254"]).stdout
        assert "fa:16:3e:a9:fe:fe" in neighbours
    finally:
        lab.run("vm1", ["ip", "route", "replace", "169.254.169.254/32", "via", "10.0.1.1"])


@pytest.mark.parametrize("port_security", [True, False])
def test_a_source_address_that_is_not_the_vms_own_gets_nothing(
    lab: Lab, port_security: bool
) -> None:
    """With port security (a VM port's default) the spoofed request stops at the port; with
    it turned off, the metadata service's own source check refuses it."""
    port_id = lab.plan.vm("vm1").port_id
    with lab.client() as client:
        client.update("port", port_id, {"port_security_enabled": port_security})
        lab.run("vm1", ["ip", "addr", "add", "10.0.1.99/32", "dev", "eth0"])
        try:
            spoofed = lab.run(
                "vm1",
                ["curl", "-sS", "--max-time", "3", "--interface", "10.0.1.99", f"{BASE}/latest/"],
                check=False,
            )
            assert spoofed.returncode != 0 and spoofed.stdout == ""
            # The VM's own address still works (its ARP for the gateway may have gone out
            # from the spoofed address and been dropped: ask again).
            lab.run("vm1", ["ip", "neigh", "flush", "dev", "eth0"])
            assert curl(lab, "vm1", "/latest/meta-data/local-ipv4").stdout == "10.0.1.10"
        finally:
            lab.run("vm1", ["ip", "addr", "del", "10.0.1.99/32", "dev", "eth0"])
            client.update("port", port_id, {"port_security_enabled": True})
