"""The 802.1Q/802.1ad tag the kernel took off a received frame is put back
(`restore_vlan_tag`), so a tagged or QinQ frame from a VM is never seen as untagged."""

from __future__ import annotations

import struct

from hivenet.datapath._offload import VNET_HEADER_LEN
from hivenet.datapath.userspace import (
    _AUXDATA,
    TP_STATUS_VLAN_TPID_VALID,
    TP_STATUS_VLAN_VALID,
    restore_vlan_tag,
)
from hivenet.packets import extract_flow_match

UNTAGGED = (
    bytes.fromhex("ffffffffffff020000000001")
    + b"\x08\x00"
    + bytes.fromhex("4500001c000100004011f9d80a0000010a000002" + "0035003500080000")
)


def _received(frame: bytes, vnet: bytes = bytes(VNET_HEADER_LEN)) -> bytearray:
    buffer = bytearray(256)
    buffer[: VNET_HEADER_LEN + len(frame)] = vnet + frame
    return buffer


def _aux(status: int, tci: int = 0, tpid: int = 0) -> bytes:
    return _AUXDATA.pack(status, 0, 0, 0, 0, tci, tpid)


def test_no_tag_leaves_the_frame_alone() -> None:
    buffer = _received(UNTAGGED)
    length = VNET_HEADER_LEN + len(UNTAGGED)
    assert restore_vlan_tag(buffer, length, _aux(0)) == length
    assert bytes(buffer[VNET_HEADER_LEN:length]) == UNTAGGED


def test_a_stripped_8021q_tag_is_put_back() -> None:
    buffer = _received(UNTAGGED)
    length = restore_vlan_tag(
        buffer, VNET_HEADER_LEN + len(UNTAGGED), _aux(TP_STATUS_VLAN_VALID, tci=0x2005)
    )
    frame = bytes(buffer[VNET_HEADER_LEN:length])
    assert frame == UNTAGGED[:12] + b"\x81\x00\x20\x05" + UNTAGGED[12:]
    assert extract_flow_match(frame, 1).vlan == 5


def test_an_8021ad_outer_tag_keeps_its_tpid() -> None:
    inner = UNTAGGED[:12] + b"\x81\x00\x00\x05" + UNTAGGED[12:]
    buffer = _received(inner)
    status = TP_STATUS_VLAN_VALID | TP_STATUS_VLAN_TPID_VALID
    length = restore_vlan_tag(
        buffer, VNET_HEADER_LEN + len(inner), _aux(status, tci=7, tpid=0x88A8)
    )
    frame = bytes(buffer[VNET_HEADER_LEN:length])
    assert frame[12:20] == b"\x88\xa8\x00\x07\x81\x00\x00\x05"
    # QinQ is not parsed as IP: a frame of ethertype 0x88a8 (port security drops it).
    assert extract_flow_match(frame, 1).eth_type == 0x88A8


def test_offload_offsets_move_with_the_tag() -> None:
    # NEEDS_CSUM, GSO TCPv4, hdr_len 54, gso_size 1400, csum_start 34, csum_offset 16.
    vnet = struct.pack("<BBHHHH", 1, 1, 54, 1400, 34, 16)
    buffer = _received(UNTAGGED, vnet)
    restore_vlan_tag(buffer, VNET_HEADER_LEN + len(UNTAGGED), _aux(TP_STATUS_VLAN_VALID, tci=5))
    assert struct.unpack_from("<BBHHHH", buffer) == (1, 1, 58, 1400, 38, 16)
