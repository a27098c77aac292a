"""End-to-end: two tenants with the same subnet (10.0.1.0/24, even the same VM addresses) on
the same two hosts never see each other's packets. Each VM's eth0 is captured while the other
tenant talks (ARP broadcasts included); the captures must hold nothing of the other tenant."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from hivenet.lab.lab import Lab
from hivenet.lab.scenario import parse_scenario
from hivenet.model.types import mac_to_int
from hivenet.packets import extract_flow_match
from tests.e2e.common import running_lab

pytestmark = pytest.mark.e2e

TWO_TENANTS = """
name: two-tenants
hosts: [h1, h2]
networks:
  - {name: blue, subnet: 10.0.1.0/24, tenant: blue}
  - {name: green, subnet: 10.0.1.0/24, tenant: green}
vms:
  - {name: blue1, host: h1, network: blue, ip: 10.0.1.10/24, mac: "02:00:00:0b:00:0a"}
  - {name: blue2, host: h2, network: blue, ip: 10.0.1.11/24, mac: "02:00:00:0b:00:0b"}
  - {name: green1, host: h1, network: green, ip: 10.0.1.10/24, mac: "02:00:00:0c:00:0a"}
  - {name: green2, host: h2, network: green, ip: 10.0.1.11/24, mac: "02:00:00:0c:00:0b"}
"""
TENANTS = {"blue": ("blue1", "blue2"), "green": ("green1", "green2")}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with running_lab(parse_scenario(TWO_TENANTS), tmp_path_factory.mktemp("tenants")) as lab:
        yield lab


@pytest.mark.parametrize(("talking", "listening"), [("blue", "green"), ("green", "blue")])
def test_overlapping_tenants_never_see_each_others_packets(
    lab: Lab, talking: str, listening: str
) -> None:
    first, second = TENANTS[talking]
    talker_macs = {mac_to_int(lab.mac_of(vm)) for vm in TENANTS[talking]}
    for vm in TENANTS[talking]:  # so the conversation starts with broadcast ARP requests
        lab.run(vm, ["ip", "neigh", "flush", "dev", "eth0"])
    captures = {vm: lab.capture(vm, 2.0, label=f"cap{vm}") for vm in TENANTS[listening]}
    result = lab.ping(first, "10.0.1.11", count=5, interval=0.05)
    back = lab.ping(second, "10.0.1.10", count=5, interval=0.05)
    assert result.ok, result.output
    assert back.ok, back.output
    for vm, capture in captures.items():
        leaked = [
            frame
            for frame in capture.frames()
            if extract_flow_match(frame, 0).eth_src in talker_macs
            or extract_flow_match(frame, 0).arp_sha in talker_macs
        ]
        assert leaked == [], f"{vm} ({listening}) saw {talking}'s frames"
    # The replies came from the talker's own tenant: its peer's MAC answered.
    neighbours = lab.run(first, ["ip", "neigh", "show", "10.0.1.11"]).stdout
    assert lab.mac_of(second) in neighbours, neighbours
