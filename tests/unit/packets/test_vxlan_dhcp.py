"""VXLAN and DHCP codecs against scapy."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN

from hivenet.packets import (
    DhcpMessage,
    MalformedPacket,
    PacketError,
    build_dhcp_reply_frame,
    build_vxlan_frame,
    dhcp_reply,
    parse_frame,
    vxlan_decapsulate,
    vxlan_encapsulate,
)
from hivenet.packets.dhcp import (
    DHCP_ACK,
    DHCP_DISCOVER,
    DHCP_NAK,
    DHCP_OFFER,
    DHCP_REQUEST,
    OPTION_DNS_SERVERS,
    OPTION_LEASE_TIME,
    OPTION_ROUTER,
    OPTION_SUBNET_MASK,
    addresses_option,
    build_dhcp_request_message,
    u32_option,
)

from .scapy_oracle import checksums_valid

SERVER_MAC, CLIENT_MAC = "02:00:00:00:00:fe", "02:00:00:00:00:01"


# Inner frames scapy dissects to the end: Ethernet II with a local experimental ethertype
# (payload kept raw). An arbitrary 14+ bytes may read as an 802.3 frame shorter than its
# bytes, whose rest scapy holds as padding and leaves out of the UDP checksum it recomputes:
# the oracle then disagrees with a correct checksum (found once by hypothesis).
inner_frames = st.builds(
    lambda macs, payload: macs + b"\x88\xb5" + payload,
    st.binary(min_size=12, max_size=12),
    st.binary(max_size=46),
)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**24 - 1), inner_frames)
def test_vxlan_matches_scapy(vni: int, inner: bytes) -> None:
    frame = build_vxlan_frame(
        inner, vni, eth_src=1, eth_dst=2, ip_src="192.0.2.1", ip_dst="192.0.2.2", src_port=50000
    )
    packet = Ether(frame)
    assert packet[VXLAN].vni == vni and int(packet[VXLAN].flags) == 0x08
    assert checksums_valid(frame)
    assert vxlan_decapsulate(parse_frame(frame).payload) == (vni, inner)
    theirs = bytes(VXLAN(vni=vni, flags=0x08) / inner)
    assert vxlan_encapsulate(inner, vni) == theirs
    assert vxlan_decapsulate(theirs) == (vni, inner)


def test_vxlan_without_i_flag_is_rejected() -> None:
    with pytest.raises(MalformedPacket, match=r"VXLAN\.flags"):
        vxlan_decapsulate(bytes(VXLAN(vni=5, flags=0)) + b"inner")


def _scapy_discover(broadcast: bool = True) -> bytes:
    return bytes(
        Ether(src=CLIENT_MAC, dst="ff:ff:ff:ff:ff:ff")
        / IP(src="0.0.0.0", dst="255.255.255.255")
        / UDP(sport=68, dport=67)
        / BOOTP(
            chaddr=bytes.fromhex("020000000001"), xid=0xDEADBEEF, flags=0x8000 if broadcast else 0
        )
        / DHCP(
            options=[
                ("message-type", "discover"),
                ("requested_addr", "10.0.0.7"),
                ("hostname", b"vm1"),
                "end",
            ]
        )
    )


def test_dhcp_decodes_scapy_discover() -> None:
    message = DhcpMessage.decode(parse_frame(_scapy_discover()).payload)
    assert message.message_type == DHCP_DISCOVER
    assert message.xid == 0xDEADBEEF
    assert message.client_mac == 0x020000000001
    assert message.requested_ip == ipaddress.IPv4Address("10.0.0.7")
    assert message.option(12) == b"vm1"
    assert message.encode()[:240] == bytes(BOOTP(parse_frame(_scapy_discover()).payload))[:240]


@pytest.mark.parametrize("broadcast", [True, False])
def test_dhcp_offer_reply_parses_in_scapy(broadcast: bool) -> None:
    request_frame = _scapy_discover(broadcast)
    request = DhcpMessage.decode(parse_frame(request_frame).payload)
    reply = dhcp_reply(
        request,
        message_type=DHCP_OFFER,
        your_ip="10.0.0.7",
        server_ip="10.0.0.1",
        options=(
            addresses_option(OPTION_SUBNET_MASK, "255.255.255.0"),
            addresses_option(OPTION_ROUTER, "10.0.0.1"),
            addresses_option(OPTION_DNS_SERVERS, "10.0.0.2", "10.0.0.3"),
            u32_option(OPTION_LEASE_TIME, 3600),
        ),
    )
    frame = build_dhcp_reply_frame(
        request_frame, reply, server_mac=SERVER_MAC, server_ip="10.0.0.1"
    )
    packet = Ether(frame)
    assert checksums_valid(frame)
    assert packet[UDP].sport == 67 and packet[UDP].dport == 68
    if broadcast:
        assert (packet.dst, packet[IP].dst) == ("ff:ff:ff:ff:ff:ff", "255.255.255.255")
    else:
        assert (packet.dst, packet[IP].dst) == (CLIENT_MAC, "10.0.0.7")
    bootp = packet[BOOTP]
    assert (bootp.op, bootp.xid, bootp.yiaddr) == (2, 0xDEADBEEF, "10.0.0.7")
    options = {
        option[0]: option[1:] if len(option) > 2 else option[1]
        for option in packet[DHCP].options
        if isinstance(option, tuple)
    }
    assert options["message-type"] == DHCP_OFFER
    assert options["server_id"] == "10.0.0.1"
    assert options["subnet_mask"] == "255.255.255.0"
    assert options["name_server"] == ("10.0.0.2", "10.0.0.3")
    assert options["lease_time"] == 3600
    assert len(packet[BOOTP]) >= 300


def test_dhcp_request_ack_and_nak_addressing() -> None:
    request = build_dhcp_request_message(
        client_mac=CLIENT_MAC,
        xid=7,
        message_type=DHCP_REQUEST,
        broadcast=False,
        ciaddr=int(ipaddress.IPv4Address("10.0.0.7")),
    )
    request_frame = bytes(
        Ether(src=CLIENT_MAC, dst=SERVER_MAC)
        / IP(src="10.0.0.7", dst="10.0.0.1")
        / UDP(sport=68, dport=67)
        / request.encode()
    )
    parsed = DhcpMessage.decode(parse_frame(request_frame).payload)
    assert parsed == request
    ack = dhcp_reply(parsed, message_type=DHCP_ACK, your_ip="10.0.0.7", server_ip="10.0.0.1")
    ack_packet = Ether(
        build_dhcp_reply_frame(request_frame, ack, server_mac=SERVER_MAC, server_ip="10.0.0.1")
    )
    assert ack_packet[IP].dst == "10.0.0.7" and ack_packet.dst == CLIENT_MAC
    nak = dhcp_reply(parsed, message_type=DHCP_NAK, your_ip=None, server_ip="10.0.0.1")
    nak_packet = Ether(
        build_dhcp_reply_frame(request_frame, nak, server_mac=SERVER_MAC, server_ip="10.0.0.1")
    )
    assert nak_packet[IP].dst == "255.255.255.255"


def test_dhcp_errors_name_the_field() -> None:
    with pytest.raises(MalformedPacket, match=r"DHCP\.magic_cookie"):
        DhcpMessage.decode(bytes(240))
    good = build_dhcp_request_message(client_mac=CLIENT_MAC, xid=1).encode()
    cut = good[:240] + bytes((53, 9, 1))
    with pytest.raises(PacketError, match=r"DHCP\.options"):
        DhcpMessage.decode(cut)
    long_option = (43, bytes(600))
    message = build_dhcp_request_message(client_mac=CLIENT_MAC, xid=1, options=(long_option,))
    assert DhcpMessage.decode(message.encode()).option(43) == bytes(600)
