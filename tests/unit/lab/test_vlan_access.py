"""The lab's access-port relay (lab/traffic/vlan_access.py): what crosses it, what does not."""

from __future__ import annotations

import struct

from hivenet.lab.traffic.vlan_access import (
    AUXDATA,
    PACKET_AUXDATA,
    SOL_PACKET,
    TP_STATUS_VLAN_VALID,
    tag,
    untag,
)

FRAME = bytes.fromhex("020000000001020000000002") + b"\x08\x00" + b"payload" * 4


def auxdata(tci: int, status: int = TP_STATUS_VLAN_VALID) -> list[tuple[int, int, bytes]]:
    return [(SOL_PACKET, PACKET_AUXDATA, AUXDATA.pack(status, 0, 0, 0, 0, tci, 0x8100))]


def test_its_vlan_is_untagged_inline_or_from_auxdata_and_others_are_dropped() -> None:
    tagged = tag(FRAME, 100)
    assert tagged[12:16] == struct.pack("!HH", 0x8100, 100)
    assert untag(tagged, [], 100) == FRAME
    assert untag(FRAME, auxdata(100), 100) == FRAME  # the kernel took the tag off
    assert untag(FRAME, auxdata(0x2000 | 100), 100) == FRAME  # priority bits are no VLAN
    assert untag(tag(FRAME, 200), [], 100) is None
    assert untag(FRAME, auxdata(200), 100) is None
    assert untag(FRAME, [], 100) is None  # untagged: not on the access VLAN
    assert untag(FRAME, auxdata(100, status=0), 100) is None
