"""One host's datapath with its surroundings, the same way for every backend, so the contract
suite (`test_contract.py`) can run one set of cases on each.

A rig owns a datapath on a fake clock, plays the VMs on its ports (`send_from_vm`, `delivered`)
and the underlay peer at `REMOTE_IP` (`tunnelled`, `arrive_from_tunnel`). `MemoryRig` wraps the
strict fake; `ReplayRig` runs the real `UserspaceDatapath` over replayed sockets (no root); the
e2e tier adds a rig on real veths and UDP (tests/e2e/test_datapath_contract.py).
"""

from __future__ import annotations

from collections.abc import Callable

from hivenet.clock import ManualClock
from hivenet.datapath import userspace
from hivenet.datapath.base import Datapath
from hivenet.datapath.memory import MemoryDatapath, MemoryUnderlay
from hivenet.datapath.userspace import UserspaceDatapath
from hivenet.packets.vxlan import vxlan_decapsulate, vxlan_encapsulate
from tests.unit.datapath.fakes import FakeLoop, RecordingUdpSocket, ReplaySocket

LOCAL_IP = "127.0.0.1"
REMOTE_IP = "127.0.0.2"
VNET_HEADER = bytes(10)  # virtio-net header with no offload work, as a port socket reads it


class Rig:
    """What a contract case needs; subclasses fill it in for one backend."""

    datapath: Datapath
    clock: ManualClock

    def bind(self, port_key: int) -> None:
        self.datapath.bind_port(port_key, self.interface_name(port_key))

    def interface_name(self, port_key: int) -> str:
        """The VM-facing interface of port `port_key` (a real rig makes it on demand)."""
        return f"hnct{port_key}"

    def send_from_vm(self, port_key: int, *frames: bytes) -> None:
        raise NotImplementedError

    def delivered(self, port_key: int) -> list[bytes]:
        """Frames handed to the VM on `port_key` since the last call."""
        raise NotImplementedError

    def tunnelled(self) -> list[tuple[str, int, bytes]]:
        """(remote IP, tunnel key, inner frame or message) sent since the last call."""
        raise NotImplementedError

    def arrive_from_tunnel(
        self, tunnel_key: int, payload: bytes, source_ip: str = REMOTE_IP
    ) -> None:
        """VXLAN with `tunnel_key` around `payload`, from underlay address `source_ip`."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class _RecordingPeer:
    """The far end of the memory underlay: keeps what arrives."""

    def __init__(self) -> None:
        self.received: list[tuple[int, bytes]] = []

    def receive_tunnel(self, tunnel_key: int, frame: bytes, *, source_ip: str) -> None:
        self.received.append((tunnel_key, frame))


class MemoryRig(Rig):
    def __init__(self) -> None:
        self.clock = ManualClock()
        self.underlay = MemoryUnderlay()
        self.peer = _RecordingPeer()
        self.underlay.attach(REMOTE_IP, self.peer)  # type: ignore[arg-type]
        self.memory = MemoryDatapath("h1", LOCAL_IP, self.underlay, clock=self.clock)
        self.datapath = self.memory

    def send_from_vm(self, port_key: int, *frames: bytes) -> None:
        for frame in frames:
            self.memory.receive(port_key, frame)

    def delivered(self, port_key: int) -> list[bytes]:
        return self.memory.take(port_key)

    def tunnelled(self) -> list[tuple[str, int, bytes]]:
        sent = [(REMOTE_IP, key, frame) for key, frame in self.peer.received]
        self.peer.received.clear()
        return sent

    def arrive_from_tunnel(
        self, tunnel_key: int, payload: bytes, source_ip: str = REMOTE_IP
    ) -> None:
        self.memory.receive_tunnel(tunnel_key, payload, source_ip=source_ip)


class ReplayRig(Rig):
    """The real userspace datapath; only its sockets and event loop are fakes."""

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
        self.userspace = UserspaceDatapath(LOCAL_IP, clock=self.clock)
        self.userspace.start(self.loop)  # type: ignore[arg-type]
        self.datapath = self.userspace
        self._ports: dict[int, str] = {}
        self._sent_seen: dict[str, int] = {}
        self._tunnel_seen = 0

    def bind(self, port_key: int) -> None:
        super().bind(port_key)
        self._ports[port_key] = self.interface_name(port_key)

    def send_from_vm(self, port_key: int, *frames: bytes) -> None:
        sock = self.sockets[self._ports[port_key]]
        sock.queue.extend(VNET_HEADER + frame for frame in frames)
        self.loop.readable(sock.fileno())

    def delivered(self, port_key: int) -> list[bytes]:
        name = self._ports[port_key]
        sent = self.sockets[name].sent
        seen = self._sent_seen.get(name, 0)
        self._sent_seen[name] = len(sent)
        return [packet[len(VNET_HEADER) :] for packet in sent[seen:]]

    def tunnelled(self) -> list[tuple[str, int, bytes]]:
        datagrams = self.tunnel.split_with_addresses()
        fresh = datagrams[self._tunnel_seen :]
        self._tunnel_seen = len(datagrams)
        result = []
        for (address, port), datagram in fresh:
            assert port == self.userspace.vxlan_port
            key, inner = vxlan_decapsulate(datagram)
            result.append((address, key, inner))
        return result

    def arrive_from_tunnel(
        self, tunnel_key: int, payload: bytes, source_ip: str = REMOTE_IP
    ) -> None:
        self.tunnel.queue.append(vxlan_encapsulate(payload, tunnel_key))
        self.tunnel.sources.append((source_ip, userspace.DEFAULT_VXLAN_PORT))
        self.loop.readable(self.tunnel.fileno())

    def close(self) -> None:
        self.userspace.close()
