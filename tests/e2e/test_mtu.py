"""End-to-end: path MTU discovery across the overlay. The VMs learn MTU 1450 by DHCP; a VM
whose interface was forced back to 1500 sends too much, and HiveNet answers with ICMP
"fragmentation needed" (mtu 1450) instead of losing the packet at the tunnel: Linux ping
reports it, the kernel caches the path MTU, tracepath finds it, and a TCP transfer between
two 1500-MTU VMs (whose big segments hit the flow the SYN installed) completes."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest

from hivenet.lab.lab import Lab
from hivenet.lab.scenario import parse_scenario
from tests.e2e.common import running_lab

pytestmark = pytest.mark.e2e

SCENARIO = """
name: mtu
hosts: [h1, h2]
networks:
  - {name: net1, subnet: 10.0.1.0/24, tenant: demo}
  - {name: net2, subnet: 10.0.2.0/24, tenant: demo}
routers:
  - name: r1
    tenant: demo
    interfaces: [{network: net1, ip: 10.0.1.1/24}, {network: net2, ip: 10.0.2.1/24}]
vms:
  - {name: vm1, host: h1, network: net1, ip: 10.0.1.10/24}
  - {name: vm2, host: h2, network: net1, ip: 10.0.1.20/24}
  - {name: vm3, host: h2, network: net2, ip: 10.0.2.30/24}
  - {name: vm4, host: h1, network: net2, ip: 10.0.2.40/24}
"""
L2_PEER, ROUTED_PEER = "10.0.1.20", "10.0.2.30"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with running_lab(parse_scenario(SCENARIO), tmp_path_factory.mktemp("mtu")) as lab:
        yield lab


def shell(lab: Lab, vm: str, command: str, *, timeout: float = 30.0) -> str:
    result = lab.run(vm, ["sh", "-c", command], timeout=timeout, check=False)
    return result.stdout + result.stderr


def force_mtu_1500(lab: Lab, vm: str) -> None:
    """Undo what DHCP said (1450)."""
    shell(lab, vm, "ip link set dev eth0 mtu 1500")
    assert "mtu 1500" in shell(lab, vm, "ip link show dev eth0")


def pipeline_drops(lab: Lab, host: str, reason: str) -> int:
    return int(lab.fresh_agent_counters(host)["pipeline"].get(f"drop.{reason}", 0))


def test_the_vms_learned_1450_by_dhcp(lab: Lab) -> None:
    for vm in ("vm1", "vm2", "vm3", "vm4"):
        assert "mtu 1450" in shell(lab, vm, "ip link show dev eth0"), vm


# Each test below talks to a destination no earlier one did: the VM's kernel caches what it
# learned per destination (a cached PMTU would make ping fail locally, or fragment for it).


def test_ping_too_big_without_df_is_dropped_and_counted(lab: Lab) -> None:
    force_mtu_1500(lab, "vm1")
    before = pipeline_drops(lab, "h1", "too_big")
    output = shell(lab, "vm1", f"ping -n -M dont -s 1472 -c 2 -i 0.2 -W 1 {L2_PEER}")
    assert "100% packet loss" in output, output
    assert pipeline_drops(lab, "h1", "too_big") > before
    # Nothing was learned from it: the route has no MTU of its own.
    assert "mtu" not in shell(lab, "vm1", f"ip route get {L2_PEER}")


@pytest.mark.parametrize("target", [L2_PEER, ROUTED_PEER], ids=["bridged", "routed"])
def test_ping_with_df_too_big_is_told_the_mtu_and_the_kernel_caches_it(
    lab: Lab, target: str
) -> None:
    force_mtu_1500(lab, "vm1")
    shell(lab, "vm1", f"ping -n -c 1 -W 2 {target}")  # warm-up: the router resolves vm3
    # Fits (1422 + 8 + 20 = 1450): answered.
    fits = shell(lab, "vm1", f"ping -n -M do -s 1422 -c 2 -i 0.2 -W 2 {target}")
    assert " 0% packet loss" in fits, fits
    # 1500 bytes with DF: the ingress agent answers "fragmentation needed, mtu 1450" (from the
    # router's address when routed, from the destination's when bridged). Linux ping prints
    # it, and refuses the next sends itself ("message too long").
    before = pipeline_drops(lab, "h1", "frag_needed")
    output = shell(lab, "vm1", f"ping -n -M do -s 1472 -c 3 -i 0.2 -W 2 {target}")
    source = "10.0.1.1" if target == ROUTED_PEER else target
    assert f"From {source} icmp_seq=1 Frag needed and DF set (mtu = 1450)" in output, output
    assert "message too long, mtu=1450" in output, output
    route = shell(lab, "vm1", f"ip route get {target}")
    assert "mtu 1450" in route, route
    assert pipeline_drops(lab, "h1", "frag_needed") > before


def test_tracepath_finds_the_path_mtu(lab: Lab) -> None:
    force_mtu_1500(lab, "vm1")
    target = "10.0.2.40"  # vm4: routed, on the same host (a local port, not a tunnel)
    output = shell(lab, "vm1", f"tracepath -n -m 5 {target}", timeout=60)
    assert re.search(r"pmtu 1450", output), output
    assert "mtu 1450" in shell(lab, "vm1", f"ip route get {target}")


def test_tcp_between_two_1500_mtu_vms_discovers_the_path_mtu(lab: Lab) -> None:
    # Both ends at 1500: each side's MSS is 1460, so the SYN's flow is small and the full-size
    # (TSO) segments after it hit that flow; the datapath sends them back to the simulation,
    # whose ICMP makes the sender's kernel shrink its segments.
    force_mtu_1500(lab, "vm2")
    force_mtu_1500(lab, "vm3")
    before = counter(lab, "h2", "datapath", "mtu_upcalls")
    started = time.monotonic()
    transfer = lab.tcp_transfer("vm2", "vm3", ROUTED_PEER, size=2 << 20)
    assert transfer.checksum_ok, transfer
    assert time.monotonic() - started < 60
    assert counter(lab, "h2", "datapath", "mtu_upcalls") > before
    assert "mtu 1450" in shell(lab, "vm2", f"ip route get {ROUTED_PEER}")


def counter(lab: Lab, host: str, section: str, name: str) -> int:
    return int(lab.fresh_agent_counters(host)[section].get(name, 0))
