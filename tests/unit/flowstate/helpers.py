"""Packet builders shared by the flowstate tests (FlowMatch values, no frames)."""

from __future__ import annotations

import ipaddress

from hivenet.packets.flowmatch import ETH_TYPE_IPV4, ETH_TYPE_IPV6, FlowMatch

SYN, ACK, FIN, RST, PSH = 0x02, 0x10, 0x01, 0x04, 0x08


def ip(text: str) -> int:
    return int(ipaddress.ip_address(text))


def packet(
    src: str,
    dst: str,
    proto: int = 6,
    sport: int = 0,
    dport: int = 0,
    flags: int = 0,
    icmp_type: int = 0,
    icmp_id: int = 0,
) -> FlowMatch:
    version = ipaddress.ip_address(src).version
    return FlowMatch(
        eth_type=ETH_TYPE_IPV4 if version == 4 else ETH_TYPE_IPV6,
        ip_src=ip(src),
        ip_dst=ip(dst),
        ip_proto=proto,
        tp_src=sport,
        tp_dst=dport,
        tcp_flags=flags,
        icmp_type=icmp_type,
        icmp_id=icmp_id,
    )


def tcp(src: str, sport: int, dst: str, dport: int, flags: int) -> FlowMatch:
    return packet(src, dst, 6, sport, dport, flags)


def udp(src: str, sport: int, dst: str, dport: int) -> FlowMatch:
    return packet(src, dst, 17, sport, dport)
