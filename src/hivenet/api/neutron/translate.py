"""Neutron v2.0 resources as views of native topology objects, and requests as native writes.

Owns the mapping (no state of its own):
- network  <-> `Bridge` (`mtu` is the bridge's; `router:external`, `port_security_enabled`,
  description, tags in its `external_ids`);
- port     <-> a bridge `Port` (binding:host_id -> host_id + interface_name, security groups,
  allowed address pairs; Nova's device_id/device_owner and binding:profile in
  `external_ids`); a bridge port linked to a router port is that router's interface;
- router   <-> `Router`;
- security-group(-rule) <-> `SecurityGroup` / `SecurityGroupRule`, with the default group of
  each project at a fixed id derived from the project (so two requests never make two).

Request bodies are checked by the `*Body` models (unknown attributes refused, each field
validated with its name). Must not read or write the store: `routes.py` does, in one
transaction per request.
"""

from __future__ import annotations

import ipaddress
import json
import uuid
from collections.abc import Iterable, Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from hivenet.model import (
    Bridge,
    DeviceKind,
    Direction,
    EtherType,
    Port,
    Router,
    SecurityGroup,
    SecurityGroupRule,
    TopologyObject,
)
from hivenet.model.subnet import Subnet, overlay_mtu
from hivenet.model.types import AllowedAddressPair

DEFAULT_SG_NAME = "default"
_NAMESPACE = uuid.UUID("1c8b5d8e-4b7e-4f7c-9a1e-6b2d2f1f0a01")

DEVICE_OWNER_ROUTER_INTERFACE = "network:router_interface"
DEVICE_OWNER_ROUTER_GATEWAY = "network:router_gateway"
DEVICE_OWNER_FLOATINGIP = "network:floatingip"
VIF_TYPE_TAP = "tap"
VIF_TYPE_UNBOUND = "unbound"
TAP_PREFIX = "tap"
NOVA_TAP_ID_CHARS = 11

# Keys of `external_ids`.
DESCRIPTION = "neutron:description"
TAGS = "neutron:tags"
EXTERNAL = "neutron:router_external"
PORT_SECURITY = "neutron:port_security_enabled"
DEVICE_ID = "neutron:device_id"
DEVICE_OWNER = "neutron:device_owner"
BINDING_PROFILE = "neutron:binding_profile"
PROTOCOL = "neutron:protocol"

IP_PROTOCOLS: dict[str, int] = {
    "icmp": 1,
    "igmp": 2,
    "tcp": 6,
    "egp": 8,
    "udp": 17,
    "ipv6-encap": 41,
    "ipv6-route": 43,
    "ipv6-frag": 44,
    "rsvp": 46,
    "gre": 47,
    "esp": 50,
    "ah": 51,
    "ipv6-icmp": 58,
    "icmpv6": 58,
    "ipv6-nonxt": 59,
    "ipv6-opts": 60,
    "ospf": 89,
    "pgm": 113,
    "vrrp": 112,
    "sctp": 132,
    "udplite": 136,
}


def default_security_group_id(project_id: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, f"default-sg/{project_id}"))


def derived_id(*parts: str) -> str:
    """A fixed id for an object HiveNet makes on behalf of another (a router's SNAT rule)."""
    return str(uuid.uuid5(_NAMESPACE, "/".join(parts)))


def nova_tap_name(port_id: str) -> str:
    return f"{TAP_PREFIX}{port_id[:NOVA_TAP_ID_CHARS]}"


def _bool(text: str | None, default: bool) -> bool:
    return default if text is None else text == "true"


def _tags(obj: TopologyObject) -> list[str]:
    raw = obj.external_ids.get(TAGS)
    return list(json.loads(raw)) if raw else []


def common_fields(obj: TopologyObject, revision: int) -> dict[str, Any]:
    return {
        "id": obj.id,
        "name": obj.name,
        "tenant_id": obj.tenant_id,
        "project_id": obj.tenant_id,
        "description": obj.external_ids.get(DESCRIPTION, ""),
        "tags": _tags(obj),
        "revision_number": revision,
    }


def with_external_ids(
    obj_external_ids: Mapping[str, str], updates: Mapping[str, str | None]
) -> dict[str, str]:
    merged = dict(obj_external_ids)
    for key, value in updates.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


def tags_text(tags: Iterable[str]) -> str:
    return json.dumps(sorted(set(tags)))


# --------------------------------------------------------------------------------------------
# Request bodies


Tag = Annotated[str, Field(min_length=1, max_length=60)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str | None = Field(default=None, max_length=255)
    description: str | None = Field(default=None, max_length=255)
    tenant_id: str | None = Field(default=None, max_length=64)
    project_id: str | None = Field(default=None, max_length=64)
    tags: list[Tag] | None = Field(default=None, max_length=50)

    def owner(self) -> str | None:
        if self.tenant_id and self.project_id and self.tenant_id != self.project_id:
            raise ValueError(
                f"tenant_id={self.tenant_id!r} and project_id={self.project_id!r} differ"
            )
        return self.project_id or self.tenant_id

    def described(self, current: Mapping[str, str]) -> dict[str, str]:
        updates: dict[str, str | None] = {}
        if self.description is not None:
            updates[DESCRIPTION] = self.description or None
        if self.tags is not None:
            updates[TAGS] = tags_text(self.tags) if self.tags else None
        return with_external_ids(current, updates)


class NetworkBody(_Body):
    admin_state_up: bool | None = None
    shared: bool | None = None
    router_external: bool | None = Field(default=None, alias="router:external")
    port_security_enabled: bool | None = None
    mtu: int | None = Field(default=None, ge=68, le=65535)
    availability_zone_hints: list[str] | None = Field(default=None, max_length=0)


class AddressPairBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ip_address: str
    mac_address: str | None = None


class FixedIpBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    subnet_id: str | None = None
    ip_address: str | None = None


class PortBody(_Body):
    network_id: str | None = None
    admin_state_up: bool | None = None
    mac_address: str | None = None
    fixed_ips: list[FixedIpBody] | None = None
    device_id: str | None = Field(default=None, max_length=255)
    device_owner: str | None = Field(default=None, max_length=255)
    security_groups: list[str] | None = None
    port_security_enabled: bool | None = None
    allowed_address_pairs: list[AddressPairBody] | None = Field(default=None, max_length=10)
    binding_host_id: str | None = Field(default=None, alias="binding:host_id", max_length=64)
    binding_profile: dict[str, Any] | None = Field(default=None, alias="binding:profile")
    binding_vnic_type: str | None = Field(default=None, alias="binding:vnic_type")

    @field_validator("binding_vnic_type")
    @classmethod
    def _normal_vnic(cls, value: str | None) -> str | None:
        if value not in (None, "normal"):
            raise ValueError(f"binding:vnic_type={value!r}: only 'normal' is supported")
        return value

    @field_validator("binding_profile")
    @classmethod
    def _profile(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return value
        name = value.get("interface_name")
        if name is not None and (not isinstance(name, str) or not 1 <= len(name) <= 15):
            raise ValueError(
                f"binding:profile interface_name={name!r}: a Linux interface name of 1-15 "
                "characters"
            )
        if len(json.dumps(value)) > 4096:
            raise ValueError("binding:profile is larger than 4096 bytes of JSON")
        return value


class GatewayBody(BaseModel):
    """`{}` (what `openstack router unset --external-gateway` sends) removes the gateway."""

    model_config = ConfigDict(extra="forbid")

    network_id: str | None = None
    enable_snat: bool = True
    external_fixed_ips: list[FixedIpBody] | None = Field(default=None, max_length=1)


class RouterBody(_Body):
    admin_state_up: bool | None = None
    external_gateway_info: GatewayBody | None = None
    # Whether the body named external_gateway_info at all (null clears the gateway).


class PoolBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    start: str
    end: str


class HostRouteBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    destination: str
    nexthop: str


class SubnetBody(_Body):
    network_id: str | None = None
    ip_version: int | None = None
    cidr: str | None = None
    gateway_ip: str | None = None
    allocation_pools: list[PoolBody] | None = None
    dns_nameservers: list[str] | None = Field(default=None, max_length=16)
    host_routes: list[HostRouteBody] | None = Field(default=None, max_length=32)
    enable_dhcp: bool | None = None
    ipv6_ra_mode: None = None
    ipv6_address_mode: None = None
    subnetpool_id: None = None
    service_types: list[str] | None = Field(default=None, max_length=0)

    def native_fields(self) -> dict[str, Any]:
        """The native `Subnet` fields this body sets (left-out ones keep the model's
        Neutron-like defaults: gateway = first host, pools = every other host)."""
        fields: dict[str, Any] = {}
        for name in ("cidr", "gateway_ip", "dns_nameservers", "enable_dhcp"):
            if name in self.model_fields_set and (
                name == "gateway_ip" or getattr(self, name) is not None
            ):
                fields[name] = getattr(self, name)
        if self.allocation_pools is not None:
            fields["allocation_pools"] = [p.model_dump() for p in self.allocation_pools]
        if self.host_routes is not None:
            fields["host_routes"] = [r.model_dump() for r in self.host_routes]
        if self.name is not None:
            fields["name"] = self.name
        return fields


class InterfaceBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    subnet_id: str | None = None
    port_id: str | None = None


class FloatingIpBody(_Body):
    floating_network_id: str | None = None
    floating_ip_address: str | None = None
    subnet_id: str | None = None
    port_id: str | None = None
    fixed_ip_address: str | None = None


class SecurityGroupBody(_Body):
    pass


class SecurityGroupRuleBody(_Body):
    security_group_id: str | None = None
    direction: Direction | None = None
    ethertype: EtherType = EtherType.IPV4
    protocol: str | int | None = None
    port_range_min: int | None = Field(default=None, ge=0, le=65535)
    port_range_max: int | None = Field(default=None, ge=0, le=65535)
    remote_ip_prefix: str | None = None
    remote_group_id: str | None = None

    def protocol_number(self) -> int | None:
        protocol = self.protocol
        if protocol is None or protocol == "" or protocol == "any":
            return None
        if isinstance(protocol, int) or protocol.isdigit():
            number = int(protocol)
            if not 0 <= number <= 255:
                raise ValueError(f"protocol={protocol!r}: an IP protocol number is 0-255")
            return number
        if protocol.lower() not in IP_PROTOCOLS:
            raise ValueError(
                f"protocol={protocol!r}: give a number 0-255 or one of {sorted(IP_PROTOCOLS)}"
            )
        return IP_PROTOCOLS[protocol.lower()]


# --------------------------------------------------------------------------------------------
# Responses


def network_view(bridge: Bridge, revision: int, subnet_ids: list[str]) -> dict[str, Any]:
    ext = bridge.external_ids
    return {
        **common_fields(bridge, revision),
        "admin_state_up": bridge.admin_state_up,
        "status": "ACTIVE" if bridge.admin_state_up else "DOWN",
        "shared": bridge.shared,
        "router:external": _bool(ext.get(EXTERNAL), False),
        "port_security_enabled": _bool(ext.get(PORT_SECURITY), True),
        "mtu": overlay_mtu(bridge.mtu),
        "subnets": sorted(subnet_ids),
        "availability_zone_hints": [],
        "availability_zones": [],
    }


def subnet_view(subnet: Subnet, revision: int) -> dict[str, Any]:
    return {
        **common_fields(subnet, revision),
        "network_id": subnet.bridge_id,
        "ip_version": subnet.cidr.version,
        "cidr": str(subnet.cidr),
        "gateway_ip": None if subnet.gateway_ip is None else str(subnet.gateway_ip),
        "allocation_pools": [
            {"start": str(p.start), "end": str(p.end)} for p in subnet.allocation_pools
        ],
        "dns_nameservers": [str(d) for d in subnet.dns_nameservers],
        "host_routes": [
            {"destination": str(r.destination), "nexthop": str(r.nexthop)}
            for r in subnet.host_routes
        ],
        "enable_dhcp": subnet.enable_dhcp,
        "ipv6_ra_mode": None,
        "ipv6_address_mode": None,
        "subnetpool_id": None,
        "service_types": [],
    }


def is_external(bridge: Bridge) -> bool:
    return _bool(bridge.external_ids.get(EXTERNAL), False)


def network_visible(caller: Any, bridge: Bridge) -> bool:
    """Every project may read an external network (and use it as a gateway or for floating
    IPs) and a shared one (and attach its own ports to it)."""
    return bool(caller.sees(bridge)) or is_external(bridge) or bridge.shared


def network_attachable(caller: Any, bridge: Bridge) -> bool:
    """Whose ports a network takes: its own project's, and every project's when shared."""
    return bool(caller.sees(bridge)) or bridge.shared


def network_port_security(bridge: Bridge) -> bool:
    return _bool(bridge.external_ids.get(PORT_SECURITY), True)


def port_view(
    port: Port,
    revision: int,
    *,
    active: bool,
    fixed_ips: list[dict[str, str]],
    router_peer: Port | None = None,
    gateway: bool = False,
) -> dict[str, Any]:
    ext = port.external_ids
    if router_peer is not None:
        device_id = router_peer.device_id
        device_owner = DEVICE_OWNER_ROUTER_GATEWAY if gateway else DEVICE_OWNER_ROUTER_INTERFACE
    else:
        device_id = ext.get(DEVICE_ID, "")
        device_owner = ext.get(DEVICE_OWNER, "")
    if not port.admin_state_up:
        status = "DOWN"
    elif router_peer is not None:
        status = "ACTIVE"
    else:
        status = "ACTIVE" if active else "DOWN"
    profile_text = ext.get(BINDING_PROFILE)
    profile = json.loads(profile_text) if profile_text else {}
    bound = port.host_id is not None
    return {
        **common_fields(port, revision),
        "network_id": port.device_id,
        "admin_state_up": port.admin_state_up,
        "mac_address": port.mac,
        "status": status,
        "fixed_ips": fixed_ips,
        "device_id": device_id,
        "device_owner": device_owner,
        "security_groups": list(port.security_group_ids),
        "port_security_enabled": port.port_security_enabled,
        "allowed_address_pairs": [
            {
                "ip_address": _pair_ip(pair.ip_address),
                "mac_address": pair.mac_address or port.mac,
            }
            for pair in port.allowed_address_pairs
        ],
        "binding:host_id": port.host_id or "",
        "binding:vif_type": VIF_TYPE_TAP if bound else VIF_TYPE_UNBOUND,
        "binding:vif_details": {"port_filter": True} if bound else {},
        "binding:vnic_type": "normal",
        "binding:profile": profile,
    }


def _pair_ip(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str:
    if network.prefixlen == network.max_prefixlen:
        return str(network.network_address)
    return str(network)


def address_pairs(pairs: Iterable[AddressPairBody]) -> tuple[AllowedAddressPair, ...]:
    out = []
    for pair in pairs:
        try:
            network = ipaddress.ip_network(pair.ip_address, strict=False)
        except ValueError:
            raise ValueError(
                f"allowed_address_pairs ip_address={pair.ip_address!r}: not an IP address or CIDR"
            ) from None
        out.append(AllowedAddressPair(ip_address=network, mac_address=pair.mac_address))
    return tuple(out)


def binding_interface(port_id: str, profile: Mapping[str, Any]) -> str:
    name = profile.get("interface_name")
    return str(name) if name else nova_tap_name(port_id)


def router_view(router: Router, revision: int, gateway: dict[str, Any] | None) -> dict[str, Any]:
    return {
        **common_fields(router, revision),
        "admin_state_up": router.admin_state_up,
        "status": "ACTIVE" if router.admin_state_up else "DOWN",
        "external_gateway_info": gateway,
    }


def rule_view(rule: SecurityGroupRule, revision: int) -> dict[str, Any]:
    protocol: str | None = rule.external_ids.get(PROTOCOL)
    if protocol is None and rule.protocol is not None:
        protocol = str(rule.protocol)
    prefix = rule.remote_ip_prefix
    return {
        **common_fields(rule, revision),
        "security_group_id": rule.security_group_id,
        "direction": rule.direction.value,
        "ethertype": rule.ethertype.value,
        "protocol": protocol,
        "port_range_min": rule.port_range_min,
        "port_range_max": rule.port_range_max,
        "remote_ip_prefix": None if prefix is None else str(prefix),
        "normalized_cidr": None if prefix is None else str(prefix),
        "remote_group_id": rule.remote_group_id,
        "remote_address_group_id": None,
    }


def security_group_view(
    group: SecurityGroup, revision: int, rules: list[dict[str, Any]]
) -> dict[str, Any]:
    view = common_fields(group, revision)
    view["description"] = group.description
    view["security_group_rules"] = rules
    return view


def default_security_group(project_id: str) -> tuple[SecurityGroup, list[SecurityGroupRule]]:
    """Neutron's default group: egress anywhere (IPv4, IPv6), ingress from members of the
    same group (IPv4, IPv6)."""
    group_id = default_security_group_id(project_id)
    group = SecurityGroup(
        id=group_id,
        name=DEFAULT_SG_NAME,
        tenant_id=project_id,
        description="Default security group",
    )
    rules = [
        SecurityGroupRule(
            id=derived_id("default-sg-rule", project_id, direction.value, ethertype.value),
            tenant_id=project_id,
            security_group_id=group_id,
            direction=direction,
            ethertype=ethertype,
            remote_group_id=group_id if direction is Direction.INGRESS else None,
        )
        for direction in (Direction.EGRESS, Direction.INGRESS)
        for ethertype in (EtherType.IPV4, EtherType.IPV6)
    ]
    return group, rules


def rule_key(rule: SecurityGroupRule) -> tuple[object, ...]:
    """What makes two rules of a group the same rule (Neutron refuses duplicates)."""
    return (
        rule.security_group_id,
        rule.direction,
        rule.ethertype,
        rule.protocol,
        rule.port_range_min,
        rule.port_range_max,
        rule.remote_ip_prefix,
        rule.remote_group_id,
    )


def is_bridge_port(port: Port) -> bool:
    return port.device_kind is DeviceKind.BRIDGE


NETWORK_ATTRIBUTES = frozenset(network_view(Bridge(id="x"), 0, []).keys())
PORT_ATTRIBUTES = frozenset(
    port_view(
        Port(id="x", device_kind=DeviceKind.BRIDGE, device_id="x"), 0, active=False, fixed_ips=[]
    ).keys()
)
ROUTER_ATTRIBUTES = frozenset(router_view(Router(id="x"), 0, None).keys())
SECURITY_GROUP_ATTRIBUTES = frozenset(security_group_view(SecurityGroup(id="x"), 0, []).keys())
SUBNET_ATTRIBUTES = frozenset(
    subnet_view(Subnet(id="x", bridge_id="x", cidr="10.0.0.0/24"), 0).keys()  # type: ignore[arg-type]
)
RULE_ATTRIBUTES = frozenset(
    rule_view(
        SecurityGroupRule(id="x", security_group_id="x", direction=Direction.INGRESS), 0
    ).keys()
)
