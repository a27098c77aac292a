"""The userspace datapath's software offloads (`hivenet.datapath._offload`) and its hot-path
VXLAN header check, against scapy as the independent oracle: segments must carry the right
sequence numbers, flags, IP ids and lengths, and checksums that scapy recomputes identically.
"""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Dot1Q, Ether
from scapy.packet import Packet, Raw

from hivenet.datapath._offload import (
    F_DATA_VALID,
    F_NEEDS_CSUM,
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_UDP_L4,
    ZERO_VNET_HEADER,
    VnetHeader,
    coalesce_tcp,
    complete_checksum,
    forwardable_header,
    needs_software_offload,
    segment_tcp,
    segment_udp,
    wire_frames,
)
from hivenet.datapath.userspace import parse_vxlan_header
from hivenet.packets.checksum import pseudo_header_sum
from hivenet.packets.errors import PacketError
from hivenet.packets.vxlan import vxlan_decapsulate

MAC_A, MAC_B = "02:00:00:00:00:01", "02:00:00:00:00:02"


def _partial(packet: Packet, l4_offset: int, csum_offset: int, proto: int, v6: bool) -> bytes:
    """`packet` as a stack hands it to a device with checksum offload: the L4 checksum field
    holds the folded pseudo-header sum (Linux CHECKSUM_PARTIAL)."""
    frame = bytearray(bytes(packet))
    ip_offset = len(frame) - len(packet[IPv6 if v6 else IP])
    if v6:
        src, dst = frame[ip_offset + 8 : ip_offset + 24], frame[ip_offset + 24 : ip_offset + 40]
    else:
        src, dst = frame[ip_offset + 12 : ip_offset + 16], frame[ip_offset + 16 : ip_offset + 20]
    struct.pack_into(
        "!H",
        frame,
        l4_offset + csum_offset,
        pseudo_header_sum(bytes(src), bytes(dst), proto, len(frame) - l4_offset),
    )
    return bytes(frame)


def _rebuilt(frame: bytes) -> bytes:
    """What scapy writes for `frame` with every checksum recomputed."""
    packet = Ether(frame)
    for layer in (IP, TCP, UDP):
        if packet.haslayer(layer):
            del packet[layer].chksum
    return bytes(packet)


def _tcp_packet(
    v6: bool, vlan: bool, payload: bytes, flags: str, seq: int, ack: int = 0x12345678
) -> Packet:
    ip = IPv6(src="fd00::1", dst="fd00::2") if v6 else IP(src="10.0.0.1", dst="10.0.0.2", id=65530)
    link = Ether(src=MAC_A, dst=MAC_B)
    if vlan:
        link = link / Dot1Q(vlan=7)
    options = [("NOP", None), ("NOP", None), ("Timestamp", (1, 2))]
    return (
        link
        / ip
        / TCP(
            sport=40000, dport=5001, seq=seq, ack=ack, window=0xBEEF, flags=flags, options=options
        )
        / Raw(payload)
    )


@settings(max_examples=150, deadline=None)
@given(
    v6=st.booleans(),
    vlan=st.booleans(),
    payload=st.binary(min_size=1, max_size=4000),
    segment_size=st.integers(1, 1500),
    flags=st.sampled_from(["A", "PA", "FPA", "CA", "CPA"]),
    seq=st.integers(0, 0xFFFFFFFF),
    ack=st.integers(0, 0xFFFFFFFF),
)
def test_tcp_segmentation_matches_scapy(
    v6: bool, vlan: bool, payload: bytes, segment_size: int, flags: str, seq: int, ack: int
) -> None:
    packet = _tcp_packet(v6, vlan, payload, flags, seq, ack)
    l4_offset = 14 + (4 if vlan else 0) + (40 if v6 else 20)
    frame = _partial(packet, l4_offset, 16, 6, v6)

    segments = segment_tcp(frame, l4_offset, segment_size)

    assert len(segments) == -(-len(payload) // segment_size)
    reassembled = b""
    for index, segment in enumerate(segments):
        assert segment == _rebuilt(segment), "checksums differ from scapy's"
        parsed = Ether(segment)
        tcp = parsed[TCP]
        chunk = bytes(tcp.payload)
        assert 0 < len(chunk) <= segment_size
        assert tcp.seq == (seq + len(reassembled)) & 0xFFFFFFFF
        is_last = index == len(segments) - 1
        assert bool(tcp.flags.F) == ("F" in flags and is_last)
        assert bool(tcp.flags.P) == ("P" in flags and is_last)
        assert bool(tcp.flags.C) == ("C" in flags and index == 0)
        if v6:
            assert parsed[IPv6].plen == len(tcp)
        else:
            assert parsed[IP].len == len(parsed[IP])
            assert parsed[IP].id == (65530 + index) & 0xFFFF
        reassembled += chunk
    assert reassembled == payload


@settings(max_examples=100, deadline=None)
@given(v6=st.booleans(), payload=st.binary(min_size=1, max_size=3000), size=st.integers(1, 1400))
def test_udp_segmentation_matches_scapy(v6: bool, payload: bytes, size: int) -> None:
    ip = IPv6(src="fd00::1", dst="fd00::2") if v6 else IP(src="10.0.0.1", dst="10.0.0.2")
    packet = Ether(src=MAC_A, dst=MAC_B) / ip / UDP(sport=1, dport=2) / Raw(payload)
    l4_offset = 14 + (40 if v6 else 20)
    frame = _partial(packet, l4_offset, 6, 17, v6)

    segments = segment_udp(frame, l4_offset, size)

    assert b"".join(bytes(Ether(s)[UDP].payload) for s in segments) == payload
    for segment in segments:
        assert segment == _rebuilt(segment)
        assert Ether(segment)[UDP].chksum != 0


@settings(max_examples=100, deadline=None)
@given(v6=st.booleans(), udp=st.booleans(), payload=st.binary(max_size=2000))
def test_complete_checksum_matches_scapy(v6: bool, udp: bool, payload: bytes) -> None:
    ip = IPv6(src="fd00::1", dst="fd00::2") if v6 else IP(src="10.0.0.1", dst="10.0.0.2")
    l4 = UDP(sport=53, dport=53) if udp else TCP(sport=1, dport=2, flags="S")
    packet = Ether(src=MAC_A, dst=MAC_B) / ip / l4 / Raw(payload)
    l4_offset = 14 + (40 if v6 else 20)
    csum_offset = 6 if udp else 16
    frame = _partial(packet, l4_offset, csum_offset, 17 if udp else 6, v6)
    header = VnetHeader(F_NEEDS_CSUM, 0, 0, 0, l4_offset, csum_offset).encode()

    assert complete_checksum(frame, l4_offset, csum_offset) == bytes(packet)
    assert wire_frames(header, frame) == [bytes(packet)]


def test_wire_frames_dispatches_on_the_header() -> None:
    packet = _tcp_packet(False, False, bytes(range(256)) * 10, "PA", 1)
    frame = _partial(packet, 34, 16, 6, False)
    tso = VnetHeader(F_NEEDS_CSUM, GSO_TCPV4, 66, 1000, 34, 16).encode()
    assert len(wire_frames(tso, frame)) == 3
    assert wire_frames(ZERO_VNET_HEADER, frame)[0] is frame
    valid_only = VnetHeader(F_DATA_VALID).encode()
    assert not needs_software_offload(valid_only)
    assert forwardable_header(valid_only) == ZERO_VNET_HEADER
    assert forwardable_header(tso) is tso
    with pytest.raises(PacketError):  # L4 offset that contradicts the IPv4 header length
        wire_frames(VnetHeader(F_NEEDS_CSUM, GSO_TCPV4, 66, 1000, 30, 16).encode(), frame)
    with pytest.raises(PacketError):  # GSO without a checksum request
        wire_frames(VnetHeader(0, GSO_TCPV6, 66, 1000, 34, 16).encode(), frame)
    with pytest.raises(PacketError):  # USO on a TCP frame
        wire_frames(VnetHeader(F_NEEDS_CSUM, GSO_UDP_L4, 42, 1000, 34, 6).encode(), frame)


@settings(max_examples=300, deadline=None)
@given(
    header=st.tuples(
        st.integers(0, 3),
        st.sampled_from([0, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4, 3, 0x81, 9]),
        st.integers(0, 0xFFFF),
        st.integers(0, 0xFFFF),
        st.integers(0, 200),
        st.integers(0, 40),
    ),
    frame=st.binary(max_size=300),
)
def test_bad_offload_metadata_raises_only_packet_errors(
    header: tuple[int, int, int, int, int, int], frame: bytes
) -> None:
    with contextlib.suppress(PacketError):
        wire_frames(VnetHeader(*header).encode(), frame)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=22, max_size=64))
def test_hot_path_vxlan_check_agrees_with_the_codec(datagram: bytes) -> None:
    tunnel_key, bad_header = parse_vxlan_header(datagram)
    try:
        vni, inner = vxlan_decapsulate(datagram)
    except PacketError:
        assert bad_header == "vxlan_bad_flags"
    else:
        assert bad_header is None
        assert (tunnel_key, datagram[8:]) == (vni, inner)


def test_vxlan_check_refuses_datagrams_without_an_inner_ethernet_header() -> None:
    assert parse_vxlan_header(bytes.fromhex("0800000000002a00") + bytes(13)) == (
        0,
        "vxlan_truncated",
    )
    assert parse_vxlan_header(bytes.fromhex("0800000000002a00") + bytes(14)) == (42, None)


@settings(max_examples=100, deadline=None)
@given(
    v6=st.booleans(),
    payload=st.binary(min_size=2, max_size=6000),
    segment_size=st.integers(1, 1400),
    flags=st.sampled_from(["A", "PA", "FPA", "CPA"]),
    seq=st.integers(0, 0xFFFFFFFF),
)
def test_coalesce_undoes_segmentation(
    v6: bool, payload: bytes, segment_size: int, flags: str, seq: int
) -> None:
    packet = _tcp_packet(v6, False, payload, flags, seq)
    l4_offset = 14 + (40 if v6 else 20)
    segments = segment_tcp(bytes(packet), l4_offset, segment_size)
    if len(segments) < 2:
        assert coalesce_tcp(segments) is None
        return

    merged = coalesce_tcp(segments)

    assert merged is not None
    vnet_header, frame = merged
    header = VnetHeader.decode(vnet_header)
    assert (header.csum_start, header.csum_offset, header.gso_size) == (l4_offset, 16, segment_size)
    assert complete_checksum(frame, l4_offset, 16) == bytes(packet)
    assert wire_frames(vnet_header, frame) == segments


def test_coalesce_refuses_what_it_cannot_merge_safely() -> None:
    packet = _tcp_packet(False, False, bytes(range(256)) * 12, "PA", 1000)
    segments = segment_tcp(bytes(packet), 34, 1000)
    assert coalesce_tcp(segments) is not None
    corrupt = bytearray(segments[1])
    corrupt[-1] ^= 0x01
    other_packet = _tcp_packet(False, False, bytes(1000), "A", 2000)  # contiguous sequence...
    other_packet[TCP].dport = 5002  # ...of another connection
    other_flow = bytes(other_packet)
    tagged = segment_tcp(bytes(_tcp_packet(False, True, bytes(3000), "A", 1)), 38, 1000)
    refused = {
        "bad checksum": [segments[0], bytes(corrupt), segments[2]],
        "out of order": [segments[0], segments[2], segments[1]],
        "gap": [segments[0], segments[2]],
        "other flow": [segments[0], other_flow],
        "short middle": [segments[0], segments[3], segments[1]],
        "vlan": tagged,
        "one segment": segments[:1],
    }
    for case, frames in refused.items():
        assert coalesce_tcp(frames) is None, case
