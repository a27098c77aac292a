"""The eBPF fast path's programs in the kernel of this machine: the verifier accepts every
program of bpf/hn_fastpath.o (loaded and pinned by `KernelFastPath`, as the datapath does), and
the programs, run on frames built here (BPF_PROG_TEST_RUN), agree with the Python reference:
a hit rewrites the frame exactly as `execute_actions` does (checksums included) and redirects,
a miss goes to the agent, and the socket filter gives the opposite answer to tc.

Root only (BPF), no namespaces. Keys are made for ifindex 1: test runs see the loopback device.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import pytest

from hivenet.datapath.ebpf import bpfsys
from hivenet.datapath.ebpf.datapath import VXLAN_AGENT_MARK
from hivenet.datapath.ebpf.entries import kernel_entry, kernel_key
from hivenet.datapath.ebpf.kernel import BPFFS, KernelFastPath, object_path
from hivenet.flows.actions import Action, DecTtl, Output, SetField, Tunnel
from hivenet.flows.execute import execute_actions
from hivenet.flows.table import flow_match_values
from hivenet.model.types import FLOWSTATE_TUNNEL_KEY
from hivenet.packets import extract_flow_match
from hivenet.packets.builders import build_echo_request, build_tcp_segment, build_udp_datagram
from hivenet.packets.parse import verify_checksums
from hivenet.packets.vxlan import vxlan_encapsulate

TC_ACT_OK = 0
TC_ACT_SHOT = 2
TC_ACT_REDIRECT = 7
LOOPBACK_IFINDEX = 1
OUT_IFINDEX = 42  # any: a test run only reports the redirect
TCP_ACK = 0x10
TCP_PSH = 0x08
TCP_FIN = 0x01

MAC_A = "02:00:00:00:00:0a"
MAC_B = "02:00:00:00:00:0b"


@pytest.fixture
def kernel() -> Iterator[KernelFastPath]:
    if os.geteuid() != 0:
        pytest.skip("needs root (BPF)")
    made = KernelFastPath(None, vxlan_port=4789)
    made.setup()
    try:
        yield made
    finally:
        made.close()
    assert not made.pin_dir.exists()


def _program(kernel: KernelFastPath, name: str) -> int:
    return bpfsys.object_get(str(kernel.pin_dir / name))


def _install(kernel: KernelFastPath, frame: bytes, actions: list[Action], mtu: int = 0) -> None:
    values = flow_match_values(extract_flow_match(frame, 1))
    key = kernel_key(values, LOOPBACK_IFINDEX)
    assert key is not None
    entry = kernel_entry(values, actions, {2: OUT_IFINDEX}, OUT_IFINDEX, mtu=mtu)
    assert entry is not None
    kernel.set_entry(key, entry.value)


def _run(kernel: KernelFastPath, program: str, frame: bytes) -> tuple[int, bytes]:
    fd = _program(kernel, program)
    try:
        if program.endswith("_upcall"):
            # A socket filter's test run pulls one Ethernet header, as a receive does, and
            # (unlike tc's) does not push it back; AF_PACKET does. Lend it one to pull.
            return bpfsys.prog_test_run(fd, frame[:14] + frame)
        return bpfsys.prog_test_run(fd, frame)
    finally:
        os.close(fd)


def _tcp(flags: int = TCP_ACK, **changes: object) -> bytes:
    fields: dict[str, object] = {
        "eth_src": MAC_A,
        "eth_dst": MAC_B,
        "ip_src": "10.0.0.1",
        "ip_dst": "10.0.0.2",
        "src_port": 40000,
        "dst_port": 80,
        "flags": flags,
        "payload": b"x" * 50,
    }
    fields.update(changes)
    return build_tcp_segment(**fields)  # type: ignore[arg-type]


def test_every_program_is_loaded_and_pinned(kernel: KernelFastPath) -> None:
    assert object_path().is_file()
    pinned = {path.name for path in kernel.pin_dir.iterdir()}
    assert {
        "hn_port_ingress",
        "hn_port_upcall",
        "hn_tunnel_ingress",
        "hn_underlay_upcall",
        "hn_underlay_ingress",
        "hn_flows",
        "hn_ports",
    } <= pinned
    assert kernel.pin_dir.parent == BPFFS and kernel.pin_dir.name.startswith("hn-")


NAT_ACTIONS: list[Action] = [
    SetField("eth_src", 0x020000000001),
    SetField("eth_dst", 0x020000000002),
    SetField("ip_src", 0xC0A80101),
    SetField("ip_dst", 0xC0A80202),
    SetField("tp_src", 5555),
    SetField("tp_dst", 8080),
    DecTtl(),
    Output(2),
]


@pytest.mark.parametrize(
    ("name", "frame", "actions"),
    [
        ("tcp_nat", _tcp(), NAT_ACTIONS),
        ("tcp_push_to_tunnel", _tcp(TCP_ACK | TCP_PSH), [Tunnel("172.31.250.2", 77)]),
        (
            "udp_nat",
            build_udp_datagram(
                eth_src=MAC_A,
                eth_dst=MAC_B,
                ip_src="10.0.0.1",
                ip_dst="10.0.0.2",
                src_port=5353,
                dst_port=53,
                payload=b"query",
            ),
            NAT_ACTIONS,
        ),
        (
            "icmp_echo_routed",
            build_echo_request(
                eth_src=MAC_A,
                eth_dst=MAC_B,
                ip_src="10.0.0.1",
                ip_dst="10.0.0.2",
                identifier=9,
                sequence=1,
            ),
            [SetField("ip_dst", 0xC0A80202), DecTtl(), Output(2)],
        ),
    ],
)
def test_a_hit_rewrites_like_the_python_reference_and_redirects(
    kernel: KernelFastPath, name: str, frame: bytes, actions: list[Action]
) -> None:
    _install(kernel, frame, actions)
    verdict, output = _run(kernel, "hn_port_ingress", frame)
    assert verdict == TC_ACT_REDIRECT, name
    ((_, expected),) = execute_actions(frame, actions)
    assert output == expected, name
    assert verify_checksums(output) == []
    # The upcall filter must keep the hit away from the agent.
    assert _run(kernel, "hn_port_upcall", frame)[0] == 0
    assert kernel.counters()["kernel_hits"] == 1
    key = kernel_key(flow_match_values(extract_flow_match(frame, 1)), LOOPBACK_IFINDEX)
    assert key is not None
    assert kernel.entry_counters(key) == (1, len(frame))


@pytest.mark.parametrize(
    ("name", "packet"),
    [
        ("other_5_tuple", _tcp(src_port=40001)),
        ("fin_goes_to_the_agent", _tcp(TCP_ACK | TCP_FIN)),
        ("other_ttl", _tcp(ttl=9)),
        ("vlan_tagged", _tcp(vlan=5)),
    ],
)
def test_a_miss_goes_to_the_agent_and_not_through_tc(
    kernel: KernelFastPath, name: str, packet: bytes
) -> None:
    _install(kernel, _tcp(), [Output(2)])
    verdict, _output = _run(kernel, "hn_port_ingress", packet)
    assert verdict == TC_ACT_SHOT, name
    assert _run(kernel, "hn_port_upcall", packet)[0] != 0, name
    assert kernel.counters()["kernel_misses"] == 1


def test_a_packet_bigger_than_the_entrys_mtu_is_a_miss(kernel: KernelFastPath) -> None:
    _install(kernel, _tcp(), [Output(2)], mtu=90)  # 20 + 20 + 50 bytes: exactly the MTU
    assert _run(kernel, "hn_port_ingress", _tcp())[0] == TC_ACT_REDIRECT
    assert _run(kernel, "hn_port_upcall", _tcp())[0] == 0
    bigger = _tcp(payload=b"x" * 51)  # the same key, one byte more
    assert _run(kernel, "hn_port_ingress", bigger)[0] == TC_ACT_SHOT
    assert _run(kernel, "hn_port_upcall", bigger)[0] != 0  # the agent answers it


def _bad_header_checksum(frame: bytes) -> bytes:
    return frame[:24] + bytes((frame[24] ^ 0x5A,)) + frame[25:]


def test_a_bad_ipv4_header_checksum_misses_a_routed_entry_only(kernel: KernelFastPath) -> None:
    # The checksum is no key field: a routed (DecTtl) entry must not take a packet whose header
    # sum is wrong; the agent drops and counts it. A bridged entry forwards it (as a switch).
    routed, bridged = _tcp(), _tcp(src_port=40002)
    _install(kernel, routed, [DecTtl(), Output(2)])
    _install(kernel, bridged, [Output(2)])
    assert _run(kernel, "hn_port_ingress", _bad_header_checksum(routed))[0] == TC_ACT_SHOT
    assert _run(kernel, "hn_port_upcall", _bad_header_checksum(routed))[0] != 0
    assert _run(kernel, "hn_port_ingress", routed)[0] == TC_ACT_REDIRECT
    assert _run(kernel, "hn_port_ingress", _bad_header_checksum(bridged))[0] == TC_ACT_REDIRECT


def test_removed_entries_stop_hitting(kernel: KernelFastPath) -> None:
    frame = _tcp()
    _install(kernel, frame, [Output(2)])
    assert _run(kernel, "hn_port_ingress", frame)[0] == TC_ACT_REDIRECT
    (key,) = kernel.entry_keys()
    kernel.delete_entry(key)
    assert _run(kernel, "hn_port_ingress", frame)[0] == TC_ACT_SHOT
    assert kernel.entry_counters(key) is None


def test_lab_clean_removes_the_pins_of_datapaths_that_died(kernel: KernelFastPath) -> None:
    from hivenet.lab.cleanup import clean

    dead_pid = 2**22 + 1  # above pid_max's ceiling: no such process
    stale = BPFFS / f"hn-{dead_pid}-0"
    stale.mkdir()
    report = clean("zzzz")
    assert stale.name in report.bpf_pins and not stale.exists()
    assert kernel.pin_dir.exists()  # a running datapath's pins stay


def _vxlan(key: int, mark: int = 0) -> bytes:
    header = vxlan_encapsulate(b"", key)
    header = header[:7] + bytes([mark])
    return build_udp_datagram(
        eth_src=MAC_A,
        eth_dst="00:00:00:00:00:00",  # the test run's device (loopback): a frame for this host
        ip_src="172.31.250.2",
        ip_dst="172.31.250.1",
        src_port=50000,
        dst_port=4789,
        payload=header + _tcp(),
    )


def test_the_underlay_filter_gives_the_agent_what_the_kernel_must_not_deliver(
    kernel: KernelFastPath,
) -> None:
    """A local port's VXLAN is the kernel's, unless a peer's agent marked it (it may follow
    a flow-state message the agent must apply first); flow-state and unknown keys are the
    agent's."""
    local_key = 77
    bpfsys.map_update(kernel._fds["hn_ports"], struct.pack("=I", local_key), struct.pack("=I", 1))
    assert _run(kernel, "hn_underlay_upcall", _vxlan(local_key))[0] == 0
    assert _run(kernel, "hn_underlay_upcall", _vxlan(local_key, VXLAN_AGENT_MARK))[0] != 0
    assert _run(kernel, "hn_underlay_upcall", _vxlan(78))[0] != 0
    assert _run(kernel, "hn_underlay_upcall", _vxlan(FLOWSTATE_TUNNEL_KEY))[0] != 0


def _with_vxlan_header(frame: bytes, header: bytes, inner: bytes = b"") -> bytes:
    """`frame` (a `_vxlan` datagram) with its VXLAN header and inner frame replaced, the IP
    and UDP lengths and the IP header checksum made right again."""
    payload = header + inner
    ip = bytearray(frame[14:34])
    ip[2:4] = (20 + 8 + len(payload)).to_bytes(2, "big")
    ip[10:12] = b"\0\0"
    total = sum(int.from_bytes(ip[i : i + 2], "big") for i in range(0, 20, 2))
    total = (total & 0xFFFF) + (total >> 16)
    ip[10:12] = (~total & 0xFFFF).to_bytes(2, "big")
    udp = frame[34:38] + (8 + len(payload)).to_bytes(2, "big") + b"\0\0"
    return frame[:14] + bytes(ip) + udp + payload


@pytest.mark.parametrize(
    ("name", "header", "inner", "agent"),
    [
        ("local key, well formed", "0800000000004d00", _tcp(), False),
        ("no I flag", "0000000000004d00", _tcp(), True),
        ("a reserved flag bit", "0c00000000004d00", _tcp(), True),
        ("a reserved byte", "0800010000004d00", _tcp(), True),
        ("the last reserved byte (an agent's mark)", "0800000000004d01", _tcp(), True),
        ("inner frame shorter than Ethernet", "0800000000004d00", b"x" * 13, True),
        ("truncated VXLAN header", "0800", b"", True),
        ("unknown key", "0800000000004e00", _tcp(), True),
    ],
)
def test_the_underlay_programs_agree_and_the_kernel_gets_only_what_it_delivers(
    kernel: KernelFastPath, name: str, header: str, inner: bytes, agent: bool
) -> None:
    """Every datagram Linux's VXLAN device would drop without a readable reason goes to the
    agent (which counts it by reason) and tc drops the kernel's copy; a well-formed datagram
    for a local port is the kernel's alone."""
    bpfsys.map_update(kernel._fds["hn_ports"], struct.pack("=I", 77), struct.pack("=I", 1))
    frame = _with_vxlan_header(_vxlan(77), bytes.fromhex(header), inner)
    to_agent = _run(kernel, "hn_underlay_upcall", frame)[0] != 0
    verdict = _run(kernel, "hn_underlay_ingress", frame)[0]
    assert to_agent is agent, name
    assert verdict == (TC_ACT_SHOT if agent else TC_ACT_OK), name
    assert kernel.counters()["kernel_underlay_to_agent"] == (1 if agent else 0)


def test_the_underlay_programs_leave_other_traffic_to_the_stack(kernel: KernelFastPath) -> None:
    plain = _with_vxlan_header(_vxlan(77), b"")  # UDP to the VXLAN port, nothing in it
    other_port = bytearray(_vxlan(78))
    other_port[36:38] = (4790).to_bytes(2, "big")
    fragment = bytearray(_vxlan(78))
    fragment[20:22] = (0x2000).to_bytes(2, "big")  # MF: the stack reassembles it
    assert _run(kernel, "hn_underlay_ingress", plain)[0] == TC_ACT_SHOT  # truncated: agent's
    for frame in (bytes(other_port), bytes(fragment), _tcp()):
        assert _run(kernel, "hn_underlay_upcall", frame)[0] == 0
        assert _run(kernel, "hn_underlay_ingress", frame)[0] == TC_ACT_OK


def test_the_batch_dump_reads_every_entry_as_the_lookups_do(kernel: KernelFastPath) -> None:
    # More entries than one batch (4096), so the dump has to resume from its cursor.
    def key_of(frame: bytes) -> bytes:
        key = kernel_key(flow_match_values(extract_flow_match(frame, 1)), LOOPBACK_IFINDEX)
        assert key is not None
        return key

    wanted: dict[bytes, tuple[int, int]] = {}
    for port in range(5000):
        frame = _tcp(src_port=20000 + port)
        _install(kernel, frame, [Output(2)])
        wanted[key_of(frame)] = (0, 0)
    hit = _tcp(src_port=20007)
    for _ in range(3):
        assert _run(kernel, "hn_port_ingress", hit)[0] == TC_ACT_REDIRECT
    wanted[key_of(hit)] = (3, 3 * len(hit))
    dumped = kernel.all_entry_counters()
    assert dumped == wanted
    assert all(kernel.entry_counters(key) == counted for key, counted in dumped.items())
