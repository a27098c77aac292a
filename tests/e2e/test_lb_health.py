"""End-to-end health monitoring with real probes through the overlay: the lab of
`test_lb_vip` (five hosts; member VMs m1-m3 on h1-h3 serving on 8080, clients c1/c2 on h4/h5,
VIP 10.0.1.100:80 on router r1), one `hivenet agent run` per host with its default of probing
through health namespaces (root), and a TCP health monitor (delay 1 s, timeout 1 s, 2 up,
2 down) written through the REST API.

Proven here:
- the agents build their health ports themselves (`hm.r1.<host>`, a 169.254.x.y/30 router
  port bound to a `hnhm*` veth of that host) and each member is reported online by exactly
  its two chosen probers: real TCP probes from the health namespaces crossed the router and
  the tunnels, and the members' replies came back through the router's connected routes;
- the HTTP server of one member stopped: every one of its probers reports it offline within
  delay x retries_down + 1 s (3 s), and from then on no request from either client host
  reaches it and none fails;
- a checksummed echo stream through the same VIP and pool, to another member, runs across
  the whole test (member down, member back) without a break or a corrupted byte;
- the server restarted: the probers report it online again and it takes new requests;
- the agents remove their health namespaces when they stop.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from hivenet.agent.health import HEALTH_PORT_ID_PREFIX, MEMBER_HEALTH_KIND, health_subnet
from hivenet.agent.health_ns import health_namespace_name, host_tag
from hivenet.lab.lab import Lab
from hivenet.lab.netns import NamespaceProcess
from hivenet.model.topology import TOPOLOGY_PREFIX
from hivenet.store import open_store
from hivenet.store.keys import STATE_PREFIX
from tests.e2e.common import running_lab
from tests.e2e.test_lb_vip import CLIENTS, MEMBERS, VIP, requests, scenario

pytestmark = pytest.mark.e2e

DELAY, TIMEOUT, RISE, FALL = 1, 1, 2, 2
DETECTION_LIMIT = DELAY * FALL + 1.0
WEIGHTS = {"m1": 1, "m2": 1, "m3": 1}

# One server per member VM on 8080: an HTTP GET gets the VM's name; any other stream is echoed
# back ("echo <peer>" is printed when one starts). A TCP health probe connects and closes.
MEMBER_SERVER = """
import socket, sys, threading
name = sys.argv[1]
listener = socket.create_server(("0.0.0.0", 8080), backlog=128)
print("ready", flush=True)
def serve(connection, peer):
    with connection:
        data = connection.recv(65536)
        if data.startswith(b"GET "):
            while b"\\r\\n\\r\\n" not in data:
                more = connection.recv(65536)
                if not more:
                    return
                data += more
            body = name.encode()
            connection.sendall(b"HTTP/1.0 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n" % len(body)
                               + body)
            return
        if data:
            print(f"echo {peer[0]}:{peer[1]}", flush=True)
        while data:
            connection.sendall(data)
            data = connection.recv(65536)
while True:
    connection, peer = listener.accept()
    threading.Thread(target=serve, args=(connection, peer), daemon=True).start()
"""


@pytest.fixture(scope="module")
def lab_and_servers(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Lab, dict[str, NamespaceProcess]]]:
    health_namespaces: list[str] = []
    try:
        with running_lab(scenario(), tmp_path_factory.mktemp("lbhealth"), timeout=90) as lab:
            health_namespaces.extend(expected_health_namespaces(lab))
            servers = {vm: start_member_server(lab, vm) for vm in MEMBERS}
            create_load_balancer(lab)
            yield lab, servers
    finally:
        # The agents took their health namespaces (placeholders included) away on stopping.
        left = [name for name in health_namespaces if os.path.lexists(f"/run/netns/{name}")]
        for name in left:
            Path(f"/run/netns/{name}").unlink(missing_ok=True)
        assert not left, left


def expected_health_namespaces(lab: Lab) -> list[str]:
    """The health namespace each host's agent would use for r1 (its tag hashes the host id
    and the inode of the agent's network namespace, the host namespace)."""
    names = []
    for host in lab.plan.hosts:
        inode = os.stat(f"/run/netns/{host.namespace}").st_ino
        names.append(health_namespace_name("r1", host_tag(host.name, inode)))
    return names


def start_member_server(lab: Lab, vm: str) -> NamespaceProcess:
    label = "member"
    process = lab.start_in(vm, [sys.executable, "-c", MEMBER_SERVER, vm], label=label)
    deadline = time.monotonic() + 15
    while "ready" not in lab.log_of(vm, label).read_text():
        assert process.poll() is None and time.monotonic() < deadline, f"no server in {vm}"
        time.sleep(0.05)
    return process


def create_load_balancer(lab: Lab) -> None:
    with lab.client() as client:
        client.create("load_balancer", {"id": "lb1", "router_id": "r1"})
        client.create("pool", {"id": "web", "load_balancer_id": "lb1"})
        client.create(
            "listener",
            {
                "id": "web-80",
                "load_balancer_id": "lb1",
                "vip_address": VIP,
                "protocol": "tcp",
                "protocol_port": 80,
                "default_pool_id": "web",
            },
        )
        for vm, (_host, address) in MEMBERS.items():
            client.create(
                "member",
                {
                    "id": f"web-{vm}",
                    "pool_id": "web",
                    "address": address,
                    "protocol_port": 8080,
                    "weight": WEIGHTS[vm],
                },
            )
        client.create(
            "health_monitor",
            {
                "id": "web-hm",
                "pool_id": "web",
                "type": "tcp",
                "delay": DELAY,
                "timeout": TIMEOUT,
                "max_retries": RISE,
                "max_retries_down": FALL,
            },
        )


def read_prefix(lab: Lab, prefix: str) -> dict[str, bytes]:
    async def read() -> dict[str, bytes]:
        store = open_store(lab.store_url)
        try:
            return {kv.key: kv.value for kv in (await store.range(prefix)).kvs}
        finally:
            await store.close()

    return asyncio.run(read())


def health_reports(lab: Lab) -> dict[str, dict[str, str]]:
    """member id -> host -> the status that host's agent reports (from the store)."""
    reports: dict[str, dict[str, str]] = {}
    for key, value in read_prefix(lab, STATE_PREFIX).items():
        host, kind, member_id = key[len(STATE_PREFIX) :].split("/", 2)
        if kind == MEMBER_HEALTH_KIND:
            reports.setdefault(member_id, {})[host] = json.loads(value)["status"]
    return reports


def wait_reports(lab: Lab, member_id: str, status: str, limit: float) -> float:
    """Until two hosts report `member_id` as `status` and none otherwise; seconds it took."""
    started = time.monotonic()
    while True:
        reports = health_reports(lab).get(member_id, {})
        if len(reports) == 2 and set(reports.values()) == {status}:
            return time.monotonic() - started
        assert time.monotonic() - started < limit, (
            f"{member_id}: {reports}, wanted {status}\n{agent_logs(lab)}"
        )
        time.sleep(0.05)


def agent_logs(lab: Lab, lines: int = 12) -> str:
    """The last lines of every agent's log (for a failure message)."""
    out = []
    for host in lab.plan.host_names:
        text = lab.agent_log(host).read_text(errors="replace").splitlines()
        out.append(f"--- agent {host}:\n" + "\n".join(text[-lines:]))
    return "\n".join(out)


def echo_holder(lab: Lab) -> str | None:
    holders = [vm for vm in MEMBERS if "echo " in lab.log_of(vm, "member").read_text()]
    assert len(holders) <= 1, holders
    return holders[0] if holders else None


def test_real_probes_take_a_stopped_member_out_and_back_without_breaking_streams(
    lab_and_servers: tuple[Lab, dict[str, NamespaceProcess]],
) -> None:
    lab, servers = lab_and_servers
    for vm in MEMBERS:
        wait_reports(lab, f"web-{vm}", "online", limit=20.0)

    # The health ports: one per probing host, bound there, from the router's health subnet.
    ports = [
        json.loads(value)
        for key, value in read_prefix(lab, f"{TOPOLOGY_PREFIX}port/").items()
        if key.rsplit("/", 1)[1].startswith(HEALTH_PORT_ID_PREFIX)
    ]
    probing_hosts = {host for r in health_reports(lab).values() for host in r}
    assert {p["host_id"] for p in ports} == probing_hosts, ports
    subnet = health_subnet("r1")
    for port in ports:
        assert port["id"] == f"hm.r1.{port['host_id']}" and port["device_id"] == "r1"
        assert port["interface_name"].startswith("hnhm"), port
        (address,) = port["addresses"]
        assert address.endswith("/30") and address.split("/")[0] in {str(a) for a in subnet}
    assert len({p["addresses"][0] for p in ports}) == len(ports)

    # A long-lived checksummed stream through the VIP, to whichever member Maglev picks.
    for client_vm in CLIENTS:
        requests(lab, client_vm, 6)  # warm-up: the router's neighbours get resolved
    stream = lab.echo_client("c1", VIP, 80, chunk_size=4096, chunks=320, interval=0.08, timeout=10)
    stream.wait_progress(5, timeout=15)
    holder = echo_holder(lab)
    assert holder is not None
    victim = next(vm for vm in ("m2", "m1", "m3") if vm != holder)
    victim_id = f"web-{victim}"

    # Stop the victim's server: its probers see it down within delay x retries_down + 1 s.
    stopped_at = time.monotonic()
    servers[victim].stop()
    detection = wait_reports(lab, victim_id, "offline", limit=DETECTION_LIMIT + 5)
    assert detection <= DETECTION_LIMIT, f"offline after {detection:.2f} s"
    print(f"{victim_id} reported offline by both probers {detection:.2f} s after the stop")
    time.sleep(max(0.0, stopped_at + DETECTION_LIMIT - time.monotonic()))
    for client_vm in CLIENTS:
        counts = requests(lab, client_vm, 40)
        assert counts["failed"] == 0 and counts[victim] == 0, counts
        assert sum(counts.values()) == 40

    # Back: its probers see it serve again, and it takes new requests.
    servers[victim] = start_member_server(lab, victim)
    wait_reports(lab, victim_id, "online", limit=DELAY * RISE + 6)
    total: Counter[str] = Counter()
    for client_vm in CLIENTS:
        total.update(requests(lab, client_vm, 40))
    assert total["failed"] == 0 and total[victim] > 0, total

    # The stream never broke: every chunk came back intact, from the one member it started on.
    assert len(stream.progress()) < 320, "the stream ended before the member changes were over"
    result = stream.result(timeout=60)
    assert result.echoes_match and result.bytes_sent == 4096 * 320, result
    assert result.longest_wait < 2.0, result
    assert echo_holder(lab) == holder
