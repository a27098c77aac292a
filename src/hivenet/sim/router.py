"""A virtual router during a walk: `receive()` a packet that came in through one of its ports.

Owns what a router does with a frame, in order: admission (admin state, untagged, Ethernet
destination), ARP and neighbour discovery (answers and learning), the pre-routing chains
(floating IPs, load-balancer VIPs, the router's inbound chain), traffic to the router's own
addresses (echo reply, port unreachable, TCP RST), TTL, LPM + ECMP route choice, the
post-routing chains, next-hop resolution (ARP/ND request when unknown) and the rewrite
towards the next hop. ICMP errors a router sends hook in where the decision is taken
(`walk.send_icmp_error`); leaving through a port is `sim/ports.py`'s.
Must not touch I/O, the clock, the store or the datapath.
"""

from __future__ import annotations

from sys import intern

from hivenet.model import RouteType
from hivenet.packets.flowmatch import (
    ETH_TYPE_ARP,
    ETH_TYPE_IPV4,
    ETH_TYPE_IPV6,
    FRAG_LATER,
    FULL_MASKS,
    IP_PROTO_ICMP,
    IP_PROTO_ICMPV6,
    IP_PROTO_TCP,
    IP_PROTO_UDP,
)
from hivenet.sim import ports, replies
from hivenet.sim.chains import run_chain
from hivenet.sim.routing import NextHop, flow_hash
from hivenet.sim.tables import LearnedNeighbour, ip_text, mac_text, neighbour_entry_tag
from hivenet.sim.topology import PortInfo, RouterInfo
from hivenet.sim.walk import (
    MULTICAST_BIT,
    TCP_FLAG_RST,
    Here,
    PacketState,
    Walk,
    memo_tag,
    memo_value,
)

ARP_REQUEST = 1
ICMP_ECHO_REQUEST = 8
ICMPV6_ECHO_REQUEST = 128
ND_ROUTER_SOLICIT = 133
ND_REDIRECT = 137
ND_NEIGHBOR_SOLICIT = 135
ND_NEIGHBOR_ADVERT = 136

# `SimulationResult.handoff` of a BGP packet for an uplink's own address (agent/bgp.py).
HANDOFF_BGP = "bgp"
BGP_TCP_PORT = 179

# A drop installed while a next hop is being resolved: short, and tagged with the missing
# ARP/ND entry so learning it invalidates the drop at once.
UNRESOLVED_IDLE_TIMEOUT = 2.0
_neighbour_tag = memo_tag(neighbour_entry_tag)
_BLACKHOLE, _REJECT_ROUTE = RouteType.BLACKHOLE, RouteType.REJECT


def _route_text_of(
    version: int, ip_dst: int, route_id: str, route_type: RouteType, ecmp: int, skipped: int
) -> str:
    return (
        f"{ip_text(version, ip_dst)} via route {route_id} ({route_type.value}"
        + (f", ecmp 1 of {ecmp}" if ecmp > 1 else "")
        + (f", {skipped} down skipped" if skipped else "")
        + ")"
    )


def _forward_text_of(version: int, next_hop_ip: int, mac: int, port_id: str) -> str:
    return f"next hop {ip_text(version, next_hop_ip)} is-at {mac_text(mac)}, out port {port_id}"


# Trace text of a route and a forward, by the values it is made of.
_route_text = memo_value(_route_text_of)
_forward_text = memo_value(_forward_text_of)

_NO_CHAINS = (None, None, None)  # a stage of a router without chains (most routers)
_FULL_VLAN = FULL_MASKS["vlan"]
_FULL_ETH_TYPE = FULL_MASKS["eth_type"]
_FULL_ETH_DST = FULL_MASKS["eth_dst"]


def receive(
    walk: Walk, packet: PacketState, router: RouterInfo, in_port: PortInfo, depth: int
) -> None:
    here = walk.enter("router", router, depth)
    if here is None:
        return
    walk.read(packet, "vlan", _FULL_VLAN)
    if packet.vlan:
        walk.drop(here, "vlan_tagged", f"vlan {packet.vlan}")
        return
    walk.read(packet, "eth_type", _FULL_ETH_TYPE)
    eth_type = packet.eth_type
    if eth_type == ETH_TYPE_ARP:
        _answer_arp(walk, packet, router, in_port, here)
        return
    if eth_type not in (ETH_TYPE_IPV4, ETH_TYPE_IPV6):
        walk.drop(here, "not_ip", f"ethertype {eth_type:#06x}")
        return
    version = 4 if eth_type == ETH_TYPE_IPV4 else 6
    walk.read(packet, "eth_dst", _FULL_ETH_DST)
    dst_mac = packet.eth_dst
    if dst_mac != in_port.mac and not dst_mac & MULTICAST_BIT:
        walk.drop(here, "not_for_router", f"dst {mac_text(dst_mac)}")
        return
    if version == 4 and not walk.ipv4_header_valid():
        # RFC 1812 5.2.2. The checksum is no match field: a flow installed for a good packet
        # is re-checked per packet by the datapath (flows with DecTtl), so never cache this.
        walk.drop(here, "bad_ip_checksum", "IPv4 header checksum")
        walk.no_cache("a bad header checksum is not in the flow match", here.depth)
        return
    if version == 4 and walk.ipv4_source_routed():
        # IP options are no match field either: routed flows re-check them per packet too.
        walk.drop(here, "ip_source_route", "IPv4 source route option")
        walk.no_cache("IPv4 options are not in the flow match", here.depth)
        return
    if version == 6:
        walk.read(packet, "ip_proto", FULL_MASKS["ip_proto"])
        if packet.ip_proto == IP_PROTO_ICMPV6:
            walk.read(packet, "icmp_type", FULL_MASKS["icmp_type"])
            if ND_ROUTER_SOLICIT <= packet.icmp_type <= ND_REDIRECT:
                _answer_nd(walk, packet, router, in_port, here)
                return
    if dst_mac & MULTICAST_BIT:
        walk.drop(here, "multicast", "multicast is not routed")
        return
    _route(walk, packet, router, in_port, version, here)


def _route(
    walk: Walk,
    packet: PacketState,
    router: RouterInfo,
    in_port: PortInfo,
    version: int,
    here: Here,
) -> None:
    """An IP packet for the router: pre-routing chains, local delivery or TTL and route,
    post-routing chains, next hop."""
    depth = here.depth
    if version == 4 and in_port.id in walk.view.bgp_ports and _is_bgp(walk, packet, in_port):
        # Before the chains: a NAT binding on the uplink address must never take the session.
        walk.no_cache("BGP packets go to the host's speaker one by one", depth)
        walk.hand_off(here, HANDOFF_BGP, f"to the BGP speaker of port {in_port.id}")
        return
    if packet.first_router is None:  # who answers it if it does not fit the egress MTU
        packet.first_router = (in_port, packet.copy())
    floating = walk.view.security.routers.get(router.id)
    vips = walk.view.vips.routers.get(router.id)
    pre_routing = (
        floating.pre_chain_id if floating is not None else None,
        vips.pre_chain_id if vips is not None else None,
        router.inbound_chain_id,
    )
    if pre_routing != _NO_CHAINS and not _run_chains(
        walk, packet, pre_routing, in_port, None, depth
    ):
        return
    own_mask = router.own_v4_read_mask if version == 4 else router.own_v6_read_mask
    walk.read(packet, "ip_dst", own_mask)
    if own_mask and (version, packet.ip_dst) in router.own_addresses:
        _answer_local(walk, packet, in_port, version, here)
        return
    # TTL: without an earlier decrement "ttl <= 1" only depends on bits 7..1.
    walk.read(packet, "ip_ttl", 0xFE if packet.ttl_decrements == 0 else 0xFF)
    if packet.ip_ttl <= 1:
        walk.step(here, "ttl", f"ttl {packet.ip_ttl} expired")
        walk.send_icmp_error(packet, "time_exceeded", in_port, depth)
        walk.drop(here, "ttl_expired")
        return
    hop = _choose_next_hop(walk, packet, router, in_port, version, here)
    if hop is None:
        return
    out_port = walk.view.ports.get(hop.port_id or "")
    if out_port is None:
        walk.drop(here, "unknown_port", f"next hop {hop.port_id}")
        return
    if hop.gateway is not None:
        next_hop_ip = hop.gateway
    else:
        walk.read(packet, "ip_dst", FULL_MASKS["ip_dst"])
        next_hop_ip = packet.ip_dst
    post_routing = (
        floating.post_chain_id if floating is not None else None,
        vips.post_chain_id if vips is not None else None,
        router.outbound_chain_id,
    )
    if post_routing != _NO_CHAINS and not _run_chains(
        walk, packet, post_routing, in_port, out_port.id, depth
    ):
        return
    _forward(walk, packet, router, in_port, out_port, version, next_hop_ip, here)


def _is_bgp(walk: Walk, packet: PacketState, in_port: PortInfo) -> bool:
    """TCP to or from port 179 addressed to the uplink port's own IPv4 address: the BGP
    session its speaker holds (the address lives here, in the router, not in a kernel)."""
    walk.read(packet, "ip_dst", FULL_MASKS["ip_dst"])
    if not any(address.ip == packet.ip_dst for address in in_port.addresses_of(4)):
        return False
    walk.read(packet, "ip_proto", FULL_MASKS["ip_proto"])
    if packet.ip_proto != IP_PROTO_TCP:
        return False
    walk.read(packet, "tp_src", FULL_MASKS["tp_src"])
    walk.read(packet, "tp_dst", FULL_MASKS["tp_dst"])
    return BGP_TCP_PORT in (packet.tp_src, packet.tp_dst)


def _run_chains(
    walk: Walk,
    packet: PacketState,
    chain_ids: tuple[str | None, ...],
    in_port: PortInfo,
    out_port_id: str | None,
    depth: int,
) -> bool:
    """Run the router's chains of one stage in order (None: absent); False when one ended
    the packet (a reject is answered out of the ingress port)."""
    for chain_id in chain_ids:
        if chain_id is not None and not run_chain(
            walk, packet, chain_id, in_port, out_port_id, in_port, depth
        ):
            return False
    return True


def _choose_next_hop(
    walk: Walk,
    packet: PacketState,
    router: RouterInfo,
    in_port: PortInfo,
    version: int,
    here: Here,
) -> NextHop | None:
    """The route's next hop for the packet (ECMP: by flow hash), or None when the packet
    ends here (no route, blackhole or reject route)."""
    table = router.routes_v4 if version == 4 else router.routes_v6
    walk.read(packet, "ip_dst", table.dst_read_mask)
    walk.read(packet, "ip_src", table.src_read_mask)
    group = table.lookup(packet.ip_dst, packet.ip_src)
    if group is None:
        walk.step(here, "route", f"no route to {ip_text(version, packet.ip_dst)}")
        walk.send_icmp_error(packet, "net_unreachable", in_port, here.depth)
        walk.drop(here, "no_route")
        return None
    ecmp = len(group.next_hops)
    if ecmp > 1:
        for field in ("ip_src", "ip_dst", "ip_proto", "tp_src", "tp_dst"):
            walk.read(packet, field, FULL_MASKS[field])
        hop, skipped = group.choose_live(
            flow_hash(packet.ip_src, packet.ip_dst, packet.ip_proto, packet.tp_src, packet.tp_dst),
            lambda candidate: _hop_is_live(walk, candidate),
        )
        # The flow depends on the liveness of its hop and of the dead hops ranked above it:
        # tag it with theirs, so exactly the flows a death or a return moves are invalidated.
        for candidate in (hop, *skipped):
            _tag_hop_liveness(walk, candidate)
    else:
        hop, skipped = group.next_hops[0], ()
    walk.step(
        here,
        "route",
        _route_text((version, packet.ip_dst, hop.route_id, hop.type, ecmp, len(skipped))),
    )
    if hop.type is _BLACKHOLE:
        walk.drop(here, "blackhole", hop.route_id)
        return None
    if hop.type is _REJECT_ROUTE:
        walk.send_icmp_error(packet, "net_unreachable", in_port, here.depth)
        walk.drop(here, "reject_route", hop.route_id)
        return None
    return hop


def _hop_is_live(walk: Walk, hop: NextHop) -> bool:
    """False for a next hop through an exterior port that is down: its host is down (lease
    gone or probe timed out) or its uplink is (`down_ports`). Other hops count as live."""
    port = walk.view.ports.get(hop.port_id or "")
    if port is None or port.peer_id is not None:
        return True
    if port.id in walk.view.down_ports:
        return False
    return not (port.host_id and port.host_id in walk.view.down_hosts)


def _tag_hop_liveness(walk: Walk, hop: NextHop) -> None:
    port = walk.view.ports.get(hop.port_id or "")
    if port is None or port.peer_id is not None:
        return
    walk.tags.add(port.tag)
    if port.host_id:
        walk.tags.add(intern(f"host:{port.host_id}"))


def _forward(
    walk: Walk,
    packet: PacketState,
    router: RouterInfo,
    in_port: PortInfo,
    out_port: PortInfo,
    version: int,
    next_hop_ip: int,
    here: Here,
) -> None:
    """Rewrite towards the next hop (its MAC, one TTL less) and leave through `out_port`."""
    neighbour = resolve_neighbour(walk, router, version, next_hop_ip)
    if neighbour is None:
        _unresolved_next_hop(walk, out_port, version, next_hop_ip, here)
        return
    packet.set("eth_src", out_port.mac)
    packet.set("eth_dst", neighbour)
    packet.ip_ttl -= 1
    packet.ttl_decrements += 1
    walk.step(here, "forward", _forward_text((version, next_hop_ip, neighbour, out_port.id)))
    ports.egress(walk, packet, out_port, in_port, here.depth)


def resolve_neighbour(walk: Walk, router: RouterInfo, version: int, ip: int) -> int | None:
    key = (router.id, version, ip)
    walk.tags.add(_neighbour_tag(key))
    mac = walk.neighbour_overlay.get(key)
    if mac is None:
        mac = walk.tables.neighbour_mac(router.id, version, ip)
    walk.lookups.setdefault(("neighbour", router.id, version, ip), mac)
    return mac


def learn_neighbour(
    walk: Walk, router: RouterInfo, version: int, ip: int, mac: int, here: Here
) -> None:
    if not ip or mac & MULTICAST_BIT or not mac:
        return
    key = (router.id, version, ip)
    known = walk.neighbour_overlay.get(key)
    if known is None:
        known = walk.tables.neighbour_mac(router.id, version, ip)
    if known != mac:
        walk.neighbour_overlay[key] = mac
        walk.learned.append(LearnedNeighbour(router.id, version, ip, mac))
        walk.step(here, "learn", f"{ip_text(version, ip)} is-at {mac_text(mac)}")


def _unresolved_next_hop(
    walk: Walk, out_port: PortInfo, version: int, next_hop_ip: int, here: Here
) -> None:
    """Drop (briefly cached) and ask for the next hop's MAC out of `out_port`."""
    source = next(iter(out_port.addresses_of(version)), None)
    walk.idle_timeout = min(walk.idle_timeout, UNRESOLVED_IDLE_TIMEOUT)
    if source is None:
        walk.drop(here, "no_source_address", out_port.id)
        return
    if version == 4:
        request = replies.arp_request(out_port.mac, source.ip, next_hop_ip)
        what = "ARP request"
    else:
        request = replies.neighbour_solicitation(out_port.mac, source.ip, next_hop_ip)
        what = "neighbour solicitation"
    walk.reply(request, out_port, f"{what} for {ip_text(version, next_hop_ip)}")
    walk.drop(
        here,
        "neighbour_unresolved",
        f"{ip_text(version, next_hop_ip)} via port {out_port.id}",
    )


def _answer_arp(
    walk: Walk, packet: PacketState, router: RouterInfo, in_port: PortInfo, here: Here
) -> None:
    """Learn the sender, answer a request for the port's own address, a VIP or a floating
    IP; the ARP packet itself goes no further."""
    walk.no_cache("ARP is handled by the router per packet", here.depth)
    for field in ("arp_op", "arp_spa", "arp_sha", "arp_tpa", "eth_src"):
        walk.read(packet, field, FULL_MASKS[field])
    sender_ip = packet.arp_spa
    if any(a.contains(sender_ip) for a in in_port.addresses_of(4)):
        learn_neighbour(walk, router, 4, sender_ip, packet.arp_sha, here)
    own = next((a for a in in_port.addresses_of(4) if a.ip == packet.arp_tpa), None)
    floating = walk.view.security.routers.get(router.id)
    vips = walk.view.vips.routers.get(router.id)
    if (
        packet.arp_op == ARP_REQUEST
        and own is None
        and vips is not None
        and packet.arp_tpa in vips.arp_answers.get(in_port.id, frozenset())
    ):
        floating = None  # answered below as a VIP
        walk.tags.add(intern(f"chain:{vips.pre_chain_id}"))
        text = ip_text(4, packet.arp_tpa)
        walk.step(here, "arp", f"reply VIP {text}")
        walk.reply(
            _arp_reply_from(packet, in_port, packet.arp_tpa), in_port, f"ARP reply for VIP {text}"
        )
    if (
        packet.arp_op == ARP_REQUEST
        and own is None
        and floating is not None
        and packet.arp_tpa in floating.arp_answers.get(in_port.id, frozenset())
    ):
        walk.tags.add(intern(f"chain:{floating.pre_chain_id}"))
        reply = _arp_reply_from(packet, in_port, packet.arp_tpa)
        text = ip_text(4, packet.arp_tpa)
        walk.step(here, "arp", f"reply floating {text}")
        walk.reply(reply, in_port, f"ARP reply for floating {text}")
    if packet.arp_op == ARP_REQUEST and own is not None:
        reply = _arp_reply_from(packet, in_port, own.ip)
        walk.step(here, "arp", f"reply {own.text} is-at {mac_text(in_port.mac)}")
        walk.reply(reply, in_port, f"ARP reply for {own.text}")
    walk.consume(here, "arp_consumed", "ARP")


def _arp_reply_from(packet: PacketState, in_port: PortInfo, sender_ip: int) -> bytes:
    """The port's answer to the ARP request `packet`: `sender_ip` is at the port's MAC."""
    return replies.arp_reply(
        sender_mac=in_port.mac,
        sender_ip=sender_ip,
        target_mac=packet.arp_sha,
        target_ip=packet.arp_spa,
    )


def _answer_nd(
    walk: Walk, packet: PacketState, router: RouterInfo, in_port: PortInfo, here: Here
) -> None:
    """Learn from a neighbour solicitation or advertisement, advertise the port's own
    address; the ND packet itself goes no further."""
    walk.no_cache("neighbour discovery is handled by the router per packet", here.depth)
    for field in ("ip_src", "nd_target", "eth_src", "icmp_type"):
        walk.read(packet, field, FULL_MASKS[field])
    addresses = in_port.addresses_of(6)
    if packet.icmp_type == ND_NEIGHBOR_SOLICIT:
        if packet.ip_src and any(a.contains(packet.ip_src) for a in addresses):
            learn_neighbour(walk, router, 6, packet.ip_src, packet.eth_src, here)
        own = next((a for a in addresses if a.ip == packet.nd_target), None)
        if own is not None:
            advert = replies.neighbour_advertisement(
                router_mac=in_port.mac,
                target_ip=own.ip,
                dst_mac=packet.eth_src,
                dst_ip=packet.ip_src,
            )
            walk.step(here, "nd", f"advertise {own.text}")
            walk.reply(advert, in_port, f"NA for {own.text}")
    elif packet.icmp_type == ND_NEIGHBOR_ADVERT and any(
        a.contains(packet.nd_target) for a in addresses
    ):
        learn_neighbour(walk, router, 6, packet.nd_target, packet.eth_src, here)
    walk.consume(here, "nd_consumed", f"ICMPv6 type {packet.icmp_type}")


def _answer_local(
    walk: Walk, packet: PacketState, in_port: PortInfo, version: int, here: Here
) -> None:
    """A packet addressed to one of the router's own addresses: echo reply, port
    unreachable for UDP, RST for TCP; it is never forwarded."""
    walk.no_cache("traffic to the router itself is answered per packet", here.depth)
    for field in ("ip_proto", "ip_frag", "icmp_type"):
        walk.read(packet, field, FULL_MASKS[field])
    target = ip_text(version, packet.ip_dst)
    proto = packet.ip_proto
    seen = walk.frame_as_seen(packet)
    echo_type = ICMP_ECHO_REQUEST if version == 4 else ICMPV6_ECHO_REQUEST
    icmp_proto = IP_PROTO_ICMP if version == 4 else IP_PROTO_ICMPV6
    if packet.ip_frag == FRAG_LATER:
        walk.drop(here, "to_router", "fragment")
        return
    if proto == icmp_proto and packet.icmp_type == echo_type:
        reply = replies.echo_reply(seen)
        if reply is not None:
            walk.step(here, "ping", f"echo reply from {target}")
            walk.reply(reply, in_port, f"echo reply from {target}")
        walk.drop_reasons.append("to_router")
        return
    if proto == IP_PROTO_UDP:
        walk.send_icmp_error(
            packet, "port_unreachable", in_port, here.depth, source_ip=packet.ip_dst
        )
        walk.drop(here, "to_router", f"udp to {target}")
        return
    if proto == IP_PROTO_TCP:
        walk.read(packet, "tcp_flags", FULL_MASKS["tcp_flags"])
        if not packet.tcp_flags & TCP_FLAG_RST:
            reset = replies.tcp_reset(seen, source_mac=in_port.mac)
            if reset is not None:
                walk.reply(reset, in_port, f"TCP RST from {target}")
        walk.drop(here, "to_router", f"tcp to {target}")
        return
    walk.drop(here, "to_router", f"protocol {proto}")
