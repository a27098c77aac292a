"""The exact-match cache's raw-header key (`hivenet.datapath._fastkey`) against the parser it
lets the datapath skip (`extract_flow_match`): a key only for frames the parser accepts, equal
keys only for frames with equal FlowMatches, and the parse path for everything unusual.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hivenet.datapath._fastkey import raw_flow_key
from hivenet.packets import (
    build_arp_request,
    build_echo_request,
    build_neighbor_solicitation,
    build_tcp_segment,
    build_udp_datagram,
    extract_flow_match,
)
from hivenet.packets.errors import PacketError
from hivenet.packets.flowmatch import FlowMatch

MAC_A, MAC_B = "02:00:00:00:00:01", "02:00:00:00:00:02"
TIMESTAMP_OPTIONS = b"\x01\x01\x08\x0a" + bytes(range(8))


def key_of(frame: bytes) -> object:
    return raw_flow_key(frame, 0, len(frame))


def flow_match_or_error(frame: bytes) -> FlowMatch | None:
    try:
        return extract_flow_match(frame, 7)
    except PacketError:
        return None


# ---- a generator of plausible and broken frames ---------------------------------------------


@st.composite
def l4_headers(draw: st.DrawFn, protocol: int) -> bytes:
    if protocol == 6:
        data_offset = draw(st.sampled_from([5, 5, 5, 8, 8, 8, 8, 8, 4, 6, 15]))
        options_len = max(0, data_offset * 4 - 20)
        if options_len == 12 and draw(st.integers(0, 3)) != 3:
            options = TIMESTAMP_OPTIONS
        else:
            options = draw(st.binary(min_size=options_len, max_size=options_len))
        return (
            struct.pack(
                "!HHIIBBHHH",
                draw(st.integers(0, 0xFFFF)),
                draw(st.sampled_from([80, 443, 5201])),
                draw(st.integers(0, 0xFFFFFFFF)),
                draw(st.integers(0, 0xFFFFFFFF)),
                (data_offset << 4) | draw(st.sampled_from([0, 0, 1])),
                draw(st.integers(0, 0xFF)),
                draw(st.integers(0, 0xFFFF)),
                draw(st.integers(0, 0xFFFF)),
                draw(st.integers(0, 0xFFFF)),
            )
            + options
        )
    if protocol == 17:
        return struct.pack(
            "!HHHH",
            draw(st.integers(0, 0xFFFF)),
            draw(st.sampled_from([9, 53, 4789])),
            draw(st.sampled_from([0, 7, 8, 26, 60, 0xFFFF])),  # fixed up to fit below mostly
            draw(st.integers(0, 0xFFFF)),
        )
    # ICMP / ICMPv6: type, code, checksum, identifier, sequence
    return struct.pack(
        "!BBHHH",
        draw(st.sampled_from([0, 3, 8, 11, 128, 129, 135, 136, 1])),
        draw(st.integers(0, 3)),
        draw(st.integers(0, 0xFFFF)),
        draw(st.integers(0, 0xFFFF)),
        draw(st.integers(0, 0xFFFF)),
    )


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    """Mostly well-formed frames (the first choice of each draw is the valid one, as
    hypothesis favours it), with a share of broken lengths, versions, options and types."""
    ip_version = draw(st.sampled_from([4, 4, 4, 6, 6, 0]))
    vlan_tag = (
        struct.pack("!HH", 0x8100, draw(st.integers(0, 0xFFFF))) if draw(st.booleans()) else b""
    )
    macs = draw(st.sampled_from([bytes.fromhex("020000000002020000000001"), bytes(12)]))
    if ip_version == 0:
        eth_type = draw(st.sampled_from([0x0806, 0x8100, 0x88CC, 0x0800, 0x86DD]))
        return macs + vlan_tag + struct.pack("!H", eth_type) + draw(st.binary(max_size=80))
    protocol = draw(st.sampled_from([6, 6, 6, 17, 17, 17, 1, 58, 58, 0, 44, 60]))
    l4 = draw(l4_headers(protocol)) + draw(st.binary(max_size=24))
    if protocol == 17 and draw(st.integers(0, 4)) != 4:
        l4 = l4[:4] + struct.pack("!H", len(l4)) + l4[6:]
    if ip_version == 4:
        ihl = draw(st.sampled_from([5, 5, 5, 5, 5, 6, 4]))
        options = draw(st.binary(min_size=max(0, ihl * 4 - 20), max_size=max(0, ihl * 4 - 20)))
        total_length = 20 + len(options) + len(l4)
        if draw(st.integers(0, 7)) == 7:
            total_length = draw(st.integers(0, 0xFFFF))
        l3 = (
            struct.pack(
                "!BBHHHBBH4s4s",
                (draw(st.sampled_from([4, 4, 4, 4, 4, 6])) << 4) | ihl,
                draw(st.integers(0, 0xFF)),
                total_length,
                draw(st.integers(0, 0xFFFF)),
                draw(st.sampled_from([0, 0, 0x4000, 0x4000, 0x2000, 0x0001, 0x8000])),
                draw(st.integers(0, 0xFF)),
                protocol,
                draw(st.integers(0, 0xFFFF)),
                bytes([10, 0, 0, draw(st.integers(1, 3))]),
                bytes([10, 0, 0, draw(st.integers(1, 3))]),
            )
            + options
        )
        eth_type = 0x0800
    else:
        payload_length = len(l4)
        if draw(st.integers(0, 7)) == 7:
            payload_length = draw(st.integers(0, 0xFFFF))
        l3 = struct.pack(
            "!IHBB16s16s",
            (draw(st.sampled_from([6, 6, 6, 6, 6, 4])) << 28) | draw(st.integers(0, 0x0FFFFFFF)),
            payload_length,
            protocol,
            draw(st.integers(0, 0xFF)),
            bytes(15) + bytes([draw(st.integers(1, 3))]),
            bytes(15) + bytes([draw(st.integers(1, 3))]),
        )
        eth_type = 0x86DD
    frame = macs + vlan_tag + struct.pack("!H", eth_type) + l3 + l4
    trailer = draw(st.binary(max_size=8))  # Ethernet padding after the IP packet
    return frame + trailer


# Per-packet bytes by layer (offset, length): IPv4 id and checksum; IPv6 low
# flow-label bits; TCP sequence, acknowledgement, window, checksum, urgent pointer, the
# timestamp values; UDP checksum; ICMP checksum and echo sequence.
_IPV4_PER_PACKET = ((4, 2), (10, 2))
_IPV6_PER_PACKET = ((2, 2),)
_L4_PER_PACKET = {6: ((4, 8), (14, 6), (24, 8)), 17: ((6, 2),), 1: ((2, 2), (6, 2))}
_L4_PER_PACKET[58] = _L4_PER_PACKET[1]


def per_packet_spans(frame: bytes) -> list[tuple[int, int]]:
    """Where the next packet of the same flow may differ, for a frame with a key (an oracle
    written from the RFC header layouts, independent of the key's struct formats)."""
    l3 = 18 if frame[12:14] == b"\x81\x00" else 14
    if frame[l3] >> 4 == 4:
        spans = [(l3 + offset, length) for offset, length in _IPV4_PER_PACKET]
        l4, protocol = l3 + 20, frame[l3 + 9]
    else:
        spans = [(l3 + offset, length) for offset, length in _IPV6_PER_PACKET]
        l4, protocol = l3 + 40, frame[l3 + 6]
    header_end = l4 + (frame[l4 + 12] >> 4) * 4 if protocol == 6 else l4 + 8
    spans += [
        (l4 + offset, length)
        for offset, length in _L4_PER_PACKET[protocol]
        if l4 + offset + length <= header_end
    ]
    spans.append((header_end, len(frame) - header_end))  # payload and padding
    return spans


@st.composite
def frame_and_variant(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A frame and a variant: either the same flow's next packet (per-packet fields and the
    payload changed), or a copy with a few arbitrary header bytes (or its length) changed."""
    frame = draw(frames())
    variant = bytearray(frame)
    if key_of(frame) is not None and draw(st.booleans()):
        for start, length in per_packet_spans(frame):
            variant[start : start + length] = draw(st.binary(min_size=length, max_size=length))
        return frame, bytes(variant)
    for _ in range(draw(st.integers(1, 4))):
        if not variant:
            break
        position = draw(st.integers(0, min(len(variant), 100) - 1))
        variant[position] = draw(st.integers(0, 0xFF))
    if draw(st.integers(0, 5)) == 0:
        variant = variant[: draw(st.integers(0, len(variant)))]
    elif draw(st.integers(0, 5)) == 0:
        variant += draw(st.binary(min_size=1, max_size=16))
    return frame, bytes(variant)


# ---- the two soundness properties -----------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(frames())
def test_a_key_only_for_frames_the_parser_accepts(frame: bytes) -> None:
    if key_of(frame) is not None:
        assert flow_match_or_error(frame) is not None


@settings(max_examples=300, deadline=None)
@given(frame_and_variant())
def test_equal_keys_mean_equal_flow_matches(pair: tuple[bytes, bytes]) -> None:
    frame, variant = pair
    key = key_of(frame)
    if key is None or key_of(variant) != key:
        return
    assert flow_match_or_error(frame) is not None
    assert flow_match_or_error(variant) == flow_match_or_error(frame)


@settings(max_examples=200, deadline=None)
@given(frames(), st.binary(max_size=12), st.binary(max_size=64))
def test_the_key_reads_only_the_frame_inside_a_larger_buffer(
    frame: bytes, before: bytes, after: bytes
) -> None:
    buffer = bytearray(before + frame + after)
    assert raw_flow_key(buffer, len(before), len(frame)) == key_of(frame)
    assert raw_flow_key(memoryview(buffer), len(before), len(frame)) == key_of(frame)


def test_generated_frames_exercise_both_paths() -> None:
    """Guards the properties above against a generator that never yields a key (vacuous)."""
    keyed = fallback = equal_pairs = 0

    @settings(max_examples=300, deadline=None, database=None, derandomize=True)
    @given(frame_and_variant())
    def count(pair: tuple[bytes, bytes]) -> None:
        nonlocal keyed, fallback, equal_pairs
        frame, variant = pair
        key = key_of(frame)
        if key is None:
            fallback += 1
            return
        keyed += 1
        if key_of(variant) == key and variant != frame:
            equal_pairs += 1

    count()
    assert keyed >= 20 and fallback >= 30 and equal_pairs >= 10, (keyed, fallback, equal_pairs)


# ---- which frames take which path -----------------------------------------------------------


def _tcp(**changes: object) -> bytes:
    fields: dict[str, object] = {
        "eth_src": MAC_A,
        "eth_dst": MAC_B,
        "ip_src": "10.0.0.1",
        "ip_dst": "10.0.0.2",
        "src_port": 40000,
        "dst_port": 80,
        "flags": 0x10,
        "payload": b"x" * 10,
    }
    fields.update(changes)
    return build_tcp_segment(**fields)  # type: ignore[arg-type]


def _udp(**changes: object) -> bytes:
    fields: dict[str, object] = {
        "eth_src": MAC_A,
        "eth_dst": MAC_B,
        "ip_src": "10.0.0.1",
        "ip_dst": "10.0.0.2",
        "src_port": 5000,
        "dst_port": 9,
        "payload": b"q" * 18,
    }
    fields.update(changes)
    return build_udp_datagram(**fields)  # type: ignore[arg-type]


FAST_FRAMES = {
    "tcp": _tcp(),
    "tcp_timestamps": _tcp(options=TIMESTAMP_OPTIONS),
    "tcp_vlan": _tcp(vlan=10),
    "tcp_ipv6": _tcp(ip_src="fd00::1", ip_dst="fd00::2"),
    "udp": _udp(),
    "udp_vlan_ipv6": _udp(ip_src="fd00::1", ip_dst="fd00::2", vlan=20),
    "icmp_echo": build_echo_request(
        eth_src=MAC_A, eth_dst=MAC_B, ip_src="10.0.0.1", ip_dst="10.0.0.2", identifier=3, sequence=1
    ),
    "icmpv6_echo": build_echo_request(
        eth_src=MAC_A, eth_dst=MAC_B, ip_src="fd00::1", ip_dst="fd00::2", identifier=3, sequence=1
    ),
}


def _with_ipv4_byte(frame: bytes, offset: int, value: int) -> bytes:
    changed = bytearray(frame)
    changed[14 + offset] = value
    return bytes(changed)


SLOW_FRAMES = {
    "arp": build_arp_request(sender_mac=MAC_A, sender_ip="10.0.0.1", target_ip="10.0.0.2"),
    "neighbor_solicitation": build_neighbor_solicitation(
        src_mac=MAC_A, src_ip="fd00::1", target_ip="fd00::2"
    ),
    "tcp_mss_option": _tcp(options=b"\x02\x04\x05\xb4"),
    "ipv4_more_fragments": _with_ipv4_byte(_udp(), 6, 0x20),
    "ipv4_later_fragment": _with_ipv4_byte(_udp(), 7, 0x01),
    "ipv4_options": _with_ipv4_byte(_udp(), 0, 0x46),
    "truncated_tcp": _tcp()[:50],
}


@pytest.mark.parametrize("name", sorted(FAST_FRAMES))
def test_common_frames_get_a_key(name: str) -> None:
    frame = FAST_FRAMES[name]
    assert key_of(frame) is not None
    assert flow_match_or_error(frame) is not None


@pytest.mark.parametrize("name", sorted(SLOW_FRAMES))
def test_unusual_frames_take_the_parse_path(name: str) -> None:
    assert key_of(SLOW_FRAMES[name]) is None


@settings(max_examples=200, deadline=None)
@given(frames(), st.data())
def test_the_next_packet_of_a_flow_has_the_same_key(frame: bytes, data: st.DataObject) -> None:
    key = key_of(frame)
    if key is None:
        return
    variant = bytearray(frame)
    for start, length in per_packet_spans(frame):
        variant[start : start + length] = data.draw(st.binary(min_size=length, max_size=length))
    assert key_of(bytes(variant)) == key


def test_per_packet_fields_do_not_change_the_key() -> None:
    first = _tcp(seq=1, ack=2, window=100, options=TIMESTAMP_OPTIONS, payload=b"a")
    second = _tcp(seq=9999, ack=77, window=5, options=TIMESTAMP_OPTIONS[:4] + bytes(8) + b"")
    assert first != second
    assert key_of(first) == key_of(second)


@pytest.mark.parametrize(
    "changes", [{"src_port": 40001}, {"flags": 0x18}, {"tos": 4}, {"ttl": 63}, {"vlan": 5}]
)
def test_flow_match_fields_change_the_key(changes: dict[str, object]) -> None:
    assert key_of(_tcp(**changes)) != key_of(_tcp())
