"""End-to-end: a VM that floods new flows does not starve its neighbours (issue 16, "Bad
input"). On the NAT lab, vm4 (host h1, net2) sends broadcast ARP requests for random addresses
of its network and TCP SYNs to random ports of the outside world (192.0.2.2, source-NATed by
router r1: every SYN is a new connection to simulate, with a NAT binding) at a few thousand
frames a second for a few seconds, while vm1 (same host h1, net1) opens ordinary TCP
connections to vm2 (h2) and pings it. Each of vm4's frames is a new flow for h1's agent:
without a budget every one was simulated, and vm1's new flows waited behind them.

Checked: every one of vm1's connections succeeds and its setup time stays bounded (generous
bounds: a noisy shared 2-core machine; a SYN lost to the flood would cost a 1 s retransmit), no
agent dies, and h1 counts upcall-budget drops for vm4's port and none for vm1's. The measured
times are printed (`pytest -s`) for the record.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hivenet.lab.lab import Lab
from hivenet.lab.scenario import builtin_scenario
from tests.e2e.common import running_lab

pytestmark = pytest.mark.e2e

FLOOD_SECONDS = 20.0  # at most: it is stopped once the measurement is done
FLOOD_RATE = 6000  # frames per second offered (half ARP broadcasts, half SYNs)

# Raw frames out of eth0 at about RATE per second for SECONDS: ARP who-has random addresses of
# the VM's /24, and TCP SYNs from random source ports to random ports of TARGET via the gateway's MAC.
FLOODER = r"""
import os, random, signal, socket, struct, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
rate, seconds, target, gateway = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4]
def mac_of(ip):
    for line in open("/proc/net/arp").read().splitlines()[1:]:
        fields = line.split()
        if fields[0] == ip:
            return bytes.fromhex(fields[3].replace(":", ""))
    raise SystemExit(f"no ARP entry for {ip}")
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
sock.bind(("eth0", 0))
mac = bytes.fromhex(open("/sys/class/net/eth0/address").read().strip().replace(":", ""))
gw_mac = mac_of(gateway)
src_ip = None
for line in os.popen("ip -4 -o addr show dev eth0").read().split():
    if "/" in line and line[0].isdigit():
        src_ip = socket.inet_aton(line.split("/")[0])
dst_ip = socket.inet_aton(target)
def csum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF
def arp():
    tpa = src_ip[:3] + bytes([random.randint(100, 250)])
    body = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac, src_ip, bytes(6), tpa)
    return b"\xff" * 6 + mac + b"\x08\x06" + body
def syn():
    sport, dport = random.randint(1024, 65535), random.randint(1, 65535)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, random.getrandbits(32), 0, 5 << 4, 2, 64240, 0, 0)
    pseudo = src_ip + dst_ip + struct.pack("!BBH", 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", csum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, 6, 0, src_ip, dst_ip)
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    return gw_mac + mac + b"\x08\x00" + ip + tcp
sent = 0
start = time.monotonic()
tick = 0.01
try:
    while time.monotonic() - start < seconds:
        due = int((time.monotonic() - start + tick) * rate)
        while sent < due:
            try:
                sock.send(arp() if sent % 2 else syn())
            except OSError:
                pass
            sent += 1
        time.sleep(tick)
finally:
    print(f"{sent} frames in {time.monotonic() - start:.1f} s", flush=True)
"""

# COUNT TCP connections to HOST:PORT one after another, PAUSE apart: one JSON line each with
# the connect() time in ms, or the error.
CONNECTOR = r"""
import json, socket, sys, time
host, port, count, pause = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
for _ in range(count):
    started = time.perf_counter()
    try:
        socket.create_connection((host, port), timeout=5).close()
        print(json.dumps({"ms": (time.perf_counter() - started) * 1000}), flush=True)
    except OSError as error:
        print(json.dumps({"error": repr(error)}), flush=True)
    time.sleep(pause)
"""

ACCEPTOR = r"""
import socket, sys
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((sys.argv[1], int(sys.argv[2])))
server.listen(128)
print("ready", flush=True)
while True:
    server.accept()[0].close()
"""

SERVER_PORT = 8080
TARGET_IP = "10.0.1.20"  # vm2, on h2
FLOODER_VM = "vm4"  # on h1 with vm1, net2


# The agents' per-port budget, well below the default (2000/s): a NATed SYN costs the agent
# about 1 ms on this machine, so under the default the flooding port is held back by the turns
# it must give the other ports only (and its socket's overflow); this shows the budget too.
UPCALL_RATE = 100
UPCALL_BURST = 100


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with pytest.MonkeyPatch.context() as patch:  # the agents read them at start
        patch.setenv("HIVENET_UPCALL_RATE", str(UPCALL_RATE))
        patch.setenv("HIVENET_UPCALL_BURST", str(UPCALL_BURST))
        with running_lab(builtin_scenario("nat"), tmp_path_factory.mktemp("lab")) as lab:
            yield lab


def python(script: str, *args: object) -> list[str]:
    return [sys.executable, "-c", script, *(str(arg) for arg in args)]


def wait_for_line(path: Path, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} never said {text!r}: {path.read_text() if path.exists() else ''}")


def connect_times(lab: Lab, label: str, count: int, pause: float) -> list[dict[str, Any]]:
    process = lab.start_in(
        "vm1", python(CONNECTOR, TARGET_IP, SERVER_PORT, count, pause), label=label
    )
    try:
        process.popen.wait(timeout=count * (pause + 6) + 10)
    finally:
        process.stop()
    lines = lab.log_of("vm1", label).read_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def summary(results: list[dict[str, Any]]) -> str:
    times = sorted(r["ms"] for r in results if "ms" in r)
    if not times:
        return "no connection"
    p90 = times[int(len(times) * 0.9) - 1] if len(times) >= 10 else times[-1]
    return (
        f"{len(times)}/{len(results)} connected, p50 {statistics.median(times):.2f} ms, "
        f"p90 {p90:.2f} ms, max {times[-1]:.2f} ms"
    )


def budget_drops(lab: Lab, host: str, port_key: int) -> int:
    datapath = lab.fresh_agent_counters(host)["datapath"]
    return int(datapath.get(f"port.{port_key}.upcall_budget_drops", 0))


def port_key_of(lab: Lab, vm: str) -> int:
    with lab.client() as client:
        return int(client.get("port", lab.plan.vm(vm).port_id).data["tunnel_key"])


def test_a_flooding_vm_does_not_starve_its_neighbours_new_connections(lab: Lab) -> None:
    server = lab.start_in("vm2", python(ACCEPTOR, TARGET_IP, SERVER_PORT), label="hnacceptor")
    try:
        wait_for_line(lab.log_of("vm2", "hnacceptor"), "ready")
        # Warm up: ARP entries and the first flows, vm2's gateway MAC for the flooder.
        assert lab.ping("vm1", TARGET_IP, count=2).ok
        assert lab.ping(FLOODER_VM, "10.0.2.1", count=2).ok
        quiet = connect_times(lab, "hnconnq", 20, 0.05)
        assert all("ms" in r for r in quiet), quiet

        flooder = lab.start_in(
            FLOODER_VM,
            python(FLOODER, FLOOD_RATE, FLOOD_SECONDS, "192.0.2.2", "10.0.2.1"),
            label="hnflooder",
        )
        try:
            time.sleep(0.5)  # the flood is under way
            pinged = lab.ping("vm1", TARGET_IP, count=10, interval=0.05, wait=2.0)
            flooded = connect_times(lab, "hnconnf", 30, 0.05)
            flood_lasted = flooder.poll() is None
        finally:
            flooder.stop()
        sent = lab.log_of(FLOODER_VM, "hnflooder").read_text().strip()
    finally:
        server.stop()
    print(
        f"\nflood: {sent} from {FLOODER_VM}; vm1 -> vm2 TCP setup quiet: "
        f"{summary(quiet)}; under flood: {summary(flooded)}; ping under flood: "
        f"{pinged.received}/{pinged.sent}, rtts {pinged.rtts_ms}"
    )
    drops_flooder = budget_drops(lab, "h1", port_key_of(lab, FLOODER_VM))
    drops_vm1 = budget_drops(lab, "h1", port_key_of(lab, "vm1"))
    print(f"h1 upcall budget drops: {FLOODER_VM} {drops_flooder}, vm1 {drops_vm1}")
    datapath = lab.fresh_agent_counters("h1")["datapath"]
    flooder_key = port_key_of(lab, FLOODER_VM)
    print(
        f"h1: {FLOODER_VM} frames read {datapath[f'port.{flooder_key}.rx_packets']}, "
        f"dropped by its socket {datapath[f'port.{flooder_key}.rx_kernel_drops']}; "
        f"upcalls {datapath['upcalls']}"
    )
    assert flood_lasted, "the flood ended before the measurement did"
    assert all(process.running for process in lab.status().processes), lab.status()
    assert all("ms" in r for r in flooded), flooded
    times = sorted(r["ms"] for r in flooded)
    # Bounds for a loaded shared machine: a SYN lost or queued behind the flood shows as a
    # 1 s retransmit, far above both.
    assert statistics.median(times) < 100, summary(flooded)
    assert times[-1] < 900, summary(flooded)
    # Ping replies to a 2 s wait: one may be lost to a scheduling hiccup, not several.
    assert pinged.received >= pinged.sent - 1, pinged.output
    assert drops_flooder > 0
    assert drops_vm1 == 0
