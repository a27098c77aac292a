"""End-to-end observability on the built-in `nat` lab (3 hosts, SNAT of net1 to 192.0.2.1 via
the uplink on h3, floating IPs on net2) plus a load balancer on r1 (VIP 10.0.1.100:80 in
net1, HTTP members vm3 and vm4 on net2), real agents on the userspace datapath:

- `hivenet trace` (API and through the port's agent) through SNAT to the outside and
  through the LB VIP (DNAT to a member), with the egress host and tunnel key;
- a live trace of a real HTTP request to the VIP records its path and the installed flow;
- every agent's Prometheus endpoint (scraped inside its host namespace and parsed by the
  Prometheus client's parser) and `GET /v1/ports/{id}/stats` count the real traffic;
- the topology page in headless chromium shows the lab's devices and draws a trace's path.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hivenet.lab.cleanup import clean
from hivenet.lab.lab import Lab
from hivenet.lab.netns import LabScope, list_links, list_namespaces
from hivenet.lab.plan import vm_port_id
from hivenet.lab.scenario import builtin_scenario
from tests.e2e.common import lab_datapath

pytestmark = pytest.mark.e2e

VIP = "10.0.1.100"
MEMBERS = {"vm3": "10.0.2.20", "vm4": "10.0.2.10"}
OUTSIDE_IP = "192.0.2.2"
SNAT_IP = "192.0.2.1"
HTTP_GET = """
import sys, urllib.request
ok = 0
for _ in range(int(sys.argv[2])):
    try:
        with urllib.request.urlopen(f"http://{sys.argv[1]}/who", timeout=3) as answer:
            ok += answer.status == 200
    except OSError:
        pass
print(ok)
"""
SCRAPE = """
import sys, urllib.request
print(urllib.request.urlopen("http://127.0.0.1:9464/metrics", timeout=5).read().decode())
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.skip("e2e: needs root (network namespaces, veth)")
    scope = LabScope.unique()
    root = tmp_path_factory.mktemp("observelab")
    state_dir = root / "state"
    lab = Lab(builtin_scenario("nat"), state_dir=state_dir, scope=scope, datapath=lab_datapath())
    try:
        lab.up(timeout=90)
        for vm in MEMBERS:
            site = root / f"site-{vm}"
            site.mkdir()
            (site / "who").write_text(vm)
            lab.start_in(
                vm,
                [sys.executable, "-m", "http.server", "8080", "--directory", str(site)],
                label="http",
            )
        for vm in MEMBERS:
            deadline = time.monotonic() + 15
            while lab.tcp_probe(vm, "127.0.0.1", 8080, timeout=1.0) != "connected":
                assert time.monotonic() < deadline, f"no HTTP server in {vm}"
                time.sleep(0.2)
        with lab.client() as client:
            client.create("load_balancer", {"id": "lb1", "router_id": "r1", "tenant_id": "demo"})
            client.create("pool", {"id": "web", "load_balancer_id": "lb1", "tenant_id": "demo"})
            client.create(
                "listener",
                {
                    "id": "web-80",
                    "load_balancer_id": "lb1",
                    "vip_address": VIP,
                    "protocol": "tcp",
                    "protocol_port": 80,
                    "default_pool_id": "web",
                    "tenant_id": "demo",
                },
            )
            for vm, address in MEMBERS.items():
                client.create(
                    "member",
                    {
                        "id": f"web-{vm}",
                        "pool_id": "web",
                        "address": address,
                        "protocol_port": 8080,
                        "tenant_id": "demo",
                    },
                )
        # Real traffic first, so the router has resolved the outside and the members (a
        # trace before that shows the router asking: neighbour_unresolved, as it should).
        for _ in range(5):
            if lab.ping("vm1", OUTSIDE_IP, count=1, wait=0.5).ok:
                break
        warm = http_ok(lab, "vm1", VIP, 6)
        assert warm >= 4, warm
        # Maglev may have sent all of those to one member: resolve r1's neighbour entry of
        # each member, and wait until the API and h1's agent both see it, so a trace to
        # either member does not stop at neighbour_unresolved.
        deadline = time.monotonic() + 30
        for address in MEMBERS.values():
            for via in ("api", "agent"):
                while True:
                    body = trace(
                        lab, from_port=vm_port_id("vm1"), ip_dst=address, dst_port=8080, via=via
                    )
                    if body["drop_reason"] is None:
                        break
                    assert time.monotonic() < deadline, body
                    lab.ping("vm1", address, count=1, wait=0.5)
        yield lab
    finally:
        failures = lab.down()
        leftovers = clean(scope.tag, directory=state_dir)
        assert not failures, failures
        assert leftovers.is_empty(), leftovers
        assert not list_namespaces(scope.namespace_prefix)
        assert not list_links(scope.link_prefix)


def trace(lab: Lab, **request: Any) -> dict[str, Any]:
    with lab.client() as client:
        return client.trace(request)


def http_ok(lab: Lab, vm: str, target: str, count: int) -> int:
    result = lab.run(vm, [sys.executable, "-c", HTTP_GET, target, str(count)], timeout=120)
    return int(result.stdout.strip() or 0)


@pytest.mark.parametrize("via", ["api", "agent"])
def test_trace_through_snat_to_the_outside(lab: Lab, via: str) -> None:
    body = trace(lab, from_port=vm_port_id("vm1"), ip_dst=OUTSIDE_IP, dst_port=80, via=via)
    assert body["simulated_by"] == via and body["drop_reason"] is None, body
    details = " ".join(step["detail"] for step in body["steps"]).lower()
    assert "snat" in details
    assert any(action == f"set ip_src={SNAT_IP}" for action in body["actions"]), body["actions"]
    (egress,) = body["egress"]
    assert egress["port_id"] == "ext.r1" and egress["host"] == "h3"
    assert egress["remote_ip"] == lab.plan.host("h3").underlay_ip and egress["tunnel_key"] > 0
    assert body["megaflow"]["match"]["ip_dst"] == OUTSIDE_IP


@pytest.mark.parametrize("via", ["api", "agent"])
def test_trace_through_the_lb_vip(lab: Lab, via: str) -> None:
    body = trace(lab, from_port=vm_port_id("vm1"), ip_dst=VIP, dst_port=80, via=via)
    assert body["drop_reason"] is None, body
    (egress,) = body["egress"]
    member_vm = {vm_port_id(vm): vm for vm in MEMBERS}[egress["port_id"]]
    assert egress["host"] == lab.plan.vm(member_vm).host
    assert f"set ip_dst={MEMBERS[member_vm]}" in body["actions"]
    assert "set tp_dst=8080" in body["actions"]
    assert "lb-pool:web" in body["tags"]


def test_live_trace_of_a_real_request_to_the_vip(lab: Lab) -> None:
    with lab.client() as client:
        armed = client.live_trace(
            {"port": vm_port_id("vm1"), "count": 1, "ttl": 60,
             "match": {"ip_dst": VIP, "proto": "tcp", "tp_dst": "80"}}
        )  # fmt: skip
        assert armed["host"] == "h1"
        # The agent arms the trace when the request reaches it through the store watch:
        # requests (each a new connection, so an upcall) until one was recorded.
        deadline = time.monotonic() + 20
        while True:
            assert http_ok(lab, "vm1", VIP, 1) == 1
            result = client.get_live_trace(armed["id"])
            if result["status"] == "done":
                break
            assert time.monotonic() < deadline, result
            time.sleep(0.3)
    assert len(result["records"]) == 1, result
    (record,) = result["records"]
    assert record["packet"]["ip_dst"] == VIP and record["packet"]["tp_dst"] == "80"
    (egress,) = record["egress"]
    assert egress["port_id"] in {vm_port_id(vm) for vm in MEMBERS}
    assert record["flow"]["installed"] in (True, False)  # reported either way
    assert record["simulated_by"] == "agent" and record["flow_state"] == "live"


def metric_value(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"no sample {name} {labels}")


def test_prometheus_on_every_agent_and_port_stats(lab: Lab) -> None:
    assert http_ok(lab, "vm1", VIP, 5) == 5
    port = vm_port_id("vm1")
    deadline = time.monotonic() + 15
    while True:
        with lab.client() as client:
            stats = client.object_stats("port", port)
        if stats["rx_packets"] > 0:
            break
        assert time.monotonic() < deadline, stats
        time.sleep(0.5)
    # Counted at h1 (rx: vm1's packets enter there) and where the replies enter (tx to vm1).
    assert "h1" in stats["hosts"] and stats["tx_packets"] > 0
    for host in lab.plan.host_names:
        scraped = lab.run(host, [sys.executable, "-c", SCRAPE], timeout=30).stdout
        assert metric_value(scraped, "hivenet_bound_ports", host=host) >= 0
        if host == "h1":
            assert (
                metric_value(scraped, "hivenet_port_rx_packets_total", port=port, tenant="demo") > 0
            )
            assert metric_value(scraped, "hivenet_upcalls_total", host=host) > 0


def test_topology_page_in_chromium_draws_a_trace(lab: Lab, tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    request = {"from_port": vm_port_id("vm1"), "ip_dst": VIP, "dst_port": 80}
    fragment = urllib.parse.urlencode({"token": lab.token(), "trace": json.dumps(request)})
    url = f"{lab.api_url}/ui#{fragment}"
    profile = tmp_path / "profile"
    common = [chromium, "--headless", "--no-sandbox", "--disable-gpu",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--no-first-run", f"--user-data-dir={profile}", "--virtual-time-budget=8000",
              "--window-size=1280,800"]  # fmt: skip
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert 'data-loaded="true"' in dom.stdout, dom.stderr[-2000:]
    assert 'data-trace="forwarded"' in dom.stdout
    for device, kind in (("r1", "router"), ("net1", "bridge"), (vm_port_id("vm1"), "vm")):
        assert re.search(rf'data-id="{re.escape(device)}" data-kind="{kind}"', dom.stdout), device
    on_path = {
        re.search(r'data-id="([^"]+)"', item).group(1)  # type: ignore[union-attr]
        for item in re.findall(r"<li [^>]*>", dom.stdout)
        if 'class="on-path"' in item
    }
    assert {vm_port_id("vm1"), "r1"} <= on_path
    assert on_path & {vm_port_id(vm) for vm in MEMBERS}
    screenshot = tmp_path / "lab-ui-trace.png"
    subprocess.run([*common, f"--screenshot={screenshot}", url], capture_output=True, timeout=120)
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
