"""Hypothesis strategies that build random frames with scapy, the independent oracle of the
packets tests. Owns only test-data generation; it never imports HiveNet code."""

from __future__ import annotations

import ipaddress

from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_NOP, IPOption_Router_Alert, IPOption_RR
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6ND_RA,
    ICMPv6ND_RS,
    ICMPv6NDOptDstLLAddr,
    ICMPv6NDOptMTU,
    ICMPv6NDOptPrefixInfo,
    ICMPv6NDOptSrcLLAddr,
    ICMPv6TimeExceeded,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Packet, Raw

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
payloads = st.binary(max_size=64)


def _mac(value: int) -> str:
    return ":".join(f"{b:02x}" for b in value.to_bytes(6, "big"))


macs = st.integers(0, 2**48 - 1).map(_mac)
ipv4s = st.integers(0, 2**32 - 1).map(lambda v: str(ipaddress.IPv4Address(v)))
ipv6s = st.integers(0, 2**128 - 1).map(lambda v: str(ipaddress.IPv6Address(v)))

ip_options = st.lists(st.sampled_from(["nop", "rr", "alert"]), max_size=3).map(
    lambda names: [
        {
            "nop": IPOption_NOP(),
            "rr": IPOption_RR(routers=["10.0.0.1", "10.0.0.2"]),
            "alert": IPOption_Router_Alert(),
        }[name]
        for name in names
    ]
)

tcp_options = st.lists(
    st.one_of(
        st.tuples(st.just("MSS"), u16),
        st.tuples(st.just("WScale"), st.integers(0, 14)),
        st.just(("NOP", None)),
        st.just(("SAckOK", b"")),
        st.tuples(st.just("Timestamp"), st.tuples(u32, u32)),
    ),
    max_size=4,
)


@st.composite
def tcp_layers(draw: st.DrawFn) -> Packet:
    return TCP(
        sport=draw(u16),
        dport=draw(u16),
        seq=draw(u32),
        ack=draw(u32),
        flags=draw(st.integers(0, 0x1FF)),
        window=draw(u16),
        urgptr=draw(u16),
        options=draw(tcp_options),
    ) / Raw(draw(payloads))


@st.composite
def udp_layers(draw: st.DrawFn) -> Packet:
    return UDP(sport=draw(u16), dport=draw(u16)) / Raw(draw(payloads))


@st.composite
def icmp_layers(draw: st.DrawFn) -> Packet:
    kind = draw(st.sampled_from(["echo", "echo_reply", "unreachable", "time_exceeded", "other"]))
    if kind in ("echo", "echo_reply"):
        return ICMP(type=8 if kind == "echo" else 0, id=draw(u16), seq=draw(u16)) / Raw(
            draw(payloads)
        )
    if kind == "other":
        return ICMP(type=draw(st.sampled_from([13, 14, 42])), code=draw(u8)) / Raw(draw(payloads))
    quoted = (
        IP(src=draw(ipv4s), dst=draw(ipv4s), ttl=draw(u8))
        / UDP(sport=draw(u16), dport=draw(u16))
        / Raw(draw(payloads))
    )
    return ICMP(type=3 if kind == "unreachable" else 11, code=draw(st.integers(0, 15))) / Raw(
        bytes(quoted)[: draw(st.integers(28, 28 + 64))]
    )


@st.composite
def ipv4_packets(draw: st.DrawFn) -> Packet:
    fragment_offset = draw(st.sampled_from([0, 0, 0, 1, 185]))
    flags = draw(st.integers(0, 7))
    header = IP(
        src=draw(ipv4s),
        dst=draw(ipv4s),
        tos=draw(u8),
        ttl=draw(u8),
        id=draw(u16),
        flags=flags,
        frag=fragment_offset,
        options=draw(ip_options),
    )
    if fragment_offset:
        # A TCP fragment at offset 8 bytes can only overlap the TCP header: refused (RFC 1858).
        header.proto = draw(st.sampled_from([1, 17] if fragment_offset == 1 else [1, 6, 17]))
        return header / Raw(draw(payloads))
    layer = draw(st.sampled_from(["tcp", "udp", "icmp", "other"]))
    if layer == "tcp":
        return header / draw(tcp_layers())
    if layer == "udp":
        return header / draw(udp_layers())
    if layer == "icmp":
        return header / draw(icmp_layers())
    header.proto = draw(st.sampled_from([47, 50, 132]))
    return header / Raw(draw(payloads))


@st.composite
def icmpv6_layers(draw: st.DrawFn) -> Packet:
    kind = draw(st.sampled_from(["echo", "reply", "ns", "na", "rs", "ra", "unreach", "time"]))
    lladdr = draw(macs)
    if kind == "echo":
        return ICMPv6EchoRequest(id=draw(u16), seq=draw(u16), data=draw(payloads))
    if kind == "reply":
        return ICMPv6EchoReply(id=draw(u16), seq=draw(u16), data=draw(payloads))
    if kind == "ns":
        message = ICMPv6ND_NS(tgt=draw(ipv6s))
        return message / ICMPv6NDOptSrcLLAddr(lladdr=lladdr) if draw(st.booleans()) else message
    if kind == "na":
        message = ICMPv6ND_NA(
            tgt=draw(ipv6s),
            R=draw(st.integers(0, 1)),
            S=draw(st.integers(0, 1)),
            O=draw(st.integers(0, 1)),
        )
        return message / ICMPv6NDOptDstLLAddr(lladdr=lladdr) if draw(st.booleans()) else message
    if kind == "rs":
        return ICMPv6ND_RS() / ICMPv6NDOptSrcLLAddr(lladdr=lladdr)
    if kind == "ra":
        return (
            ICMPv6ND_RA(
                chlim=draw(u8),
                M=draw(st.integers(0, 1)),
                O=draw(st.integers(0, 1)),
                routerlifetime=draw(u16),
                reachabletime=draw(u32),
                retranstimer=draw(u32),
            )
            / ICMPv6NDOptSrcLLAddr(lladdr=lladdr)
            / ICMPv6NDOptMTU(mtu=draw(u32))
            / ICMPv6NDOptPrefixInfo(prefix="2001:db8::", prefixlen=64)
        )
    quoted = bytes(IPv6(src=draw(ipv6s), dst=draw(ipv6s)) / UDP(sport=draw(u16), dport=draw(u16)))
    error = (
        ICMPv6DestUnreach(code=draw(u8)) if kind == "unreach" else ICMPv6TimeExceeded(code=draw(u8))
    )
    return error / Raw(quoted)


@st.composite
def ipv6_packets(draw: st.DrawFn) -> Packet:
    header: Packet = IPv6(
        src=draw(ipv6s),
        dst=draw(ipv6s),
        tc=draw(u8),
        fl=draw(st.integers(0, 2**20 - 1)),
        hlim=draw(u8),
    )
    kinds = draw(st.lists(st.sampled_from(["routing", "dest", "fragment"]), max_size=2))
    if kinds.count("fragment") > 1:  # RFC 8200 4.1: a valid frame has at most one
        kinds.remove("fragment")
    if draw(st.booleans()):
        kinds.insert(0, "hop")
    later_fragment = False
    for kind in kinds:
        if kind == "hop":
            header = header / IPv6ExtHdrHopByHop()
        elif kind == "routing":
            header = header / IPv6ExtHdrRouting(addresses=[draw(ipv6s)], segleft=0)
        elif kind == "dest":
            header = header / IPv6ExtHdrDestOpt()
        else:
            offset = draw(st.sampled_from([0, 0, 7]))
            header = header / IPv6ExtHdrFragment(
                offset=offset, m=draw(st.integers(0, 1)), id=draw(u32)
            )
            if offset:
                later_fragment = True
                break
    if later_fragment:
        header.lastlayer().nh = draw(st.sampled_from([6, 17, 58]))
        return header / Raw(draw(payloads))
    layer = draw(st.sampled_from(["tcp", "udp", "icmpv6", "icmpv6"]))
    if layer == "tcp":
        return header / draw(tcp_layers())
    if layer == "udp":
        return header / draw(udp_layers())
    return header / draw(icmpv6_layers())


@st.composite
def arp_packets(draw: st.DrawFn) -> Packet:
    return ARP(
        op=draw(st.integers(1, 2)),
        hwsrc=draw(macs),
        psrc=draw(ipv4s),
        hwdst=draw(macs),
        pdst=draw(ipv4s),
    )


@st.composite
def scapy_frames(draw: st.DrawFn) -> bytes:
    """Random valid frames (with Ethernet padding sometimes) as bytes."""
    frame: Packet = Ether(src=draw(macs), dst=draw(macs))
    if draw(st.booleans()):
        frame = frame / Dot1Q(vlan=draw(st.integers(0, 4095)), prio=draw(st.integers(0, 7)))
    network = draw(st.sampled_from(["ipv4", "ipv4", "ipv6", "ipv6", "arp", "other"]))
    if network == "ipv4":
        frame = frame / draw(ipv4_packets())
    elif network == "ipv6":
        frame = frame / draw(ipv6_packets())
    elif network == "arp":
        frame = frame / draw(arp_packets())
    else:
        frame.lastlayer().type = draw(st.sampled_from([0x88CC, 0x9000, 0x0600]))
        frame = frame / Raw(draw(payloads))
    padding = draw(st.sampled_from([b"", b"", bytes(6)]))
    return bytes(frame) + padding
