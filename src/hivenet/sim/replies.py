"""The packets the simulation generates (ARP replies/requests, ND, echo replies, ICMP errors,
TCP resets), built with `hivenet.packets.builders`.

Owns the mapping from the engine's vocabulary (ints for addresses as in FlowMatch, error
kinds such as "net_unreachable") to the builders' arguments and ICMP/ICMPv6 codes. Byte
layouts belong to `hivenet.packets`; when to answer belongs to the device modules (`sim/router.py`, `sim/bridge.py`, `sim/chains.py`). A builder
that refuses a frame (e.g. a fragment, or an ICMP error about an ICMP error) yields None:
no answer is sent. Pure: no I/O, no clock.
"""

from __future__ import annotations

import ipaddress

from hivenet.packets import PacketError
from hivenet.packets.builders import (
    build_arp_reply,
    build_arp_request,
    build_icmp_dest_unreachable,
    build_icmp_echo_reply,
    build_icmp_time_exceeded,
    build_icmpv6_dest_unreachable,
    build_icmpv6_echo_reply,
    build_icmpv6_packet_too_big,
    build_icmpv6_time_exceeded,
    build_neighbor_advertisement,
    build_neighbor_solicitation,
    build_tcp_rst,
    icmp_error_allowed,
)
from hivenet.packets.headers import (
    ICMP_ADMIN_PROHIBITED,
    ICMP_FRAGMENTATION_NEEDED,
    ICMP_HOST_UNREACHABLE,
    ICMP_NET_UNREACHABLE,
    ICMP_PORT_UNREACHABLE,
    ICMPV6_ADDRESS_UNREACHABLE,
    ICMPV6_ADMIN_PROHIBITED,
    ICMPV6_NO_ROUTE,
    ICMPV6_PORT_UNREACHABLE,
)
from hivenet.packets.parse import parse_frame

ALL_NODES = ipaddress.IPv6Address("ff02::1")
ALL_NODES_MAC = 0x333300000001

# Error kind -> (ICMPv4 destination-unreachable code, ICMPv6 destination-unreachable code).
_UNREACHABLE_CODES: dict[str, tuple[int, int]] = {
    "net_unreachable": (ICMP_NET_UNREACHABLE, ICMPV6_NO_ROUTE),
    "host_unreachable": (ICMP_HOST_UNREACHABLE, ICMPV6_ADDRESS_UNREACHABLE),
    "port_unreachable": (ICMP_PORT_UNREACHABLE, ICMPV6_PORT_UNREACHABLE),
    "admin_prohibited": (ICMP_ADMIN_PROHIBITED, ICMPV6_ADMIN_PROHIBITED),
}
# "frag_needed": ICMP fragmentation needed (RFC 1191) / ICMPv6 packet too big, with an MTU.
ERROR_KINDS = frozenset({*_UNREACHABLE_CODES, "time_exceeded", "frag_needed"})


def _v4(ip: int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(ip)


def _v6(ip: int) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(ip)


def arp_reply(*, sender_mac: int, sender_ip: int, target_mac: int, target_ip: int) -> bytes:
    return build_arp_reply(
        sender_mac=sender_mac,
        sender_ip=_v4(sender_ip),
        target_mac=target_mac,
        target_ip=_v4(target_ip),
    )


def arp_request(sender_mac: int, sender_ip: int, target_ip: int) -> bytes:
    return build_arp_request(
        sender_mac=sender_mac, sender_ip=_v4(sender_ip), target_ip=_v4(target_ip)
    )


def neighbour_solicitation(sender_mac: int, sender_ip: int, target_ip: int) -> bytes:
    return build_neighbor_solicitation(
        src_mac=sender_mac, src_ip=_v6(sender_ip), target_ip=_v6(target_ip)
    )


def neighbour_advertisement(*, router_mac: int, target_ip: int, dst_mac: int, dst_ip: int) -> bytes:
    """A router's solicited NA, or an unsolicited one to all-nodes when the solicitation came
    from :: (duplicate address detection)."""
    if dst_ip == 0:
        return build_neighbor_advertisement(
            src_mac=router_mac,
            src_ip=_v6(target_ip),
            dst_mac=ALL_NODES_MAC,
            dst_ip=ALL_NODES,
            router=True,
            solicited=False,
        )
    return build_neighbor_advertisement(
        src_mac=router_mac, src_ip=_v6(target_ip), dst_mac=dst_mac, dst_ip=_v6(dst_ip), router=True
    )


def echo_reply(request: bytes) -> bytes | None:
    """The echo reply (ICMP or ICMPv6) to `request`, or None when it cannot be answered."""
    try:
        parsed = parse_frame(request)
        if parsed.ipv4 is not None:
            return build_icmp_echo_reply(request)
        return build_icmpv6_echo_reply(request)
    except PacketError:
        return None


def icmp_error(
    offending: bytes,
    kind: str,
    *,
    source_mac: int | None,
    source_ip: int | None,
    mtu: int = 0,
) -> bytes | None:
    """An ICMP/ICMPv6 error of `kind` about `offending`, sent back to its sender from
    `source_ip` (default: the offending packet's destination, as a firewall answering on the
    destination's behalf) and `source_mac` (default: the MAC the packet was sent to); `mtu`
    for "frag_needed". None when RFC 1812 / RFC 4443 forbid an error about this packet (or
    the MTU is below IPv6's minimum of 1280)."""
    if kind not in ERROR_KINDS:
        raise ValueError(
            f"icmp_error: unknown kind {kind!r} (expected one of {sorted(ERROR_KINDS)})"
        )
    if not icmp_error_allowed(offending):
        return None
    try:
        parsed = parse_frame(offending)
        if parsed.ipv4 is not None:
            src_v4 = _v4(parsed.ipv4.dst if source_ip is None else source_ip)
            if kind == "time_exceeded":
                return build_icmp_time_exceeded(offending, src_ip=src_v4, src_mac=source_mac)
            if kind == "frag_needed":
                return build_icmp_dest_unreachable(
                    offending,
                    ICMP_FRAGMENTATION_NEEDED,
                    src_ip=src_v4,
                    src_mac=source_mac,
                    mtu=mtu,
                )
            return build_icmp_dest_unreachable(
                offending, _UNREACHABLE_CODES[kind][0], src_ip=src_v4, src_mac=source_mac
            )
        if parsed.ipv6 is not None:
            src_v6 = _v6(parsed.ipv6.dst if source_ip is None else source_ip)
            if kind == "time_exceeded":
                return build_icmpv6_time_exceeded(offending, src_ip=src_v6, src_mac=source_mac)
            if kind == "frag_needed":
                return build_icmpv6_packet_too_big(
                    offending, mtu=mtu, src_ip=src_v6, src_mac=source_mac
                )
            return build_icmpv6_dest_unreachable(
                offending, _UNREACHABLE_CODES[kind][1], src_ip=src_v6, src_mac=source_mac
            )
    except (PacketError, ValueError):  # ValueError: an MTU the builder refuses
        return None
    return None


def tcp_reset(segment: bytes, *, source_mac: int | None) -> bytes | None:
    """The RST answering `segment` (None for a RST or a fragment: never answered)."""
    try:
        return build_tcp_rst(segment, src_mac=source_mac)
    except PacketError:
        return None
