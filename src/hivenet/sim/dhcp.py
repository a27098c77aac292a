"""The DHCP server of the overlay: a pure responder answering a local port's DHCPv4 messages
from its stored fixed IP and subnet (RFC 2131, options of RFC 2132/3442/3397).

Owns the choice of reply (OFFER, ACK, NAK or nothing) for one client message, the options a
reply carries, what counts as bad input, and the per-port budget that keeps a DISCOVER flood
from costing more than a few answers. There is no lease table: a port's address is the one
IPAM gave it, so every answer is computed from the model as it is now (change the address,
and the next renewal NAKs the old one and the client starts over).

Must not touch sockets, threads, the clock (callers pass `now`) or the store; the engine turns
the reply into a generated frame (`packets.dhcp.build_dhcp_reply_frame`) like an ARP reply.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
from dataclasses import dataclass, field
from sys import intern
from typing import TYPE_CHECKING

from hivenet.flows.budget import UpcallBudget
from hivenet.model import DeviceKind
from hivenet.model.subnet import Subnet, overlay_mtu
from hivenet.packets.dhcp import (
    BOOTP_REQUEST,
    DHCP_ACK,
    DHCP_DECLINE,
    DHCP_DISCOVER,
    DHCP_INFORM,
    DHCP_NAK,
    DHCP_OFFER,
    DHCP_RELEASE,
    DHCP_REQUEST,
    DHCP_SERVER_PORT,
    OPTION_BROADCAST_ADDRESS,
    OPTION_CLASSLESS_ROUTES,
    OPTION_DNS_SERVERS,
    OPTION_DOMAIN_NAME,
    OPTION_DOMAIN_SEARCH,
    OPTION_HOSTNAME,
    OPTION_INTERFACE_MTU,
    OPTION_LEASE_TIME,
    OPTION_MESSAGE,
    OPTION_REBINDING_TIME,
    OPTION_RENEWAL_TIME,
    OPTION_ROUTER,
    OPTION_SERVER_ID,
    OPTION_SUBNET_MASK,
    DhcpMessage,
    addresses_option,
    build_dhcp_reply_frame,
    dhcp_reply,
    u32_option,
)
from hivenet.packets.errors import PacketError
from hivenet.packets.flowmatch import ETH_TYPE_IPV4, FULL_MASKS, IP_PROTO_UDP
from hivenet.packets.options import Option
from hivenet.packets.parse import parse_frame
from hivenet.sim.masks import differing_mask
from hivenet.sim.metadata import METADATA_ADDRESS
from hivenet.sim.topology import BridgeInfo, PortInfo, TopologyView

if TYPE_CHECKING:  # the walk imports this module (SimContext holds a DhcpBudget)
    from hivenet.sim.result import Here
    from hivenet.sim.walk import PacketState, Walk

# Per-port budget for messages that cost an answer: a burst, then a steady rate.
DHCP_BURST = 10
DHCP_RATE_PER_SECOND = 2.0


class DhcpVerdict(enum.StrEnum):
    """What became of one client message (the agent counts each)."""

    OFFER = "dhcp_offer"
    ACK = "dhcp_ack"
    NAK = "dhcp_nak"
    INFORM = "dhcp_inform"  # answered by an ACK without a lease
    RELEASE = "dhcp_release"  # nothing to free: the address belongs to the port
    DECLINE = "dhcp_decline"
    OTHER_SERVER = "dhcp_other_server"  # a REQUEST choosing another server's offer
    MALFORMED = "dhcp_malformed"  # truncated, bad lengths, bad cookie, not a request
    NOT_ITS_MAC = "dhcp_chaddr_mismatch"  # asks for a MAC that is not the port's
    NO_CONFIG = "dhcp_no_config"  # no fixed IPv4 on a DHCP-enabled subnet
    OVER_BUDGET = "dhcp_over_budget"  # a flood from one port
    UNSUPPORTED = "dhcp_unsupported"  # a server message type, or none at all


@dataclass(frozen=True, slots=True)
class DhcpLease:
    """Everything a port's answer is made of (built by the caller from the topology)."""

    mac: int
    address: ipaddress.IPv4Address
    subnet: Subnet
    mtu: int
    server_ip: ipaddress.IPv4Address
    hostname: str | None = None
    extra_routes: tuple[tuple[ipaddress.IPv4Network, ipaddress.IPv4Address], ...] = ()

    @property
    def network(self) -> ipaddress.IPv4Network:
        network = self.subnet.cidr
        assert isinstance(network, ipaddress.IPv4Network)
        return network


@dataclass(frozen=True, slots=True)
class DhcpAnswer:
    verdict: DhcpVerdict
    reply: DhcpMessage | None = None
    detail: str = ""


def server_address(subnet: Subnet) -> ipaddress.IPv4Address | None:
    """The address the responder answers as (option 54): the gateway, else the first host
    of the subnet (then a renewal cannot reach it by unicast and rebinds by broadcast)."""
    if subnet.ip_version != 4:
        return None
    if subnet.gateway_ip is not None:
        assert isinstance(subnet.gateway_ip, ipaddress.IPv4Address)
        return subnet.gateway_ip
    network = subnet.cidr
    assert isinstance(network, ipaddress.IPv4Network)
    first = network.network_address + (1 if network.prefixlen < 31 else 0)
    return first


def lease_for(
    subnet: Subnet,
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
    mac: int,
    mtu: int,
    hostname: str | None = None,
) -> DhcpLease | None:
    """The lease of a port holding `address` on `subnet`; None if DHCP does not serve it."""
    if not subnet.enable_dhcp or not isinstance(address, ipaddress.IPv4Address):
        return None
    server = server_address(subnet)
    if server is None:
        return None
    return DhcpLease(mac, address, subnet, mtu, server, hostname)


# --- options ---------------------------------------------------------------------------------


def classless_routes_option(
    routes: list[tuple[ipaddress.IPv4Network, ipaddress.IPv4Address]],
) -> Option:
    """RFC 3442: per route its prefix length, the significant octets, then the router."""
    encoded = bytearray()
    for destination, router in routes:
        width = destination.prefixlen
        encoded.append(width)
        encoded += destination.network_address.packed[: (width + 7) // 8]
        encoded += router.packed
    return (OPTION_CLASSLESS_ROUTES, bytes(encoded))


def domain_search_option(*domains: str) -> Option:
    """RFC 3397: the search list as DNS wire names (no compression)."""
    encoded = bytearray()
    for domain in domains:
        for label in domain.removesuffix(".").split("."):
            raw = label.encode("ascii")
            encoded.append(len(raw))
            encoded += raw
        encoded.append(0)
    return (OPTION_DOMAIN_SEARCH, bytes(encoded))


def lease_options(lease: DhcpLease, *, with_lease_time: bool) -> tuple[Option, ...]:
    """The configuration options of an OFFER/ACK, in code order."""
    subnet, network = lease.subnet, lease.network
    options: list[Option] = [
        addresses_option(OPTION_SUBNET_MASK, network.netmask),
    ]
    gateway = subnet.gateway_ip
    if gateway is not None:
        options.append(addresses_option(OPTION_ROUTER, gateway))
    servers = [s for s in subnet.dns_nameservers if s.version == 4]
    if servers:
        options.append(addresses_option(OPTION_DNS_SERVERS, *servers))
    if lease.hostname:
        options.append((OPTION_HOSTNAME, lease.hostname.encode("ascii", "replace")[:63]))
    if subnet.domain_name:
        options.append((OPTION_DOMAIN_NAME, subnet.domain_name.removesuffix(".").encode()))
    options.append((OPTION_INTERFACE_MTU, lease.mtu.to_bytes(2, "big")))
    if network.prefixlen < 31:
        options.append(addresses_option(OPTION_BROADCAST_ADDRESS, network.broadcast_address))
    if with_lease_time:
        lease_time = subnet.lease_time
        options.append(u32_option(OPTION_LEASE_TIME, lease_time))
        options.append(u32_option(OPTION_RENEWAL_TIME, lease_time // 2))
        options.append(u32_option(OPTION_REBINDING_TIME, lease_time * 7 // 8))
    if subnet.domain_name:
        options.append(domain_search_option(subnet.domain_name))
    routes = [
        (route.destination, route.nexthop)
        for route in subnet.host_routes
        if isinstance(route.destination, ipaddress.IPv4Network)
        and isinstance(route.nexthop, ipaddress.IPv4Address)
    ]
    routes.extend(lease.extra_routes)
    if routes:
        # A client that takes option 121 ignores option 3 (RFC 3442): repeat the default route.
        if gateway is not None and not any(d.prefixlen == 0 for d, _ in routes):
            assert isinstance(gateway, ipaddress.IPv4Address)
            routes.append((ipaddress.IPv4Network("0.0.0.0/0"), gateway))
        options.append(classless_routes_option(routes))
    return tuple(options)


# --- the responder ---------------------------------------------------------------------------


def _nak(request: DhcpMessage, lease: DhcpLease, why: str) -> DhcpAnswer:
    reply = dhcp_reply(
        request,
        message_type=DHCP_NAK,
        your_ip=None,
        server_ip=lease.server_ip,
        options=((OPTION_MESSAGE, why.encode()[:255]),),
    )
    return DhcpAnswer(DhcpVerdict.NAK, reply, why)


def _ack(request: DhcpMessage, lease: DhcpLease, message_type: int) -> DhcpMessage:
    return dhcp_reply(
        request,
        message_type=message_type,
        your_ip=lease.address,
        server_ip=lease.server_ip,
        options=lease_options(lease, with_lease_time=True),
    )


def answer(request: DhcpMessage, lease: DhcpLease | None) -> DhcpAnswer:
    """The answer to one decoded client message from the port `lease` describes."""
    try:
        return _answer(request, lease)
    except PacketError as exc:  # an option with a bogus length (53, 50, 54, ...)
        return DhcpAnswer(DhcpVerdict.MALFORMED, detail=str(exc))


def _answer(request: DhcpMessage, lease: DhcpLease | None) -> DhcpAnswer:
    if request.op != BOOTP_REQUEST:
        return DhcpAnswer(DhcpVerdict.MALFORMED, detail=f"op {request.op} is not a request")
    message_type = request.message_type
    if message_type not in (
        DHCP_DISCOVER,
        DHCP_REQUEST,
        DHCP_DECLINE,
        DHCP_RELEASE,
        DHCP_INFORM,
    ):
        return DhcpAnswer(DhcpVerdict.UNSUPPORTED, detail=f"message type {message_type}")
    if lease is None:
        return DhcpAnswer(DhcpVerdict.NO_CONFIG)
    if request.client_mac != lease.mac:
        return DhcpAnswer(
            DhcpVerdict.NOT_ITS_MAC, detail=f"chaddr {request.client_mac:012x} is not the port's"
        )
    server_id = request.option(OPTION_SERVER_ID)
    if server_id is not None and len(server_id) != 4:
        return DhcpAnswer(
            DhcpVerdict.MALFORMED, detail=f"server identifier has {len(server_id)} bytes"
        )
    ours = server_id is None or ipaddress.IPv4Address(server_id) == lease.server_ip
    if message_type == DHCP_DISCOVER:
        return DhcpAnswer(DhcpVerdict.OFFER, _ack(request, lease, DHCP_OFFER))
    if message_type == DHCP_RELEASE:
        return DhcpAnswer(DhcpVerdict.RELEASE)
    if message_type == DHCP_DECLINE:
        return DhcpAnswer(DhcpVerdict.DECLINE)
    if message_type == DHCP_INFORM:
        reply = dhcp_reply(
            request,
            message_type=DHCP_ACK,
            your_ip=None,
            server_ip=lease.server_ip,
            options=lease_options(lease, with_lease_time=False),
        )
        return DhcpAnswer(DhcpVerdict.INFORM, reply)
    # DHCPREQUEST (RFC 2131 4.3.2): SELECTING names a server; INIT-REBOOT has a requested
    # address and no ciaddr; RENEWING/REBINDING has ciaddr.
    if not ours:
        return DhcpAnswer(DhcpVerdict.OTHER_SERVER)
    requested = request.requested_ip
    claimed = requested if requested is not None else None
    if claimed is None and request.ciaddr:
        claimed = ipaddress.IPv4Address(request.ciaddr)
    if claimed is None:
        return DhcpAnswer(DhcpVerdict.MALFORMED, detail="REQUEST without an address")
    if claimed != lease.address:
        return _nak(request, lease, f"{claimed} is not this port's address")
    return DhcpAnswer(DhcpVerdict.ACK, _ack(request, lease, DHCP_ACK))


def decode_and_answer(payload: bytes, lease: DhcpLease | None) -> DhcpAnswer:
    """`answer` for a raw UDP payload: anything that does not decode is MALFORMED."""
    try:
        request = DhcpMessage.decode(payload)
    except PacketError as exc:
        return DhcpAnswer(DhcpVerdict.MALFORMED, detail=str(exc))
    return answer(request, lease)


# --- flood budget ----------------------------------------------------------------------------


@dataclass
class DhcpBudget:
    """A token bucket per port (`flows.budget.UpcallBudget`): `allow(port, now)` spends one
    token; tokens refill at `rate` per second up to `burst`. Callers pass the clock. Buckets
    of ports that went quiet are dropped by `forget_idle`."""

    burst: int = DHCP_BURST
    rate: float = DHCP_RATE_PER_SECOND
    _buckets: dict[str, UpcallBudget] = field(default_factory=dict)

    def allow(self, port_id: str, now: float) -> bool:
        bucket = self._buckets.get(port_id)
        if bucket is None:
            bucket = self._buckets[port_id] = UpcallBudget(self.rate, self.burst, now)
        return bucket.allow(now)

    def forget_idle(self, now: float) -> None:
        """Drop buckets that are full again (nothing to remember about those ports)."""
        full_after = self.burst / self.rate
        for port_id in [p for p, b in self._buckets.items() if now - b.updated >= full_after]:
            del self._buckets[port_id]

    def __len__(self) -> int:
        return len(self._buckets)


# --- from the topology -----------------------------------------------------------------------

# The reply's source MAC when no router port holds the gateway address (locally administered).
DHCP_SERVER_FALLBACK_MAC = 0x02_68_6E_00_00_43


@dataclass(frozen=True, slots=True)
class PortDhcp:
    """A port's lease, the MAC the answers come from and the subnet they depend on."""

    lease: DhcpLease
    server_mac: int
    subnet_id: str


def port_lease(
    view: TopologyView, port: PortInfo, underlay_mtu: int
) -> tuple[DhcpLease | None, str | None, tuple[str, ...]]:
    """(lease, its subnet, every subnet looked at) of exterior bridge port `port`: its first
    fixed IPv4 on a DHCP-enabled subnet, with the bridge's MTU (or the underlay's less VXLAN).
    No lease: not served (the request then goes on to the bridge like any broadcast).
    Reads the topology only, never the packet."""
    if port.device_kind is not DeviceKind.BRIDGE or port.peer_id is not None:
        return None, None, ()
    fixed_ips = port.port.fixed_ips
    bridge = view.bridges.get(port.device_id)
    if bridge is None or not fixed_ips:
        return None, None, ()
    subnets = view.objects.get("subnet", {})
    for fixed in fixed_ips:
        subnet = subnets.get(fixed.subnet_id)
        if not isinstance(subnet, Subnet) or fixed.ip_address is None:
            continue
        mtu = overlay_mtu(bridge.bridge.mtu, underlay_mtu)
        lease = lease_for(subnet, fixed.ip_address, port.mac, mtu, port.port.name or None)
        if lease is not None:
            return lease, subnet.id, tuple(f.subnet_id for f in fixed_ips)
    return None, None, tuple(f.subnet_id for f in fixed_ips)


def port_dhcp(view: TopologyView, port: PortInfo, underlay_mtu: int) -> PortDhcp | None:
    """`port_lease` with the MAC the answers come from; None when the port is not served."""
    lease, subnet_id, _looked_at = port_lease(view, port, underlay_mtu)
    if lease is None or subnet_id is None:
        return None
    bridge = view.bridges[port.device_id]
    return PortDhcp(lease, _gateway_mac(view, bridge, lease.server_ip), subnet_id)


def _gateway_mac(view: TopologyView, bridge: BridgeInfo, server_ip: ipaddress.IPv4Address) -> int:
    """The MAC of the router port on `bridge` that holds `server_ip`, so answers come from
    the address the client will renew with; else a fixed local MAC."""
    wanted = int(server_ip)
    for port_id in bridge.port_ids:
        bridge_port = view.ports.get(port_id)
        if bridge_port is None or bridge_port.peer_id is None:
            continue
        router_port = view.ports.get(bridge_port.peer_id)
        if router_port is not None and any(a.ip == wanted for a in router_port.addresses_of(4)):
            return router_port.mac
    return DHCP_SERVER_FALLBACK_MAC


def with_metadata_route(lease: DhcpLease) -> DhcpLease:
    """`lease` with a host route to the metadata service (option 121): through the
    subnet's gateway, else on-link (the service answers ARP for its address)."""
    gateway = lease.subnet.gateway_ip
    nexthop = gateway if isinstance(gateway, ipaddress.IPv4Address) else ipaddress.IPv4Address(0)
    route = (ipaddress.IPv4Network(f"{METADATA_ADDRESS}/32"), nexthop)
    return dataclasses.replace(lease, extra_routes=(*lease.extra_routes, route))


# --- at port ingress (called by sim/ports.py) --------------------------------------------------


def serve_at_ingress(walk: Walk, packet: PacketState, port: PortInfo, here: Here) -> bool:
    """Answer `packet` if it is a DHCPv4 client message from an exterior bridge port this
    responder serves: a generated reply out of the same port, and the packet consumed
    (True). False: not DHCP, or not served here (it continues to the bridge).

    The topology is asked first, so traffic of ports that are not served reads no packet
    field here; a served port's flows read the protocol and the bits of tp_dst that tell it
    from 67, and carry the tags of the subnets that decided (enabling DHCP later or
    changing the subnet invalidates them)."""
    if not port.port.fixed_ips:  # port_lease's answer for it (no lease, no subnet looked at)
        return False
    lease, subnet_id, looked_at = port_lease(walk.view, port, walk.ctx.underlay_mtu)
    for looked in looked_at:
        walk.tags.add(intern(f"subnet:{looked}"))
    if lease is None or subnet_id is None:
        return False
    if walk.ctx.metadata:
        lease = with_metadata_route(lease)
    walk.read(packet, "eth_type", FULL_MASKS["eth_type"])
    if packet.eth_type != ETH_TYPE_IPV4:
        return False
    walk.read(packet, "ip_proto", FULL_MASKS["ip_proto"])
    if packet.ip_proto != IP_PROTO_UDP:
        return False
    walk.read(packet, "tp_dst", differing_mask(packet.tp_dst, DHCP_SERVER_PORT))
    if packet.tp_dst != DHCP_SERVER_PORT:
        return False
    walk.no_cache("DHCP is answered per message, from the model as it is now", here.depth)
    budget = walk.ctx.dhcp_budget
    if budget is not None and not budget.allow(port.id, walk.now):
        walk.drop(here, DhcpVerdict.OVER_BUDGET.value, "too many DHCP messages from this port")
        return True
    try:
        payload = parse_frame(walk.frame).payload
    except PacketError as error:
        walk.drop(here, DhcpVerdict.MALFORMED.value, str(error))
        return True
    outcome = decode_and_answer(bytes(payload), lease)
    if outcome.reply is None:
        if outcome.verdict in (DhcpVerdict.RELEASE, DhcpVerdict.DECLINE, DhcpVerdict.OTHER_SERVER):
            walk.consume(here, outcome.verdict.value, f"DHCP ({outcome.verdict.value})")
        else:
            walk.drop(here, outcome.verdict.value, outcome.detail)
        return True
    server_mac = _gateway_mac(walk.view, walk.view.bridges[port.device_id], lease.server_ip)
    frame = build_dhcp_reply_frame(
        walk.frame, outcome.reply, server_mac=server_mac, server_ip=lease.server_ip
    )
    walk.reply(frame, port, f"DHCP {outcome.verdict.value.removeprefix('dhcp_')}")
    walk.consume(here, outcome.verdict.value, f"DHCP answered: {outcome.verdict.value}")
    return True
