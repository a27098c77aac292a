"""How an IP packet compares with an MTU: the check a router makes before it forwards (RFC 791
fragmentation, RFC 1191 "don't fragment", RFC 8200 section 5: IPv6 is never fragmented on the
way, the sender is told with a packet-too-big).

Owns `ip_size` (IP version, L3 length and whether the packet may be fragmented, read from the
frame's bytes: none of it is a `FlowMatch` field, so megaflows cannot tell sizes apart) and
`mtu_verdict`, which the simulation and every datapath use alike. Pure: bytes in, ints out.
"""

from __future__ import annotations

FITS = 0
TOO_BIG = 1  # may not be fragmented (IPv4 with DF, or IPv6): the sender must be told the MTU
TOO_BIG_NO_DF = 2  # IPv4 without DF: a router would fragment it (HiveNet drops it, "too_big")

_ETH_TYPE_IPV4 = 0x0800
_ETH_TYPE_IPV6 = 0x86DD
_VLAN_TYPES = (0x8100, 0x88A8)
_IPV4_DF = 0x40  # in the first byte of flags + fragment offset


def ip_size(frame: bytes | bytearray | memoryview, start: int = 0) -> tuple[int, int, bool] | None:
    """(IP version, L3 length from the IP header, may be fragmented) of the Ethernet frame at
    `start` in `frame`; None for a frame that is not IPv4/IPv6 or is too short to say."""
    end = len(frame)
    offset = start + 12
    if offset + 2 > end:
        return None
    eth_type = (frame[offset] << 8) | frame[offset + 1]
    offset += 2
    while eth_type in _VLAN_TYPES:
        if offset + 4 > end:
            return None
        eth_type = (frame[offset + 2] << 8) | frame[offset + 3]
        offset += 4
    if eth_type == _ETH_TYPE_IPV4:
        if offset + 8 > end:
            return None
        length = (frame[offset + 2] << 8) | frame[offset + 3]
        return 4, length, not frame[offset + 6] & _IPV4_DF
    if eth_type == _ETH_TYPE_IPV6:
        if offset + 6 > end:
            return None
        return 6, 40 + ((frame[offset + 4] << 8) | frame[offset + 5]), False
    return None


def mtu_verdict(
    frame: bytes | bytearray | memoryview, mtu: int, start: int = 0, segment_length: int = 0
) -> int:
    """FITS, TOO_BIG or TOO_BIG_NO_DF for the frame at `start` against an MTU of `mtu` L3
    bytes (0: no limit). `segment_length`: the L3 length of each segment of a GSO super-frame
    (what goes on the wire), used instead of the header's length."""
    if not mtu:
        return FITS
    size = ip_size(frame, start)
    if size is None:
        return FITS
    _version, length, may_fragment = size
    if segment_length:
        length = segment_length
    if length <= mtu:
        return FITS
    return TOO_BIG_NO_DF if may_fragment else TOO_BIG
