"""Declarative header layouts: they agree with hand-written struct layouts (the hot path's
offsets), round-trip, and reject out-of-range values naming the field."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hivenet.packets import MalformedPacket, TruncatedPacket
from hivenet.packets.headers import (
    ArpPacket,
    Dot1QTag,
    EthernetHeader,
    IcmpHeader,
    Ipv4Header,
    Ipv6FragmentHeader,
    Ipv6Header,
    TcpHeader,
    UdpHeader,
    VxlanHeader,
)
from hivenet.packets.layout import Header


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=60, max_size=60))
def test_layouts_agree_with_struct_on_the_hot_path_fields(data: bytes) -> None:
    ethernet = EthernetHeader.decode_fixed(data)
    dst_hi, dst_lo, src_hi, src_lo, eth_type = struct.unpack_from("!HIHIH", data)
    assert (ethernet.dst, ethernet.src, ethernet.ethertype) == (
        dst_hi << 32 | dst_lo,
        src_hi << 32 | src_lo,
        eth_type,
    )
    tci, inner = struct.unpack_from("!HH", data)
    tag = Dot1QTag.decode_fixed(data)
    assert (tag.pcp, tag.dei, tag.vid, tag.ethertype) == (
        tci >> 13,
        tci >> 12 & 1,
        tci & 0xFFF,
        inner,
    )
    values = struct.unpack_from("!BBHHHBBHII", data)
    ipv4 = Ipv4Header.LAYOUT.decode(data)
    assert ipv4 == (
        values[0] >> 4,
        values[0] & 15,
        values[1],
        values[2],
        values[3],
        values[4] >> 13,
        values[4] & 0x1FFF,
        *values[5:],
    )
    vcl, plen, nh, hlim, s1, s2, d1, d2 = struct.unpack_from("!IHBBQQQQ", data)
    assert Ipv6Header.decode_fixed(data) == Ipv6Header(
        vcl >> 28, vcl >> 20 & 0xFF, vcl & 0xFFFFF, plen, nh, hlim, s1 << 64 | s2, d1 << 64 | d2
    )
    sport, dport, seq, ack, offset, flags, window, checksum, urgent = struct.unpack_from(
        "!HHIIBBHHH", data
    )
    assert TcpHeader.LAYOUT.decode(data) == (
        sport,
        dport,
        seq,
        ack,
        offset >> 4,
        offset & 15,
        flags,
        window,
        checksum,
        urgent,
    )
    assert UdpHeader.decode_fixed(data) == UdpHeader(*struct.unpack_from("!HHHH", data))
    icmp_type, code, icmp_checksum, identifier, sequence = struct.unpack_from("!BBHHH", data)
    icmp = IcmpHeader.decode_fixed(data)
    assert (icmp.type, icmp.code, icmp.checksum, icmp.identifier, icmp.sequence) == (
        icmp_type,
        code,
        icmp_checksum,
        identifier,
        sequence,
    )
    fragment = Ipv6FragmentHeader.decode_fixed(data)
    next_header, _reserved, offset_flags, identification = struct.unpack_from("!BBHI", data)
    assert (fragment.next_header, fragment.fragment_offset, fragment.more_fragments) == (
        next_header,
        offset_flags >> 3,
        offset_flags & 1,
    )
    assert fragment.identification == identification


HEADERS: list[type[Header]] = [
    EthernetHeader,
    Dot1QTag,
    ArpPacket,
    UdpHeader,
    IcmpHeader,
    VxlanHeader,
    Ipv6Header,
]


@pytest.mark.parametrize("header_class", HEADERS, ids=lambda cls: cls.__name__)
@settings(max_examples=50, deadline=None)
@given(data=st.binary(min_size=40, max_size=40))
def test_fixed_layouts_round_trip(header_class: type[Header], data: bytes) -> None:
    header = header_class.decode_fixed(data)
    assert header.encode_fixed() == data[: header_class.LAYOUT.size]


def test_constructors_reject_out_of_range_fields_by_name() -> None:
    with pytest.raises(MalformedPacket, match=r"802\.1Q\.vid: 4096 does not fit in 12 bits"):
        Dot1QTag(0, 0, 4096, 0x0800)
    with pytest.raises(MalformedPacket, match=r"UDP\.src_port: -1"):
        UdpHeader(-1, 2, 8, 0)
    with pytest.raises(MalformedPacket, match=r"IPv4\.ihl: 6 does not match 0 option bytes"):
        Ipv4Header(4, 6, 0, 20, 0, 0, 0, 64, 6, 0, 1, 2)
    with pytest.raises(MalformedPacket, match=r"TCP\.flags: True"):
        TcpHeader(1, 2, 0, 0, 5, 0, True, 0, 0, 0)
    with pytest.raises(MalformedPacket, match=r"VXLAN\.vni"):
        VxlanHeader(8, 0, 1 << 24)


def test_decode_reports_truncation_with_layer_name() -> None:
    with pytest.raises(TruncatedPacket, match=r"Ethernet\.header: needs 14 bytes, only 3"):
        EthernetHeader.decode_fixed(b"abc")
    with pytest.raises(TruncatedPacket, match=r"IPv6\.header"):
        Ipv6Header.decode(bytes(39))
