"""Random bytes and cut or corrupted valid frames never raise anything but PacketError, from
any decoder or rewrite."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from hivenet.packets import (
    DhcpMessage,
    PacketError,
    dec_ttl,
    embedded_datagram,
    extract_flow_match,
    parse_frame,
    pop_vlan,
    push_vlan,
    rewrite_frame,
    verify_checksums,
    vxlan_decapsulate,
)

from .scapy_frames import scapy_frames

OPERATIONS: list[Callable[[bytes], object]] = [
    lambda frame: extract_flow_match(frame, 1),
    parse_frame,
    verify_checksums,
    lambda frame: embedded_datagram(parse_frame(frame)),
    dec_ttl,
    pop_vlan,
    lambda frame: push_vlan(frame, 10),
    lambda frame: rewrite_frame(frame, "ip_src", 1),
    lambda frame: rewrite_frame(frame, "ip_tos", 4),
    lambda frame: rewrite_frame(frame, "tp_dst", 2),
    lambda frame: rewrite_frame(frame, "icmp_id", 3),
    lambda frame: rewrite_frame(frame, "eth_src", 3),
    vxlan_decapsulate,
    DhcpMessage.decode,
]


def _only_packet_errors(frame: bytes) -> None:
    for operation in OPERATIONS:
        with contextlib.suppress(PacketError):
            operation(frame)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_raise_only_packet_errors(frame: bytes) -> None:
    _only_packet_errors(frame)


@settings(max_examples=200, deadline=None)
@given(scapy_frames(), st.data())
def test_cut_and_corrupted_frames_raise_only_packet_errors(
    frame: bytes, data: st.DataObject
) -> None:
    mutated = bytearray(frame)
    for _ in range(data.draw(st.integers(0, 4))):
        mutated[data.draw(st.integers(0, len(mutated) - 1))] = data.draw(st.integers(0, 255))
    mutated = mutated[: data.draw(st.integers(0, len(mutated)))]
    _only_packet_errors(bytes(mutated))
