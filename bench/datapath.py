"""Benchmark: the userspace datapath against the kernel doing the same job, in the same run.

Scenarios (VMs are namespaces with veths, MTU 1450, offloads on; underlay MTU 1500):
  local   two VMs on one host:  our datapath (port -> port)   vs  a Linux bridge
  vxlan   VMs on two hosts:     our datapaths over VXLAN      vs  bridge + kernel VXLAN device
Metrics: single-stream TCP throughput (iperf3, else a Python socket pump) and 64-byte frame
rate (UDP with 18-byte payloads; packets per second that reach the receiver). It also samples
the CPU time the datapath process used, and with --profile runs the datapath under cProfile
once more to show where its time goes.

Needs root. Prints a table, then exactly one JSON line. Everything it creates is in a unique
`hn` lab scope that is removed at the end (also on error or Ctrl-C).
"""

from __future__ import annotations

import argparse
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


@dataclass
class Measurement:
    tcp_gbps: float = 0.0
    small_pps: float = 0.0
    datapath_cpu: dict[str, float] = field(default_factory=dict)  # metric -> CPU seconds/second


@dataclass
class Lab:
    scope: LabScope
    vm1_ns: str
    vm2_ns: str
    vm2_link: str
    drivers: list[tuple[NamespaceProcess, Path]] = field(default_factory=list)


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


def build_local(scope: LabScope, kernel: bool, workdir: Path, profile: Path | None) -> Lab:
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
        config = {
            "ports": {"1": vm1.port_link, "2": vm2.port_link},
            "flows": _flows_to(1, {"output": 2}, VM2_MAC) + _flows_to(2, {"output": 1}, VM1_MAC),
        }
        _start_driver(lab, h1.namespace, config, workdir, profile)
    return lab


def build_vxlan(scope: LabScope, kernel: bool, workdir: Path, profile: Path | None) -> Lab:
    bridge = add_underlay(scope)
    h1 = add_host(scope, "h1", 1, bridge)
    h2 = add_host(scope, "h2", 2, bridge)
    vm1 = add_vm(scope, "vm1", h1, f"{VM1_IP}/24", VM1_MAC)
    vm2 = add_vm(scope, "vm2", h2, f"{VM2_IP}/24", VM2_MAC)
    lab = Lab(scope, vm1.namespace, vm2.namespace, vm2.vm_link)
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
            config = {
                "underlay_ip": host.underlay_ip,
                "ports": {index: vm.port_link},
                "flows": _flows_to(int(index), tunnel, peer_mac),
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
        argv = ["iperf3", "-c", VM2_IP, "-p", str(IPERF_PORT), "-t", str(seconds), "-J"]
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
                [sys.executable, "-c", TCP_SOURCE, VM2_IP, str(IPERF_PORT), str(seconds)],
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


def _small_packets(lab: Lab, seconds: float) -> float:
    """64-byte frames per second that reach VM2's interface."""
    sink = start_in_namespace(
        lab.vm2_ns, [sys.executable, "-c", UDP_SILENT_SINK, VM2_IP, "9"], label="udpsink"
    )
    try:
        time.sleep(0.3)
        before, started = _rx_packets(lab), time.monotonic()
        run_in_namespace(
            lab.vm1_ns,
            [sys.executable, "-c", UDP_BLAST, VM2_IP, "9", str(SMALL_UDP_PAYLOAD), str(seconds)],
            timeout=seconds + 30,
        )
        return (_rx_packets(lab) - before) / (time.monotonic() - started)
    finally:
        sink.stop()


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
) -> tuple[Measurement, dict[str, int]]:
    builder = build_local if name == "local" else build_vxlan
    scope = LabScope.unique()
    try:
        lab = builder(scope, kernel, workdir, profile)
        _warm_up(lab)
        measurement = Measurement()
        for metric in ("tcp_gbps", "small_pps"):
            value, cpu = _measure(lab, metric, seconds, _traffic)
            setattr(measurement, metric, value)
            if lab.drivers:
                measurement.datapath_cpu[metric] = round(cpu, 2)
        counters: dict[str, int] = {}
        for process, counters_file in lab.drivers:
            for key, value in request_counters(process.pid, counters_file).items():
                if key.startswith("drop.") or key in ("offload_segmented", "upcalls"):
                    counters[key] = counters.get(key, 0) + value
            process.stop()
        return measurement, counters
    finally:
        clean(scope.tag)


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    parser.add_argument("--profile", action="store_true", help="also profile the datapath")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/datapath.py needs root (network namespaces); nothing measured")
        print(json.dumps({"bench": "datapath", "skipped": "needs root"}))
        return 0

    tool = "iperf3" if _has_iperf3() else "python socket pump"
    tool += " for TCP, sendmmsg UDP blaster for 64B"
    results: dict[str, dict[str, Any]] = {}
    profiles: dict[str, list[tuple[str, float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="hn-bench-") as directory:
        workdir = Path(directory)
        for scenario in ("local", "vxlan"):
            for kernel in (True, False):
                label = f"{scenario}/{'kernel' if kernel else 'userspace'}"
                measurement, counters = run_scenario(scenario, kernel, args.seconds, workdir)
                results[label] = {
                    "tcp_gbps": round(measurement.tcp_gbps, 3),
                    "small_pps": round(measurement.small_pps),
                    "datapath_cpu": measurement.datapath_cpu,
                    "counters": counters,
                }
            if args.profile:
                profile = workdir / f"{scenario}.prof"
                run_scenario(scenario, False, args.seconds, workdir, profile)
                profiles[scenario] = _top_functions(profile)

    ratios: dict[str, float] = {}
    print(f"\nUserspace datapath vs kernel ({tool}, {args.seconds:.0f}s per measurement)")
    print(f"{'scenario':<20}{'TCP Gb/s':>10}{'64B kpps':>10}{'dp CPU tcp/pps':>16}")
    for label, row in results.items():
        cpu = row["datapath_cpu"]
        cpu_text = f"{cpu['tcp_gbps']:.2f}/{cpu['small_pps']:.2f}" if cpu else "-"
        print(f"{label:<20}{row['tcp_gbps']:>10.2f}{row['small_pps'] / 1000:>10.0f}{cpu_text:>16}")
    for scenario in ("local", "vxlan"):
        kernel_row, ours = results[f"{scenario}/kernel"], results[f"{scenario}/userspace"]
        for metric in ("tcp_gbps", "small_pps"):
            base = kernel_row[metric]
            ratios[f"{scenario}_{metric}"] = round(ours[metric] / base, 3) if base else 0.0
    print("ratios userspace/kernel: " + ", ".join(f"{k}={v:.2f}" for k, v in ratios.items()))
    for scenario, rows in profiles.items():
        print(f"\nwhere the datapath's time goes ({scenario}, cProfile own time, TCP then 64B):")
        for function, own, share in rows:
            print(f"  {share:6.1%} {own:8.2f}s  {function}")
    print(
        json.dumps(
            {
                "bench": "datapath",
                "tool": tool,
                "seconds": args.seconds,
                "results": results,
                "ratios": ratios,
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
