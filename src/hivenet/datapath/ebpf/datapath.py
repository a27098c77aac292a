"""`EbpfDatapath`: the userspace datapath with established flows moved into the kernel.

Owns: the offload bookkeeping between the megaflow table and the kernel's exact-match map
(`hn_flows`): which kernel entries stand for which megaflow, their removal when the megaflow is
invalidated, replaced, evicted or expired, folding the kernel's per-entry counters back into
the megaflows (idle expiry, flow-state refresh and `flows()` see kernel traffic), and the
kernel's counters. The kernel objects themselves are `kernel.KernelFastPath`'s.

How a packet goes: a VM port's frame is seen first by the agent's AF_PACKET tap, whose socket
filter (hn_port_upcall) takes it only when the kernel map has no entry for it; then tc ingress
(hn_port_ingress) forwards it on a hit and drops it on a miss. A frame that reached userspace
runs the userspace path: on a megaflow hit it is forwarded here and an exact entry for its key
is written to the kernel (when the actions are ones the kernel does, `entries.kernel_entry`),
so the next packet of that flow stays in the kernel; on a miss it is upcalled to the agent, and
the megaflow the agent installs for it gets the frame's exact entry at once. Received VXLAN goes
to the collect-metadata device, whose tc ingress delivers it by key to the local port; what it
does not deliver (flow-state messages, unknown keys) reaches `_decapsulate` via an AF_PACKET
socket on the underlay with a socket filter. Slow-path tunnel output leaves from an ephemeral
UDP source port (the VXLAN device owns the VXLAN port; receivers look at the destination only)
and carries `VXLAN_AGENT_MARK`: a receiving eBPF host hands it to its agent, not to its kernel,
because it may depend on the flow-state message sent just before it (a NAT binding the reply
needs), and only the agent's one socket keeps the two in order. Without the mark the kernel
delivered the packet while the agent was still reading the message, and the member's first
replies left unNATed.

Built on `UserspaceDatapath` by subclassing: `_lookup_slow` (megaflow hit -> offload),
`_upcall` (remember the frame being simulated) and `_open_tunnel_socket` are overridden; mypy
checks the overrides against the base class.
Must not touch: the simulation, the store, or kernel objects other than its `KernelFastPath`'s.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from hivenet.datapath._offload import VNET_HEADER_LEN
from hivenet.datapath.ebpf.entries import kernel_entry, kernel_key, mask_allows_exact_entry
from hivenet.datapath.userspace import (
    _PACKET_STATS,
    DEFAULT_VXLAN_PORT,
    PACKET_STATISTICS,
    SOL_PACKET,
    UserspaceDatapath,
    _ActionPlan,
    _BoundPort,
    interface_rx_packets,
)
from hivenet.flows.actions import Action
from hivenet.flows.table import Flow, Tag

log = logging.getLogger(__name__)

_ETHERNET_HEADER_LEN = 14
# In the last reserved VXLAN byte of what an agent sends itself (bpf: HN_VXLAN_AGENT_MARK).
VXLAN_AGENT_MARK = 0x01
_UDP_HEADER_LEN = 8
_IP_PROTO_UDP = 17
_BATCH_SYNC_ENTRIES = 64  # above this many kernel entries, counters are read in one batch dump


class FastPathKernel(Protocol):
    """What the datapath needs of the kernel side (`KernelFastPath`; tests pass a fake)."""

    tunnel_ifindex: int | None

    def setup(self) -> None: ...
    def close(self) -> None: ...
    def open_underlay_socket(self) -> socket.socket | None: ...
    def attach_port(self, port_key: int, interface_name: str, sock: socket.socket) -> int: ...
    def detach_port(self, port_key: int, interface_name: str) -> None: ...
    def set_entry(self, key: bytes, value: bytes) -> None: ...
    def delete_entry(self, key: bytes) -> None: ...
    def entry_counters(self, key: bytes) -> tuple[int, int] | None: ...
    def all_entry_counters(self) -> dict[bytes, tuple[int, int]]: ...
    def counters(self) -> dict[str, int]: ...
    def set_tunnel_peers(self, addresses: frozenset[str] | None) -> None: ...
    def port_frames(self, ifindex: int) -> int | None: ...


class _Offloaded:
    """The kernel entries of one megaflow and what the kernel counted on each so far."""

    __slots__ = ("entries",)

    def __init__(self) -> None:
        # kernel key -> [packets, bytes already folded into the flow, in port, out port]
        self.entries: dict[bytes, list[int]] = {}


class EbpfDatapath(UserspaceDatapath):
    """The `Datapath` of one host with a kernel fast path (see the module docstring).

    `start()` raises `kernel.FastPathUnavailable` (with nothing left behind) where the kernel
    side cannot load; the caller then falls back to `UserspaceDatapath`."""

    _vxlan_mark = VXLAN_AGENT_MARK

    def __init__(
        self,
        underlay_ip: str | None,
        *,
        vxlan_port: int = DEFAULT_VXLAN_PORT,
        kernel: FastPathKernel | None = None,
        max_flows: int = 100_000,
        batch_size: int = 64,
        expiry_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(
            underlay_ip,
            vxlan_port=vxlan_port,
            max_flows=max_flows,
            batch_size=batch_size,
            expiry_interval=expiry_interval,
            clock=clock,
        )
        if kernel is None:
            from hivenet.datapath.ebpf.kernel import KernelFastPath

            kernel = KernelFastPath(underlay_ip, vxlan_port=vxlan_port)
        self.kernel = kernel
        self._port_ifindexes: dict[int, int] = {}
        self._offloaded: dict[Flow, _Offloaded] = {}
        self._entry_owner: dict[bytes, Flow] = {}
        self._simulating: tuple[int, tuple[int, ...]] | None = None
        # Kernel entries to write once the frames of the current port batch are sent (None:
        # outside a batch, written at once): a first packet does not wait for the syscalls.
        self._deferred_offloads: list[tuple[int, tuple[int, ...], Flow]] | None = None
        self._underlay_sock: socket.socket | None = None
        self._underlay_buffer = bytearray(65536)
        self._underlay_drops = 0  # what the underlay socket's full buffer cost, summed
        self._offload_installs = 0
        self._kernel_packets = 0
        self._kernel_bytes = 0
        self._offload_refused = 0
        # What this agent tunnels goes to the peer agent's AF_PACKET socket on the underlay
        # (marked), which gets a UDP GSO train over veth as one frame it cannot cut apart
        # (no segment size): the several equal-size fragments of one datagram arrived as one
        # oversized frame. So datagram by datagram (bulk traffic is in the kernel anyway).
        self._udp_gso = False

    # ---- life cycle -------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.kernel.setup()
        try:
            super().start(loop)
            self._underlay_sock = self.kernel.open_underlay_socket()
            if self._underlay_sock is not None and self._loop is not None:
                self._loop.add_reader(self._underlay_sock.fileno(), self._on_underlay_readable)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for port_key in list(self._ports):
            self.unbind_port(port_key)
        if self._underlay_sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._underlay_sock.fileno())
            self._underlay_sock.close()
            self._underlay_sock = None
        super().close()
        self.kernel.close()
        self._offloaded.clear()
        self._entry_owner.clear()

    def _open_tunnel_socket(self) -> socket.socket:
        # The kernel VXLAN device listens on vxlan_port; the slow path only sends, from an
        # ephemeral port (VXLAN receivers look at the destination port alone).
        listen_port, self.vxlan_port = self.vxlan_port, 0
        try:
            return super()._open_tunnel_socket()
        finally:
            self.vxlan_port = listen_port

    # ---- ports ------------------------------------------------------------------------------

    def bind_port(self, port_key: int, interface_name: str) -> None:
        super().bind_port(port_key, interface_name)
        try:
            ifindex = self.kernel.attach_port(port_key, interface_name, self._ports[port_key].sock)
        except BaseException:
            super().unbind_port(port_key)
            raise
        self._port_ifindexes[port_key] = ifindex
        port = self._ports[port_key]
        if port.rx_baseline is not None:  # tc counts from its attachment on
            port.rx_baseline = interface_rx_packets(interface_name)

    def _frames_seen(self, port: _BoundPort) -> int | None:
        """Every frame of the port passes tc ingress (the socket gets only the misses)."""
        ifindex = self._port_ifindexes.get(port.key)
        return None if ifindex is None else self.kernel.port_frames(ifindex)

    def unbind_port(self, port_key: int) -> None:
        port = self._ports.get(port_key)
        if port is not None:
            self.kernel.detach_port(port_key, port.interface_name)
            self._port_ifindexes.pop(port_key, None)
            # Entries keyed on this port's ifindex or sending to it would outlive it.
            for flow, offloaded in list(self._offloaded.items()):
                for key, (_, _, in_port, out_port) in list(offloaded.entries.items()):
                    if port_key in (in_port, out_port):
                        self._delete_entry(flow, key)
        super().unbind_port(port_key)

    # ---- flows ------------------------------------------------------------------------------

    def install_flow(
        self,
        match: tuple[int, ...],
        mask: tuple[int, ...],
        actions: Sequence[Action],
        tags: Iterable[Tag],
        *,
        idle_timeout: float = 60.0,
        hard_timeout: float = 0.0,
        mtu: int = 0,
    ) -> Flow | None:
        checked_actions = tuple(actions)
        self._check_tunnel_addresses(checked_actions)
        flow = self._table.install(
            match,
            mask,
            checked_actions,
            tags,
            self._clock(),
            idle_timeout=idle_timeout,
            hard_timeout=hard_timeout,
            mtu=mtu,
        )
        self._purge_removed()
        simulating = self._simulating
        if simulating is not None and flow.matches(simulating[1]):
            self._offload_soon(simulating[0], simulating[1], flow)
        return flow

    def invalidate(self, tags: Iterable[Tag]) -> int:
        removed = self._table.invalidate(tags)
        for flow in removed:
            self._forget(flow)
        return len(removed)

    def expire_flows(self) -> int:
        now = self._clock()
        self._sync_kernel_counters(now)
        removed = self._table.expire(now)
        for flow in removed:
            self._forget(flow)
        return len(removed)

    def flows(self) -> list[Flow]:
        self._sync_kernel_counters(self._clock())
        return super().flows()

    def counters(self) -> dict[str, int]:
        self._sync_kernel_counters(self._clock())
        result = super().counters()
        result.update(self.kernel.counters())
        result["kernel_entries"] = len(self._entry_owner)
        result["kernel_packets"] = self._kernel_packets
        result["kernel_bytes"] = self._kernel_bytes
        result["kernel_offloads"] = self._offload_installs
        result["kernel_offload_refused"] = self._offload_refused
        return result

    def set_tunnel_peers(self, addresses: Iterable[str] | None) -> None:
        """The userspace check (flow-state messages and marked frames reach `_decapsulate`)
        and the kernel's (hn_tunnel_ingress, for what the VXLAN device delivers itself)."""
        super().set_tunnel_peers(addresses)
        self.kernel.set_tunnel_peers(self._tunnel_peers)

    def kernel_entries(self) -> dict[bytes, Flow]:
        """Kernel key -> the megaflow it stands for (a copy, for tests and tools)."""
        return dict(self._entry_owner)

    # ---- the slow path ----------------------------------------------------------------------

    def _lookup_slow(
        self, port: _BoundPort, key: object, length: int, now: float
    ) -> tuple[Flow, _ActionPlan] | None:
        """A frame the kernel did not forward: megaflow hit -> forward it and offload its exact
        entry; miss -> upcall. The base class's raw-key cache is left empty on purpose: every
        frame that reaches userspace passes here, so every megaflow hit can be offloaded."""
        frame = bytes(port.view[VNET_HEADER_LEN:length])
        parsed = self._parse_slow(port.key, bytes(port.view[:VNET_HEADER_LEN]), frame, now)
        if parsed is None:
            return None
        values, fragment = parsed
        flow = self._table.lookup_values(values, now, packet_bytes=len(frame))
        if flow is None:
            self._simulating = (port.key, values)
            try:
                self._upcall_first(port.key, bytes(port.view[:VNET_HEADER_LEN]), frame, fragment)
            finally:
                self._simulating = None
            return None
        self._megaflow_hits += 1
        if fragment is not None:
            self._fragments.record(fragment.key, flow.actions, flow.mtu)
        self._offload_soon(port.key, values, flow)
        return flow, self._plan_for(flow.actions)

    def _on_port_readable(self, port: _BoundPort) -> None:
        self._deferred_offloads = []
        try:
            super()._on_port_readable(port)
        finally:
            deferred, self._deferred_offloads = self._deferred_offloads, None
            for port_key, values, flow in deferred:
                self._offload(port_key, values, flow)

    def _offload_soon(self, port_key: int, values: tuple[int, ...], flow: Flow) -> None:
        if self._deferred_offloads is None:
            self._offload(port_key, values, flow)
        else:
            self._deferred_offloads.append((port_key, values, flow))

    def _offload(self, port_key: int, values: tuple[int, ...], flow: Flow) -> None:
        ifindex = self._port_ifindexes.get(port_key)
        if ifindex is None or flow.removed:
            return
        key = kernel_key(values, ifindex)
        if key is None:
            return
        if key in self._entry_owner and self._entry_owner[key] is flow:
            return
        entry = (
            kernel_entry(
                values,
                flow.actions,
                self._port_ifindexes,
                self.kernel.tunnel_ifindex,
                mtu=flow.mtu,
            )
            if mask_allows_exact_entry(flow.mask)
            else None
        )
        if entry is None:
            self._offload_refused += 1
            return
        previous = self._entry_owner.get(key)
        if previous is not None:  # the key moves to this megaflow; the update overwrites it
            self._delete_entry(previous, key, in_kernel=False)
        try:
            self.kernel.set_entry(key, entry.value)
        except OSError as error:
            self._drop(f"kernel_entry_error_{error.errno}")
            self._entry_owner.pop(key, None)
            return
        self._offload_installs += 1
        self._entry_owner[key] = flow
        out_port = -1 if entry.output_port is None else entry.output_port
        self._offloaded.setdefault(flow, _Offloaded()).entries[key] = [0, 0, port_key, out_port]

    def _delete_entry(self, flow: Flow, key: bytes, *, in_kernel: bool = True) -> None:
        offloaded = self._offloaded.get(flow)
        if offloaded is not None:
            offloaded.entries.pop(key, None)
            if not offloaded.entries:
                del self._offloaded[flow]
        if self._entry_owner.get(key) is flow:
            del self._entry_owner[key]
            if in_kernel:
                self.kernel.delete_entry(key)

    def _forget(self, flow: Flow) -> None:
        """Remove the kernel entries of a megaflow that left the table."""
        offloaded = self._offloaded.get(flow)
        if offloaded is not None:
            for key in list(offloaded.entries):
                self._delete_entry(flow, key)

    def _purge_removed(self) -> None:
        """Entries of megaflows the table dropped on its own (replaced by an install with the
        same match and mask, or evicted beyond max_flows)."""
        for flow in [flow for flow in self._offloaded if flow.removed]:
            self._forget(flow)

    def _sync_kernel_counters(self, now: float) -> None:
        """Fold what the kernel counted since the last call into the megaflows (their idle
        timers restart when their entries were hit) and into the port and tunnel counters."""
        self._purge_removed()
        # Beyond a few entries one batch dump of the map (a syscall per 4096 entries) costs far
        # less than a lookup syscall per entry: at 10k flows, every expiry tick.
        dump = (
            self.kernel.all_entry_counters()
            if len(self._entry_owner) > _BATCH_SYNC_ENTRIES
            else None
        )
        # Traffic per (in port, out port) and per megaflow, applied once each at the end: at
        # 10k entries of a few megaflows that is a few updates instead of 10k.
        by_ports: dict[tuple[int, int], list[int]] = {}
        for flow, offloaded in list(self._offloaded.items()):
            flow_packets = flow_bytes = 0
            for key, seen in list(offloaded.entries.items()):
                counted = self.kernel.entry_counters(key) if dump is None else dump.get(key)
                if counted is None:  # the kernel's LRU evicted it
                    self._delete_entry(flow, key, in_kernel=False)
                    continue
                packets = counted[0] - seen[0]
                if packets <= 0:
                    continue
                byte_count = counted[1] - seen[1]
                seen[0], seen[1] = counted
                flow_packets += packets
                flow_bytes += byte_count
                pair = by_ports.get((seen[2], seen[3]))
                if pair is None:
                    by_ports[(seen[2], seen[3])] = [packets, byte_count]
                else:
                    pair[0] += packets
                    pair[1] += byte_count
            if flow_packets:
                if self._table.record_use(flow, now, flow_bytes):
                    flow.packets += flow_packets - 1
                else:
                    self._forget(flow)
        for (in_port, out_port), (packets, byte_count) in by_ports.items():
            self._account_kernel_traffic(in_port, out_port, packets, byte_count)

    def _account_kernel_traffic(
        self, in_port: int, out_port: int, packets: int, byte_count: int
    ) -> None:
        self._kernel_packets += packets
        self._kernel_bytes += byte_count
        source = self._ports.get(in_port)
        if source is not None:
            source.rx_packets += packets
            source.rx_bytes += byte_count
        target = self._ports.get(out_port)
        if target is not None:
            target.tx_packets += packets
            target.tx_bytes += byte_count
        elif out_port < 0:
            self._tunnel_tx_packets += packets
            self._tunnel_tx_bytes += byte_count

    # ---- received VXLAN the kernel did not deliver -------------------------------------------

    def _underlay_socket_drops(self) -> int:
        """Frames for the agent lost at its full underlay socket (PACKET_STATISTICS, which
        resets on each read: summed here); the kernel dropped its copy at tc, so they are
        lost, and counted as the userspace datapath's UDP socket drops are."""
        getsockopt = getattr(self._underlay_sock, "getsockopt", None)  # tests' fakes: none
        if getsockopt is not None:
            try:
                _packets, drops = _PACKET_STATS.unpack(
                    getsockopt(SOL_PACKET, PACKET_STATISTICS, _PACKET_STATS.size)
                )
            except (OSError, struct.error):
                drops = 0
            self._underlay_drops += drops
        return self._underlay_drops

    def _on_underlay_readable(self) -> None:
        sock = self._underlay_sock
        if sock is None:
            return
        buffer = self._underlay_buffer
        for _ in range(self._batch_size):
            try:
                length = sock.recv_into(buffer)
            except BlockingIOError:
                return
            except OSError:
                self._drop("underlay_rx_error")
                return
            frame = bytes(buffer[:length])
            datagram = vxlan_datagram(frame)
            if datagram is None:
                self._drop("underlay_malformed")
                continue
            # vxlan_datagram checked the IPv4 header is there: its source is bytes 12..16.
            start = _ETHERNET_HEADER_LEN + 12
            self._decapsulate(datagram, socket.inet_ntoa(frame[start : start + 4]))


def vxlan_datagram(frame: bytes) -> bytes | None:
    """The UDP payload (VXLAN header and what follows) of an Ethernet/IPv4/UDP frame."""
    if len(frame) < _ETHERNET_HEADER_LEN + 20 + _UDP_HEADER_LEN:
        return None
    version_ihl = frame[_ETHERNET_HEADER_LEN]
    header_length = (version_ihl & 0x0F) * 4
    if version_ihl >> 4 != 4 or header_length < 20 or frame[_ETHERNET_HEADER_LEN + 9] != 17:
        return None
    total_length = int.from_bytes(frame[_ETHERNET_HEADER_LEN + 2 : _ETHERNET_HEADER_LEN + 4])
    start = _ETHERNET_HEADER_LEN + header_length + _UDP_HEADER_LEN
    end = _ETHERNET_HEADER_LEN + total_length
    if end > len(frame) or start > end:
        return None
    return frame[start:end]
