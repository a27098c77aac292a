"""`EbpfReplayRig`: the real `EbpfDatapath` with replayed sockets and `FakeKernel` for its
kernel side, as a contract `Rig` (no root). A frame from a VM meets the fake kernel first, as it
meets tc first for real: a hit is forwarded there and never reaches the datapath's socket; a
miss goes to the socket. Tunnel arrivals for a bound key are delivered by the kernel; others
come up the underlay socket as whole Ethernet/IPv4/UDP/VXLAN frames.
"""

from __future__ import annotations

from collections.abc import Callable

from hivenet.clock import ManualClock
from hivenet.datapath import userspace
from hivenet.datapath.ebpf.datapath import EbpfDatapath
from hivenet.datapath.userspace import UserspaceDatapath
from hivenet.flows.actions import Output, Tunnel
from hivenet.packets import build_udp_datagram
from hivenet.packets.vxlan import vxlan_encapsulate
from tests.unit.datapath.ebpf.kernel_fake import FakeKernel
from tests.unit.datapath.fakes import MAC_A, MAC_B, FakeLoop, RecordingUdpSocket, ReplaySocket
from tests.unit.datapath.rigs import LOCAL_IP, REMOTE_IP, VNET_HEADER, ReplayRig


class EbpfReplayRig(ReplayRig):
    """ReplayRig's sockets and reading of what was sent; its own datapath and kernel."""

    def __init__(self, patch: Callable[[object, str, object], None]) -> None:
        self.clock = ManualClock()
        self.sockets: dict[str, ReplaySocket] = {}
        self.tunnel = RecordingUdpSocket()
        self.loop = FakeLoop()

        def open_port_socket(interface_name: str) -> ReplaySocket:
            sock = self.sockets[interface_name] = ReplaySocket()
            return sock

        patch(userspace, "open_port_socket", open_port_socket)
        patch(UserspaceDatapath, "_open_tunnel_socket", lambda _self: self.tunnel)
        self.kernel = FakeKernel()
        self.ebpf = EbpfDatapath(LOCAL_IP, clock=self.clock, kernel=self.kernel)
        self.ebpf.start(self.loop)  # type: ignore[arg-type]
        self.datapath = self.userspace = self.ebpf
        self.kernel_forwarded = 0
        self._ports: dict[int, str] = {}
        self._sent_seen: dict[str, int] = {}
        self._tunnel_seen = 0
        self._kernel_tunnelled: list[tuple[str, int, bytes]] = []

    def send_from_vm(self, port_key: int, *frames: bytes) -> None:
        sock = self.sockets[self._ports[port_key]]
        for frame in frames:
            sent = self.kernel.forward(port_key, frame)
            if sent is None:
                sock.queue.append(VNET_HEADER + frame)
                self.loop.readable(sock.fileno())
                continue
            self.kernel_forwarded += 1
            for action, output in sent:
                if isinstance(action, Output):
                    self.sockets[self._ports[action.port_key]].sent.append(VNET_HEADER + output)
                else:
                    assert isinstance(action, Tunnel)
                    self._kernel_tunnelled.append((action.remote_ip, action.tunnel_key, output))

    def tunnelled(self) -> list[tuple[str, int, bytes]]:
        result = super().tunnelled() + self._kernel_tunnelled
        self._kernel_tunnelled = []
        return result

    def arrive_from_tunnel(
        self, tunnel_key: int, payload: bytes, source_ip: str = REMOTE_IP
    ) -> None:
        if tunnel_key in self.kernel.ports:  # hn_tunnel_ingress delivers it by key
            peers = self.kernel.tunnel_peers
            if peers is not None and source_ip not in peers:  # ... from a peer only
                self.kernel.unknown_source_drops += 1
                return
            port_of_ifindex = {index: key for key, index in self.kernel.ports.items()}
            port_key = port_of_ifindex[self.kernel.ports[tunnel_key]]
            self.sockets[self._ports[port_key]].sent.append(VNET_HEADER + payload)
            return
        outer = build_udp_datagram(
            eth_src=MAC_B,
            eth_dst=MAC_A,
            ip_src=source_ip,
            ip_dst=LOCAL_IP,
            src_port=49152,
            dst_port=self.ebpf.vxlan_port,
            payload=vxlan_encapsulate(payload, tunnel_key),
        )
        self.kernel.underlay.queue.append(outer)
        self.loop.readable(self.kernel.underlay.fileno())
