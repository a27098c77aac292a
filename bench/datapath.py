"""Benchmark: the userspace datapath against the kernel doing the same job, in the same run.

Scenarios (VMs are namespaces with veths, MTU 1450, offloads on; underlay MTU 1500):
  local   two VMs on one host:  our datapath (port -> port)   vs  a Linux bridge
  vxlan   VMs on two hosts:     our datapaths over VXLAN      vs  bridge + kernel VXLAN device
          (ours accept VXLAN only from the peer host, as agents do: `set_tunnel_peers`)
  vxlan-dnat  ours only: VM1 talks to a VIP whose address and ports every packet has rewritten
          to VM2's (and back on replies), as established load-balanced or floating-IP flows;
          its peer is the plain kernel VXLAN row
  at scale    ours only: VM1 keeps 10k UDP flows to VM2 active (--flows, --flows-rate): how
          fast the datapath takes them on (eBPF: one kernel entry per flow, derived from the
          megaflow) and the datapath process's CPU once they are all established
Metrics: single-stream TCP throughput (iperf3, else a Python socket pump) and 64-byte frame
rate (UDP with 18-byte payloads; packets per second that reach the receiver). It also samples
the CPU time the datapath process used, and with --profile runs the datapath under cProfile
once more to show where its time goes.

It also reports, per scenario, what the 64-byte senders offered (`sent kpps`: when it equals
the received rate the load generator is the limit, not the forwarder), the datapath's CPU
microseconds per forwarded 64-byte frame (less noisy than the rate on a shared machine), and
UDP round-trip p50/p99 of a new flow's first packet and of a cached one; "upcall" is the local
scenario without flows, so every frame goes through the upcall handler. An in-process
micro-benchmark of the per-frame path (fake sockets, no root) runs first (`--micro-only`); it
includes what a miss costs before any simulation: upcalled without and within the per-port
upcall budget, and dropped over it.

Needs root for the lab part. Prints tables, then exactly one JSON line. Everything it creates
is in a unique `hn` lab scope that is removed at the end (also on error or Ctrl-C).

By default both of our datapaths are measured, interleaved with the same kernel baselines in
the same run: `ebpf` (established flows in the kernel, datapath/ebpf/; the agent's default)
and `userspace`; `--datapath ebpf|userspace` measures one.

Published figures (with the date and the machine they were measured on) live in the README,
not here: this script prints only what it measured in this run, with each userspace figure
as a ratio to the kernel's in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import pstats
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hivenet.datapath._testdriver import driver_argv, read_counters, request_counters
from hivenet.datapath.ebpf._testdriver import argv as ebpf_driver_argv
from hivenet.lab.cleanup import clean
from hivenet.lab.netns import (
    LabScope,
    NamespaceProcess,
    add_host,
    add_underlay,
    add_vm,
    attach_to_bridge,
    create_bridge,
    create_vxlan,
    run_in_namespace,
    start_in_namespace,
)
from hivenet.model.types import mac_to_int

VM1_MAC, VM2_MAC = "02:00:00:00:02:01", "02:00:00:00:02:02"
VM1_IP, VM2_IP = "10.0.9.1", "10.0.9.2"
SMALL_UDP_PAYLOAD = 18  # 14 Ethernet + 20 IPv4 + 8 UDP + 18 = 60 bytes, 64 on the wire with FCS
IPERF_PORT = 5201
DATAPATH = "userspace"  # or "ebpf" (--datapath)


@dataclass
class Measurement:
    tcp_gbps: float = 0.0
    small_pps: float = 0.0
    offered_pps: float = 0.0  # what the 64-byte senders sent
    datapath_cpu: dict[str, float] = field(default_factory=dict)  # metric -> CPU seconds/second
    latency: dict[str, float] = field(default_factory=dict)


@dataclass
class Lab:
    scope: LabScope
    vm1_ns: str
    vm2_ns: str
    vm2_link: str
    drivers: list[tuple[NamespaceProcess, Path]] = field(default_factory=list)
    offered_pps: float = 0.0
    # Where VM1's traffic goes: VM2's address, or in the NAT scenario the address the datapath
    # rewrites to VM2's (VM2 binds its own address either way).
    target_ip: str = VM2_IP
    # Server port -> the port VM1 sends to (the DNAT scenario maps VIP ports to VM2's).
    client_ports: dict[int, int] = field(default_factory=dict)

    def port(self, server_port: int) -> str:
        return str(self.client_ports.get(server_port, server_port))


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _start_driver(
    lab: Lab, namespace: str, config: dict[str, Any], workdir: Path, profile: Path | None
) -> None:
    name = f"dp{len(lab.drivers)}"
    config_file = workdir / f"{lab.scope.tag}-{name}.json"
    counters_file = workdir / f"{lab.scope.tag}-{name}.counters.json"
    config_file.write_text(json.dumps(config))
    if DATAPATH == "ebpf":
        argv = ebpf_driver_argv(str(config_file), str(counters_file))
    else:
        argv = driver_argv(config_file, counters_file)
    if profile is not None:
        argv = [argv[0], "-m", "cProfile", "-o", str(profile), *argv[1:]]
    log_path = workdir / f"{lab.scope.tag}-{name}.log"
    with log_path.open("wb") as log:
        process = start_in_namespace(namespace, argv, label=name, output=log)
    lab.drivers.append((process, counters_file))
    deadline = time.monotonic() + 15
    while read_counters(counters_file) is None:
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"datapath driver failed to start:\n{log_path.read_text()}")
        time.sleep(0.05)


def _flows_to(port_key: int, action: dict[str, Any], peer_mac: str) -> list[dict[str, Any]]:
    return [
        {"match": {"in_port": port_key, "eth_type": 0x0806}, "actions": [action]},
        {
            "match": {"in_port": port_key, "eth_type": 0x0800, "eth_dst": mac_to_int(peer_mac)},
            "actions": [action],
        },
    ]


def build_local(
    scope: LabScope, kernel: bool, workdir: Path, profile: Path | None, *, upcall_only: bool = False
) -> Lab:
    bridge = add_underlay(scope)
    h1 = add_host(scope, "h1", 1, bridge)
    vm1 = add_vm(scope, "vm1", h1, f"{VM1_IP}/24", VM1_MAC)
    vm2 = add_vm(scope, "vm2", h1, f"{VM2_IP}/24", VM2_MAC)
    lab = Lab(scope, vm1.namespace, vm2.namespace, vm2.vm_link)
    if kernel:
        switch = scope.link("sw")
        create_bridge(switch, mtu=1450, namespace=h1.namespace)
        for port in (vm1.port_link, vm2.port_link):
            attach_to_bridge(port, switch, namespace=h1.namespace)
    else:
        config: dict[str, Any] = {"ports": {"1": vm1.port_link, "2": vm2.port_link}}
        if upcall_only:
            # No flows: every frame is an upcall, answered by executing the other port's output
            # (the path of a new flow's first packet, minus the agent's simulation).
            config["miss_actions"] = {"1": [{"output": 2}], "2": [{"output": 1}]}
        else:
            config["flows"] = _flows_to(1, {"output": 2}, VM2_MAC) + _flows_to(
                2, {"output": 1}, VM1_MAC
            )
        _start_driver(lab, h1.namespace, config, workdir, profile)
    return lab


# The DNAT scenario: VM1 talks to a VIP whose ports map to VM2's (as a load balancer's or a
# floating IP's established flows: addresses and ports rewritten, checksums fixed, both ways).
VIP = "10.0.9.100"
VIP_PORTS = {IPERF_PORT: 80, 9: 19, 7: 17}  # VM2's port -> the VIP's
UDP, TCP = 17, 6


def _dnat_flows(port_key: int, tunnel: dict[str, Any], forward: bool) -> list[dict[str, Any]]:
    """VM1 -> VIP:vport rewritten to VM2:port (`forward`), or VM2's replies from port
    rewritten back to VIP:vport; the ARP and ping flows of `_flows_to` stay plain."""
    peer_mac = VM2_MAC if forward else VM1_MAC
    flows = _flows_to(port_key, tunnel, peer_mac)
    flows[1]["match"]["ip_proto"] = 1  # ping: plain (the warm-up, VM2 answers VM1 directly)
    if forward:
        flows[1]["match"]["ip_dst"] = int(ipaddress.IPv4Address(VM2_IP))
    for server_port, vip_port in VIP_PORTS.items():
        proto = TCP if server_port == IPERF_PORT else UDP
        match = {"in_port": port_key, "eth_type": 0x0800, "eth_dst": mac_to_int(peer_mac)}
        match["ip_proto"] = proto
        if forward:
            match |= {"ip_dst": int(ipaddress.IPv4Address(VIP)), "tp_dst": vip_port}
            rewrite = [("ip_dst", int(ipaddress.IPv4Address(VM2_IP))), ("tp_dst", server_port)]
        else:
            match["tp_src"] = server_port
            rewrite = [("ip_src", int(ipaddress.IPv4Address(VIP))), ("tp_src", vip_port)]
        actions = [{"set_field": {"field": name, "value": value}} for name, value in rewrite]
        flows.append({"match": match, "actions": [*actions, tunnel]})
    return flows


def build_vxlan(
    scope: LabScope, kernel: bool, workdir: Path, profile: Path | None, *, dnat: bool = False
) -> Lab:
    bridge = add_underlay(scope)
    h1 = add_host(scope, "h1", 1, bridge)
    h2 = add_host(scope, "h2", 2, bridge)
    vm1 = add_vm(scope, "vm1", h1, f"{VM1_IP}/24", VM1_MAC)
    vm2 = add_vm(scope, "vm2", h2, f"{VM2_IP}/24", VM2_MAC)
    lab = Lab(scope, vm1.namespace, vm2.namespace, vm2.vm_link)
    if dnat:
        if kernel:
            raise ValueError("the DNAT scenario is ours only (its peer is the plain kernel VXLAN)")
        lab.target_ip = VIP
        lab.client_ports = dict(VIP_PORTS)
        # VM1 reaches the VIP on its link (the router's MAC would do the same in a real topology)
        run_in_namespace(
            vm1.namespace,
            [
                "ip",
                "neigh",
                "replace",
                VIP,
                "lladdr",
                VM2_MAC,
                "dev",
                vm1.vm_link,
                "nud",
                "permanent",
            ],
        )
    pairs = ((h1, h2, vm1, "1"), (h2, h1, vm2, "2"))
    if kernel:
        for host, peer, vm, index in pairs:
            switch, vxlan = scope.link(f"sw{index}"), scope.link(f"vx{index}")
            create_bridge(switch, mtu=1450, namespace=host.namespace)
            create_vxlan(
                vxlan,
                vni=100,
                local_ip=host.underlay_ip,
                remote_ip=peer.underlay_ip,
                underlay_link=host.underlay_link,
                namespace=host.namespace,
            )
            attach_to_bridge(vxlan, switch, namespace=host.namespace)
            attach_to_bridge(vm.port_link, switch, namespace=host.namespace)
    else:
        for (host, peer, vm, index), peer_key, peer_mac in zip(
            pairs, (2, 1), (VM2_MAC, VM1_MAC), strict=True
        ):
            tunnel = {"tunnel": {"remote_ip": peer.underlay_ip, "key": peer_key}}
            if dnat:
                flows = _dnat_flows(int(index), tunnel, forward=index == "1")
            else:
                flows = _flows_to(int(index), tunnel, peer_mac)
            config = {
                "underlay_ip": host.underlay_ip,
                "ports": {index: vm.port_link},
                "flows": flows,
                "tunnel_peers": [peer.underlay_ip],  # the agent's source check, on
            }
            _start_driver(lab, host.namespace, config, workdir, profile if index == "1" else None)
    return lab


# ---- traffic ----------------------------------------------------------------------------------

TCP_SINK = """
import socket, sys
listener = socket.create_server((sys.argv[1], int(sys.argv[2])))
connection, _ = listener.accept()
total, buffer = 0, bytearray(1 << 20)
while n := connection.recv_into(buffer):
    total += n
print(total)
"""

TCP_SOURCE = """
import socket, sys, time
address, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + seconds
for _ in range(50):
    try:
        connection = socket.create_connection((address, port))
        break
    except ConnectionRefusedError:
        time.sleep(0.1)
chunk = bytes(1 << 16)
while time.monotonic() < deadline:
    connection.sendall(chunk)
connection.close()
"""

# A UDP socket that never reads: datagrams to it are dropped by the kernel without any ICMP.
UDP_SILENT_SINK = """
import socket, sys, time
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
sock.bind((sys.argv[1], int(sys.argv[2])))
time.sleep(3600)
"""

# Small datagrams as fast as one core can: sendmmsg (through ctypes) sends 256 per syscall,
# so the generator outruns both forwarders and the frame rate at the receiver is what counts.
UDP_BLAST = """
import ctypes, ctypes.util, socket, sys, time
libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
class IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("length", ctypes.c_size_t)]
class MsgHdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32),
                ("iov", ctypes.POINTER(IoVec)), ("iovlen", ctypes.c_size_t),
                ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]
class MMsgHdr(ctypes.Structure):
    _fields_ = [("header", MsgHdr), ("length", ctypes.c_uint)]
address, port, size, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.connect((address, port))
payload = ctypes.create_string_buffer(size)
vector = IoVec(ctypes.cast(payload, ctypes.c_void_p), size)
batch = 256
messages = (MMsgHdr * batch)()
for message in messages:
    message.header.iov = ctypes.pointer(vector)
    message.header.iovlen = 1
deadline, sent = time.monotonic() + seconds, 0
while time.monotonic() < deadline:
    count = libc.sendmmsg(sock.fileno(), messages, batch, 0)
    if count > 0:
        sent += count
    elif ctypes.get_errno() not in (11, 105, 111):  # EAGAIN, ENOBUFS, ECONNREFUSED
        raise OSError(ctypes.get_errno(), "sendmmsg")
print(sent)
"""


UDP_ECHO = """
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((sys.argv[1], int(sys.argv[2])))
while True:
    data, peer = sock.recvfrom(2048)
    sock.sendto(data, peer)
"""

# Round trips to the echo server: each "first" probe from a fresh socket (a new 5-tuple, so a
# new exact-match entry in each direction), then as many "cached" probes on one socket.
UDP_PROBE = """
import json, socket, sys, time
address, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def probe(sock):
    started = time.perf_counter()
    sock.send(b"probe")
    sock.recv(64)
    return (time.perf_counter() - started) * 1e6
first, cached = [], []
for _ in range(count):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        sock.connect((address, port))
        try:
            first.append(probe(sock))
        except TimeoutError:
            pass
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
    sock.settimeout(2)
    sock.connect((address, port))
    probe(sock)
    for _ in range(count):
        try:
            cached.append(probe(sock))
        except TimeoutError:
            pass
print(json.dumps({"first": first, "cached": cached}))
"""


def _has_iperf3() -> bool:
    return shutil.which("iperf3") is not None


def _measure(
    lab: Lab, metric: str, seconds: float, run_traffic: Callable[[Lab, str, float], float]
) -> tuple[float, float]:
    """(result, datapath CPU seconds per second of traffic) for one metric."""
    pids = [process.pid for process, _ in lab.drivers]
    cpu_before = sum(_cpu_seconds(pid) for pid in pids)
    started = time.monotonic()
    result = run_traffic(lab, metric, seconds)
    elapsed = time.monotonic() - started
    cpu = (sum(_cpu_seconds(pid) for pid in pids) - cpu_before) / elapsed if pids else 0.0
    return result, cpu


def _tcp_iperf3(lab: Lab, seconds: float) -> float:
    server = start_in_namespace(
        lab.vm2_ns, ["iperf3", "-s", "-1", "-B", VM2_IP, "-p", str(IPERF_PORT)], label="iperf3"
    )
    try:
        argv = ["iperf3", "-c", lab.target_ip, "-p", lab.port(IPERF_PORT), "-t", str(seconds), "-J"]
        for _attempt in range(50):  # the server needs a moment to listen
            result = run_in_namespace(lab.vm1_ns, argv, timeout=seconds + 30, check=False)
            if "Connection refused" not in result.stdout + result.stderr:
                break
            time.sleep(0.1)
        report = json.loads(result.stdout)
        if "error" in report:
            raise RuntimeError(f"iperf3: {report['error']}")
        return float(report["end"]["sum_received"]["bits_per_second"]) / 1e9
    finally:
        server.stop()


def _tcp_python_pump(lab: Lab, seconds: float) -> float:
    with tempfile.TemporaryFile() as output:
        sink = start_in_namespace(
            lab.vm2_ns,
            [sys.executable, "-c", TCP_SINK, VM2_IP, str(IPERF_PORT)],
            label="tcpsink",
            output=output,
        )
        try:
            run_in_namespace(
                lab.vm1_ns,
                [
                    sys.executable,
                    "-c",
                    TCP_SOURCE,
                    lab.target_ip,
                    lab.port(IPERF_PORT),
                    str(seconds),
                ],
                timeout=seconds + 30,
            )
            sink.popen.wait(30)
            output.seek(0)
            total = int(output.read().decode().strip() or 0)
        finally:
            sink.stop()
    return total * 8 / seconds / 1e9


def _rx_packets(lab: Lab) -> int:
    path = f"/sys/class/net/{lab.vm2_link}/statistics/rx_packets"
    return int(run_in_namespace(lab.vm2_ns, ["cat", path]).stdout)


SENDERS = 1  # UDP blaster processes for the 64-byte test (--senders)


def _small_packets(lab: Lab, seconds: float) -> float:
    """64-byte frames per second that reach VM2's interface (what the senders offered is
    kept in `lab.offered_pps`, to tell a slow forwarder from a slow load generator)."""
    sink = start_in_namespace(
        lab.vm2_ns, [sys.executable, "-c", UDP_SILENT_SINK, VM2_IP, "9"], label="udpsink"
    )
    try:
        time.sleep(0.3)
        before, started = _rx_packets(lab), time.monotonic()
        with contextlib.ExitStack() as files:
            outputs = [files.enter_context(tempfile.TemporaryFile()) for _ in range(SENDERS)]
            argv = [
                sys.executable,
                "-c",
                UDP_BLAST,
                lab.target_ip,
                lab.port(9),
                str(SMALL_UDP_PAYLOAD),
                str(seconds),
            ]
            blasters = [
                start_in_namespace(lab.vm1_ns, argv, label=f"blast{index}", output=output)
                for index, output in enumerate(outputs)
            ]
            try:
                for blaster in blasters:
                    blaster.popen.wait(seconds + 30)
            finally:
                for blaster in blasters:
                    blaster.stop()
            elapsed = time.monotonic() - started
            received = _rx_packets(lab) - before
            sent = 0
            for output in outputs:
                output.seek(0)
                sent += int(output.read().decode().strip() or 0)
        lab.offered_pps = sent / seconds
        return received / elapsed
    finally:
        sink.stop()


def _latency(lab: Lab, probes: int) -> dict[str, float]:
    """Round-trip p50/p99 in microseconds of a new flow's first packet and of a cached one."""
    echo = start_in_namespace(
        lab.vm2_ns, [sys.executable, "-c", UDP_ECHO, VM2_IP, "7"], label="udpecho"
    )
    try:
        time.sleep(0.3)
        result = run_in_namespace(
            lab.vm1_ns,
            [sys.executable, "-c", UDP_PROBE, lab.target_ip, lab.port(7), str(probes)],
            timeout=probes + 30,
        )
    finally:
        echo.stop()
    samples = json.loads(result.stdout)
    summary: dict[str, float] = {}
    for kind in ("first", "cached"):
        values = sorted(samples[kind])
        if values:
            summary[f"{kind}_p50_us"] = round(values[len(values) // 2], 1)
            summary[f"{kind}_p99_us"] = round(
                values[min(len(values) - 1, len(values) * 99 // 100)], 1
            )
    return summary


def _traffic(lab: Lab, metric: str, seconds: float) -> float:
    if metric == "small_pps":
        return _small_packets(lab, seconds)
    return _tcp_iperf3(lab, seconds) if _has_iperf3() else _tcp_python_pump(lab, seconds)


def _warm_up(lab: Lab) -> None:
    run_in_namespace(lab.vm1_ns, ["ping", "-c", "2", "-i", "0.2", "-W", "2", VM2_IP])


def run_scenario(
    name: str,
    kernel: bool,
    seconds: float,
    workdir: Path,
    profile: Path | None = None,
    probes: int = 0,
) -> tuple[Measurement, dict[str, int]]:
    """Measure one scenario: "local", "vxlan", "vxlan-dnat" (vxlan with every packet's address
    and port rewritten, ours only) or "upcall" (local without flows: only the latency of
    frames that all go through the upcall handler)."""
    scope = LabScope.unique()
    try:
        if name in ("vxlan", "vxlan-dnat"):
            lab = build_vxlan(scope, kernel, workdir, profile, dnat=name == "vxlan-dnat")
        else:
            lab = build_local(scope, kernel, workdir, profile, upcall_only=name == "upcall")
        _warm_up(lab)
        measurement = Measurement()
        metrics = () if name == "upcall" else ("tcp_gbps", "small_pps")
        for metric in metrics:
            value, cpu = _measure(lab, metric, seconds, _traffic)
            setattr(measurement, metric, value)
            if lab.drivers:
                measurement.datapath_cpu[metric] = round(cpu, 2)
        measurement.offered_pps = lab.offered_pps
        if probes:
            measurement.latency = _latency(lab, probes)
        counters: dict[str, int] = {}
        for process, counters_file in lab.drivers:
            for key, value in request_counters(process.pid, counters_file).items():
                if key.startswith("drop.") or key in (
                    "offload_segmented",
                    "offload_checksummed",
                    "upcalls",
                    "emc_hits",
                    "megaflow_hits",
                ):
                    counters[key] = counters.get(key, 0) + value
            process.stop()
        return measurement, counters
    finally:
        clean(scope.tag)


# ---- many active flows -------------------------------------------------------------------------

# One UDP socket in VM1 sends to `count` destination ports of VM2 in turn (each a flow of its
# own: one exact-match kernel entry on eBPF), paced at `rate` datagrams per second.
UDP_MANY_FLOWS = """
import socket, sys, time
address, first, count, rate, seconds = (sys.argv[1], int(sys.argv[2]), int(sys.argv[3]),
                                         float(sys.argv[4]), float(sys.argv[5]))
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
payload, sent, started = bytes(18), 0, time.monotonic()
while (now := time.monotonic()) < started + seconds:
    due = int((now - started) * rate)
    while sent < due:
        try:
            sock.sendto(payload, (address, first + sent % count))
        except OSError:
            pass
        sent += 1
    time.sleep(0.001)
print(sent)
"""
MANY_FLOWS_FIRST_PORT = 20000


def flows_at_scale(
    datapath: str, workdir: Path, flows: int, rate: float, seconds: float
) -> dict[str, Any]:
    """VM1 keeps `flows` UDP flows active across hosts: how fast the datapath takes them on
    (kernel entries installed per second on eBPF) and what its process costs in CPU once they
    are all established (the kernel forwards them; the process syncs hit counters)."""
    global DATAPATH
    DATAPATH = datapath
    scope = LabScope.unique()
    try:
        lab = build_vxlan(scope, False, workdir, None)
        _warm_up(lab)
        last = MANY_FLOWS_FIRST_PORT + flows - 1
        # VM2 drops them before its UDP stack (no ICMP port-unreachable flood back to VM1).
        rules = workdir / f"{scope.tag}-drop.nft"
        rules.write_text(
            "table inet hnbench {\n  chain input {\n    type filter hook input priority 0;\n"
            f"    udp dport {MANY_FLOWS_FIRST_PORT}-{last} drop\n  }}\n}}\n"
        )
        run_in_namespace(lab.vm2_ns, ["nft", "-f", str(rules)])
        (ingress, counters_file) = lab.drivers[0]
        sender = start_in_namespace(
            lab.vm1_ns,
            [
                sys.executable,
                "-c",
                UDP_MANY_FLOWS,
                VM2_IP,
                str(MANY_FLOWS_FIRST_PORT),
                str(flows),
                str(rate),
                str(seconds),
            ],
            label="manyflows",
        )
        base = request_counters(ingress.pid, counters_file)
        started, cpu_start = time.monotonic(), _cpu_seconds(ingress.pid)
        rx_start = _rx_packets(lab)
        established_at: float | None = None
        cpu_established = 0.0
        samples: list[dict[str, float]] = []
        try:
            while sender.popen.poll() is None:
                time.sleep(0.25)
                now_counters = request_counters(ingress.pid, counters_file)
                now, cpu = time.monotonic() - started, _cpu_seconds(ingress.pid) - cpu_start
                settled = {
                    key: now_counters.get(key, 0) - base.get(key, 0)
                    for key in (
                        "kernel_offloads",
                        "upcalls",
                        "megaflow_hits",
                        "emc_hits",
                        "port.1.rx_kernel_drops",
                        "drop.upcall_budget",
                    )
                }
                samples.append({"t": now, "cpu": cpu, **settled})
                known = settled["kernel_offloads"] if datapath == "ebpf" else flows
                if established_at is None and known >= flows and now > flows / rate:
                    established_at, cpu_established = now, cpu
        finally:
            sender.stop()
        elapsed = time.monotonic() - started
        received = _rx_packets(lab) - rx_start
        final = samples[-1] if samples else {"cpu": 0.0, "t": elapsed}
        row: dict[str, Any] = {
            "flows": flows,
            "offered_pps": round(rate),
            "received_pps": round(received / elapsed),
            "kernel_entries_installed": int(final.get("kernel_offloads", 0)),
            "upcalls": int(final.get("upcalls", 0)),
            "userspace_hits": int(final.get("megaflow_hits", 0) + final.get("emc_hits", 0)),
            # Frames the port's socket had no room for (the kernel dropped them before userspace)
            "socket_drops": int(final.get("port.1.rx_kernel_drops", 0)),
            "upcall_budget_drops": int(final.get("drop.upcall_budget", 0)),
        }
        if established_at is not None and final["t"] > established_at:
            if datapath == "ebpf":  # userspace keeps no per-flow entries: nothing to set up
                row["setup_seconds"] = round(established_at, 2)
                row["setup_flows_per_s"] = round(flows / established_at)
                row["cpu_setup"] = round(cpu_established / established_at, 3)
            row["cpu_established"] = round(
                (final["cpu"] - cpu_established) / (final["t"] - established_at), 3
            )
        return row
    finally:
        clean(scope.tag)


# ---- in-process micro-benchmark of the per-frame fast path (no sockets, no root) -------------


class _FakePacketSocket:
    """Stands in for a port's AF_PACKET socket: `recv_into` replays `packets` (virtio-net
    header + frame) `rounds` times, `send` counts."""

    def __init__(self, packets: list[bytes], rounds: int) -> None:
        self._packets = packets * rounds
        self._next = 0
        self.sent = 0

    def recv_into(self, buffer: bytearray) -> int:
        index = self._next
        if index >= len(self._packets):
            raise BlockingIOError
        self._next = index + 1
        packet = self._packets[index]
        buffer[: len(packet)] = packet
        return len(packet)

    def send(self, packet: bytes | memoryview) -> int:
        self.sent += 1
        return len(packet)


class _FakeUdpSocket:
    def __init__(self) -> None:
        self.calls = 0

    def fileno(self) -> int:
        return -1  # no kernel socket: its drop count (`udp_socket_drops`) reads as 0

    def sendto(self, data: bytes, address: object) -> int:
        self.calls += 1
        return len(data)

    def sendmsg(self, buffers: list[bytes], ancillary: object, flags: int, address: object) -> int:
        self.calls += 1
        return sum(len(buffer) for buffer in buffers)


def _micro_frames(flow_count: int) -> list[bytes]:
    from hivenet.packets import build_udp_datagram

    return [
        build_udp_datagram(
            eth_src=VM1_MAC,
            eth_dst=VM2_MAC,
            ip_src=VM1_IP,
            ip_dst=VM2_IP,
            src_port=10000 + index,
            dst_port=9,
            payload=bytes(SMALL_UDP_PAYLOAD),
        )
        for index in range(flow_count)
    ]


def micro_benchmark(frames_per_case: int = 200_000, flow_count: int = 16) -> dict[str, float]:
    """Frames per second of each piece of the per-frame path, in this process."""
    from hivenet.datapath import userspace
    from hivenet.datapath._fastkey import raw_flow_key
    from hivenet.flows.actions import Output, Tunnel
    from hivenet.flows.table import flow_match_values
    from hivenet.packets import extract_flow_match
    from hivenet.packets.flowmatch import FIELD_NAMES, FULL_MASKS, mask_from

    frames = _micro_frames(flow_count)
    rounds = max(1, frames_per_case // flow_count)
    total = rounds * flow_count
    results: dict[str, float] = {}

    def rate(label: str, run: Callable[[], object]) -> None:
        started = time.perf_counter()
        run()
        results[label] = total / (time.perf_counter() - started)

    buffers = [bytearray(bytes(10) + frame) for frame in frames]
    parse_cache: dict[tuple[int, ...], int] = {}
    raw_cache: dict[object, int] = {}

    def parse_path() -> None:
        for _ in range(rounds):
            for frame in frames:
                parse_cache.get(flow_match_values(extract_flow_match(frame, 1)))

    def raw_key_path() -> None:
        for _ in range(rounds):
            for buffer in buffers:
                raw_cache.get(raw_flow_key(buffer, 10, len(buffer) - 10))

    rate("key: extract_flow_match + EMC get", parse_path)
    rate("key: raw_flow_key + cache get", raw_key_path)

    match_fields = {"in_port": 1, "eth_type": 0x0800, "eth_dst": mac_to_int(VM2_MAC)}
    match = tuple(match_fields.get(name, 0) for name in FIELD_NAMES)
    mask = mask_from({name: FULL_MASKS[name] for name in match_fields})
    packets = [bytes(10) + frame for frame in frames]
    for label, action in (
        ("datapath: port -> port", Output(2)),
        ("datapath: port -> VXLAN", Tunnel("127.0.0.2", 2)),
    ):
        datapath = userspace.UserspaceDatapath("127.0.0.1", batch_size=64)
        ingress_socket = _FakePacketSocket(packets, rounds)
        egress_socket = _FakePacketSocket([], 0)
        tunnel_socket = _FakeUdpSocket()
        ingress = userspace._BoundPort(1, "in", ingress_socket)  # type: ignore[arg-type]
        egress = userspace._BoundPort(2, "out", egress_socket)  # type: ignore[arg-type]
        datapath._ports.update({1: ingress, 2: egress})
        datapath._tunnel_sock = tunnel_socket  # type: ignore[assignment]
        datapath.install_flow(match, mask, [action], ["bench"], idle_timeout=0)

        def forward(datapath: userspace.UserspaceDatapath = datapath) -> None:
            # What one readiness callback does, batch after batch, until the replay ends.
            port = datapath._ports[1]
            while True:
                datapath._tunnel_batch = {}
                received = datapath._receive_from_port(port, 64, 1.0)
                batch, datapath._tunnel_batch = datapath._tunnel_batch, None
                if batch:
                    datapath._flush_tunnel_batch(batch)
                if received < 64:
                    return

        rate(label, forward)
        forwarded = egress_socket.sent + datapath.counters()["tunnel_tx_packets"]
        if forwarded != total:
            raise RuntimeError(f"{label}: forwarded {forwarded} of {total} frames")
        results[label + " (sends per frame)"] = (egress_socket.sent + tunnel_socket.calls) / total
    # Misses: what a flood of new flows costs the datapath before the agent simulates anything
    # (a no-op handler), without the per-port upcall budget, within it and over it (dropped).
    # Interleaved three times, the best of each kept: the difference is a few microseconds.
    cases = (
        ("miss: upcall (no budget)", (0.0, 1)),
        ("miss: upcall (within the budget)", (1e12, 10**9)),
        ("miss: over the upcall budget, dropped", (1e-9, 1)),
    )
    best: dict[str, float] = {}
    for _ in range(3):
        for label, budget in cases:
            datapath = userspace.UserspaceDatapath("127.0.0.1", batch_size=64)
            datapath.set_upcall_budget(*budget)
            datapath.set_upcall_handler(lambda _port, _frame: None)
            replay = _FakePacketSocket(packets, rounds)
            datapath._ports[1] = userspace._BoundPort(1, "in", replay)  # type: ignore[arg-type]

            def miss(datapath: userspace.UserspaceDatapath = datapath) -> None:
                port = datapath._ports[1]
                while True:  # readiness callbacks, as the loop makes them, to the replay's end
                    datapath._batch_upcalls = 0
                    if not datapath._receive_from_port(port, 64, 1.0):
                        return

            rate(label, miss)
            best[label] = max(best.get(label, 0.0), results.pop(label))
    results.update(best)
    return results


def _print_micro(results: dict[str, float]) -> None:
    print("\nper-frame fast path in-process (64-byte UDP, 16 flows, fake sockets)")
    for label, value in results.items():
        if label.endswith("(sends per frame)"):
            print(f"  {label:<45}{value:>12.3f}")
        else:
            print(f"  {label:<45}{value / 1000:>9.0f} k/s {1e6 / value:>6.2f} us")


def _top_functions(profile: Path, limit: int = 12) -> list[tuple[str, float, float]]:
    """(function, own seconds, share of all own time) for the functions with most own time."""
    stats = pstats.Stats(str(profile))
    entries = stats.stats  # type: ignore[attr-defined]
    total = sum(entry[2] for entry in entries.values()) or 1.0
    ranked = sorted(entries.items(), key=lambda item: item[1][2], reverse=True)[:limit]
    return [
        (f"{Path(filename).name}:{line}({function})", own, own / total)
        for (filename, line, function), (_cc, _nc, own, _cum, _callers) in ranked
    ]


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def _summarise(runs: list[tuple[Measurement, dict[str, int]]]) -> dict[str, Any]:
    """Medians over the runs of one scenario (the machine is shared: single runs are noisy)."""
    measurements = [measurement for measurement, _ in runs]
    row: dict[str, Any] = {
        "runs": len(runs),
        "tcp_gbps": round(_median([m.tcp_gbps for m in measurements]), 3),
        "small_pps": round(_median([m.small_pps for m in measurements])),
        "offered_pps": round(_median([m.offered_pps for m in measurements])),
        "tcp_gbps_all": [round(m.tcp_gbps, 2) for m in measurements],
        "small_pps_all": [round(m.small_pps) for m in measurements],
        "counters": runs[-1][1],
    }
    cpu_metrics = measurements[0].datapath_cpu.keys()
    row["datapath_cpu"] = {
        metric: round(_median([m.datapath_cpu[metric] for m in measurements]), 2)
        for metric in cpu_metrics
    }
    if "small_pps" in row["datapath_cpu"] and row["small_pps"]:
        # CPU of the datapath per forwarded 64-byte frame: less sensitive to the noise of a
        # shared machine than the frame rate itself.
        row["cpu_us_per_small_frame"] = round(
            _median([m.datapath_cpu["small_pps"] / m.small_pps * 1e6 for m in measurements]), 2
        )
    latency_keys = measurements[0].latency.keys()
    row["latency"] = {
        key: round(_median([m.latency[key] for m in measurements if key in m.latency]), 1)
        for key in latency_keys
    }
    return row


def main() -> int:
    global SENDERS, DATAPATH
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    parser.add_argument("--runs", type=int, default=3, help="repetitions; medians are reported")
    parser.add_argument("--senders", type=int, default=1, help="64-byte sender processes")
    parser.add_argument("--probes", type=int, default=200, help="latency probes per run")
    parser.add_argument("--profile", action="store_true", help="also profile the datapath")
    parser.add_argument(
        "--micro-only", action="store_true", help="only the in-process micro-benchmark"
    )
    parser.add_argument(
        "--datapath",
        choices=("both", "ebpf", "userspace"),
        default="both",
        help="which of our datapaths to measure against the kernel",
    )
    parser.add_argument(
        "--flows", type=int, default=10_000, help="active flows of the at-scale run (0: skip)"
    )
    parser.add_argument(
        "--flows-rate", type=float, default=50_000.0, help="datagrams/s over those flows"
    )
    args = parser.parse_args()
    datapaths = ("ebpf", "userspace") if args.datapath == "both" else (args.datapath,)
    DATAPATH = datapaths[0]
    if args.runs < 1 or args.senders < 1 or args.probes < 0:
        parser.error("--runs and --senders must be >= 1, --probes >= 0")
    SENDERS = args.senders
    micro = micro_benchmark()
    _print_micro(micro)
    if args.micro_only or os.geteuid() != 0:
        if not args.micro_only:
            print("bench/datapath.py needs root (network namespaces) for the lab part")
        print(json.dumps({"bench": "datapath", "micro": micro}, sort_keys=True))
        return 0

    tool = "iperf3" if _has_iperf3() else "python socket pump"
    tool += f" for TCP, {SENDERS} sendmmsg UDP blaster(s) for 64B"
    labels = [
        (scenario, kind) for scenario in ("local", "vxlan") for kind in ("kernel", *datapaths)
    ] + [(scenario, dp) for scenario in ("vxlan-dnat", "upcall") for dp in datapaths]
    collected: dict[str, list[tuple[Measurement, dict[str, int]]]] = {}
    profiles: dict[str, list[tuple[str, float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="hn-bench-") as directory:
        workdir = Path(directory)
        for _run in range(args.runs):
            # Interleaved (kernel, ours, kernel, ours, ...) so slow phases of the shared machine
            # hit both sides.
            for scenario, kind in labels:
                kernel = kind == "kernel"
                if not kernel:
                    DATAPATH = kind  # run_scenario starts this datapath
                collected.setdefault(f"{scenario}/{kind}", []).append(
                    run_scenario(scenario, kernel, args.seconds, workdir, probes=args.probes)
                )
        at_scale: dict[str, dict[str, Any]] = {}
        if args.flows > 0:
            for datapath in datapaths:
                at_scale[datapath] = flows_at_scale(
                    datapath, workdir, args.flows, args.flows_rate, max(12.0, 3 * args.seconds)
                )
        DATAPATH = datapaths[0]
        if args.profile:
            for scenario in ("local", "vxlan"):
                profile = workdir / f"{scenario}.prof"
                run_scenario(scenario, False, args.seconds, workdir, profile)
                profiles[scenario] = _top_functions(profile)
    results = {label: _summarise(runs) for label, runs in collected.items()}

    ratios: dict[str, float] = {}
    print(
        f"\n{' and '.join(datapaths)} datapath vs kernel ({tool}, {args.seconds:.0f}s per "
        f"measurement, medians of {args.runs} runs)"
    )
    print(
        f"{'scenario':<18}{'TCP Gb/s':>9}{'64B kpps':>9}{'sent kpps':>10}{'dp CPU tcp/pps':>15}"
        f"{'us/frame':>9}{'1st p50/p99 us':>16}{'cached p50/p99':>16}"
    )
    for label, row in results.items():
        cpu = row["datapath_cpu"]
        cpu_text = f"{cpu['tcp_gbps']:.2f}/{cpu['small_pps']:.2f}" if cpu else "-"
        per_frame = row.get("cpu_us_per_small_frame")
        latency = row["latency"]
        first = f"{latency.get('first_p50_us', 0):.0f}/{latency.get('first_p99_us', 0):.0f}"
        cached = f"{latency.get('cached_p50_us', 0):.0f}/{latency.get('cached_p99_us', 0):.0f}"
        print(
            f"{label:<18}{row['tcp_gbps']:>9.2f}{row['small_pps'] / 1000:>9.0f}"
            f"{row['offered_pps'] / 1000:>10.0f}{cpu_text:>15}"
            f"{(f'{per_frame:.1f}' if per_frame else '-'):>9}{first:>16}{cached:>16}"
        )
    for datapath in datapaths:
        mine: dict[str, float] = {}
        # The DNAT scenario's peer is the plain kernel VXLAN path: rewriting costs must not
        # take the ratio below the unrewritten target.
        for scenario, peer in (("local", "local"), ("vxlan", "vxlan"), ("vxlan-dnat", "vxlan")):
            kernel_row, ours = results[f"{peer}/kernel"], results[f"{scenario}/{datapath}"]
            for metric in ("tcp_gbps", "small_pps"):
                base = kernel_row[metric]
                mine[f"{scenario.replace('-', '_')}_{metric}"] = (
                    round(ours[metric] / base, 3) if base else 0.0
                )
        print(f"ratios {datapath}/kernel: " + ", ".join(f"{k}={v:.2f}" for k, v in mine.items()))
        ratios.update(
            mine if len(datapaths) == 1 else {f"{datapath}_{k}": v for k, v in mine.items()}
        )
    if at_scale:
        print(
            f"\n{args.flows} active UDP flows across hosts at {args.flows_rate / 1000:.0f} kpps "
            "(datapath process CPU in seconds per second; eBPF: one kernel entry per flow)"
        )
        print(
            f"{'datapath':<12}{'setup s':>9}{'flows/s':>9}{'CPU setup':>10}{'CPU estab.':>11}"
            f"{'entries':>9}{'upcalls':>9}{'rx kpps':>9}{'sock drops':>11}"
        )
        for datapath, row in at_scale.items():
            print(
                f"{datapath:<12}{row.get('setup_seconds', '-'):>9}"
                f"{row.get('setup_flows_per_s', '-'):>9}{row.get('cpu_setup', '-'):>10}"
                f"{row.get('cpu_established', '-'):>11}{row['kernel_entries_installed']:>9}"
                f"{row['upcalls']:>9}{row['received_pps'] / 1000:>9.1f}{row['socket_drops']:>11}"
            )
    for scenario, rows in profiles.items():
        print(f"\nwhere the datapath's time goes ({scenario}, cProfile own time, TCP then 64B):")
        for function, own, share in rows:
            print(f"  {share:6.1%} {own:8.2f}s  {function}")
    print(
        json.dumps(
            {
                "bench": "datapath",
                "datapath": DATAPATH if len(datapaths) == 1 else list(datapaths),
                "tool": tool,
                "seconds": args.seconds,
                "runs": args.runs,
                "senders": SENDERS,
                "results": results,
                "ratios": ratios,
                "at_scale": at_scale,
                "micro": micro,
                "profile": {
                    scenario: [[function, round(share, 4)] for function, _own, share in rows]
                    for scenario, rows in profiles.items()
                },
            },
            sort_keys=True,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
