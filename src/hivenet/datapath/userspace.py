"""`UserspaceDatapath`: the host's packet path in Python, on the agent's asyncio loop.

Owns: one AF_PACKET socket per bound port (the VM-facing interface, e.g. the host end of a veth
pair), one UDP socket for VXLAN (RFC 7348) on the host's underlay address, the fast path
(exact-match cache -> megaflow table -> upcall to the agent on a miss), executing flow actions
on frames, and the counters. Everything runs in the thread of the event loop passed to
`start()`; there are no threads and no locks.

Must not touch: the simulation or the topology (the agent decides; this only forwards), the
store, or interfaces it was not asked to bind. Sockets are opened in the network namespace of
the calling process: run the process inside the host's namespace (see `hivenet.lab.netns`).

Offloads stay ON on the veths. Each port socket has PACKET_VNET_HDR, so a frame arrives with a
virtio-net header that may say "checksum not done yet" or "this is a 64 KiB TCP super-frame".
Such a frame forwarded to another local port keeps its header, and the kernel completes it at
the output. A frame leaving through VXLAN, or handed to the agent, is made wire-ready here
(software segmentation and checksums, `hivenet.datapath._offload`). Actions that would make
the header lie (L3/L4 rewrites, VLAN push/pop that shift offsets) run on wire-ready frames.

Receive is batched: each readiness callback drains up to `batch_size` frames with `recv_into`
the port's one preallocated buffer; a forwarded frame is sent from that buffer (a memoryview),
so the fast path makes no per-frame bytes object. The fast path keys each port's flow cache on
raw header bytes (`hivenet.datapath._fastkey.raw_flow_key`: one struct call, no parsing) and
caches (flow, action plan); a miss, or a frame without a raw key, is parsed
(`extract_flow_match`) and looked up in the exact-match cache by field values, then in the
megaflow table, then upcalled. Tunnel output of one batch is held back and sent at its end,
equal-size datagrams to one peer as one UDP GSO train (one syscall for up to 64 frames). A
PACKET_MMAP (TPACKET_V3) ring was considered; see bench/datapath.py.

Upcalls are budgeted per ingress port (`hivenet.flows.budget.UpcallBudget`, a token bucket:
`upcall_rate` per second, `upcall_burst` at once; `set_upcall_budget`): a port over its budget
has its missed frames dropped (`drop.upcall_budget`, `port.<key>.upcall_budget_drops`) instead
of simulated, so one flooding VM cannot take the agent from the others. And one readiness
callback makes at most `upcalls_per_batch` upcalls (and takes at most 16 frames through the
slow path without finding a flow) before it returns to the loop (which calls it again:
readiness is level-triggered), so the ports ready together are served in turn and a busy port
delays another by a couple of simulations, not by a batch of them. A flooding port's socket
then fills and the kernel drops the rest of its frames, not the other ports'
(`port.<key>.rx_kernel_drops`, read from PACKET_STATISTICS by `counters()`).

Tunnel keys: the VNI is the egress port's tunnel key; received VXLAN is delivered by VNI to the
bound port with that key, without a flow lookup (the ingress host already simulated). The key
FLOWSTATE_TUNNEL_KEY (0xFFFFFF) carries flow-state messages (`hivenet.flowstate.wire`), not
frames: they go to the handler set with `set_flow_state_handler` (the agent's flow-state
sync) and are sent with `send_flow_state`. Other keys from FLOOD_KEY_BASE up are reserved
(flooding): counted and dropped for now. Once `set_tunnel_peers` gave the allowed underlay
sources (the agent: live members of its tunnel zones), a datagram from any other source is
dropped before its header is read (`drop.tunnel_unknown_source`).

External VTEPs (`bind_vtep`, the L2 gateway): a datagram from a bound VTEP's address is
checked before the tunnel peers: with a VNI bound to that address its frame enters the bound
virtual port like a frame from a local interface (flow lookup, upcall on a miss); with any
other VNI it is dropped as `tunnel_unknown_source`. Output to a VTEP is a plain `Tunnel`.

Counters (`counters()`): `port.<key>.{rx,tx}_{packets,bytes}`, `tunnel_{rx,tx}_{packets,bytes}`,
`upcalls`, `port.<key>.upcall_budget_drops`, `emc_hits`, `megaflow_hits`, `flows`, `offload_segmented`, `offload_checksummed`,
`offload_coalesced` (VXLAN trains merged back into one TCP super-frame), `mtu_upcalls` (flow
hits sent to the agent for being larger than the flow's MTU), and `drop.<reason>` for every
drop (malformed frames, bad VXLAN headers, flow drops, `too_big`, ...).

MTU: a flow installed with `mtu` (the egress network's, from the simulation) is not taken by
an IP packet larger than that (a GSO super-frame: by its segments' size), as OVS's
check_pkt_larger: IPv4 with DF and IPv6 go to the agent, whose simulation answers with ICMP
"fragmentation needed" / "packet too big"; IPv4 without DF is dropped (`too_big`). The check
costs one comparison for frames no longer than mtu + 14.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from hivenet.datapath._fastkey import RawFlowKey, raw_flow_key
from hivenet.datapath._fragments import Fragment, FragmentKey, FragmentTracker, ipv4_fragment
from hivenet.datapath._offload import (
    F_DATA_VALID,
    VNET_HEADER_LEN,
    ZERO_VNET_HEADER,
    coalesce_tcp,
    forwardable_header,
    needs_software_offload,
    segment_l3_length,
    wire_frames,
)
from hivenet.datapath.base import UpcallHandler, tunnel_peer_set
from hivenet.datapath.vtep import VtepTable
from hivenet.flows.actions import Action, DecTtl, Drop, Output, PopVlan, PushVlan, SetField, Tunnel
from hivenet.flows.budget import DEFAULT_UPCALL_BURST, DEFAULT_UPCALL_RATE, UpcallBudget
from hivenet.flows.execute import execute_actions
from hivenet.flows.table import ExactMatchCache, Flow, FlowTable, Tag, flow_match_values
from hivenet.model.types import (
    FLOOD_KEY_BASE,
    FLOWSTATE_TUNNEL_KEY,
    TUNNEL_KEY_MAX,
    TUNNEL_KEY_MIN,
)
from hivenet.packets import extract_flow_match
from hivenet.packets.errors import PacketError
from hivenet.packets.headers import VXLAN_FLAG_VNI_VALID, VXLAN_PORT
from hivenet.packets.mtu import FITS, TOO_BIG, mtu_verdict
from hivenet.packets.options import ipv4_unroutable
from hivenet.packets.vxlan import VXLAN_HEADER_SIZE, vxlan_encapsulate

log = logging.getLogger(__name__)

DEFAULT_VXLAN_PORT = VXLAN_PORT

# Linux constants the socket module does not export (linux/if_packet.h, asm/socket.h, in.h).
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_MR_PROMISC = 1
PACKET_QDISC_BYPASS = 20
PACKET_VNET_HDR = 15
PACKET_IGNORE_OUTGOING = 23
PACKET_STATISTICS = 6
PACKET_AUXDATA = 8
# struct tpacket_auxdata: status, len, snaplen, mac, net, vlan_tci, vlan_tpid.
_AUXDATA = struct.Struct("=IIIHHHH")
_AUXDATA_SPACE = socket.CMSG_SPACE(_AUXDATA.size)
TP_STATUS_VLAN_VALID = 1 << 4
TP_STATUS_VLAN_TPID_VALID = 1 << 6
_ETH_TYPE_VLAN = 0x8100
_VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
_VNET_U16 = struct.Struct("<H")  # hdr_len at 2, csum_start at 6
_VLAN_TAG = struct.Struct("!HH")
_PACKET_STATS = struct.Struct("=II")  # struct tpacket_stats: tp_packets, tp_drops (read resets)
ETH_P_ALL = 0x0003
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
IP_MTU_DISCOVER = 10
IP_PMTUDISC_DO = 2
IPV6_MTU_DISCOVER = 23
IPV6_PMTUDISC_DO = 2
SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
# linux/udp.h UDP_MAX_SEGMENTS; and one UDP datagram (all segments together) stays < 64 KiB.
_UDP_GSO_MAX_SEGMENTS = 64
_UDP_GSO_MAX_BYTES = 65000
_GRO_SEGMENT_SIZE = struct.Struct("=i")

_ETHERNET_HEADER_LEN = 14
# Upcalls one port's readiness callback may make before it lets the loop serve the others, and
# frames it may take through the slow path without finding a flow (upcalled, over the budget,
# malformed: each is parsed and looked up, tens of microseconds).
DEFAULT_UPCALLS_PER_BATCH = 2
_MISSES_PER_BATCH = 16
# Room for a 64 KiB GSO super-frame plus its Ethernet/VLAN header and the virtio-net header.
_PORT_RECV_SIZE = 65536 + 64
_TUNNEL_RECV_SIZE = 65536
_SOCKET_BUFFER_BYTES = 4 * 1024 * 1024

# Actions that leave a partial checksum and the header offsets of a frame valid: they touch
# neither the L3/L4 pseudo-header fields nor the position of the IP header.
_OFFLOAD_SAFE_FIELDS = frozenset({"eth_src", "eth_dst"})
_TRANSFORMS = (SetField, DecTtl, PushVlan, PopVlan)


@dataclass(frozen=True, slots=True)
class _ActionPlan:
    """What one flow's action list asks for, worked out once per distinct action tuple.

    `destinations` are the outputs of a plan without header transforms (the frame goes out as
    it came in). `drop_reason` is set when the list ends in a drop (explicit `Drop`, or empty).
    """

    actions: tuple[Action, ...]
    transforms: bool
    offload_safe: bool
    destinations: tuple[Output | Tunnel, ...]
    drop_reason: str | None
    # Routed (a TTL decrement): the IPv4 header checksum is checked on every packet, since
    # it is no match field and a good packet's flow must not carry a bad one (RFC 1812).
    routed: bool = False


def _plan(actions: tuple[Action, ...]) -> _ActionPlan:
    destinations: list[Output | Tunnel] = []
    transforms = False
    offload_safe = True
    drop_reason: str | None = "flow_no_actions" if not actions else None
    for action in actions:
        if isinstance(action, Drop):
            drop_reason = f"flow_{action.reason}"
            break
        if isinstance(action, Output | Tunnel):
            destinations.append(action)
        elif isinstance(action, _TRANSFORMS):
            transforms = True
            if isinstance(action, PushVlan | PopVlan) or (
                isinstance(action, SetField) and action.field not in _OFFLOAD_SAFE_FIELDS
            ):
                offload_safe = False
    if not destinations and drop_reason is None:
        drop_reason = "flow_no_output"
    routed = any(isinstance(action, DecTtl) for action in actions)
    return _ActionPlan(actions, transforms, offload_safe, tuple(destinations), drop_reason, routed)


# Tunnel output held back during one receive batch: (tunnel key, remote IP) -> (VXLAN header,
# peer address, wire frames in arrival order).
_TunnelBatch = dict[tuple[int, str], tuple[bytes, tuple[str, int], list[bytes]]]


class _BoundPort:
    """One bound virtual port: its packet socket, its receive buffer, its raw-key flow cache
    and its counters (plain ints on the hot path).

    `flow_cache` maps `raw_flow_key` of a frame received here to (flow, plan): a hit skips
    parsing, the megaflow lookup and the action planning. Entries whose flow was removed are
    noticed by `FlowTable.record_use` and replaced; the cache is bounded (oldest out first).
    """

    __slots__ = (
        "buffer",
        "flow_cache",
        "interface_name",
        "kernel_drops",
        "key",
        "recv_into",
        "rx_baseline",
        "rx_bytes",
        "rx_packets",
        "send",
        "sock",
        "socket_packets",
        "tx_bytes",
        "tx_packets",
        "view",
    )

    def __init__(self, key: int, interface_name: str, sock: socket.socket) -> None:
        self.key = key
        self.interface_name = interface_name
        self.sock = sock
        self.send = sock.send
        # Every frame is read into this one buffer and forwarded from it (no per-frame bytes).
        self.buffer = bytearray(_PORT_RECV_SIZE)
        self.view = memoryview(self.buffer)
        # A real packet socket hands out the 802.1Q tag the kernel took off (PACKET_AUXDATA);
        # test and benchmark stand-ins give plain frames.
        self.recv_into = (
            _tag_restoring_receiver(sock, self.view)
            if isinstance(sock, socket.socket)
            else sock.recv_into
        )
        # Ordered: evicting the oldest entry of a plain dict again and again scans the holes
        # that earlier evictions left at its front.
        self.flow_cache: OrderedDict[RawFlowKey, tuple[Flow, _ActionPlan]] = OrderedDict()
        self.rx_packets = 0
        self.rx_bytes = 0
        self.tx_packets = 0
        self.tx_bytes = 0
        self.kernel_drops = 0
        self.socket_packets = 0  # frames the kernel queued to (or dropped at) the socket
        # The interface's own receive count at bind: frames it took in that no HiveNet program
        # ever saw died in the host's stack (a truncated 802.1Q frame: see `stack_drops`).
        self.rx_baseline = (
            interface_rx_packets(interface_name) if isinstance(sock, socket.socket) else None
        )

    def read_kernel_drops(self) -> int:
        """Frames the kernel dropped because this socket's buffer was full (the port sent faster
        than we read: a flood held to its turns), summed since the bind."""
        getsockopt = getattr(self.sock, "getsockopt", None)
        if getsockopt is not None:
            try:
                packets, drops = _PACKET_STATS.unpack(
                    getsockopt(SOL_PACKET, PACKET_STATISTICS, _PACKET_STATS.size)
                )
            except (OSError, struct.error):
                packets = drops = 0
            self.kernel_drops += drops
            self.socket_packets += packets
        return self.kernel_drops


def interface_rx_packets(interface_name: str) -> int | None:
    """The kernel's receive packet count of `interface_name` in this process's network
    namespace (/proc/self/net/dev), None when it is not there."""
    try:
        lines = Path("/proc/self/net/dev").read_text().splitlines()[2:]
    except OSError:
        return None
    for line in lines:
        name, _, fields = line.partition(":")
        if name.strip() == interface_name:
            return int(fields.split()[1])
    return None


def udp_socket_drops(sock: socket.socket) -> int:
    """The kernel's receive drop count of a UDP socket of this process (0 when not found)."""
    try:
        inode = str(os.fstat(sock.fileno()).st_ino)
    except OSError:
        return 0
    for table in ("/proc/self/net/udp", "/proc/self/net/udp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 12 and fields[9] == inode:
                return int(fields[12])
    return 0


def unroutable_ipv4(buffer: memoryview, base: int, size: int) -> str | None:
    """The drop reason of an IPv4 frame at `buffer[base:base + size]` a router must not
    forward (`ipv4_unroutable`: bad header checksum, source route); None for any other frame
    (the flow matched it, so it parsed)."""
    at = base + 14
    eth_type = buffer[base + 12 : base + 14]
    if eth_type == b"\x81\x00":
        eth_type = buffer[base + 16 : base + 18]
        at += 4
    if eth_type != b"\x08\x00":
        return None
    return ipv4_unroutable(buffer, at)


def restore_vlan_tag(buffer: bytearray, length: int, auxdata: bytes) -> int:
    """Put back into the received frame in `buffer[:length]` (virtio-net header, then the
    frame) the outermost 802.1Q/802.1ad tag that the kernel's receive path took off and
    reported in `auxdata` (struct tpacket_auxdata); returns the new length.

    Why: Linux untags every VLAN frame before any packet socket sees it (skb_vlan_untag), so
    without this a tagged frame from a VM would be forwarded as untagged and a QinQ frame as
    single-tagged. `buffer` must have 4 spare bytes after `length`."""
    status, _len, _snaplen, _mac, _net, tci, tpid = _AUXDATA.unpack(auxdata)
    if not status & TP_STATUS_VLAN_VALID:
        return length
    if not status & TP_STATUS_VLAN_TPID_VALID:
        tpid = _ETH_TYPE_VLAN
    at = VNET_HEADER_LEN + 12
    buffer[at + 4 : length + 4] = buffer[at:length]
    _VLAN_TAG.pack_into(buffer, at, tpid, tci)
    if buffer[0] & _VIRTIO_NET_HDR_F_NEEDS_CSUM or buffer[1]:
        # Offsets in the virtio-net header count from the frame's start: the tag moved L3.
        header_length = _VNET_U16.unpack_from(buffer, 2)[0]
        if header_length:
            _VNET_U16.pack_into(buffer, 2, header_length + 4)
        _VNET_U16.pack_into(buffer, 6, _VNET_U16.unpack_from(buffer, 6)[0] + 4)
    return length + 4


def _tag_restoring_receiver(
    sock: socket.socket, buffer_view: memoryview
) -> Callable[[bytearray], int]:
    """`recv_into` for a packet socket with PACKET_AUXDATA on, always called with the buffer
    under `buffer_view`: the frame with its VLAN tag (4 bytes are kept free for it)."""
    recvmsg_into = sock.recvmsg_into
    into = (buffer_view[:-4],)

    def receive(buffer: bytearray) -> int:
        length, ancillary, _flags, _address = recvmsg_into(into, _AUXDATA_SPACE)
        for level, kind, data in ancillary:
            if level == SOL_PACKET and kind == PACKET_AUXDATA and data[0] & TP_STATUS_VLAN_VALID:
                return restore_vlan_tag(buffer, length, data)
        return length

    return receive


def open_port_socket(interface_name: str) -> socket.socket:
    """A non-blocking AF_PACKET socket on `interface_name` with the virtio-net header on,
    our own transmissions (and the host stack's) ignored, and the interface promiscuous."""
    # Protocol 0 receives nothing until bind() sets protocol and interface together, so no
    # frame from another interface slips in between.
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
        sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        sock.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
        sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, _SOCKET_BUFFER_BYTES)
        sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, _SOCKET_BUFFER_BYTES)
        sock.bind((interface_name, ETH_P_ALL))
        ifindex = socket.if_nametoindex(interface_name)
        # struct packet_mreq { int mr_ifindex; u16 mr_type; u16 mr_alen; u8 mr_address[8]; }
        membership = struct.pack("iHH8s", ifindex, PACKET_MR_PROMISC, 0, b"")
        sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, membership)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def parse_vxlan_header(datagram: bytes) -> tuple[int, str | None]:
    """(tunnel key, None) for a usable VXLAN datagram, else (0, drop reason). The hot-path twin
    of `hivenet.packets.vxlan.vxlan_decapsulate` (a unit test checks they agree), plus the
    datapath's own checks: an inner frame of at least an Ethernet header."""
    if len(datagram) < VXLAN_HEADER_SIZE + _ETHERNET_HEADER_LEN:
        return 0, "vxlan_truncated"
    # RFC 7348: the I flag must be set; the reserved bits are ignored on receipt.
    if not datagram[0] & VXLAN_FLAG_VNI_VALID:
        return 0, "vxlan_bad_flags"
    return int.from_bytes(datagram[4:7], "big"), None


class UserspaceDatapath:
    """The `Datapath` of one host, in userspace (see the module docstring).

    Typical use, inside the agent's event loop (in the host's network namespace):
    `dp = UserspaceDatapath("172.31.250.1"); dp.start(); dp.set_upcall_handler(h);
    dp.bind_port(7, "hnv1")` ... `dp.close()`.
    """

    # A mark in the last reserved byte of every VXLAN header this datapath sends (0: none).
    _vxlan_mark = 0

    def __init__(
        self,
        underlay_ip: str | None,
        *,
        vxlan_port: int = DEFAULT_VXLAN_PORT,
        max_flows: int = 100_000,
        emc_capacity: int = 8192,
        batch_size: int = 64,
        expiry_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        upcall_rate: float = DEFAULT_UPCALL_RATE,
        upcall_burst: int = DEFAULT_UPCALL_BURST,
        upcalls_per_batch: int = DEFAULT_UPCALLS_PER_BATCH,
    ) -> None:
        self._underlay_family = socket.AF_INET
        if underlay_ip is not None:
            try:
                address = ipaddress.ip_address(underlay_ip)
            except ValueError:
                raise ValueError(f"underlay_ip: {underlay_ip!r} is not an IP address") from None
            if address.version == 6:
                self._underlay_family = socket.AF_INET6
        if isinstance(vxlan_port, bool) or not isinstance(vxlan_port, int):
            raise ValueError(f"vxlan_port: expected an int, got {vxlan_port!r}")
        if not 1 <= vxlan_port <= 65535:
            raise ValueError(f"vxlan_port: {vxlan_port} is outside 1..65535")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
        if not expiry_interval > 0:
            raise ValueError(f"expiry_interval: expected a number > 0, got {expiry_interval!r}")
        if (
            isinstance(upcalls_per_batch, bool)
            or not isinstance(upcalls_per_batch, int)
            or upcalls_per_batch < 1
        ):
            raise ValueError(f"upcalls_per_batch: expected an int >= 1, got {upcalls_per_batch!r}")
        self.underlay_ip = underlay_ip
        self.vxlan_port = vxlan_port
        self._batch_size = batch_size
        self._expiry_interval = expiry_interval
        self._clock = clock
        self._table = FlowTable(max_flows)
        self._emc = ExactMatchCache(emc_capacity)
        self._emc_capacity = emc_capacity
        self._tunnel_batch: _TunnelBatch | None = None
        self._ports: dict[int, _BoundPort] = {}
        self._plans: dict[tuple[Action, ...], _ActionPlan] = {}
        self._vxlan_headers: dict[int, bytes] = {}
        self._upcall_handler: UpcallHandler | None = None
        # Per ingress port key: its upcall token bucket (made at its first upcall).
        self._upcall_budgets: dict[int, UpcallBudget] = {}
        self._upcall_rate = 0.0
        self._upcall_burst = 1
        self.set_upcall_budget(upcall_rate, upcall_burst)
        self._upcalls_per_batch = upcalls_per_batch
        self._batch_upcalls = 0
        self._flow_state_handler: Callable[[bytes], None] | None = None
        self._flowstate_rx = 0
        self._flowstate_tx = 0
        self._tunnel_peers: frozenset[str] | None = None
        self._vteps = VtepTable()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tunnel_sock: socket.socket | None = None
        self._expiry_timer: asyncio.TimerHandle | None = None
        self._drops: dict[str, int] = {}
        self._tunnel_rx_packets = 0
        self._tunnel_rx_bytes = 0
        self._tunnel_tx_packets = 0
        self._tunnel_tx_bytes = 0
        self._upcalls = 0
        self._emc_hits = 0
        self._megaflow_hits = 0
        self._mtu_upcalls = 0
        self._offload_segmented = 0
        self._offload_checksummed = 0
        self._offload_coalesced = 0
        self._udp_gso = True  # until the kernel refuses it (underlay without checksum offload)
        self._fragments = FragmentTracker()
        self._recording_fragment: FragmentKey | None = None

    # ---- life cycle -------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Open the VXLAN socket and start serving on `loop` (default: the running loop)."""
        if self._loop is not None:
            raise RuntimeError("UserspaceDatapath.start: already started")
        self._loop = loop or asyncio.get_running_loop()
        if self.underlay_ip is not None:
            self._tunnel_sock = self._open_tunnel_socket()
            self._loop.add_reader(self._tunnel_sock.fileno(), self._on_tunnel_readable)
        self._expiry_timer = self._loop.call_later(self._expiry_interval, self._expire_tick)

    def close(self) -> None:
        """Unbind every port and close every socket. Safe to call twice."""
        for port_key in list(self._ports):
            self.unbind_port(port_key)
        if self._tunnel_sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._tunnel_sock.fileno())
            self._tunnel_sock.close()
            self._tunnel_sock = None
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None
        self._loop = None

    def __enter__(self) -> UserspaceDatapath:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _open_tunnel_socket(self) -> socket.socket:
        sock = socket.socket(self._underlay_family, socket.SOCK_DGRAM)
        try:
            # VXLAN must not be fragmented (RFC 7348 section 4.3): refuse oversize frames.
            if self._underlay_family == socket.AF_INET:
                sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
            else:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DO)
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, _SOCKET_BUFFER_BYTES)
            sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, _SOCKET_BUFFER_BYTES)
            # Let the kernel hand over a train of same-size datagrams in one read (a peer's
            # UDP GSO send arrives whole over veth); we split it by the reported size.
            sock.setsockopt(SOL_UDP, UDP_GRO, 1)
            sock.bind((self.underlay_ip, self.vxlan_port))
            sock.setblocking(False)
        except OSError as error:
            sock.close()
            raise OSError(
                error.errno,
                f"VXLAN socket on {self.underlay_ip}:{self.vxlan_port}: {error.strerror}",
            ) from error
        return sock

    # ---- Datapath protocol ------------------------------------------------------------------

    def bind_port(self, port_key: int, interface_name: str) -> None:
        if self._loop is None:
            raise RuntimeError("UserspaceDatapath.bind_port: call start() first")
        _check_port_key("port_key", port_key)
        if port_key in self._ports:
            bound = self._ports[port_key].interface_name
            raise ValueError(f"port_key: {port_key} is already bound to {bound!r}")
        if port_key in self._vteps:
            raise ValueError(f"port_key: {port_key} is already bound to a VTEP")
        for port in self._ports.values():
            if port.interface_name == interface_name:
                raise ValueError(
                    f"interface_name: {interface_name!r} is already bound as port {port.key}"
                )
        try:
            sock = open_port_socket(interface_name)
        except OSError as error:
            raise OSError(
                error.errno, f"interface_name {interface_name!r}: {error.strerror}"
            ) from error
        port = _BoundPort(port_key, interface_name, sock)
        self._ports[port_key] = port
        self._loop.add_reader(sock.fileno(), self._on_port_readable, port)

    def unbind_port(self, port_key: int) -> None:
        port = self._ports.pop(port_key, None)
        if port is None:
            raise KeyError(f"port_key: {port_key} is not bound")
        if self._loop is not None:
            self._loop.remove_reader(port.sock.fileno())
        port.sock.close()
        self._upcall_budgets.pop(port_key, None)

    def bind_vtep(self, port_key: int, remote_ip: str, vni: int) -> None:
        _check_port_key("port_key", port_key)
        if port_key in self._ports:
            raise ValueError(f"port_key: {port_key} is already bound to an interface")
        self._vteps.bind(port_key, remote_ip, vni)

    def unbind_vtep(self, port_key: int) -> None:
        self._vteps.unbind(port_key)
        self._upcall_budgets.pop(port_key, None)

    def set_upcall_handler(self, handler: UpcallHandler) -> None:
        self._upcall_handler = handler

    def set_upcall_budget(self, rate: float, burst: int) -> None:
        """Each port may cause `rate` upcalls per second, `burst` at once; more are dropped
        (`drop.upcall_budget`, `port.<key>.upcall_budget_drops`). `rate` 0: no budget.
        Every port starts again with a full bucket."""
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not rate >= 0:
            raise ValueError(f"rate: expected a number >= 0, got {rate!r}")
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ValueError(f"burst: expected an int >= 1, got {burst!r}")
        self._upcall_rate = float(rate)
        self._upcall_burst = burst
        self._upcall_budgets.clear()

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
        return self._table.install(
            match,
            mask,
            checked_actions,
            tags,
            self._clock(),
            idle_timeout=idle_timeout,
            hard_timeout=hard_timeout,
            mtu=mtu,
        )

    def invalidate(self, tags: Iterable[Tag]) -> int:
        # The exact-match cache notices removed flows by their `removed` flag.
        return len(self._table.invalidate(tags))

    def execute(self, frame: bytes, actions: Sequence[Action]) -> None:
        """Apply `actions` to one wire-ready frame (no offload metadata) now."""
        if not isinstance(frame, bytes | bytearray):
            raise ValueError(f"frame: expected bytes, got {type(frame).__name__}")
        checked_actions = tuple(actions)
        self._check_tunnel_addresses(checked_actions)
        if self._recording_fragment is not None:
            self._fragments.record(self._recording_fragment, checked_actions)
            self._recording_fragment = None
        self._apply(
            self._plan_for(checked_actions), checked_actions, ZERO_VNET_HEADER, bytes(frame)
        )

    def expire_flows(self) -> int:
        # The exact-match cache notices expired flows by their `removed` flag.
        return len(self._table.expire(self._clock()))

    def flows(self) -> list[Flow]:
        return self._table.flows()

    def counters(self) -> dict[str, int]:
        result: dict[str, int] = {
            "tunnel_rx_packets": self._tunnel_rx_packets,
            "tunnel_rx_bytes": self._tunnel_rx_bytes,
            "tunnel_tx_packets": self._tunnel_tx_packets,
            "tunnel_tx_bytes": self._tunnel_tx_bytes,
            "upcalls": self._upcalls,
            "flowstate_rx": self._flowstate_rx,
            "flowstate_tx": self._flowstate_tx,
            "emc_hits": self._emc_hits,
            "megaflow_hits": self._megaflow_hits,
            "mtu_upcalls": self._mtu_upcalls,
            "flows": len(self._table),
            "offload_segmented": self._offload_segmented,
            "offload_checksummed": self._offload_checksummed,
            "offload_coalesced": self._offload_coalesced,
            "fragment_datagrams": len(self._fragments),
            "fragment_forwarded": self._fragments.forwarded,
            "fragment_evictions": self._fragments.evictions,
        }
        for key, port in sorted(self._ports.items()):
            result[f"port.{key}.rx_packets"] = port.rx_packets
            result[f"port.{key}.rx_bytes"] = port.rx_bytes
            result[f"port.{key}.tx_packets"] = port.tx_packets
            result[f"port.{key}.tx_bytes"] = port.tx_bytes
            budget = self._upcall_budgets.get(key)
            result[f"port.{key}.upcall_budget_drops"] = budget.dropped if budget else 0
            result[f"port.{key}.rx_kernel_drops"] = port.read_kernel_drops()
        stack_drops = self._stack_drops()
        for key, lost in stack_drops.items():
            result[f"port.{key}.rx_stack_drops"] = lost
        for reason, count in sorted(self._drops.items()):
            result[f"drop.{reason}"] = count
        if sum(stack_drops.values()):  # like every drop reason: present once counted
            result["drop.port_stack"] = sum(stack_drops.values())
        overflow = self._underlay_socket_drops()
        if overflow:
            result["drop.tunnel_socket_overflow"] = overflow
        return result

    def _underlay_socket_drops(self) -> int:
        """Datagrams the kernel dropped because the VXLAN socket's buffer was full (the
        `drops` column of /proc/self/net/udp for its inode): lost before any HiveNet code."""
        sock = self._tunnel_sock
        if sock is None:
            return 0
        return udp_socket_drops(sock)

    def _stack_drops(self) -> dict[int, int]:
        """Per port: frames the interface received that the host's stack freed before any
        HiveNet program saw them. Linux frees an 802.1Q/802.1ad frame too short to untag
        (under 20 bytes) before packet sockets, tc or XDP-less paths: it has no counter of its
        own. Exact when the port is quiet; under load, frames still queued in the kernel
        between the interface and us count until they arrive."""
        out: dict[int, int] = {}
        for key, port in sorted(self._ports.items()):
            if port.rx_baseline is None:
                continue
            received = interface_rx_packets(port.interface_name)
            seen = self._frames_seen(port)
            if received is None or seen is None:
                continue
            out[key] = max(0, received - port.rx_baseline - seen)
        return out

    def _frames_seen(self, port: _BoundPort) -> int | None:
        """Frames of `port` that reached our program (here: the packet socket sees every one),
        counted after the interface's count was read."""
        port.read_kernel_drops()
        return port.socket_packets

    # ---- flow state and bound ports ---------------------------------------------------------

    def set_flow_state_handler(self, handler: Callable[[bytes], None]) -> None:
        """Who receives flow-state messages (VNI FLOWSTATE_TUNNEL_KEY): the agent."""
        self._flow_state_handler = handler

    def send_flow_state(self, remote_ip: str, payload: bytes) -> None:
        """One flow-state message to the host at `remote_ip`, VXLAN with the reserved VNI."""
        sock = self._tunnel_sock
        if sock is None:
            self._drop("tunnel_without_underlay")
            return
        if not payload:
            raise ValueError("send_flow_state: payload is empty")
        header = self._vxlan_headers.get(FLOWSTATE_TUNNEL_KEY)
        if header is None:
            header = self._vxlan_headers[FLOWSTATE_TUNNEL_KEY] = vxlan_encapsulate(
                b"", FLOWSTATE_TUNNEL_KEY
            )
        self._flowstate_tx += 1
        self._send_datagrams(sock, [header, payload], 1, 0, (remote_ip, self.vxlan_port))

    def set_tunnel_peers(self, addresses: Iterable[str] | None) -> None:
        self._tunnel_peers = tunnel_peer_set(addresses)

    def bound_ports(self) -> dict[int, str]:
        return {key: port.interface_name for key, port in self._ports.items()}

    # ---- receive paths ----------------------------------------------------------------------

    def _on_port_readable(self, port: _BoundPort) -> None:
        # Tunnel output of this batch is collected and sent at the end, equal-size datagrams
        # to one peer together (one UDP GSO send instead of one send each).
        self._tunnel_batch = {}
        self._batch_upcalls = 0
        try:
            self._receive_from_port(port, self._batch_size, self._clock())
        finally:
            batch, self._tunnel_batch = self._tunnel_batch, None
            if batch:
                self._flush_tunnel_batch(batch)

    def _receive_from_port(self, port: _BoundPort, limit: int, now: float) -> int:
        """Read and forward up to `limit` frames waiting on `port`; returns how many were read.

        The fast path: read into the port's buffer, take the frame's raw-header key, find
        (flow, plan) in the port's cache and send the buffer's bytes to the output port; no
        parsing, no per-frame bytes object. Anything else goes through `_lookup_slow`."""
        recv_into = port.recv_into
        buffer = port.buffer
        view = port.view
        cache_get = port.flow_cache.get
        record_use = self._table.record_use
        ports = self._ports
        received = misses = 0
        while received < limit:
            try:
                length = recv_into(buffer)
            except BlockingIOError:
                break
            except OSError as error:
                self._drop(f"port_rx_error_{errno.errorcode.get(error.errno or 0, 'unknown')}")
                break
            received += 1
            frame_len = length - VNET_HEADER_LEN
            port.rx_packets += 1
            port.rx_bytes += frame_len
            key = raw_flow_key(buffer, VNET_HEADER_LEN, frame_len)
            entry = cache_get(key) if key is not None else None
            if entry is not None and record_use(entry[0], now, frame_len):
                self._emc_hits += 1
                flow, plan = entry
            else:
                found = self._lookup_slow(port, key, length, now)
                if found is None:
                    misses += 1
                    if (
                        self._batch_upcalls >= self._upcalls_per_batch
                        or misses >= _MISSES_PER_BATCH
                    ):
                        break  # the other ports' turn (the loop calls again: level-triggered)
                    continue
                flow, plan = found
            mtu = flow.limits.mtu
            if mtu and frame_len > mtu + _ETHERNET_HEADER_LEN and self._too_big(port, length, mtu):
                continue
            if plan.transforms:
                if plan.routed and (refused := unroutable_ipv4(view, VNET_HEADER_LEN, frame_len)):
                    self._drop(refused)
                    continue
                self._apply(
                    plan,
                    plan.actions,
                    bytes(view[:VNET_HEADER_LEN]),
                    bytes(view[VNET_HEADER_LEN:length]),
                )
                continue
            for destination in plan.destinations:
                if destination.__class__ is Output:
                    target = ports.get(destination.port_key)
                    if target is None:
                        self._drop("output_port_not_bound")
                        continue
                    if buffer[0] & F_DATA_VALID:  # receive-only flag: not for the output
                        buffer[0] &= ~F_DATA_VALID
                    self._send_to_port(target, view[:length], frame_len)
                else:
                    self._send_to_tunnel(
                        destination,  # type: ignore[arg-type]
                        bytes(view[:VNET_HEADER_LEN]),
                        bytes(view[VNET_HEADER_LEN:length]),
                    )
            if plan.drop_reason is not None:
                self._drop(plan.drop_reason)
        return received

    def _lookup_slow(
        self, port: _BoundPort, key: RawFlowKey | None, length: int, now: float
    ) -> tuple[Flow, _ActionPlan] | None:
        """The frame in `port.buffer[:length]` missed the port's raw-key cache (or has no raw
        key): parse it, look it up (exact-match cache by field values, then megaflows), and
        remember the result under its raw key. None when the frame was dropped or upcalled."""
        view = port.view
        frame = bytes(view[VNET_HEADER_LEN:length])
        frame_len = len(frame)
        parsed = self._parse_slow(port.key, bytes(view[:VNET_HEADER_LEN]), frame, now)
        if parsed is None:
            return None
        values, fragment = parsed
        table = self._table
        if key is None:
            flow = self._emc.get(values)
            if flow is not None and table.record_use(flow, now, frame_len):
                self._emc_hits += 1
                if fragment is not None:
                    self._fragments.record(fragment.key, flow.actions, flow.mtu)
                return flow, self._plan_for(flow.actions)
        flow = table.lookup_values(values, now, packet_bytes=frame_len)
        cache = port.flow_cache
        if flow is None:
            if key is not None:
                cache.pop(key, None)
            self._upcall_first(port.key, bytes(view[:VNET_HEADER_LEN]), frame, fragment)
            return None
        self._megaflow_hits += 1
        if fragment is not None:
            self._fragments.record(fragment.key, flow.actions, flow.mtu)
        plan = self._plan_for(flow.actions)
        if key is None:
            self._emc.put(values, flow)
        else:
            if key not in cache and len(cache) >= self._emc_capacity:
                cache.popitem(last=False)
            cache[key] = (flow, plan)
        return flow, plan

    def _parse_slow(
        self, port_key: int, vnet_header: bytes, frame: bytes, now: float
    ) -> tuple[tuple[int, ...], Fragment | None] | None:
        """(FlowMatch values, the frame's place in its datagram if it is a first IPv4
        fragment) of a frame on the slow path, or None when it was taken care of here: a
        malformed or tiny frame dropped, a later fragment forwarded as its first fragment was
        or dropped (`hivenet.datapath._fragments`)."""
        fragment, tiny = ipv4_fragment(frame, port_key)
        if tiny is not None:
            self._drop(tiny)
            return None
        try:
            values = flow_match_values(extract_flow_match(frame, port_key))
        except PacketError:
            self._drop("malformed_frame")
            return None
        if fragment is None:
            return values, None
        if fragment.start:
            self._later_fragment(fragment, vnet_header, frame, now)
            return None
        reason = self._fragments.first(fragment, now)
        if reason is not None:
            self._drop(reason)
            return None
        return values, fragment

    def _later_fragment(
        self, fragment: Fragment, vnet_header: bytes, frame: bytes, now: float
    ) -> None:
        actions, mtu, reason = self._fragments.later(fragment, now)
        if actions is None:
            self._drop(reason or "fragment_no_first")
            return
        if mtu and len(frame) > mtu + _ETHERNET_HEADER_LEN:
            self._drop("too_big")
            return
        plan = self._plan_for(actions)
        if plan.routed and (refused := unroutable_ipv4(memoryview(frame), 0, len(frame))):
            self._drop(refused)
            return
        self._apply(plan, actions, vnet_header, frame)

    def _upcall_first(
        self, port_key: int, vnet_header: bytes, frame: bytes, fragment: Fragment | None
    ) -> None:
        """Upcall a frame; for a first fragment, what the agent executes for it (its first
        `execute` during the upcall) is recorded for its later fragments."""
        if fragment is None:
            self._upcall(port_key, vnet_header, frame)
            return
        self._recording_fragment = fragment.key
        try:
            self._upcall(port_key, vnet_header, frame)
        finally:
            self._recording_fragment = None

    def _too_big(self, port: _BoundPort, length: int, mtu: int) -> bool:
        """Whether the frame in `port.buffer[:length]` is an IP packet larger than `mtu` (its
        flow's): then it was sent to the agent (DF, IPv6) or dropped (no DF) here."""
        view = port.view
        segment = (
            segment_l3_length(view[:VNET_HEADER_LEN], view[VNET_HEADER_LEN:length])
            if port.buffer[1]  # a GSO type: what goes on the wire are its segments
            else 0
        )
        verdict = mtu_verdict(view[:length], mtu, VNET_HEADER_LEN, segment)
        if verdict == FITS:
            return False
        if verdict == TOO_BIG:
            self._mtu_upcalls += 1
            self._upcall(
                port.key, bytes(view[:VNET_HEADER_LEN]), bytes(view[VNET_HEADER_LEN:length])
            )
        else:
            self._drop("too_big")
        return True

    def _on_tunnel_readable(self) -> None:
        sock = self._tunnel_sock
        if sock is None:
            return
        recvmsg = sock.recvmsg
        decapsulate = self._decapsulate
        for _ in range(self._batch_size):
            try:
                data, ancillary, _flags, address = recvmsg(_TUNNEL_RECV_SIZE, 64)
            except BlockingIOError:
                return
            except OSError as error:
                # ICMP errors for earlier sends surface here (e.g. ECONNREFUSED): not fatal.
                self._drop(f"tunnel_rx_error_{errno.errorcode.get(error.errno or 0, 'unknown')}")
                continue
            if address[0] in self._vteps.sources:
                for datagram in _gro_segments(data, ancillary):
                    self._from_vtep(datagram, address[0])
                continue
            peers = self._tunnel_peers
            if peers is not None and address[0] not in peers:
                # One datagram or a whole GRO train: every segment came from this source.
                self._tunnel_rx_packets += 1
                self._tunnel_rx_bytes += len(data)
                self._drop("tunnel_unknown_source")
                continue
            if not ancillary:
                decapsulate(data)
                continue
            segment_size = 0
            for level, kind, value in ancillary:
                if level == SOL_UDP and kind == UDP_GRO:
                    segment_size = _GRO_SEGMENT_SIZE.unpack_from(value)[0]
            if segment_size <= 0 or segment_size >= len(data):
                decapsulate(data)
                continue
            self._decapsulate_train(data, segment_size)

    def _decapsulate(self, datagram: bytes, source_ip: str | None = None) -> None:
        """One received VXLAN datagram. `source_ip`: its outer source, when the caller has not
        checked it against the tunnel peers yet (the eBPF datapath's underlay socket)."""
        if source_ip is not None and source_ip in self._vteps.sources:
            self._from_vtep(datagram, source_ip)
            return
        self._tunnel_rx_packets += 1
        self._tunnel_rx_bytes += len(datagram)
        if source_ip is not None:
            peers = self._tunnel_peers
            if peers is not None and source_ip not in peers:
                self._drop("tunnel_unknown_source")
                return
        tunnel_key, bad_header = parse_vxlan_header(datagram)
        if bad_header is not None:
            self._drop(bad_header)
            return
        if tunnel_key == FLOWSTATE_TUNNEL_KEY:
            self._flowstate_rx += 1
            handler = self._flow_state_handler
            if handler is None:
                self._drop("flowstate_without_handler")
                return
            try:
                handler(datagram[VXLAN_HEADER_SIZE:])
            except Exception:
                self._drop("flowstate_handler_error")
                log.exception("flow-state handler failed")
            return
        if tunnel_key >= FLOOD_KEY_BASE:
            self._drop("tunnel_reserved_key")
            return
        port = self._ports.get(tunnel_key)
        if port is None:
            self._drop("tunnel_unknown_key")
            return
        inner_len = len(datagram) - VXLAN_HEADER_SIZE
        self._send_to_port(port, ZERO_VNET_HEADER + datagram[VXLAN_HEADER_SIZE:], inner_len)

    def _from_vtep(self, datagram: bytes, source_ip: str) -> None:
        """A VXLAN datagram from an external VTEP: its frame enters the port bound to
        (source, VNI) as a frame from a local interface would (flow lookup, else upcall)."""
        self._tunnel_rx_packets += 1
        self._tunnel_rx_bytes += len(datagram)
        vni, bad_header = parse_vxlan_header(datagram)
        if bad_header is not None:
            self._drop(bad_header)
            return
        port_key = self._vteps.port_key(source_ip, vni)
        if port_key is None:  # a VNI this VTEP does not carry here
            self._drop("tunnel_unknown_source")
            return
        frame = datagram[VXLAN_HEADER_SIZE:]
        try:
            values = flow_match_values(extract_flow_match(frame, port_key))
        except PacketError:
            self._drop("malformed_frame")
            return
        flow = self._table.lookup_values(values, self._clock(), packet_bytes=len(frame))
        if flow is None:
            self._upcall(port_key, ZERO_VNET_HEADER, frame)
            return
        self._megaflow_hits += 1
        verdict = mtu_verdict(frame, flow.mtu)
        if verdict == TOO_BIG:  # larger than the flow's MTU, DF or IPv6: the agent answers
            self._mtu_upcalls += 1
            self._upcall(port_key, ZERO_VNET_HEADER, frame)
            return
        if verdict != FITS:
            self._drop("too_big")
            return
        self._apply(self._plan_for(flow.actions), flow.actions, ZERO_VNET_HEADER, frame)

    def _decapsulate_train(self, data: bytes, segment_size: int) -> None:
        """A train of same-size VXLAN datagrams read at once (UDP GRO). When they are
        consecutive segments of one TCP stream for one port (what a peer's software TSO + UDP
        GSO sends), they go to the port as one super-frame with a GSO virtio-net header: one
        send instead of dozens, and one packet for the VM's stack. Anything else: one by one."""
        datagrams = [
            data[start : start + segment_size] for start in range(0, len(data), segment_size)
        ]
        header = datagrams[0][:VXLAN_HEADER_SIZE]
        tunnel_key, bad_header = parse_vxlan_header(datagrams[0])
        port = self._ports.get(tunnel_key) if bad_header is None else None
        if port is not None and all(d[:VXLAN_HEADER_SIZE] == header for d in datagrams):
            merged = coalesce_tcp([d[VXLAN_HEADER_SIZE:] for d in datagrams])
            if merged is not None:
                vnet_header, frame = merged
                self._tunnel_rx_packets += len(datagrams)
                self._tunnel_rx_bytes += len(data)
                self._offload_coalesced += 1
                self._send_to_port(port, vnet_header + frame, len(frame))
                return
        for datagram in datagrams:
            self._decapsulate(datagram)

    # ---- actions and transmit ---------------------------------------------------------------

    def _plan_for(self, actions: tuple[Action, ...]) -> _ActionPlan:
        plan = self._plans.get(actions)
        if plan is None:
            if len(self._plans) > 65536:  # bound the cache under action churn
                self._plans.clear()
            plan = self._plans[actions] = _plan(actions)
        return plan

    def _apply(
        self,
        plan: _ActionPlan,
        actions: tuple[Action, ...],
        vnet_header: bytes,
        frame: bytes,
    ) -> None:
        """Run `actions` on a frame (frames from ports without transforms take the inline
        fast path in `_receive_from_port` instead)."""
        if not plan.transforms:
            for destination in plan.destinations:
                self._emit(destination, vnet_header, frame)
        else:
            if plan.offload_safe or not needs_software_offload(vnet_header):
                inputs = [(vnet_header, frame)]
            else:
                inputs = [
                    (ZERO_VNET_HEADER, wire) for wire in self._wire_frames(vnet_header, frame)
                ]
            for input_header, input_frame in inputs:
                try:
                    outputs = execute_actions(input_frame, actions)
                except PacketError:
                    self._drop("action_failed")
                    continue
                for destination, output_frame in outputs:
                    self._emit(destination, input_header, output_frame)
        if plan.drop_reason is not None:
            self._drop(plan.drop_reason)

    def _emit(
        self,
        destination: Output | Tunnel,
        vnet_header: bytes,
        frame: bytes,
    ) -> None:
        if isinstance(destination, Output):
            target = self._ports.get(destination.port_key)
            if target is None:
                self._drop("output_port_not_bound")
                return
            self._send_to_port(target, forwardable_header(vnet_header) + frame, len(frame))
        else:
            self._send_to_tunnel(destination, vnet_header, frame)

    def _send_to_port(self, port: _BoundPort, packet: bytes | memoryview, frame_len: int) -> None:
        try:
            port.send(packet)
        except BlockingIOError:
            self._drop("port_tx_queue_full")
            return
        except OSError as error:
            if error.errno == errno.EMSGSIZE:
                self._drop("port_tx_too_big")
            else:
                self._drop(f"port_tx_error_{errno.errorcode.get(error.errno or 0, 'unknown')}")
            return
        port.tx_packets += 1
        port.tx_bytes += frame_len

    def _send_to_tunnel(self, tunnel: Tunnel, vnet_header: bytes, frame: bytes) -> None:
        sock = self._tunnel_sock
        if sock is None:
            self._drop("tunnel_without_underlay")
            return
        header = self._vxlan_headers.get(tunnel.tunnel_key)
        if header is None:
            header = vxlan_encapsulate(b"", tunnel.tunnel_key)
            if self._vxlan_mark:  # the last reserved byte (RFC 7348: ignored on receipt)
                header = header[:7] + bytes([self._vxlan_mark])
            self._vxlan_headers[tunnel.tunnel_key] = header
        if self._vxlan_mark and tunnel.remote_ip in self._vteps.sources:
            # An external VTEP gets a plain header: a kernel VXLAN device drops the mark.
            header = header[:7] + b"\x00"
        frames = (
            self._wire_frames(vnet_header, frame)
            if needs_software_offload(vnet_header)
            else (frame,)
        )
        address = (tunnel.remote_ip, self.vxlan_port)
        batch = self._tunnel_batch
        if batch is not None:
            pending = batch.get((tunnel.tunnel_key, tunnel.remote_ip))
            if len(frames) == 1:
                if pending is None:
                    pending = batch[(tunnel.tunnel_key, tunnel.remote_ip)] = (header, address, [])
                pending[2].append(frames[0])
                return
            # A segmented super-frame is a train already: send it now (after what this peer
            # was owed, to keep the order), so big TCP bursts are not held back.
            if pending is not None:
                del batch[(tunnel.tunnel_key, tunnel.remote_ip)]
                self._flush_tunnel_batch({(tunnel.tunnel_key, tunnel.remote_ip): pending})
        if len(frames) == 1:
            self._send_datagrams(sock, [header, frames[0]], 1, 0, address)
        elif frames:
            self._send_datagram_train(sock, header, frames, address)

    def _flush_tunnel_batch(self, batch: _TunnelBatch) -> None:
        """Send what a receive batch held back: per peer and key, runs of equal-size frames
        (a run may end with one shorter frame, as UDP GSO allows) as one train each."""
        sock = self._tunnel_sock
        if sock is None:
            count = sum(len(frames) for _header, _address, frames in batch.values())
            self._drop("tunnel_without_underlay", count)
            return
        for header, address, frames in batch.values():
            run: list[bytes] = []
            run_size = 0
            for wire_frame in frames:
                size = len(wire_frame)
                if run and size > run_size:
                    self._send_run(sock, header, run, address)
                    run = []
                if not run:
                    run_size = size
                run.append(wire_frame)
                if size < run_size:
                    self._send_run(sock, header, run, address)
                    run = []
            if run:
                self._send_run(sock, header, run, address)

    def _send_run(
        self, sock: socket.socket, header: bytes, frames: list[bytes], address: tuple[str, int]
    ) -> None:
        if len(frames) == 1:
            self._send_datagrams(sock, [header, frames[0]], 1, 0, address)
        else:
            self._send_datagram_train(sock, header, frames, address)

    def _send_datagram_train(
        self,
        sock: socket.socket,
        header: bytes,
        frames: Sequence[bytes],
        address: tuple[str, int],
    ) -> None:
        """Send equal-size frames (the last may be shorter) as VXLAN datagrams with UDP GSO:
        one sendmsg per up to 64 datagrams, the kernel cuts them apart."""
        datagram_size = len(header) + len(frames[0])
        per_call = max(1, min(_UDP_GSO_MAX_SEGMENTS, _UDP_GSO_MAX_BYTES // datagram_size))
        for start in range(0, len(frames), per_call):
            group = frames[start : start + per_call]
            if len(group) == 1 or not self._udp_gso:
                for wire_frame in group:
                    self._send_datagrams(sock, [header, wire_frame], 1, 0, address)
                continue
            pieces: list[bytes] = []
            for wire_frame in group:
                pieces.append(header)
                pieces.append(wire_frame)
            self._send_datagrams(sock, pieces, len(group), datagram_size, address)

    def _send_datagrams(
        self,
        sock: socket.socket,
        pieces: list[bytes],
        count: int,
        segment_size: int,
        address: tuple[str, int],
    ) -> None:
        """One send of `count` datagrams (`segment_size` > 0: a UDP GSO train of header and
        frame pairs). If the kernel refuses UDP GSO, the train goes datagram by datagram and
        later trains do too."""
        try:
            if segment_size:
                ancillary = [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", segment_size))]
                sent = sock.sendmsg([b"".join(pieces)], ancillary, 0, address)
            else:
                sent = sock.sendto(b"".join(pieces), address)
        except BlockingIOError:
            self._drop("tunnel_tx_queue_full", count)
            return
        except OSError as error:
            if segment_size and error.errno in (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT):
                # No checksum offload on the underlay device (UDP GSO needs it): go one by one.
                self._udp_gso = False
                for index in range(0, len(pieces), 2):
                    self._send_datagrams(sock, pieces[index : index + 2], 1, 0, address)
                return
            if error.errno == errno.EMSGSIZE:
                self._drop("tunnel_tx_too_big", count)
            else:
                reason = errno.errorcode.get(error.errno or 0, "unknown")
                self._drop(f"tunnel_tx_error_{reason}", count)
            return
        self._tunnel_tx_packets += count
        self._tunnel_tx_bytes += sent

    def _wire_frames(self, vnet_header: bytes, frame: bytes) -> list[bytes]:
        try:
            frames = wire_frames(vnet_header, frame)
        except PacketError:
            self._drop("bad_offload_header")
            return []
        if len(frames) > 1 or vnet_header[1]:
            self._offload_segmented += 1
        else:
            self._offload_checksummed += 1
        return frames

    def _upcall(self, port_key: int, vnet_header: bytes, frame: bytes) -> None:
        handler = self._upcall_handler
        if handler is None:
            self._drop("no_upcall_handler")
            return
        if self._upcall_rate:
            budget = self._upcall_budgets.get(port_key)
            now = self._clock()
            if budget is None:
                budget = self._upcall_budgets[port_key] = UpcallBudget(
                    self._upcall_rate, self._upcall_burst, now
                )
            if not budget.allow(now):
                self._drop("upcall_budget")
                return
        self._batch_upcalls += 1
        frames = (
            self._wire_frames(vnet_header, frame)
            if needs_software_offload(vnet_header)
            else (frame,)
        )
        for wire_frame in frames:
            self._upcalls += 1
            try:
                handler(port_key, wire_frame)
            except Exception:
                # The agent's bug must not stop the datapath; count it and keep forwarding.
                self._drop("upcall_handler_error")
                log.exception("upcall handler failed for a frame from port %d", port_key)

    def _drop(self, reason: str, count: int = 1) -> None:
        self._drops[reason] = self._drops.get(reason, 0) + count

    def _expire_tick(self) -> None:
        self.expire_flows()
        if self._loop is not None:
            self._expiry_timer = self._loop.call_later(self._expiry_interval, self._expire_tick)

    def _check_tunnel_addresses(self, actions: tuple[Action, ...]) -> None:
        for position, action in enumerate(actions):
            if isinstance(action, Tunnel):
                try:
                    address = ipaddress.ip_address(action.remote_ip)
                except ValueError:
                    raise ValueError(
                        f"actions[{position}].remote_ip: {action.remote_ip!r} is not an IP address"
                    ) from None
                family = socket.AF_INET if address.version == 4 else socket.AF_INET6
                if family != self._underlay_family:
                    raise ValueError(
                        f"actions[{position}].remote_ip: {action.remote_ip!r} is not of the "
                        f"underlay's address family ({self.underlay_ip!r})"
                    )
                _check_port_key(f"actions[{position}].tunnel_key", action.tunnel_key, tunnel=True)


def _gro_segments(data: bytes, ancillary: list[tuple[int, int, bytes]]) -> list[bytes]:
    """The datagrams of one read from the VXLAN socket (a UDP GRO train is split by the
    segment size the kernel reports)."""
    segment_size = 0
    for level, kind, value in ancillary:
        if level == SOL_UDP and kind == UDP_GRO:
            segment_size = _GRO_SEGMENT_SIZE.unpack_from(value)[0]
    if segment_size <= 0 or segment_size >= len(data):
        return [data]
    return [data[start : start + segment_size] for start in range(0, len(data), segment_size)]


def _check_port_key(name: str, value: int, *, tunnel: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: expected an int, got {value!r}")
    upper = 0xFFFFFF if tunnel else TUNNEL_KEY_MAX
    if not TUNNEL_KEY_MIN <= value <= upper:
        raise ValueError(f"{name}: {value:#x} is outside {TUNNEL_KEY_MIN:#x}..{upper:#x}")
