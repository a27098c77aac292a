"""Rewrites change the named field and keep every checksum valid (scapy recomputes them)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6, IPv6ExtHdrFragment
from scapy.layers.l2 import Dot1Q, Ether
from scapy.packet import Packet, Raw

from hivenet.packets import (
    RewriteError,
    dec_ttl,
    extract_flow_match,
    pop_vlan,
    push_vlan,
    rewrite_frame,
    verify_checksums,
)
from hivenet.packets.flowmatch import FlowMatch

from .scapy_frames import ip_options, ipv4s, ipv6s, macs, payloads, u8, u16
from .scapy_oracle import checksums_valid


@st.composite
def rewritable_frames(draw: st.DrawFn) -> tuple[bytes, str]:
    """(frame, "4" or "6") with TCP, UDP (sometimes checksum 0) or ICMP echo."""
    version = draw(st.sampled_from(["4", "6"]))
    frame: Packet = Ether(src=draw(macs), dst=draw(macs))
    if draw(st.booleans()):
        frame = frame / Dot1Q(vlan=draw(st.integers(1, 4095)))
    if version == "4":
        frame = frame / IP(
            src=draw(ipv4s),
            dst=draw(ipv4s),
            tos=draw(u8),
            ttl=draw(st.integers(1, 255)),
            options=draw(ip_options),
        )
    else:
        frame = frame / IPv6(
            src=draw(ipv6s), dst=draw(ipv6s), tc=draw(u8), hlim=draw(st.integers(1, 255))
        )
        if draw(st.booleans()):
            frame = frame / IPv6ExtHdrFragment(offset=0, m=1)
    kind = draw(st.sampled_from(["tcp", "udp", "udp0", "icmp"]))
    if kind == "tcp":
        frame = frame / TCP(sport=draw(u16), dport=draw(u16), seq=draw(u16), flags="PA")
    elif kind in ("udp", "udp0"):
        udp = UDP(sport=draw(u16), dport=draw(u16))
        if kind == "udp0" and version == "4":
            udp.chksum = 0
        frame = frame / udp
    elif version == "4":
        frame = frame / ICMP(type=draw(st.sampled_from([0, 8])), id=draw(u16), seq=draw(u16))
    else:
        frame = frame / ICMPv6EchoRequest(id=draw(u16), seq=draw(u16))
    return bytes(frame / Raw(draw(payloads))), version


FIELD_BITS = {"eth_src": 48, "eth_dst": 48, "ip_tos": 8, "tp_src": 16, "tp_dst": 16, "icmp_id": 16}


@settings(max_examples=300, deadline=None)
@given(rewritable_frames(), st.sampled_from([*sorted(FIELD_BITS), "ip_src", "ip_dst"]), st.data())
def test_rewrite_sets_the_field_and_keeps_checksums_valid(
    frame_and_version: tuple[bytes, str], field: str, data: st.DataObject
) -> None:
    frame, version = frame_and_version
    bits = FIELD_BITS.get(field, 32 if version == "4" else 128)
    value = data.draw(st.integers(0, 2**bits - 1))
    before = extract_flow_match(frame, 1)
    try:
        rewritten = rewrite_frame(frame, field, value)
    except RewriteError:
        # Only a transport field on the wrong protocol may be refused.
        assert (field in ("tp_src", "tp_dst") and before.ip_proto not in (6, 17)) or (
            field == "icmp_id" and before.ip_proto not in (1, 58)
        )
        return
    after = extract_flow_match(rewritten, 1)
    assert after == before.with_fields(**{field: value})
    assert checksums_valid(rewritten)
    assert verify_checksums(rewritten) == []
    udp_checksum_offset = (
        len(frame) - len(bytes(Ether(frame)[UDP])) + 6 if UDP in Ether(frame) else None
    )
    if (
        udp_checksum_offset is not None
        and frame[udp_checksum_offset : udp_checksum_offset + 2] == b"\0\0"
    ):
        assert rewritten[udp_checksum_offset : udp_checksum_offset + 2] == b"\0\0"


@settings(max_examples=150, deadline=None)
@given(rewritable_frames())
def test_dec_ttl_and_vlan_push_pop_keep_checksums_valid(
    frame_and_version: tuple[bytes, str],
) -> None:
    frame, _version = frame_and_version
    before = extract_flow_match(frame, 1)
    decremented = dec_ttl(frame)
    assert extract_flow_match(decremented, 1) == before.with_fields(ip_ttl=before.ip_ttl - 1)
    assert checksums_valid(decremented)
    if before.vlan:
        popped = pop_vlan(frame)
        assert extract_flow_match(popped, 1) == before.with_fields(vlan=0)
        assert push_vlan(popped, before.vlan) == frame
    else:
        pushed = push_vlan(frame, 300)
        assert extract_flow_match(pushed, 1) == before.with_fields(vlan=300)
        assert pop_vlan(pushed) == frame
        assert Ether(pushed)[Dot1Q].vlan == 300


def _v4_udp(checksum: int | None = None) -> bytes:
    udp = UDP(sport=1000, dport=53)
    if checksum is not None:
        udp.chksum = checksum
    return bytes(Ether() / IP(src="10.0.0.1", dst="10.0.0.2") / udp / b"query")


def test_udp_checksum_zero_over_ipv4_stays_zero() -> None:
    rewritten = rewrite_frame(_v4_udp(0), "ip_dst", int(ipaddress.IPv4Address("192.0.2.1")))
    assert Ether(rewritten)[UDP].chksum == 0
    assert checksums_valid(rewritten)


def test_later_fragment_rewrites_ip_but_refuses_ports() -> None:
    frame = bytes(Ether() / IP(frag=5, proto=6) / (b"x" * 20))
    assert checksums_valid(rewrite_frame(frame, "ip_src", 7))
    with pytest.raises(RewriteError, match="tp_src"):
        rewrite_frame(frame, "tp_src", 7)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: rewrite_frame(_v4_udp(), "ip_ttl", 1), "not a rewritable field"),
        (lambda: rewrite_frame(_v4_udp(), "ip_src", 2**32), "does not fit in 32 bits"),
        (lambda: rewrite_frame(_v4_udp(), "tp_src", -1), "does not fit in 16 bits"),
        (lambda: rewrite_frame(_v4_udp(), "icmp_id", 5), "no ICMP header"),
        (lambda: rewrite_frame(bytes(Ether() / IP() / ICMP(type=3)), "icmp_id", 5), "not an echo"),
        (lambda: rewrite_frame(bytes(Ether(type=0x88CC) / (b"x" * 30)), "ip_src", 1), "not IP"),
        (lambda: dec_ttl(bytes(Ether() / IP(ttl=0))), "ttl: is already 0"),
        (lambda: dec_ttl(bytes(Ether() / IPv6(hlim=0))), "hop_limit: is already 0"),
        (lambda: push_vlan(_v4_udp(), 0), "vid: must be an int in 1..4095"),
        (lambda: push_vlan(bytes(Ether() / Dot1Q(vlan=3) / IP()), 4), "already tagged"),
        (lambda: pop_vlan(_v4_udp()), "not tagged"),
    ],
)
def test_rewrite_errors_name_the_field(call: object, message: str) -> None:
    with pytest.raises(RewriteError, match=message):
        call()  # type: ignore[operator]


def test_rewrite_reference_values() -> None:
    frame = _v4_udp()
    rewritten = rewrite_frame(frame, "tp_dst", 5353)
    assert Ether(rewritten)[UDP].dport == 5353
    assert rewrite_frame(frame, "eth_dst", 0x0200000000FF)[:6] == bytes.fromhex("0200000000ff")
    match: FlowMatch = extract_flow_match(rewrite_frame(frame, "ip_tos", 0xB8), 1)
    assert match.ip_tos == 0xB8
    v6 = bytes(Ether() / IPv6(tc=3, fl=0xABCDE) / UDP())
    assert Ether(rewrite_frame(v6, "ip_tos", 0x2E))[IPv6].fl == 0xABCDE
    assert Ether(rewrite_frame(v6, "ip_tos", 0x2E))[IPv6].tc == 0x2E
