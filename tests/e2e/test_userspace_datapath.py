"""End-to-end: `UserspaceDatapath` in host namespaces, VMs on veths with offloads ON, VXLAN over
a lab underlay bridge. Real ping, real TCP (payload checked by SHA-256), a kernel VXLAN device
as a foreign VTEP, and malformed frames/VXLAN packets that must be counted, never fatal.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import pytest

from hivenet.lab.netns import (
    HostPlumbing,
    LabScope,
    VmPlumbing,
    add_address,
    add_host,
    add_underlay,
    add_vm,
    create_vxlan,
    run_in_namespace,
    set_link_features,
    start_in_namespace,
)
from hivenet.model.types import FLOOD_KEY_BASE, mac_to_int

pytestmark = pytest.mark.e2e

ETH_TYPE_IPV4 = 0x0800
ETH_TYPE_ARP = 0x0806
VM1_MAC = "02:00:00:00:01:01"
VM2_MAC = "02:00:00:00:01:02"
TRANSFER_BYTES = 8 * 1024 * 1024

TCP_SINK = """
import hashlib, socket, sys
listener = socket.create_server((sys.argv[1], int(sys.argv[2])))
connection, _ = listener.accept()
digest, total = hashlib.sha256(), 0
while chunk := connection.recv(1 << 20):
    digest.update(chunk)
    total += len(chunk)
connection.sendall(f"{total} {digest.hexdigest()}".encode())
connection.close()
"""

TCP_SOURCE = """
import hashlib, os, socket, sys, time
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
payload = os.urandom(size)
deadline = time.monotonic() + 10
while True:
    try:
        connection = socket.create_connection((host, port), timeout=20)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.1)
connection.sendall(payload)
connection.shutdown(socket.SHUT_WR)
reply = b""
while chunk := connection.recv(4096):
    reply += chunk
print(f"{size} {hashlib.sha256(payload).hexdigest()}|{reply.decode()}")
"""

SEND_RAW_FRAMES = """
import socket, sys
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
sock.bind((sys.argv[1], 0))
for frame in sys.argv[2:]:
    sock.send(bytes.fromhex(frame))
"""

SEND_UDP = """
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for payload in sys.argv[3:]:
    sock.sendto(bytes.fromhex(payload), (sys.argv[1], int(sys.argv[2])))
"""


def exact_flow(actions: list[dict[str, Any]], **match: int) -> dict[str, Any]:
    return {"match": match, "actions": actions}


def tunnel(remote_ip: str, key: int) -> dict[str, Any]:
    return {"tunnel": {"remote_ip": remote_ip, "key": key}}


def vm_to_tunnel_flows(port_key: int, peer_mac: str, remote_ip: str, remote_key: int) -> list:
    """ARP from the VM, and IPv4 to the peer's MAC, go to the peer's port through VXLAN."""
    action = [tunnel(remote_ip, remote_key)]
    return [
        exact_flow(action, in_port=port_key, eth_type=ETH_TYPE_ARP),
        exact_flow(action, in_port=port_key, eth_type=ETH_TYPE_IPV4, eth_dst=mac_to_int(peer_mac)),
    ]


def ping(namespace: str, address: str, count: int = 3) -> str:
    result = run_in_namespace(
        namespace, ["ping", "-c", str(count), "-i", "0.2", "-W", "2", address], check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{count} received" in result.stdout, result.stdout
    return result.stdout


def tcp_transfer(
    source: VmPlumbing | str, sink: VmPlumbing | str, sink_ip: str, port: int = 5001
) -> None:
    """Send TRANSFER_BYTES of random data from `source` to `sink` over TCP; both ends hash it."""
    source_ns = source.namespace if isinstance(source, VmPlumbing) else source
    sink_ns = sink.namespace if isinstance(sink, VmPlumbing) else sink
    server = start_in_namespace(
        sink_ns, [sys.executable, "-c", TCP_SINK, sink_ip, str(port)], label="tcpsink"
    )
    try:
        result = run_in_namespace(
            source_ns,
            [sys.executable, "-c", TCP_SOURCE, sink_ip, str(port), str(TRANSFER_BYTES)],
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        sent, received = result.stdout.strip().split("|")
        assert sent == received, f"sent {sent!r}, sink saw {received!r}"
        assert sent.startswith(f"{TRANSFER_BYTES} ")
    finally:
        server.stop()


def drops(counters: dict[str, int]) -> dict[str, int]:
    return {key: value for key, value in counters.items() if key.startswith("drop.")}


@dataclass
class TwoHosts:
    h1: HostPlumbing
    h2: HostPlumbing
    vm1: VmPlumbing
    vm2: VmPlumbing


def build_two_hosts(scope: LabScope) -> TwoHosts:
    bridge = add_underlay(scope)
    h1 = add_host(scope, "h1", 1, bridge)
    h2 = add_host(scope, "h2", 2, bridge)
    vm1 = add_vm(scope, "vm1", h1, "10.0.1.1/24", VM1_MAC)
    vm2 = add_vm(scope, "vm2", h2, "10.0.1.2/24", VM2_MAC)
    return TwoHosts(h1, h2, vm1, vm2)


def start_two_datapaths(lab: TwoHosts, start_datapath: Any) -> tuple[Any, Any]:
    dp1 = start_datapath(
        lab.h1.namespace,
        {
            "underlay_ip": lab.h1.underlay_ip,
            "ports": {"1": lab.vm1.port_link},
            "flows": vm_to_tunnel_flows(1, VM2_MAC, lab.h2.underlay_ip, 2),
        },
    )
    dp2 = start_datapath(
        lab.h2.namespace,
        {
            "underlay_ip": lab.h2.underlay_ip,
            "ports": {"2": lab.vm2.port_link},
            "flows": vm_to_tunnel_flows(2, VM1_MAC, lab.h1.underlay_ip, 1),
        },
    )
    return dp1, dp2


def test_ping_between_vms_on_two_hosts(lab_scope: LabScope, start_datapath: Any) -> None:
    lab = build_two_hosts(lab_scope)
    dp1, dp2 = start_two_datapaths(lab, start_datapath)

    ping(lab.vm1.namespace, "10.0.1.2", count=3)

    c1, c2 = dp1.counters(), dp2.counters()
    # ARP request + 3 echo requests left VM1 (maybe an ARP reply too, if VM2 asked back).
    assert c1["port.1.rx_packets"] >= 4
    assert c1["tunnel_tx_packets"] == c1["port.1.rx_packets"]
    assert c2["tunnel_rx_packets"] == c1["tunnel_tx_packets"]
    assert c2["port.2.tx_packets"] == c2["tunnel_rx_packets"]
    assert c2["tunnel_tx_packets"] >= 4  # ARP reply + 3 echo replies
    assert c1["port.1.tx_packets"] == c1["tunnel_rx_packets"] == c2["tunnel_tx_packets"]
    for counters in (c1, c2):
        assert counters["megaflow_hits"] >= 2  # first packet of each of ARP and IPv4
        assert counters["emc_hits"] >= 1  # the later echo requests/replies
        assert counters["upcalls"] == 0
        assert drops(counters) == {}


def test_tcp_transfer_with_offloads_on(lab_scope: LabScope, start_datapath: Any) -> None:
    lab = build_two_hosts(lab_scope)
    dp1, dp2 = start_two_datapaths(lab, start_datapath)

    tcp_transfer(lab.vm1, lab.vm2, "10.0.1.2")

    c1, c2 = dp1.counters(), dp2.counters()
    # The sender's stack handed over TSO super-frames: cut and checksummed in software on h1,
    # sent as UDP GSO trains, merged back into super-frames on h2.
    assert c1["offload_segmented"] > 0
    assert c2["offload_coalesced"] > 0
    assert c1["tunnel_tx_bytes"] > TRANSFER_BYTES
    assert c2["port.2.tx_bytes"] > TRANSFER_BYTES
    assert drops(c1) == {} and drops(c2) == {}


def test_local_forwarding_keeps_offloads(lab_scope: LabScope, start_datapath: Any) -> None:
    """Two VMs on one host: super-frames go from port to port with the virtio-net header kept
    (no software segmentation), and the TCP payload still arrives intact."""
    bridge = add_underlay(lab_scope)
    h1 = add_host(lab_scope, "h1", 1, bridge)
    vm1 = add_vm(lab_scope, "vm1", h1, "10.0.1.1/24", VM1_MAC)
    vm2 = add_vm(lab_scope, "vm2", h1, "10.0.1.2/24", VM2_MAC)
    to_vm2, to_vm1 = [{"output": 2}], [{"output": 1}]
    dp = start_datapath(
        h1.namespace,
        {
            "ports": {"1": vm1.port_link, "2": vm2.port_link},
            "flows": [exact_flow(to_vm2, in_port=1), exact_flow(to_vm1, in_port=2)],
        },
    )

    ping(vm1.namespace, "10.0.1.2", count=2)
    tcp_transfer(vm1, vm2, "10.0.1.2")

    counters = dp.counters()
    assert counters["port.2.tx_bytes"] > TRANSFER_BYTES
    # Fewer frames than MSS-sized segments would need: super-frames were passed through.
    assert counters["port.1.rx_packets"] < TRANSFER_BYTES // 1400
    assert counters["offload_segmented"] == 0
    assert drops(counters) == {}


def build_kernel_vtep(scope: LabScope, start_datapath: Any) -> tuple[VmPlumbing, str, Any]:
    """VM1 (port key 42) behind our datapath on h1; namespace `ext` has a kernel VXLAN device,
    VNI 42, aimed at h1. Returns (vm1, ext namespace, datapath driver)."""
    vni = 42
    bridge = add_underlay(scope)
    h1 = add_host(scope, "h1", 1, bridge)
    ext = add_host(scope, "ext", 3, bridge)
    vm1 = add_vm(scope, "vm1", h1, "10.0.1.1/24", VM1_MAC)
    # A veth carries CHECKSUM_PARTIAL packets across namespaces as they are; a real NIC would
    # finish the inner checksum before the wire. Model that NIC: the kernel VTEP's underlay
    # interface does checksums in software (our VM-facing veths keep every offload on).
    set_link_features(ext.underlay_link, {"tx-checksum-ip-generic": False}, namespace=ext.namespace)
    vxlan = scope.link("vx")
    create_vxlan(
        vxlan,
        vni=vni,
        local_ip=ext.underlay_ip,
        remote_ip=h1.underlay_ip,
        underlay_link=ext.underlay_link,
        namespace=ext.namespace,
    )
    add_address(vxlan, "10.0.1.3/24", namespace=ext.namespace)
    driver = start_datapath(
        h1.namespace,
        {
            "underlay_ip": h1.underlay_ip,
            "ports": {str(vni): vm1.port_link},
            "flows": [exact_flow([tunnel(ext.underlay_ip, vni)], in_port=vni)],
        },
    )
    return vm1, ext.namespace, driver


def test_kernel_vxlan_vtep_interoperates(lab_scope: LabScope, start_datapath: Any) -> None:
    vm1, ext_namespace, dp = build_kernel_vtep(lab_scope, start_datapath)

    ping(vm1.namespace, "10.0.1.3", count=3)
    ping(ext_namespace, "10.0.1.1", count=2)
    tcp_transfer(vm1, ext_namespace, "10.0.1.3", port=5001)  # our segments, kernel checks them
    tcp_transfer(ext_namespace, vm1, "10.0.1.1", port=5002)  # kernel VXLAN into our port

    counters = dp.counters()
    assert counters["tunnel_rx_bytes"] > TRANSFER_BYTES
    assert counters["tunnel_tx_bytes"] > TRANSFER_BYTES
    assert counters["offload_segmented"] > 0
    assert drops(counters) == {}


def test_malformed_frames_and_vxlan_are_counted_and_dropped(
    lab_scope: LabScope, start_datapath: Any
) -> None:
    lab = build_two_hosts(lab_scope)
    dp1, _dp2 = start_two_datapaths(lab, start_datapath)
    ethernet = bytes.fromhex("020000000102") + bytes.fromhex(VM1_MAC.replace(":", "")) + b"\x08\x00"
    ipv4_header_length_3 = ethernet + bytes.fromhex("43000014000000004001") + bytes(30)
    ipv4_total_beyond_frame = ethernet + bytes.fromhex("450005dc000000004001") + bytes(30)
    run_in_namespace(
        lab.vm1.namespace,
        [
            sys.executable,
            "-c",
            SEND_RAW_FRAMES,
            lab.vm1.vm_link,
            ipv4_header_length_3.hex(),
            ipv4_total_beyond_frame.hex(),
        ],
    )
    inner = ethernet + bytes(46)
    bad_vxlan = [
        bytes.fromhex("0800"),  # truncated header
        bytes.fromhex("0000000000000100") + inner,  # I flag missing
        bytes.fromhex("08000000") + (FLOOD_KEY_BASE + 1).to_bytes(3, "big") + b"\0" + inner,
        bytes.fromhex("08000000") + (777).to_bytes(3, "big") + b"\0" + inner,  # no such port
        bytes.fromhex("0800000000000100") + inner[:10],  # inner frame cut short
    ]
    run_in_namespace(
        lab.h2.namespace,
        [sys.executable, "-c", SEND_UDP, lab.h1.underlay_ip, "4789", *(p.hex() for p in bad_vxlan)],
    )

    ping(lab.vm1.namespace, "10.0.1.2", count=2)  # still forwarding
    dp1.assert_alive()
    assert drops(dp1.counters()) == {
        "drop.malformed_frame": 2,
        "drop.vxlan_truncated": 2,
        "drop.vxlan_bad_flags": 1,
        "drop.tunnel_reserved_key": 1,
        "drop.tunnel_unknown_key": 1,
    }


def test_lab_names_and_cleanup_leave_nothing(lab_scope: LabScope) -> None:
    from hivenet.lab.cleanup import clean
    from hivenet.lab.netns import list_links, list_namespaces

    lab = build_two_hosts(lab_scope)
    sleeper = start_in_namespace(lab.vm1.namespace, ["sleep", "600"], label="sleeper")
    assert lab.vm1.namespace in list_namespaces(lab_scope.namespace_prefix)
    assert all(len(name) <= 15 for name in list_links(lab_scope.link_prefix))

    report = clean(lab_scope.tag)

    assert sleeper.pid in report.processes
    assert sleeper.popen.wait(5) is not None
    assert list_namespaces(lab_scope.namespace_prefix) == []
    assert list_links(lab_scope.link_prefix) == []
    assert clean(lab_scope.tag).is_empty()  # idempotent
    assert not sleeper.pid_file.exists()
    with pytest.raises(OSError):
        socket.if_nametoindex(lab_scope.link("br"))


def test_routed_flow_rewrites_headers_of_offloaded_frames(
    lab_scope: LabScope, start_datapath: Any
) -> None:
    """A router hop as the simulation would install it (MACs rewritten, TTL decremented)
    between two subnets on one host: super-frames go through the rewrites with their
    virtio-net header kept, and TCP still arrives intact."""
    router_mac = "02:00:00:00:00:fe"
    bridge = add_underlay(lab_scope)
    h1 = add_host(lab_scope, "h1", 1, bridge)
    vm1 = add_vm(lab_scope, "vm1", h1, "10.0.1.1/24", VM1_MAC)
    vm2 = add_vm(lab_scope, "vm2", h1, "10.0.2.1/24", VM2_MAC)
    for vm, gateway in ((vm1, "10.0.1.254"), (vm2, "10.0.2.254")):
        run_in_namespace(
            vm.namespace,
            ["ip", "neigh", "add", gateway, "lladdr", router_mac, "dev", vm.vm_link],
        )
        run_in_namespace(vm.namespace, ["ip", "route", "add", "default", "via", gateway])

    def route_to(port_key: int, mac: str) -> list[dict[str, Any]]:
        return [
            {"set_field": {"field": "eth_src", "value": mac_to_int(router_mac)}},
            {"set_field": {"field": "eth_dst", "value": mac_to_int(mac)}},
            {"dec_ttl": True},
            {"output": port_key},
        ]

    ip_vm1, ip_vm2 = 0x0A000101, 0x0A000201
    dp = start_datapath(
        h1.namespace,
        {
            "ports": {"1": vm1.port_link, "2": vm2.port_link},
            "flows": [
                exact_flow(route_to(2, VM2_MAC), in_port=1, eth_type=ETH_TYPE_IPV4, ip_dst=ip_vm2),
                exact_flow(route_to(1, VM1_MAC), in_port=2, eth_type=ETH_TYPE_IPV4, ip_dst=ip_vm1),
            ],
        },
    )

    output = ping(vm1.namespace, "10.0.2.1", count=2)
    assert "ttl=63" in output  # one router hop each way: 64 - 1
    tcp_transfer(vm1, vm2, "10.0.2.1")

    counters = dp.counters()
    assert counters["port.2.tx_bytes"] > TRANSFER_BYTES
    assert counters["port.1.rx_packets"] < TRANSFER_BYTES // 1400  # super-frames came through
    assert counters["offload_segmented"] == 0
    assert drops(counters) == {}


def test_misses_go_to_the_upcall_handler_and_back_through_execute(
    lab_scope: LabScope, start_datapath: Any
) -> None:
    """Only ARP has a flow on h1; every IPv4 frame from VM1 misses, goes to the upcall
    handler as a wire-ready frame (super-frames cut first) and leaves through `execute()`."""
    lab = build_two_hosts(lab_scope)
    to_vm2 = [tunnel(lab.h2.underlay_ip, 2)]
    dp1 = start_datapath(
        lab.h1.namespace,
        {
            "underlay_ip": lab.h1.underlay_ip,
            "ports": {"1": lab.vm1.port_link},
            "flows": [exact_flow(to_vm2, in_port=1, eth_type=ETH_TYPE_ARP)],
            "miss_actions": {"1": to_vm2},
        },
    )
    start_datapath(
        lab.h2.namespace,
        {
            "underlay_ip": lab.h2.underlay_ip,
            "ports": {"2": lab.vm2.port_link},
            "flows": vm_to_tunnel_flows(2, VM1_MAC, lab.h1.underlay_ip, 1),
        },
    )

    ping(lab.vm1.namespace, "10.0.1.2", count=3)
    tcp_transfer(lab.vm1, lab.vm2, "10.0.1.2")

    counters = dp1.counters()
    assert counters["upcalls"] >= 3 + TRANSFER_BYTES // 1500  # every IPv4 frame, cut to MSS
    assert counters["offload_segmented"] > 0
    assert counters["megaflow_hits"] >= 1  # the ARP request
    assert drops(counters) == {}


def test_cleanup_never_signals_a_pid_that_is_no_longer_ours(lab_scope: LabScope) -> None:
    """A PID file left by a crash whose PID now belongs to someone else: removed, and the
    process lives on (start time and command line do not match the record)."""
    from hivenet.lab.cleanup import clean
    from hivenet.lab.netns import ProcessRecord, pid_file_path, read_start_time

    stranger = subprocess.Popen(["sleep", "30"])
    try:
        start_time = read_start_time(stranger.pid)
        assert start_time is not None
        stale = [
            ProcessRecord(
                stranger.pid, start_time + 1, lab_scope.namespace("h1"), "old", ("sleep", "30")
            ),
            ProcessRecord(stranger.pid, start_time, lab_scope.namespace("h2"), "old", ("python3",)),
        ]
        for record in stale:
            path = pid_file_path(record.namespace, record.label)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(record.to_json())

        report = clean(lab_scope.tag)

        assert stranger.poll() is None, "clean() signalled a process the lab did not start"
        assert report.processes == []
        assert sorted(report.pid_files) == sorted(
            pid_file_path(r.namespace, r.label).name for r in stale
        )
        assert not any(pid_file_path(r.namespace, r.label).exists() for r in stale)
    finally:
        stranger.kill()
        stranger.wait()
