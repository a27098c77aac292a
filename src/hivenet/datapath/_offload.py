"""Offload metadata of the userspace datapath: the virtio-net header and software GSO/checksum.

Owns: decoding and encoding the 10-byte `struct virtio_net_hdr` that an AF_PACKET socket with
`PACKET_VNET_HDR` puts in front of every frame, completing a partial (CHECKSUM_PARTIAL)
checksum in software, and segmenting a TCP (TSO) or UDP (USO) super-frame into wire-sized
frames with valid checksums. Pure functions over bytes; no sockets, no clock.

Must not touch: sockets, the flow table, or header rewrites (`hivenet.packets.rewrite`).

Why this exists: with offloads ON (the veth default), a VM's stack hands its interface frames
up to 64 KiB with `gso_size` set and the L4 checksum left for "the hardware". Forwarding such a
frame to another local interface keeps the header (the kernel finishes the job there); only a
frame leaving through a VXLAN tunnel (a plain UDP socket) or handed to the agent as bytes must
be made real here first (`wire_frames`).

Offsets in the header (`csum_start`, `hdr_len`) count from the first byte of the Ethernet
frame, in host byte order (little-endian on every platform this runs on), as the kernel's
`virtio_net_hdr_from_skb`/`virtio_net_hdr_to_skb` use them for packet sockets.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from hivenet.packets.checksum import ones_complement_sum
from hivenet.packets.errors import MalformedPacket, TruncatedPacket, UnsupportedPacket

VNET_HEADER_LEN = 10
VNET_HEADER = struct.Struct("<BBHHHH")
ZERO_VNET_HEADER = bytes(VNET_HEADER_LEN)

# virtio_net_hdr.flags
F_NEEDS_CSUM = 0x01
F_DATA_VALID = 0x02
# virtio_net_hdr.gso_type
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3  # UFO (IP fragmentation of a big datagram): deprecated, never emitted by veth
GSO_TCPV6 = 4
GSO_UDP_L4 = 5
GSO_ECN = 0x80

_ETH_TYPE_VLAN = 0x8100
_ETH_TYPE_QINQ = 0x88A8
_ETH_TYPE_IPV4 = 0x0800
_ETH_TYPE_IPV6 = 0x86DD
_IP_PROTO_TCP = 6
_IP_PROTO_UDP = 17
_TCP_FIN_PSH = 0x09
_TCP_CWR = 0x80
_ONES = 0xFFFF
_LAYER = "virtio-net"

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_CSUM_FIELDS = struct.Struct("<HH").unpack_from  # csum_start, csum_offset of a vnet header


@dataclass(frozen=True, slots=True)
class VnetHeader:
    """A decoded `struct virtio_net_hdr` (see the module docstring for offsets)."""

    flags: int = 0
    gso_type: int = GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0

    @classmethod
    def decode(cls, raw: bytes) -> VnetHeader:
        if len(raw) < VNET_HEADER_LEN:
            raise TruncatedPacket(_LAYER, "header", f"needs 10 bytes, got {len(raw)}")
        return cls(*VNET_HEADER.unpack_from(raw))

    def encode(self) -> bytes:
        return VNET_HEADER.pack(
            self.flags,
            self.gso_type,
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
        )


def needs_software_offload(vnet_header: bytes) -> bool:
    """True when the frame behind this header is not yet wire-ready (partial checksum or GSO).

    Hot path: one comparison for the common all-zero header; DATA_VALID alone also counts as
    wire-ready (the checksum is already correct)."""
    if vnet_header == ZERO_VNET_HEADER:
        return False
    return bool(vnet_header[0] & F_NEEDS_CSUM) or (vnet_header[1] & ~GSO_ECN) != GSO_NONE


def forwardable_header(vnet_header: bytes) -> bytes:
    """The header to send with a frame forwarded unchanged to another packet socket: the
    receive-only DATA_VALID flag is dropped, the offload request is kept."""
    if vnet_header == ZERO_VNET_HEADER or not vnet_header[0] & F_DATA_VALID:
        return vnet_header
    return bytes((vnet_header[0] & ~F_DATA_VALID,)) + vnet_header[1:]


def wire_frames(vnet_header: bytes, frame: bytes) -> list[bytes]:
    """The wire-ready frames that `frame` stands for: segmented if GSO, checksum completed if
    partial, or `[frame]` unchanged. Raises a `PacketError` for a header that does not fit the
    frame (the caller counts and drops)."""
    if not needs_software_offload(vnet_header):
        return [frame]
    if not (vnet_header[1] & ~GSO_ECN) and len(vnet_header) >= VNET_HEADER_LEN:
        # The common small-frame case (partial checksum, no GSO): no header object.
        csum_start, csum_offset = _CSUM_FIELDS(vnet_header, 6)
        return [complete_checksum(frame, csum_start, csum_offset)]
    header = VnetHeader.decode(vnet_header)
    gso_type = header.gso_type & ~GSO_ECN
    if gso_type == GSO_NONE:
        return [complete_checksum(frame, header.csum_start, header.csum_offset)]
    if not header.flags & F_NEEDS_CSUM:
        raise MalformedPacket(_LAYER, "flags", f"GSO type {gso_type} without NEEDS_CSUM")
    if gso_type in (GSO_TCPV4, GSO_TCPV6):
        return segment_tcp(frame, header.csum_start, header.gso_size)
    if gso_type == GSO_UDP_L4:
        return segment_udp(frame, header.csum_start, header.gso_size)
    raise UnsupportedPacket(_LAYER, "gso_type", f"GSO type {header.gso_type:#x} is not handled")


def complete_checksum(frame: bytes, csum_start: int, csum_offset: int) -> bytes:
    """Finish a CHECKSUM_PARTIAL frame: the field at csum_start+csum_offset holds the
    pseudo-header sum; store the complemented sum of everything from csum_start on."""
    field_at = csum_start + csum_offset
    if csum_start < 14 or csum_offset & 1 or field_at + 2 > len(frame):
        raise MalformedPacket(
            _LAYER,
            "csum_start",
            f"checksum at {csum_start}+{csum_offset} does not fit a {len(frame)}-byte frame",
        )
    checksum = ~ones_complement_sum(frame[csum_start:]) & _ONES
    if checksum == 0 and csum_offset == 6:  # UDP: 0 means "no checksum" (RFC 768)
        checksum = _ONES
    completed = bytearray(frame)
    completed[field_at : field_at + 2] = _U16.pack(checksum)
    return bytes(completed)


@dataclass(frozen=True, slots=True)
class _Layout:
    """Where the headers of a GSO super-frame are: L3 start and version, L4 start."""

    l3_offset: int
    is_ipv4: bool
    l4_offset: int


def _layout(frame: bytes, l4_offset: int, expected_proto: int) -> _Layout:
    if len(frame) < 14:
        raise TruncatedPacket("Ethernet", "header", f"needs 14 bytes, got {len(frame)}")
    l3_offset = 14
    eth_type = _U16.unpack_from(frame, 12)[0]
    while eth_type in (_ETH_TYPE_VLAN, _ETH_TYPE_QINQ):
        if len(frame) < l3_offset + 4:
            raise TruncatedPacket("802.1Q", "tag", "frame ends inside the VLAN tag")
        eth_type = _U16.unpack_from(frame, l3_offset + 2)[0]
        l3_offset += 4
    if eth_type == _ETH_TYPE_IPV4:
        if len(frame) < l3_offset + 20:
            raise TruncatedPacket("IPv4", "header", "frame ends inside the IPv4 header")
        header_len = (frame[l3_offset] & 0x0F) * 4
        proto = frame[l3_offset + 9]
        if header_len < 20 or l3_offset + header_len != l4_offset:
            raise MalformedPacket(
                "IPv4", "ihl", f"header ends at {l3_offset + header_len}, L4 at {l4_offset}"
            )
        if proto != expected_proto:
            raise MalformedPacket("IPv4", "protocol", f"{proto} does not match the GSO type")
        return _Layout(l3_offset, True, l4_offset)
    if eth_type == _ETH_TYPE_IPV6:
        if l4_offset < l3_offset + 40:
            raise MalformedPacket("IPv6", "header", f"L4 offset {l4_offset} inside the header")
        return _Layout(l3_offset, False, l4_offset)
    raise UnsupportedPacket("Ethernet", "eth_type", f"GSO frame with ethertype {eth_type:#06x}")


class _IpHeaders:
    """Builds the IP header (with any IPv6 extension headers) of each segment from the super-
    frame's: only the length, the IPv4 id and the IPv4 header checksum change, so the sum of
    everything else is taken once; the pseudo-header sum without its length likewise."""

    __slots__ = ("_base_sum", "_first_id", "_is_ipv4", "_template", "pseudo_sum")

    def __init__(self, frame: bytes, layout: _Layout, protocol: int) -> None:
        template = bytearray(frame[layout.l3_offset : layout.l4_offset])
        self._is_ipv4 = layout.is_ipv4
        if layout.is_ipv4:
            self._first_id = _U16.unpack_from(template, 4)[0]
            template[2:6] = bytes(4)  # total length, id
            template[10:12] = bytes(2)  # header checksum
            source, destination = template[12:16], template[16:20]
        else:
            self._first_id = 0
            template[4:6] = bytes(2)  # payload length
            source, destination = template[8:24], template[24:40]
        self._template = bytes(template)
        self._base_sum = ones_complement_sum(self._template)
        # Pseudo-header minus its length field: addresses and the protocol number.
        self.pseudo_sum = ones_complement_sum(bytes(source + destination)) + protocol

    def for_segment(self, l4_len: int, index: int) -> bytes:
        template = self._template
        if self._is_ipv4:
            total_len = len(template) + l4_len
            ip_id = (self._first_id + index) & _ONES
            checksum = ~_fold(self._base_sum + total_len + ip_id) & _ONES
            return b"".join(
                (
                    template[:2],
                    _U16.pack(total_len),
                    _U16.pack(ip_id),
                    template[6:10],
                    _U16.pack(checksum),
                    template[12:],
                )
            )
        payload_len = len(template) - 40 + l4_len
        return b"".join((template[:4], _U16.pack(payload_len), template[6:]))


def segment_tcp(frame: bytes, l4_offset: int, segment_size: int) -> list[bytes]:
    """Software TSO: cut a TCP super-frame into segments of `segment_size` payload bytes.

    Each segment gets the sequence number of its first byte, a fresh IPv4 id (first id + i,
    as Linux does), FIN/PSH only on the last and CWR only on the first, and full checksums.
    Per segment only the changed words are summed again (sequence, flags, lengths, payload)."""
    layout = _layout(frame, l4_offset, _IP_PROTO_TCP)
    if len(frame) < l4_offset + 20:
        raise TruncatedPacket("TCP", "header", "frame ends inside the TCP header")
    tcp_header_len = (frame[l4_offset + 12] >> 4) * 4
    payload_offset = l4_offset + tcp_header_len
    if tcp_header_len < 20 or payload_offset > len(frame):
        raise MalformedPacket("TCP", "data_offset", f"header length {tcp_header_len} is invalid")
    if segment_size <= 0:
        raise MalformedPacket(_LAYER, "gso_size", f"segment size {segment_size} must be > 0")
    ip_headers = _IpHeaders(frame, layout, _IP_PROTO_TCP)
    link_header = frame[: layout.l3_offset]
    tcp_header = frame[l4_offset:payload_offset]
    first_sequence = _U32.unpack_from(tcp_header, 4)[0]
    original_flags = tcp_header[13]
    # The TCP header with sequence, flags and checksum zeroed, summed once.
    header_head, acknowledgement = tcp_header[:4], tcp_header[8:12]
    header_offset_byte, header_tail = tcp_header[12:13], tcp_header[14:16]
    header_options = tcp_header[18:]
    fixed_sum = ones_complement_sum(
        b"".join((header_head, bytes(4), acknowledgement, header_offset_byte, b"\x00", header_tail))
        + bytes(2)
        + header_options
    )
    fixed_sum += ip_headers.pseudo_sum
    payload_len = len(frame) - payload_offset
    segments: list[bytes] = []
    append = segments.append
    for index, start in enumerate(range(0, max(payload_len, 1), segment_size)):
        chunk = frame[payload_offset + start : payload_offset + start + segment_size]
        flags = original_flags
        if start + segment_size < payload_len:
            flags &= ~_TCP_FIN_PSH
        if index:
            flags &= ~_TCP_CWR
        sequence = (first_sequence + start) & 0xFFFFFFFF
        l4_len = tcp_header_len + len(chunk)
        total = (
            fixed_sum
            + (sequence >> 16)
            + (sequence & _ONES)
            + flags
            + l4_len
            + ones_complement_sum(chunk)
        )
        append(
            b"".join(
                (
                    link_header,
                    ip_headers.for_segment(l4_len, index),
                    header_head,
                    _U32.pack(sequence),
                    acknowledgement,
                    header_offset_byte,
                    bytes((flags,)),
                    header_tail,
                    _U16.pack(~_fold(total) & _ONES),
                    header_options,
                    chunk,
                )
            )
        )
    return segments


def segment_udp(frame: bytes, l4_offset: int, segment_size: int) -> list[bytes]:
    """Software USO (GSO_UDP_L4): one UDP datagram per `segment_size` payload bytes, each with
    its own length and checksum."""
    layout = _layout(frame, l4_offset, _IP_PROTO_UDP)
    payload_offset = l4_offset + 8
    if len(frame) < payload_offset:
        raise TruncatedPacket("UDP", "header", "frame ends inside the UDP header")
    if segment_size <= 0:
        raise MalformedPacket(_LAYER, "gso_size", f"segment size {segment_size} must be > 0")
    ip_headers = _IpHeaders(frame, layout, _IP_PROTO_UDP)
    link_header = frame[: layout.l3_offset]
    ports = frame[l4_offset : l4_offset + 4]
    payload_len = len(frame) - payload_offset
    segments: list[bytes] = []
    for index, start in enumerate(range(0, max(payload_len, 1), segment_size)):
        chunk = frame[payload_offset + start : payload_offset + start + segment_size]
        l4_len = 8 + len(chunk)
        udp_header = ports + _U16.pack(l4_len) + b"\x00\x00"
        total = (
            ones_complement_sum(udp_header)
            + ones_complement_sum(chunk)
            + ip_headers.pseudo_sum
            + l4_len
        )
        checksum = ~_fold(total) & _ONES or _ONES
        udp_header = udp_header[:6] + _U16.pack(checksum)
        ip_header = ip_headers.for_segment(l4_len, index)
        segments.append(b"".join((link_header, ip_header, udp_header, chunk)))
    return segments


def _fold(total: int) -> int:
    """Fold a sum of one's-complement partial sums back into 16 bits (0xFFFF stays 0xFFFF)."""
    while total > _ONES:
        total = (total & _ONES) + (total >> 16)
    return total


_TCP_REFUSE_COALESCE = 0x02 | 0x04 | 0x20  # SYN, RST, URG: never merged
_IPV4_FRAGMENT_BITS = 0x3FFF  # MF + fragment offset


def coalesce_tcp(frames: Sequence[bytes]) -> tuple[bytes, bytes] | None:
    """Software GRO: merge consecutive segments of one TCP stream into one super-frame and the
    virtio-net header that asks the output interface to cut it again (GSO, partial checksum).

    Returns None unless it is safe: untagged IPv4 (no fragments) or IPv6 (no extension
    headers) carrying TCP; identical headers except lengths, IPv4 id, sequence, flags and
    checksums; contiguous sequence numbers; equal payload sizes but for a shorter last one;
    no SYN/RST/URG and FIN/PSH only on the last; and every segment's checksums valid (a
    merged frame carries no per-segment checksum any more, so a corrupt one must not hide)."""
    if len(frames) < 2:
        return None
    first = frames[0]
    if len(first) < 54:
        return None
    eth_type = _U16.unpack_from(first, 12)[0]
    l3 = 14
    if eth_type == _ETH_TYPE_IPV4:
        header_len = (first[l3] & 0x0F) * 4
        if (
            first[l3] >> 4 != 4
            or header_len < 20
            or first[l3 + 9] != _IP_PROTO_TCP
            or _U16.unpack_from(first, l3 + 6)[0] & _IPV4_FRAGMENT_BITS
        ):
            return None
        l4 = l3 + header_len
        is_ipv4 = True
    elif eth_type == _ETH_TYPE_IPV6:
        if first[l3 + 6] != _IP_PROTO_TCP:
            return None
        l4 = l3 + 40
        is_ipv4 = False
    else:
        return None
    if len(first) < l4 + 20:
        return None
    payload_offset = l4 + (first[l4 + 12] >> 4) * 4
    segment_size = len(first) - payload_offset
    if payload_offset < l4 + 20 or segment_size <= 0:
        return None
    constant: tuple[tuple[int, int], ...]
    if is_ipv4:
        if ones_complement_sum(first[l3:l4]) != _ONES:  # IPv4 header checksum
            return None
        constant = (
            (0, l3 + 2),
            (l3 + 6, l3 + 10),
            (l3 + 12, l4 + 4),
            (l4 + 8, l4 + 13),
            (l4 + 14, l4 + 16),
            (l4 + 18, payload_offset),
        )
        address_span = (l3 + 12, l3 + 20)
    else:
        constant = (
            (0, l3 + 4),
            (l3 + 6, l4 + 4),
            (l4 + 8, l4 + 13),
            (l4 + 14, l4 + 16),
            (l4 + 18, payload_offset),
        )
        address_span = (l3 + 8, l3 + 40)
    reference = [first[start:end] for start, end in constant]
    pseudo_sum = ones_complement_sum(first[address_span[0] : address_span[1]]) + _IP_PROTO_TCP
    expected_sequence = _U32.unpack_from(first, l4 + 4)[0]
    merged_flags = 0
    last_index = len(frames) - 1
    for index, frame in enumerate(frames):
        payload_len = len(frame) - payload_offset
        if payload_len <= 0 or payload_len > segment_size:
            return None
        if index < last_index and payload_len != segment_size:
            return None
        for (start, end), expected in zip(constant, reference, strict=True):
            if frame[start:end] != expected:
                return None
        if _U32.unpack_from(frame, l4 + 4)[0] != expected_sequence:
            return None
        flags = frame[l4 + 13]
        if flags & _TCP_REFUSE_COALESCE or (index < last_index and flags & _TCP_FIN_PSH):
            return None
        if _fold(ones_complement_sum(frame[l4:]) + pseudo_sum + len(frame) - l4) != _ONES:
            return None  # bad TCP checksum: let the receiver see (and drop) that segment
        # The IP length must cover the frame exactly (no Ethernet padding in the payload).
        if is_ipv4:
            if len(frame) - l3 != _U16.unpack_from(frame, l3 + 2)[0]:
                return None
        elif len(frame) - l4 != _U16.unpack_from(frame, l3 + 4)[0]:
            return None
        merged_flags |= flags
        expected_sequence = (expected_sequence + payload_len) & 0xFFFFFFFF
    payload = b"".join(frame[payload_offset:] for frame in frames)
    l4_len = payload_offset - l4 + len(payload)
    header = bytearray(first[:payload_offset])
    if is_ipv4:
        _U16.pack_into(header, l3 + 2, l4 - l3 + l4_len)
        _U16.pack_into(header, l3 + 10, 0)
        _U16.pack_into(header, l3 + 10, ~ones_complement_sum(bytes(header[l3:l4])) & _ONES)
    else:
        _U16.pack_into(header, l3 + 4, l4 - l3 - 40 + l4_len)
    header[l4 + 13] = merged_flags
    # CHECKSUM_PARTIAL: the field holds the folded pseudo-header sum, the device does the rest.
    _U16.pack_into(header, l4 + 16, _fold(pseudo_sum + l4_len))
    vnet_header = VnetHeader(
        flags=F_NEEDS_CSUM,
        gso_type=(GSO_TCPV4 if is_ipv4 else GSO_TCPV6)
        | (GSO_ECN if merged_flags & _TCP_CWR else 0),
        hdr_len=payload_offset,
        gso_size=segment_size,
        csum_start=l4,
        csum_offset=16,
    ).encode()
    return vnet_header, bytes(header) + payload


def segment_l3_length(
    vnet_header: bytes | bytearray | memoryview, frame: bytes | memoryview
) -> int:
    """The L3 length of each wire segment (the first, the largest) of a TCP or UDP GSO
    super-frame; 0 for a frame without GSO or one whose headers do not add up (the caller
    then goes by the IP header's own length). For the MTU check of a flow hit."""
    gso_type = vnet_header[1] & ~GSO_ECN
    if gso_type not in (GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4):
        return 0
    gso_size = vnet_header[4] | (vnet_header[5] << 8)
    l4_offset = vnet_header[6] | (vnet_header[7] << 8)  # csum_start
    l3_offset = 14
    if len(frame) < 14:
        return 0
    eth_type = (frame[12] << 8) | frame[13]
    while eth_type in (_ETH_TYPE_VLAN, _ETH_TYPE_QINQ) and len(frame) >= l3_offset + 4:
        eth_type = (frame[l3_offset + 2] << 8) | frame[l3_offset + 3]
        l3_offset += 4
    if gso_type == GSO_UDP_L4:
        l4_header = 8
    elif len(frame) >= l4_offset + 13:
        l4_header = (frame[l4_offset + 12] >> 4) * 4
    else:
        return 0
    if gso_size <= 0 or l4_offset < l3_offset + 20:
        return 0
    return l4_offset - l3_offset + l4_header + gso_size
