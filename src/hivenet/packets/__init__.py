"""HiveNet packets: sans-I/O codecs for Ethernet, 802.1Q, ARP, IPv4, IPv6, ICMP, ICMPv6, TCP,
UDP, VXLAN and DHCP, the `FlowMatch` hot-path extractor and the datapath's header rewrites.

This package imports only the standard library. It owns byte layouts; it does not decide
policy (which packets to answer, drop or forward: that is `hivenet.sim`). Submodules:
`headers` (value types), `parse` (generic parser), `flowextract` (hot path), `rewrite`,
`builders`, `checksum`, `vxlan`, `dhcp`, `addresses`, `errors`, `slots` (fast constructors
of immutable slotted records, for the hot paths of `sim` and `flowstate`).
"""

from hivenet.packets.addresses import mac_to_int, mac_to_str
from hivenet.packets.builders import (
    arp_reply_to,
    build_arp_reply,
    build_arp_request,
    build_echo_request,
    build_icmp_dest_unreachable,
    build_icmp_echo_reply,
    build_icmp_error,
    build_icmp_time_exceeded,
    build_icmpv6_dest_unreachable,
    build_icmpv6_echo_reply,
    build_icmpv6_error,
    build_icmpv6_packet_too_big,
    build_icmpv6_time_exceeded,
    build_nd_frame,
    build_neighbor_advertisement,
    build_neighbor_solicitation,
    build_tcp_rst,
    build_tcp_segment,
    build_udp_datagram,
    icmp_error_allowed,
    neighbor_advertisement_to,
)
from hivenet.packets.checksum import checksum_update, internet_checksum
from hivenet.packets.dhcp import DhcpMessage, build_dhcp_reply_frame, dhcp_reply
from hivenet.packets.errors import (
    MalformedPacket,
    PacketError,
    RewriteError,
    TruncatedPacket,
    UnsupportedPacket,
)
from hivenet.packets.flowextract import extract_flow_match
from hivenet.packets.flowmatch import FlowMatch
from hivenet.packets.parse import (
    EmbeddedDatagram,
    ParsedFrame,
    embedded_datagram,
    flow_match_of,
    parse_frame,
    verify_checksums,
)
from hivenet.packets.rewrite import dec_ttl, pop_vlan, push_vlan, rewrite_frame
from hivenet.packets.vxlan import build_vxlan_frame, vxlan_decapsulate, vxlan_encapsulate

__all__ = [
    "DhcpMessage",
    "EmbeddedDatagram",
    "FlowMatch",
    "MalformedPacket",
    "PacketError",
    "ParsedFrame",
    "RewriteError",
    "TruncatedPacket",
    "UnsupportedPacket",
    "arp_reply_to",
    "build_arp_reply",
    "build_arp_request",
    "build_dhcp_reply_frame",
    "build_echo_request",
    "build_icmp_dest_unreachable",
    "build_icmp_echo_reply",
    "build_icmp_error",
    "build_icmp_time_exceeded",
    "build_icmpv6_dest_unreachable",
    "build_icmpv6_echo_reply",
    "build_icmpv6_error",
    "build_icmpv6_packet_too_big",
    "build_icmpv6_time_exceeded",
    "build_nd_frame",
    "build_neighbor_advertisement",
    "build_neighbor_solicitation",
    "build_tcp_rst",
    "build_tcp_segment",
    "build_udp_datagram",
    "build_vxlan_frame",
    "checksum_update",
    "dec_ttl",
    "dhcp_reply",
    "embedded_datagram",
    "extract_flow_match",
    "flow_match_of",
    "icmp_error_allowed",
    "internet_checksum",
    "mac_to_int",
    "mac_to_str",
    "neighbor_advertisement_to",
    "parse_frame",
    "pop_vlan",
    "push_vlan",
    "rewrite_frame",
    "verify_checksums",
    "vxlan_decapsulate",
    "vxlan_encapsulate",
]
