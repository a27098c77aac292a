"""Port security, security groups and floating IPs compiled for the simulation:
`SecurityIndex`, kept by the `TopologyView` and updated one object at a time.

Owns, per port with `port_security_enabled`:
- a `PortGuard`: the (MAC, IP prefix) pairs the VM may send from (its own MAC and addresses,
  its MAC's IPv6 link-local address, plus its allowed address pairs), checked by
  `spoof_reason` before anything else (spoofed MAC, IP, ARP sender; a VM answering as a DHCP
  server or sending IPv6 router adverts);
- for a port in at least one security group (a port in none gets anti-spoofing only: port
  security is on by default for VM ports, and the /v1 API has no per-project "default"
  group to put them in, as Neutron does),
  two virtual chains registered in the view's chains, so the engine evaluates, traces and
  tags them like any chain: `sg-in.<port>` (what the VM sends: its groups' egress rules)
  and `sg-out.<port>` (what it receives: ingress rules). Each accepts ARP (the guard already
  checked it), then return traffic of tracked connections (`match_return_flow`, conntrack
  zone = the port), then DHCP/ND housekeeping, then every allow rule; the rest is dropped
  with reason "security_group". A remote group becomes an address set of its members.
Per router with floating IPs: `fip-pre.<router>` (reverse SNAT and DNAT of replies, DNAT of
each floating address to its fixed one) and `fip-post.<router>` (SNAT of the fixed address
leaving through the uplink -- the router port whose subnet holds the floating address -- and
hairpin SNAT to the router port's address for traffic that leaves the port it came in by),
plus the floating addresses the router answers ARP for on each uplink.

Recompiles only what a change touches (a rule: its group's member ports and the ports
whose rules name the group as remote; a member port's addresses: the ports that use its group
as remote; a floating IP: its router) and returns the flow tags to invalidate.
Pure: no I/O, no clock; the view passes objects in.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from hivenet.model import (
    DeviceKind,
    FloatingIp,
    IpAddrGroup,
    NatTarget,
    Port,
    PortRange,
    Rule,
    RuleAction,
    SecurityGroupRule,
    TopologyObject,
)
from hivenet.model.security import Direction
from hivenet.model.types import mac_to_int
from hivenet.packets.flowmatch import (
    ETH_TYPE_ARP,
    ETH_TYPE_IPV4,
    ETH_TYPE_IPV6,
    IP_PROTO_ICMPV6,
    IP_PROTO_UDP,
)
from hivenet.sim.rules import CompiledChain, compile_chain

SG_FROM_VM_PREFIX = "sg-in."
SG_TO_VM_PREFIX = "sg-out."
FIP_PRE_PREFIX = "fip-pre."
FIP_POST_PREFIX = "fip-post."
REMOTE_GROUP_PREFIX = "sgm."
# Rule names double as drop reasons (the engine counts a virtual chain's drop by rule name).
DROP_SECURITY_GROUP = "security_group"
FLOATING_IP_RULE = "floating_ip"  # static 1:1 NAT: the flow-state hook keeps ports as they are
HAIRPIN_RULE = "hairpin"
HAIRPIN_PORTS = (1024, 65535)

ND_ROUTER_SOLICIT = 133
ND_ROUTER_ADVERT = 134
ND_NEIGHBOR_SOLICIT = 135
ND_NEIGHBOR_ADVERT = 136
DHCP_SERVER_PORT = 67
DHCP_CLIENT_PORT = 68
DHCPV6_CLIENT_PORT = 546
DHCPV6_SERVER_PORT = 547
_ETH_TYPES = {4: ETH_TYPE_IPV4, 6: ETH_TYPE_IPV6}


@dataclass(frozen=True, slots=True)
class PortGuard:
    """What a port's VM may send from: MACs, and (MAC, network, mask) per IP version."""

    port_id: str
    macs: frozenset[int]
    v4: tuple[tuple[int, int, int], ...]
    v6: tuple[tuple[int, int, int], ...]
    # The security-group chains; None for a port in no security group (anti-spoofing only).
    from_vm_chain_id: str | None
    to_vm_chain_id: str | None

    def allows_ip(self, version: int, mac: int, ip: int) -> bool:
        for allowed_mac, network, mask in self.v4 if version == 4 else self.v6:
            if allowed_mac == mac and ip & mask == network:
                return True
        return False


class _PacketFields(Protocol):
    eth_src: int
    eth_type: int
    ip_src: int
    ip_proto: int
    ip_frag: int
    tp_src: int
    tp_dst: int
    icmp_type: int
    arp_sha: int
    arp_spa: int


def spoof_reason(guard: PortGuard, packet: _PacketFields, read: Callable[..., None]) -> str | None:
    """The drop reason for a frame the VM behind `guard` may not send, or None.
    `read(*fields)` records fields the verdict depended on (full width) for the megaflow."""
    read("eth_src")
    if packet.eth_src not in guard.macs:
        return "spoofed_mac"
    read("eth_type")
    eth_type = packet.eth_type
    if eth_type == ETH_TYPE_ARP:
        read("arp_sha", "arp_spa")
        if packet.arp_sha != packet.eth_src:
            return "spoofed_arp"
        if packet.arp_spa and not guard.allows_ip(4, packet.arp_sha, packet.arp_spa):
            return "spoofed_arp"
        return None
    if eth_type not in (ETH_TYPE_IPV4, ETH_TYPE_IPV6):
        return "port_security_ethertype"
    version = 4 if eth_type == ETH_TYPE_IPV4 else 6
    # Ports and ICMP types only for the protocols whose checks below look at them: a TCP
    # connection's flow (and its replay's match, sim/replay.py) does not depend on its ports
    # here.
    read("ip_src", "ip_proto", "ip_frag")
    proto = packet.ip_proto
    server_port = DHCP_SERVER_PORT if version == 4 else DHCPV6_SERVER_PORT
    if proto == IP_PROTO_UDP:
        read("tp_src", "tp_dst")
        if packet.tp_src == server_port:
            return "spoofed_dhcp_server"
    if version == 6 and proto == IP_PROTO_ICMPV6:
        read("icmp_type")
        if packet.icmp_type == ND_ROUTER_ADVERT:
            return "spoofed_router_advert"
    if not guard.allows_ip(version, packet.eth_src, packet.ip_src):
        # A DHCP client message may come from any address: a renewal or rebinding from an
        # address the port no longer has must reach the server, to be NAKed (Neutron's
        # firewall lets DHCP client traffic pass before its anti-spoofing rules too).
        client_port, server = (
            (DHCP_CLIENT_PORT, DHCP_SERVER_PORT)
            if version == 4
            else (DHCPV6_CLIENT_PORT, DHCPV6_SERVER_PORT)
        )
        dhcp_client = (
            proto == IP_PROTO_UDP and packet.tp_src == client_port and packet.tp_dst == server
        )
        unspecified_ok = packet.ip_src == 0 and version == 6 and proto == IP_PROTO_ICMPV6
        if not (dhcp_client or unspecified_ok):
            return "spoofed_ip"
    return None


@dataclass(frozen=True, slots=True)
class RouterNat:
    """A router's floating IPs compiled: its virtual chains and, per uplink port, the
    floating addresses (IPv4, as ints) it answers ARP for."""

    router_id: str
    pre_chain_id: str
    post_chain_id: str
    arp_answers: Mapping[str, frozenset[int]]


def _virtual_rule(chain_id: str, position: int, action: RuleAction, **fields: Any) -> Rule:
    """A rule of a virtual chain (ids derive from the chain's, which may exceed the 64
    characters of a stored id, so the object is built without re-validation: every field
    value below is already a validated model value)."""
    return Rule.model_construct(
        id=f"{chain_id}#{position}", chain_id=chain_id, position=position, action=action, **fields
    )


def _network(ip: int, version: int, prefix: int | None = None) -> Any:
    address = ipaddress.ip_address(ip) if version == 4 else ipaddress.IPv6Address(ip)
    return ipaddress.ip_network(
        f"{address}/{prefix if prefix is not None else address.max_prefixlen}"
    )


class SecurityIndex:
    """Port guards, security-group chains and floating-IP chains of one `TopologyView`.

    `objects` and `chains` are the view's own dicts (raw objects by kind; compiled chains by
    id): compiled virtual chains are written into `chains`."""

    def __init__(
        self,
        objects: dict[str, dict[str, TopologyObject]],
        chains: dict[str, CompiledChain],
    ) -> None:
        self._objects = objects
        self._chains = chains
        self.guards: dict[str, PortGuard] = {}
        self.routers: dict[str, RouterNat] = {}
        # Conntrack zone of each virtual chain (security-group chains track per port).
        self.chain_zones: dict[str, str] = {}
        self._members: dict[str, set[str]] = {}  # security group -> member ports
        self._rules: dict[str, set[str]] = {}  # security group -> its rule ids
        self._remote_users: dict[str, set[str]] = {}  # group -> groups whose rules name it
        self._fips_by_router: dict[str, set[str]] = {}
        self._routers_by_port: dict[str, set[str]] = {}  # fixed port or router port -> routers

    # ----------------------------------------------------------------- updates

    def changed(
        self, kind: str, object_id: str, old: TopologyObject | None, new: TopologyObject | None
    ) -> set[str]:
        """Follow one object change; returns the flow tags to invalidate."""
        tags: set[str] = set()
        if kind == "port":
            self._port_changed(object_id, old, new, tags)
        elif kind == "security_group":
            for port_id in sorted(self._members.get(object_id, ())):
                self._compile_port(port_id, tags)
        elif kind == "security_group_rule":
            groups: set[str] = set()
            for rule in (old, new):
                if isinstance(rule, SecurityGroupRule):
                    groups.add(rule.security_group_id)
                    self._rules.setdefault(rule.security_group_id, set()).discard(rule.id)
                    if rule.remote_group_id is not None:
                        self._remote_users.setdefault(rule.remote_group_id, set()).discard(
                            rule.security_group_id
                        )
            if isinstance(new, SecurityGroupRule):
                self._rules.setdefault(new.security_group_id, set()).add(new.id)
                if new.remote_group_id is not None:
                    self._remote_users.setdefault(new.remote_group_id, set()).add(
                        new.security_group_id
                    )
            for group_id in sorted(groups):
                for port_id in sorted(self._members.get(group_id, ())):
                    self._compile_port(port_id, tags)
        elif kind == "floating_ip":
            routers: set[str] = set()
            for fip in (old, new):
                if isinstance(fip, FloatingIp):
                    routers.add(fip.router_id)
                    self._fips_by_router.setdefault(fip.router_id, set()).discard(fip.id)
                    if fip.port_id is not None:
                        self._routers_by_port.setdefault(fip.port_id, set()).discard(fip.router_id)
            if isinstance(new, FloatingIp):
                self._fips_by_router.setdefault(new.router_id, set()).add(new.id)
                if new.port_id is not None:
                    self._routers_by_port.setdefault(new.port_id, set()).add(new.router_id)
            for router_id in sorted(routers):
                self._compile_router(router_id, tags)
        return tags

    def _port_changed(
        self, port_id: str, old: TopologyObject | None, new: TopologyObject | None, tags: set[str]
    ) -> None:
        old_groups = set(old.security_group_ids) if isinstance(old, Port) else set()
        new_groups = set(new.security_group_ids) if isinstance(new, Port) else set()
        for group_id in old_groups - new_groups:
            self._members.get(group_id, set()).discard(port_id)
        for group_id in new_groups:
            self._members.setdefault(group_id, set()).add(port_id)
        self._compile_port(port_id, tags)
        addresses_moved = not (
            isinstance(old, Port)
            and isinstance(new, Port)
            and old.addresses == new.addresses
            and old.allowed_address_pairs == new.allowed_address_pairs
        )
        # Ports whose rules use one of this port's groups as remote see other addresses:
        # all its groups' users when its addresses moved, else those of groups it left/joined.
        changed_groups = (old_groups | new_groups) if addresses_moved else old_groups ^ new_groups
        for group_id in sorted(changed_groups):
            for user_group in sorted(self._remote_users.get(group_id, ())):
                for member in sorted(self._members.get(user_group, ())):
                    if member != port_id:
                        self._compile_port(member, tags)
        # A router port (uplinks, hairpin subnets) or a floating IP's fixed port.
        routers = set(self._routers_by_port.get(port_id, ()))
        for port in (old, new):
            if isinstance(port, Port) and port.device_kind is DeviceKind.ROUTER:
                routers.add(port.device_id)
        for router_id in sorted(routers):
            if self._fips_by_router.get(router_id) or router_id in self.routers:
                self._compile_router(router_id, tags)

    # ----------------------------------------------------------------- ports

    def _compile_port(self, port_id: str, tags: set[str]) -> None:
        port = self._objects.get("port", {}).get(port_id)
        from_vm, to_vm = SG_FROM_VM_PREFIX + port_id, SG_TO_VM_PREFIX + port_id
        tags.update({f"port:{port_id}", f"chain:{from_vm}", f"chain:{to_vm}"})
        if not isinstance(port, Port) or not port.port_security_enabled:
            if self.guards.pop(port_id, None) is not None:
                for chain_id in (from_vm, to_vm):
                    self._chains.pop(chain_id, None)
                    self.chain_zones.pop(chain_id, None)
            return
        port_mac = mac_to_int(port.mac)
        macs = {port_mac}
        allowed: dict[int, list[tuple[int, int, int]]] = {4: [], 6: []}
        for interface in port.addresses:
            network = ipaddress.ip_network(f"{interface.ip}/{interface.ip.max_prefixlen}")
            allowed[interface.version].append(
                (port_mac, int(network.network_address), int(network.netmask))
            )
        for pair in port.allowed_address_pairs:
            mac = mac_to_int(pair.mac_address) if pair.mac_address else port_mac
            macs.add(mac)
            allowed[pair.ip_address.version].append(
                (mac, int(pair.ip_address.network_address), int(pair.ip_address.netmask))
            )
        # IPv6 link-local from the MAC (modified EUI-64, RFC 4291 2.5.6): the VM's neighbour
        # discovery and MLD come from it, as Neutron allows.
        allowed[6].append((port_mac, _eui64_link_local(port_mac), (1 << 128) - 1))
        if not port.security_group_ids:
            # Port security without groups: anti-spoofing only, no filtering (module doc).
            self.guards[port_id] = PortGuard(
                port_id, frozenset(macs), tuple(allowed[4]), tuple(allowed[6]), None, None
            )
            for chain_id in (from_vm, to_vm):
                self._chains.pop(chain_id, None)
                self.chain_zones.pop(chain_id, None)
            return
        self.guards[port_id] = PortGuard(
            port_id, frozenset(macs), tuple(allowed[4]), tuple(allowed[6]), from_vm, to_vm
        )
        rules_by_direction: dict[Direction, list[SecurityGroupRule]] = {
            Direction.INGRESS: [],
            Direction.EGRESS: [],
        }
        rule_objects = self._objects.get("security_group_rule", {})
        for group_id in port.security_group_ids:
            for rule_id in sorted(self._rules.get(group_id, ())):
                rule = rule_objects.get(rule_id)
                if isinstance(rule, SecurityGroupRule):
                    rules_by_direction[rule.direction].append(rule)
        address_sets: dict[str, IpAddrGroup] = {}
        for direction, chain_id in ((Direction.EGRESS, from_vm), (Direction.INGRESS, to_vm)):
            rules = self._housekeeping_rules(chain_id, direction)
            for sg_rule in rules_by_direction[direction]:
                rules.append(self._allow_rule(chain_id, len(rules), sg_rule, address_sets))
            rules.append(
                _virtual_rule(chain_id, len(rules), RuleAction.DROP, name=DROP_SECURITY_GROUP)
            )
            self._chains[chain_id] = compile_chain(
                chain_id, f"security groups of port {port.name or port_id}", rules, address_sets
            )
            self.chain_zones[chain_id] = port_id

    @staticmethod
    def _housekeeping_rules(chain_id: str, direction: Direction) -> list[Rule]:
        accept = RuleAction.ACCEPT
        rules = [
            _virtual_rule(chain_id, 0, accept, name="arp", dl_type=ETH_TYPE_ARP),
            _virtual_rule(chain_id, 1, accept, name="established", match_return_flow=True),
        ]
        if direction is Direction.EGRESS:
            dhcp = [
                (ETH_TYPE_IPV4, DHCP_CLIENT_PORT, DHCP_SERVER_PORT),
                (ETH_TYPE_IPV6, DHCPV6_CLIENT_PORT, DHCPV6_SERVER_PORT),
            ]
            nd_types = (ND_ROUTER_SOLICIT, ND_NEIGHBOR_SOLICIT, ND_NEIGHBOR_ADVERT)
        else:
            dhcp = [
                (ETH_TYPE_IPV4, DHCP_SERVER_PORT, DHCP_CLIENT_PORT),
                (ETH_TYPE_IPV6, DHCPV6_SERVER_PORT, DHCPV6_CLIENT_PORT),
            ]
            nd_types = (ND_ROUTER_ADVERT, ND_NEIGHBOR_SOLICIT, ND_NEIGHBOR_ADVERT)
        for eth_type, source, destination in dhcp:
            rules.append(
                _virtual_rule(
                    chain_id,
                    len(rules),
                    accept,
                    name="dhcp",
                    dl_type=eth_type,
                    nw_proto=IP_PROTO_UDP,
                    tp_src=PortRange(start=source, end=source),
                    tp_dst=PortRange(start=destination, end=destination),
                )
            )
        for nd_type in nd_types:
            rules.append(
                _virtual_rule(
                    chain_id,
                    len(rules),
                    accept,
                    name="neighbour_discovery",
                    dl_type=ETH_TYPE_IPV6,
                    nw_proto=IP_PROTO_ICMPV6,
                    icmp_type=nd_type,
                )
            )
        return rules

    def _allow_rule(
        self,
        chain_id: str,
        position: int,
        sg_rule: SecurityGroupRule,
        address_sets: dict[str, IpAddrGroup],
    ) -> Rule:
        fields: dict[str, Any] = {
            "name": f"sg-rule {sg_rule.id}",
            "dl_type": _ETH_TYPES[sg_rule.ethertype.version],
        }
        if sg_rule.protocol is not None:
            fields["nw_proto"] = sg_rule.protocol
        if sg_rule.is_icmp:
            if sg_rule.port_range_min is not None:
                fields["icmp_type"] = sg_rule.port_range_min
                if sg_rule.port_range_max is not None:
                    fields["icmp_code"] = sg_rule.port_range_max
        elif sg_rule.port_range_min is not None and sg_rule.port_range_max is not None:
            fields["tp_dst"] = PortRange(start=sg_rule.port_range_min, end=sg_rule.port_range_max)
        remote_field = "nw_src" if sg_rule.direction is Direction.INGRESS else "nw_dst"
        group_field = (
            "ip_addr_group_src_id"
            if sg_rule.direction is Direction.INGRESS
            else "ip_addr_group_dst_id"
        )
        if sg_rule.remote_ip_prefix is not None:
            fields[remote_field] = sg_rule.remote_ip_prefix
        elif sg_rule.remote_group_id is not None:
            set_id = REMOTE_GROUP_PREFIX + sg_rule.remote_group_id
            if set_id not in address_sets:
                address_sets[set_id] = IpAddrGroup.model_construct(
                    id=set_id, addresses=tuple(self._member_addresses(sg_rule.remote_group_id))
                )
            fields[group_field] = set_id
        return _virtual_rule(chain_id, position, RuleAction.ACCEPT, **fields)

    def _member_addresses(self, group_id: str) -> list[Any]:
        addresses: list[Any] = []
        ports = self._objects.get("port", {})
        for port_id in sorted(self._members.get(group_id, ())):
            port = ports.get(port_id)
            if not isinstance(port, Port):
                continue
            addresses.extend(interface.ip for interface in port.addresses)
            for pair in port.allowed_address_pairs:
                if pair.ip_address.num_addresses == 1:
                    addresses.append(pair.ip_address.network_address)
        return addresses

    # ----------------------------------------------------------------- routers

    def _compile_router(self, router_id: str, tags: set[str]) -> None:
        pre, post = FIP_PRE_PREFIX + router_id, FIP_POST_PREFIX + router_id
        tags.update({f"router:{router_id}", f"chain:{pre}", f"chain:{post}"})
        fips = [
            fip
            for fip_id in sorted(self._fips_by_router.get(router_id, ()))
            if isinstance(fip := self._objects.get("floating_ip", {}).get(fip_id), FloatingIp)
        ]
        router_ports = [
            port
            for port in self._objects.get("port", {}).values()
            if isinstance(port, Port)
            and port.device_kind is DeviceKind.ROUTER
            and port.device_id == router_id
        ]
        pre_rules = [
            _virtual_rule(pre, 0, RuleAction.REV_SNAT, name="reverse_snat"),
            _virtual_rule(pre, 1, RuleAction.REV_DNAT, name="reverse_dnat"),
        ]
        post_rules: list[Rule] = []
        arp_answers: dict[str, set[int]] = {}
        hairpin_ports: dict[str, Any] = {}
        for fip in fips:
            fixed = self._fixed_address(fip)
            # Every uplink on the floating subnet (a router with several uplinks, ECMP).
            uplink_ids = tuple(
                sorted(
                    port.id
                    for port in router_ports
                    if any(fip.floating_ip_address in a.network for a in port.addresses)
                )
            )
            if fixed is None or not uplink_ids:
                continue  # unassociated, or no router port on the floating subnet yet
            if fip.floating_ip_address.version == 4:
                for uplink_id in uplink_ids:
                    arp_answers.setdefault(uplink_id, set()).add(int(fip.floating_ip_address))
            floating = fip.floating_ip_address
            pre_rules.append(
                _virtual_rule(
                    pre,
                    len(pre_rules),
                    RuleAction.DNAT,
                    name=FLOATING_IP_RULE,
                    nw_dst=_network(int(floating), floating.version),
                    nat_targets=(NatTarget(address_from=fixed, address_to=fixed),),
                )
            )
            post_rules.append(
                _virtual_rule(
                    post,
                    len(post_rules),
                    RuleAction.SNAT,
                    name=FLOATING_IP_RULE,
                    nw_src=_network(int(fixed), fixed.version),
                    out_port_ids=uplink_ids,
                    nat_targets=(NatTarget(address_from=floating, address_to=floating),),
                )
            )
            for port in router_ports:
                for interface in port.addresses:
                    if fixed in interface.network and port.id not in hairpin_ports:
                        hairpin_ports[port.id] = interface
        for port_id, interface in sorted(hairpin_ports.items()):
            router_ip = interface.ip
            post_rules.append(
                _virtual_rule(
                    post,
                    len(post_rules),
                    RuleAction.SNAT,
                    name=HAIRPIN_RULE,
                    # Only what the subnet itself sent: a reply, reverse-DNATed to its
                    # floating source already, is not hairpinned again.
                    nw_src=interface.network,
                    in_port_ids=(port_id,),
                    out_port_ids=(port_id,),
                    nat_targets=(
                        NatTarget(
                            address_from=router_ip,
                            address_to=router_ip,
                            port_from=HAIRPIN_PORTS[0],
                            port_to=HAIRPIN_PORTS[1],
                        ),
                    ),
                )
            )
        if not fips:
            if self.routers.pop(router_id, None) is not None:
                self._chains.pop(pre, None)
                self._chains.pop(post, None)
            return
        name = f"floating IPs of router {router_id}"
        self._chains[pre] = compile_chain(pre, name, pre_rules, {})
        self._chains[post] = compile_chain(post, name, post_rules, {})
        self.routers[router_id] = RouterNat(
            router_id,
            pre,
            post,
            {port_id: frozenset(ips) for port_id, ips in arp_answers.items()},
        )

    def _fixed_address(self, fip: FloatingIp) -> Any:
        if fip.fixed_ip_address is not None:
            return fip.fixed_ip_address
        if fip.port_id is None:
            return None
        port = self._objects.get("port", {}).get(fip.port_id)
        if not isinstance(port, Port):
            return None
        version = fip.floating_ip_address.version
        return next((a.ip for a in port.addresses if a.version == version), None)


def _eui64_link_local(mac: int) -> int:
    """fe80::/64 with the modified EUI-64 interface identifier of `mac`."""
    identifier = ((mac >> 24) << 40) | (0xFFFE << 24) | (mac & 0xFFFFFF)
    return (0xFE80 << 112) | (identifier ^ (0x02 << 56))


def drop_reason_of(rule: Rule, default: str) -> str:
    """A virtual chain's drop rules carry their reason as their name."""
    return rule.name or default
