"""The `Datapath` contract (tests/unit/datapath/test_contract.py) once more, for real: the
userspace datapath on veth pairs (one per port, named in a fresh `LabScope`) and a real VXLAN
socket on 127.0.0.1, its peer a UDP socket on 127.0.0.2. The VM end of each veth is an
AF_PACKET socket of the test. Every case of the contract is imported and runs here with this
`rig`; the unit tier runs them on the memory fake and on replayed sockets.

The datapath runs on its own event loop, pumped by the rig for a short real while after each
action (`SETTLE` seconds), and reads a fake clock, so expiry cases stay exact.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
from collections.abc import Iterator

import pytest

from hivenet.clock import ManualClock
from hivenet.datapath.userspace import UserspaceDatapath
from hivenet.lab.netns import LabScope
from hivenet.packets.vxlan import vxlan_decapsulate, vxlan_encapsulate
from tests.unit.datapath.rigs import LOCAL_IP, REMOTE_IP, Rig
from tests.unit.datapath.test_contract import *  # noqa: F403 (the cases, collected here again)

SETTLE = 0.3  # real seconds the datapath's loop runs after each action (slack for a loaded machine)
PACKET_OUTGOING = 4  # linux/if_packet.h: a frame this socket's interface sent


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((LOCAL_IP, 0))
        return int(probe.getsockname()[1])


class VethRig(Rig):
    def __init__(self, scope: LabScope) -> None:
        self.scope = scope
        self.clock = ManualClock()
        self.loop = asyncio.new_event_loop()
        port = _free_udp_port()
        self.peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.peer.bind((REMOTE_IP, port))
        self.peer.setblocking(False)
        self.userspace = UserspaceDatapath(LOCAL_IP, vxlan_port=port, clock=self.clock)
        self.userspace.start(self.loop)
        self.datapath = self.userspace
        self.vm_sockets: dict[int, socket.socket] = {}

    def interface_name(self, port_key: int) -> str:
        name = self.scope.link(f"c{port_key}")
        if port_key not in self.vm_sockets:
            self._make_veth(port_key, name)
        return name

    def _make_veth(self, port_key: int, name: str) -> None:
        vm_end = f"{name}v"
        subprocess.run(
            ["ip", "link", "add", name, "type", "veth", "peer", "name", vm_end], check=True
        )
        for end in (name, vm_end):
            # No IPv6 on the pair: its router solicitations and MLD would be frames no case
            # sent.
            subprocess.run(["sysctl", "-qw", f"net.ipv6.conf.{end}.disable_ipv6=1"], check=True)
            subprocess.run(["ip", "link", "set", end, "up"], check=True)
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        sock.bind((vm_end, 0))
        sock.setblocking(False)
        self.vm_sockets[port_key] = sock

    def settle(self) -> None:
        self.loop.run_until_complete(asyncio.sleep(SETTLE))

    def send_from_vm(self, port_key: int, *frames: bytes) -> None:
        for frame in frames:
            self.vm_sockets[port_key].send(frame)
        self.settle()

    def delivered(self, port_key: int) -> list[bytes]:
        self.settle()
        frames: list[bytes] = []
        sock = self.vm_sockets[port_key]
        while True:
            try:
                frame, address = sock.recvfrom(65536)
            except BlockingIOError:
                return frames
            if address[2] != PACKET_OUTGOING:
                frames.append(frame)

    def tunnelled(self) -> list[tuple[str, int, bytes]]:
        self.settle()
        sent: list[tuple[str, int, bytes]] = []
        while True:
            try:
                datagram, _source = self.peer.recvfrom(65536)
            except BlockingIOError:
                return sent
            key, inner = vxlan_decapsulate(datagram)
            sent.append((REMOTE_IP, key, inner))

    def arrive_from_tunnel(
        self, tunnel_key: int, payload: bytes, source_ip: str = REMOTE_IP
    ) -> None:
        datagram = vxlan_encapsulate(payload, tunnel_key)
        if source_ip == REMOTE_IP:
            self.peer.sendto(datagram, (LOCAL_IP, self.userspace.vxlan_port))
        else:  # another sender on the loopback underlay
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
                other.bind((source_ip, 0))
                other.sendto(datagram, (LOCAL_IP, self.userspace.vxlan_port))
        self.settle()

    def close(self) -> None:
        self.userspace.close()
        self.loop.close()
        self.peer.close()
        for sock in self.vm_sockets.values():
            sock.close()


@pytest.fixture
def rig(lab_scope: LabScope) -> Iterator[Rig]:
    """Overrides the unit tier's `rig`: the veths are removed with the scope."""
    made = VethRig(lab_scope)
    try:
        yield made
    finally:
        made.close()
