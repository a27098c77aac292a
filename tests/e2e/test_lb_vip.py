"""End-to-end load balancing in the lab: five hosts, HTTP servers (`python3 -m http.server`)
and a UDP echo service in three member VMs on h1-h3, clients on h4 and h5; the load balancer
written through the REST API; one `hivenet agent` per host on the userspace datapath.

Proven here: requests through a TCP VIP from two client hosts spread over the members by
weight and every one succeeds; a member removed through the API takes no new request and
none fails; re-added it takes requests again; a UDP VIP with source-IP persistence answers
every datagram, each client from one member. (Health monitoring with real probes, and a
long-lived connection across member changes: test_lb_health.py; more of both in the memory
tier, tests/integration/lb/.)
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest

from hivenet.api.client import HivenetClient
from hivenet.lab.lab import Lab
from hivenet.lab.scenario import Scenario, scenario_from_data
from tests.e2e.common import running_lab

pytestmark = pytest.mark.e2e

VIP = "10.0.1.100"
MEMBERS = {"m1": ("h1", "10.0.2.11"), "m2": ("h2", "10.0.2.12"), "m3": ("h3", "10.0.2.13")}
CLIENTS = {"c1": ("h4", "10.0.1.10"), "c2": ("h5", "10.0.1.11")}
WEIGHTS = {"m1": 1, "m2": 1, "m3": 2}

# Prints "<member name> <count>" per member that answered, "failed <count>" for failures.
HTTP_CLIENT = """
import collections, sys, urllib.request
counts = collections.Counter()
for _ in range(int(sys.argv[2])):
    try:
        with urllib.request.urlopen(f"http://{sys.argv[1]}/who", timeout=3) as answer:
            counts[answer.read().decode().strip()] += 1
    except OSError:
        counts["failed"] += 1
for name, count in sorted(counts.items()):
    print(name, count)
"""
UDP_ECHO_SERVER = """
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("0.0.0.0", 5353))
while True:
    data, peer = sock.recvfrom(2048)
    sock.sendto(sys.argv[1].encode() + b" " + data, peer)
"""
UDP_CLIENT = """
import collections, socket, sys
counts = collections.Counter()
for _ in range(int(sys.argv[2])):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:  # a new source port each
        sock.settimeout(2)
        for _attempt in range(3):
            sock.sendto(b"hello", (sys.argv[1], 53))
            try:
                data, peer = sock.recvfrom(2048)
            except OSError:
                continue
            counts[data.split()[0].decode() if peer[0] == sys.argv[1] else "wrong-peer"] += 1
            break
        else:
            counts["failed"] += 1
for name, count in sorted(counts.items()):
    print(name, count)
"""


def scenario() -> Scenario:
    return scenario_from_data(
        {
            "name": "lb",
            "hosts": ["h1", "h2", "h3", "h4", "h5"],
            "networks": [
                {"name": "front", "subnet": "10.0.1.0/24", "tenant": "demo"},
                {"name": "back", "subnet": "10.0.2.0/24", "tenant": "demo"},
            ],
            "routers": [
                {
                    "name": "r1",
                    "tenant": "demo",
                    "interfaces": [
                        {"network": "front", "ip": "10.0.1.1/24"},
                        {"network": "back", "ip": "10.0.2.1/24"},
                    ],
                }
            ],
            "vms": [
                *(
                    {"name": vm, "host": host, "network": "back", "ip": f"{address}/24"}
                    for vm, (host, address) in MEMBERS.items()
                ),
                *(
                    {"name": vm, "host": host, "network": "front", "ip": f"{address}/24"}
                    for vm, (host, address) in CLIENTS.items()
                ),
            ],
        }
    )


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    root = tmp_path_factory.mktemp("lblab")
    with running_lab(scenario(), root, timeout=90) as lab:
        for vm in MEMBERS:
            site = root / f"site-{vm}"
            site.mkdir()
            (site / "who").write_text(vm)
            lab.start_in(
                vm,
                [sys.executable, "-m", "http.server", "8080", "--directory", str(site)],
                label="http",
            )
            lab.start_in(vm, [sys.executable, "-c", UDP_ECHO_SERVER, vm], label="udpecho")
        for vm in MEMBERS:
            wait_for_server(lab, vm)
        create_load_balancer(lab)
        yield lab


def wait_for_server(lab: Lab, vm: str, limit: float = 15.0) -> None:
    started = time.monotonic()
    while lab.tcp_probe(vm, "127.0.0.1", 8080, timeout=1.0) != "connected":
        assert time.monotonic() - started < limit, f"no HTTP server in {vm}"
        time.sleep(0.2)


def create_load_balancer(lab: Lab) -> None:
    with lab.client() as client:
        client.create("load_balancer", {"id": "lb1", "router_id": "r1"})
        client.create("pool", {"id": "web", "load_balancer_id": "lb1"})
        client.create(
            "pool",
            {
                "id": "dns",
                "load_balancer_id": "lb1",
                "protocol": "udp",
                "session_persistence": "source_ip",
            },
        )
        for listener_id, protocol, port, pool_id in (
            ("web-80", "tcp", 80, "web"),
            ("dns-53", "udp", 53, "dns"),
        ):
            client.create(
                "listener",
                {
                    "id": listener_id,
                    "load_balancer_id": "lb1",
                    "vip_address": VIP,
                    "protocol": protocol,
                    "protocol_port": port,
                    "default_pool_id": pool_id,
                },
            )
        for vm, (_host, address) in MEMBERS.items():
            add_web_member(lab, vm, client)
            client.create(
                "member",
                {"id": f"dns-{vm}", "pool_id": "dns", "address": address, "protocol_port": 5353},
            )


def add_web_member(lab: Lab, vm: str, client: HivenetClient) -> None:
    client.create(
        "member",
        {
            "id": f"web-{vm}",
            "pool_id": "web",
            "address": MEMBERS[vm][1],
            "protocol_port": 8080,
            "weight": WEIGHTS[vm],
        },
    )


def requests(lab: Lab, client: str, count: int) -> Counter[str]:
    result = lab.run(client, [sys.executable, "-c", HTTP_CLIENT, VIP, str(count)], timeout=120)
    counts: Counter[str] = Counter()
    for line in result.stdout.split("\n"):
        if line.strip():
            name, number = line.split()
            counts[name] += int(number)
    return counts


def udp_requests(lab: Lab, client: str, count: int) -> Counter[str]:
    result = lab.run(client, [sys.executable, "-c", UDP_CLIENT, VIP, str(count)], timeout=120)
    counts: Counter[str] = Counter()
    for line in result.stdout.split("\n"):
        if line.strip():
            name, number = line.split()
            counts[name] += int(number)
    return counts


def warm_up(lab: Lab) -> None:
    """The first requests resolve the router's neighbours (the packet that finds a next hop
    unresolved is dropped while the router ARPs; TCP retransmits)."""
    for client in CLIENTS:
        requests(lab, client, 6)


def test_http_through_the_vip_spreads_by_weight_from_two_client_hosts(lab: Lab) -> None:
    warm_up(lab)
    total: Counter[str] = Counter()
    for client in CLIENTS:
        counts = requests(lab, client, 120)
        assert counts["failed"] == 0, counts
        total.update(counts)
    assert set(total) == set(MEMBERS), total
    shares = {vm: total[vm] / 240 for vm in MEMBERS}
    assert shares["m3"] > shares["m1"] and shares["m3"] > shares["m2"], total
    assert abs(shares["m3"] - 0.5) < 0.15, total


def requests_until(
    lab: Lab,
    client: str,
    done: Callable[[Counter[str]], bool],
    *,
    batch_size: int = 10,
    limit: float = 15.0,
) -> Counter[str]:
    """Batches of requests from `client` until one batch satisfies `done` (a member change
    reaches every agent through the store watch, in its own time); all of them, summed."""
    total: Counter[str] = Counter()
    started = time.monotonic()
    while True:
        batch = requests(lab, client, batch_size)
        total.update(batch)
        if done(batch):
            return total
        assert time.monotonic() - started < limit, f"not in effect after {limit} s: {total}"


def test_removed_member_takes_no_new_request_and_none_fails_then_comes_back(lab: Lab) -> None:
    warm_up(lab)
    with lab.client() as client:
        client.delete("member", "web-m2")
        deleted_at = client.health()["revision"]
    for client_vm in CLIENTS:
        # While the removal propagates m2 still answers; no request may fail meanwhile.
        # A batch of 30 without m2 (1 in 5,000 by chance at its weight) marks it gone.
        settling = requests_until(lab, client_vm, lambda b: b["m2"] == 0, batch_size=30)
        assert settling["failed"] == 0, settling
        # Gone for certain once the client's agent applied the delete (not by chance).
        lab.wait_agent_revision(CLIENTS[client_vm][0], deleted_at)
        counts = requests(lab, client_vm, 60)
        assert counts["failed"] == 0 and counts["m2"] == 0, counts
    with lab.client() as client:
        add_web_member(lab, "m2", client)
    counts = requests_until(lab, "c2", lambda batch: batch["m2"] > 0)
    assert counts["failed"] == 0 and counts["m2"] > 0, counts


def test_udp_vip_answers_every_datagram_with_source_ip_persistence(lab: Lab) -> None:
    warm_up(lab)
    for client in CLIENTS:
        counts = udp_requests(lab, client, 30)
        assert counts["failed"] == 0 and counts["wrong-peer"] == 0, counts
        assert len(counts) == 1 and next(iter(counts)) in MEMBERS, counts
