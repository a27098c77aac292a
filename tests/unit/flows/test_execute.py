"""Unit tests for `hivenet.flows.execute.execute_actions`, with scapy as the oracle: the
executor's output frames must equal the frames scapy builds with the rewritten header values
(scapy computing every checksum itself), so checksums are valid by construction of the oracle."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Packet, Raw

from hivenet.flows.actions import (
    Action,
    DecTtl,
    Drop,
    Output,
    PopVlan,
    PushVlan,
    SetField,
    Tunnel,
)
from hivenet.flows.execute import execute_actions
from hivenet.packets.errors import RewriteError


def mac(value: int) -> str:
    return ":".join(f"{byte:02x}" for byte in value.to_bytes(6, "big"))


def ipv4(value: int) -> str:
    return str(ipaddress.IPv4Address(value))


def ipv6(value: int) -> str:
    return str(ipaddress.IPv6Address(value))


@dataclass(frozen=True)
class Headers:
    """The header values of one test frame; `build()` is the scapy oracle for them."""

    family: int = 4
    l4: str = "tcp"  # tcp | udp | icmp (echo request)
    eth_src: int = 0x020000000001
    eth_dst: int = 0x020000000002
    vlan: int | None = None
    ip_src: int = 0x0A000001
    ip_dst: int = 0x0A000002
    ip_tos: int = 0
    ip_ttl: int = 64
    tp_src: int = 40000
    tp_dst: int = 80
    icmp_id: int = 0x1234
    udp_checksum_zero: bool = False
    payload: bytes = b"hivenet payload"

    def build(self) -> bytes:
        layers: Packet = Ether(src=mac(self.eth_src), dst=mac(self.eth_dst))
        if self.vlan is not None:
            layers = layers / Dot1Q(vlan=self.vlan)
        if self.family == 4:
            layers = layers / IP(
                src=ipv4(self.ip_src), dst=ipv4(self.ip_dst), tos=self.ip_tos, ttl=self.ip_ttl
            )
        else:
            src = ipv6(self.ip_src)
            dst = ipv6(self.ip_dst)
            layers = layers / IPv6(src=src, dst=dst, tc=self.ip_tos, hlim=self.ip_ttl)
        if self.l4 == "tcp":
            layers = layers / TCP(sport=self.tp_src, dport=self.tp_dst, flags="S", seq=7)
        elif self.l4 == "udp":
            udp = UDP(sport=self.tp_src, dport=self.tp_dst)
            if self.udp_checksum_zero:
                udp.chksum = 0
            layers = layers / udp
        elif self.family == 4:
            layers = layers / ICMP(type=8, id=self.icmp_id, seq=3)
        else:
            layers = layers / ICMPv6EchoRequest(id=self.icmp_id, seq=3)
        return bytes(layers / Raw(self.payload))


SET_FIELD_ATTRIBUTES = {
    "eth_src",
    "eth_dst",
    "ip_src",
    "ip_dst",
    "ip_tos",
    "tp_src",
    "tp_dst",
    "icmp_id",
}


def expected_headers(headers: Headers, action: Action) -> Headers:
    """What `action` should do to the header values (the model the oracle builds from)."""
    if isinstance(action, SetField):
        assert action.field in SET_FIELD_ATTRIBUTES
        changes: dict[str, Any] = {action.field: action.value}
        return replace(headers, **changes)
    if isinstance(action, DecTtl):
        return replace(headers, ip_ttl=headers.ip_ttl - 1)
    if isinstance(action, PushVlan):
        return replace(headers, vlan=action.vlan)
    if isinstance(action, PopVlan):
        return replace(headers, vlan=None)
    return headers


CHECKSUM_FIELDS = (
    (IP, "chksum"),
    (TCP, "chksum"),
    (UDP, "chksum"),
    (ICMP, "chksum"),
    (ICMPv6EchoRequest, "cksum"),
)


def assert_checksums_valid(frame: bytes) -> None:
    """Independent check: scapy recomputing every checksum reproduces the frame's bytes."""
    packet = Ether(frame)
    for layer_type, field in CHECKSUM_FIELDS:
        if layer_type in packet and not (layer_type is UDP and packet[UDP].chksum == 0):
            delattr(packet[layer_type], field)
    assert bytes(packet) == frame


ROUTED_V4 = Headers()
ROUTED_V6 = Headers(family=6, ip_src=0x20010DB8 << 96 | 1, ip_dst=0x20010DB8 << 96 | 2)


@pytest.mark.parametrize(
    ("headers", "actions"),
    [
        # A routed IPv4 TCP hop: new MACs, TTL down, out a local port.
        (
            ROUTED_V4,
            [SetField("eth_src", 0x02AA00000001), SetField("eth_dst", 0x02BB00000002), DecTtl()],
        ),
        # SNAT + port rewrite on TCP.
        (ROUTED_V4, [SetField("ip_src", 0xC0A80164), SetField("tp_src", 61000)]),
        # DNAT on UDP with a checksum.
        (
            replace(ROUTED_V4, l4="udp"),
            [SetField("ip_dst", 0x0A0000FE), SetField("tp_dst", 5353)],
        ),
        # UDP over IPv4 without a checksum keeps 0 ("none").
        (
            replace(ROUTED_V4, l4="udp", udp_checksum_zero=True),
            [SetField("ip_dst", 0x0A0000FE), SetField("tp_src", 1)],
        ),
        (ROUTED_V4, [SetField("ip_tos", 0xB8)]),
        (replace(ROUTED_V4, l4="icmp"), [SetField("icmp_id", 0xBEEF), SetField("ip_src", 7)]),
        (ROUTED_V6, [SetField("ip_src", 0xFD00 << 112 | 5), DecTtl(), SetField("tp_dst", 22)]),
        (replace(ROUTED_V6, l4="udp"), [SetField("ip_dst", 0xFD00 << 112 | 9)]),
        (replace(ROUTED_V6, l4="icmp"), [SetField("icmp_id", 1), SetField("ip_dst", 1)]),
        (ROUTED_V6, [SetField("ip_tos", 0x2C)]),
        (ROUTED_V4, [PushVlan(100)]),
        (replace(ROUTED_V4, vlan=42), [PopVlan(), SetField("ip_dst", 0x0A000063)]),
        (replace(ROUTED_V6, vlan=7, l4="udp"), [SetField("tp_src", 9), DecTtl()]),
        (replace(ROUTED_V4, vlan=7), [PopVlan(), PushVlan(4095)]),
    ],
)
@pytest.mark.parametrize("sink", [Output(3), Tunnel("192.0.2.10", 0x123456)])
def test_rewrites_then_output_match_scapy(
    headers: Headers, actions: list[Action], sink: Output | Tunnel
) -> None:
    expected = headers
    for action in actions:
        expected = expected_headers(expected, action)
    emitted = execute_actions(headers.build(), [*actions, sink])
    assert emitted == [(sink, expected.build())]
    assert_checksums_valid(emitted[0][1])


def test_each_output_sends_the_frame_as_rewritten_so_far() -> None:
    original = ROUTED_V4
    first_rewrite = replace(original, eth_dst=0x02CC00000003)
    second_rewrite = replace(first_rewrite, ip_ttl=63, vlan=300)
    actions: list[Action] = [
        Output(1),
        SetField("eth_dst", 0x02CC00000003),
        Output(2),
        DecTtl(),
        PushVlan(300),
        Tunnel("192.0.2.2", 9),
        Output(4),
    ]
    assert execute_actions(original.build(), actions) == [
        (Output(1), original.build()),
        (Output(2), first_rewrite.build()),
        (Tunnel("192.0.2.2", 9), second_rewrite.build()),
        (Output(4), second_rewrite.build()),
    ]


@pytest.mark.parametrize(
    ("actions", "expected_ports"),
    [
        ([], []),
        ([Drop("rule")], []),
        ([Drop(), Output(1)], []),
        ([Output(1), Drop("no_route"), Output(2)], [1]),
        ([Output(1), Output(1)], [1, 1]),
    ],
)
def test_drop_stops_and_empty_actions_emit_nothing(
    actions: list[Action], expected_ports: list[int]
) -> None:
    frame = ROUTED_V4.build()
    emitted = execute_actions(frame, actions)
    assert [(sink.port_key, out) for sink, out in emitted] == [  # type: ignore[union-attr]
        (port, frame) for port in expected_ports
    ]


def test_drop_stops_before_later_rewrites_fail() -> None:
    arp = bytes(Ether(dst="ff:ff:ff:ff:ff:ff") / ARP(pdst="10.0.0.1"))
    assert execute_actions(arp, [Drop(), SetField("tp_src", 1)]) == []


def test_non_ip_frame_passes_through_output_untouched() -> None:
    arp = bytes(Ether(dst="ff:ff:ff:ff:ff:ff") / ARP(pdst="10.0.0.1"))
    emitted = execute_actions(bytearray(arp), [SetField("eth_src", 0x020000000009), Output(2)])
    expected = Ether(arp)
    expected.src = "02:00:00:00:00:09"
    assert emitted == [(Output(2), bytes(expected))]


def test_rewrite_that_cannot_apply_names_the_action() -> None:
    arp = bytes(Ether(dst="ff:ff:ff:ff:ff:ff") / ARP(pdst="10.0.0.1"))
    with pytest.raises(RewriteError) as raised:
        execute_actions(arp, [Output(1), SetField("tp_src", 1), Output(2)])
    assert "while executing actions[1] = SetField(field='tp_src', value=1)" in (
        raised.value.__notes__
    )


@pytest.mark.parametrize(
    ("frame", "actions", "message"),
    [
        ("not bytes", [Output(1)], "frame must be bytes, got str"),
        (ROUTED_V4.build(), [Output(1), "output:2"], r"actions\[1\] is not an Action: 'output:2'"),
        (ROUTED_V4.build(), [None], r"actions\[0\] is not an Action: None"),
    ],
)
def test_bad_input_is_rejected(frame: Any, actions: list[Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        execute_actions(frame, actions)


# ---- property: random headers and rewrites agree with scapy -------------------------------

u16 = st.integers(0, 0xFFFF)


@st.composite
def headers_and_actions(draw: st.DrawFn) -> tuple[Headers, list[Action]]:
    family = draw(st.sampled_from([4, 6]))
    address_bits = 32 if family == 4 else 128
    address = st.integers(0, (1 << address_bits) - 1)
    headers = Headers(
        family=family,
        l4=draw(st.sampled_from(["tcp", "udp", "icmp"])),
        eth_src=draw(st.integers(0, (1 << 48) - 1)),
        eth_dst=draw(st.integers(0, (1 << 48) - 1)),
        vlan=draw(st.none() | st.integers(1, 4095)),
        ip_src=draw(address),
        ip_dst=draw(address),
        ip_tos=draw(st.integers(0, 255)),
        ip_ttl=draw(st.integers(5, 255)),
        tp_src=draw(u16),
        tp_dst=draw(u16),
        icmp_id=draw(u16),
        payload=draw(st.binary(max_size=64)),
    )
    settable = ["eth_src", "eth_dst", "ip_src", "ip_dst", "ip_tos"]
    settable += ["icmp_id"] if headers.l4 == "icmp" else ["tp_src", "tp_dst"]
    value_for = {
        "eth_src": st.integers(0, (1 << 48) - 1),
        "eth_dst": st.integers(0, (1 << 48) - 1),
        "ip_src": address,
        "ip_dst": address,
        "ip_tos": st.integers(0, 255),
        "tp_src": u16,
        "tp_dst": u16,
        "icmp_id": u16,
    }
    set_field = st.sampled_from(settable).flatmap(
        lambda name: value_for[name].map(lambda value: SetField(name, value))
    )
    actions: list[Action] = list(draw(st.lists(set_field | st.just(DecTtl()), max_size=5)))
    if draw(st.booleans()):
        actions.append(
            PopVlan() if headers.vlan is not None else PushVlan(draw(st.integers(1, 4095)))
        )
    return headers, actions


@settings(max_examples=150, deadline=None)
@given(case=headers_and_actions())
def test_random_rewrites_agree_with_scapy(case: tuple[Headers, list[Action]]) -> None:
    headers, actions = case
    expected = headers
    for action in actions:
        expected = expected_headers(expected, action)
    [(sink, frame)] = execute_actions(headers.build(), [*actions, Output(1)])
    assert sink == Output(1)
    assert frame == expected.build()
