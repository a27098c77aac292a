"""End-to-end: lab VMs configure themselves by DHCP, answered by their host's agent (no DHCP
server process anywhere): busybox udhcpc and ISC dhclient get address, router, MTU, name
servers and static routes, renew, follow an address change made through the API; a VM
blasting malformed DHCP gets it counted and dropped while DHCP keeps working."""

from __future__ import annotations

import ipaddress
import os
import signal
import time
from collections.abc import Iterator

import pytest

from hivenet.lab import dhcpclient
from hivenet.lab.lab import DHCP_LABEL, Lab
from hivenet.lab.netns import pid_file_path
from hivenet.lab.processes import read_record
from hivenet.lab.scenario import parse_scenario
from tests.e2e.common import running_lab, wait_applied

pytestmark = pytest.mark.e2e

SCENARIO = """
name: dhcp
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
  - {name: vm3, host: h2, network: net1, ip: 10.0.1.30/24, dhcp: false}
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with running_lab(parse_scenario(SCENARIO), tmp_path_factory.mktemp("dhcp")) as lab:
        yield lab


def shell(lab: Lab, vm: str, command: str) -> str:
    return lab.run(vm, ["sh", "-c", command]).stdout


def lease_of(lab: Lab, vm: str) -> dhcpclient.Lease:
    lease = dhcpclient.read_lease(lab.dhcp_files(lab.plan.vm(vm)))
    assert lease is not None, f"{vm} has no lease"
    return lease


def wait_for(check: object, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def renew(lab: Lab, vm: str) -> None:
    """udhcpc renews on SIGUSR1; dhclient is restarted (INIT-REBOOT asks for its address)."""
    plan = lab.plan.vm(vm)
    if plan.dhcp_client == dhcpclient.UDHCPC:
        record = read_record(pid_file_path(plan.namespace, DHCP_LABEL, lab.state_dir))
        assert record is not None and record.is_running()
        os.kill(record.pid, signal.SIGUSR1)
    else:
        lab.stop_dhcp_client(plan)
        lab.start_dhcp_client(plan)


def test_vms_boot_by_dhcp_with_address_router_and_mtu(lab: Lab) -> None:
    for vm, address in (("vm1", "10.0.1.10/24"), ("vm2", "10.0.1.20/24")):
        assert f"inet {address}" in shell(lab, vm, "ip -4 -o addr show dev eth0")
        # The veth started at 1500: 1450 came from DHCP option 26.
        assert shell(lab, vm, "cat /sys/class/net/eth0/mtu").strip() == "1450"
        assert "default via 10.0.1.1 dev eth0" in shell(lab, vm, "ip -4 route")
        lease = lease_of(lab, vm)
        assert lease.mtu == 1450 and [str(r) for r in lease.routers] == ["10.0.1.1"]
        assert lease.server == "10.0.1.1" and lease.lease_time == 86400
    assert not dhcpclient.read_events(lab.dhcp_files(lab.plan.vm("vm3")))  # pinned, no client
    for source, target in (("vm1", "10.0.1.20"), ("vm1", "10.0.1.30"), ("vm2", "10.0.1.10")):
        assert lab.ping(source, target, count=3).received >= 2


def test_name_servers_and_static_routes_arrive_on_renewal(lab: Lab) -> None:
    with lab.client() as client:
        written = client.update(
            "subnet",
            "subnet.net1",
            {
                "dns_nameservers": ["10.0.1.53"],
                "host_routes": [{"destination": "192.168.0.0/16", "nexthop": "10.0.1.1"}],
                "domain_name": "lab.example",
            },
        )
    assert written.revision is not None
    for vm in ("vm1", "vm2"):
        lab.wait_agent_revision(lab.plan.vm(vm).host, written.revision)
        renew(lab, vm)
        wait_for(lambda vm=vm: lease_of(lab, vm).dns, f"{vm}'s renewed lease")  # type: ignore[misc]
        lease = lease_of(lab, vm)
        assert [str(s) for s in lease.dns] == ["10.0.1.53"] and lease.domain == "lab.example"
        routes = {(str(d), str(g)) for d, g in lease.routes}
        # Option 121 carries the default route too (a client that takes it ignores option 3).
        # And the route to the metadata service (the lab's agents run it).
        assert routes == {
            ("192.168.0.0/16", "10.0.1.1"),
            ("169.254.169.254/32", "10.0.1.1"),
            ("0.0.0.0/0", "10.0.1.1"),
        }
        table = shell(lab, vm, "ip -4 route")
        assert "192.168.0.0/16 via 10.0.1.1 dev eth0" in table
        assert "default via 10.0.1.1 dev eth0" in table
    assert "renew 10.0.1.10" in dhcpclient.read_events(lab.dhcp_files(lab.plan.vm("vm1")))


def test_malformed_dhcp_is_counted_and_dropped_and_dhcp_still_works(lab: Lab) -> None:
    blast = (
        "import os, socket\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)\n"
        "for n in range(200):\n"
        "    s.sendto(os.urandom(n % 300), ('255.255.255.255', 67))\n"
    )
    lab.run("vm3", ["python3", "-c", blast])
    counters = lab.fresh_agent_counters("h2")
    pipeline = counters["pipeline"]
    assert pipeline.get("drop.dhcp_malformed", 0) + pipeline.get("drop.dhcp_over_budget", 0) > 0
    assert pipeline.get("drop.dhcp_over_budget", 0) > 0  # a flood from one port is capped
    # The agent is fine and still answers: vm2 (same host) renews.
    renew(lab, "vm2")
    wait_for(
        lambda: dhcpclient.read_events(lab.dhcp_files(lab.plan.vm("vm2")))[-1].startswith("reboot"),
        "vm2's reboot",
    )


def test_an_address_change_reaches_the_vm_at_its_next_renewal(lab: Lab) -> None:
    with lab.client() as client:
        port = client.get("port", lab.plan.vm("vm1").port_id).data
        written = client.update(
            "port",
            port["id"],
            {"fixed_ips": [{"subnet_id": "subnet.net1", "ip_address": "10.0.1.77"}]},
        )
    # Renew only once vm1's agent has the new address: otherwise the renewal can race the
    # watch, get an ACK for the old address, and the next renewal is hours away.
    wait_applied(lab, written, ("h1",))
    renew(lab, "vm1")  # NAK for 10.0.1.10, then DISCOVER -> OFFER 10.0.1.77
    wait_for(
        lambda: lease_of(lab, "vm1").address == ipaddress.IPv4Interface("10.0.1.77/24"),
        "vm1's new address",
    )
    assert "nak" in dhcpclient.read_events(lab.dhcp_files(lab.plan.vm("vm1")))
    assert "inet 10.0.1.77/24" in shell(lab, "vm1", "ip -4 -o addr show dev eth0")
    assert lab.ping("vm2", "10.0.1.77", count=3).received >= 2
