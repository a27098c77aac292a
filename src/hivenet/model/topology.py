"""Topology objects: frozen, validated value types for everything a tenant's network is made of.

Owns the shape of each object, the invariants that one object can check on its own (a normal
route needs a next hop, a jump rule needs a target chain, addresses of one family, ...) and
the declaration of which fields reference which other objects (`REFS`), which the store's
topology repository uses to keep referential integrity inside transactions.
Must not touch the store, the clock or any I/O.
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Mapping
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hivenet.model.types import (
    TUNNEL_KEY_MAX,
    TUNNEL_KEY_MIN,
    AllowedAddressPair,
    FixedIp,
    InstanceMetadata,
    IpAddress,
    IpInterface,
    IpNetwork,
    MacAddress,
    NatTarget,
    ObjectId,
    PortRange,
    VlanId,
    Weight,
    new_id,
    random_mac,
)

DEFAULT_TENANT = "admin"
EXTERNAL_IDS_MAX = 64
EXTERNAL_ID_VALUE_MAX = 4096


class TopologyObject(BaseModel):
    """Base of every stored object. `KIND` names the key space: /hivenet/v1/topology/<KIND>/<id>.

    `REFS` maps a field name to the kind it references; the field holds one id, None or a
    tuple of ids. The repository refuses writes whose references do not exist.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    KIND: ClassVar[str] = ""
    REFS: ClassVar[dict[str, str]] = {}

    id: ObjectId = Field(default_factory=new_id)
    tenant_id: ObjectId = DEFAULT_TENANT
    name: str = Field(default="", max_length=255)
    # What a cloud management system keeps on the object for itself (as OVN's external_ids):
    # the Neutron/Octavia attributes with no native meaning (description, tags, device_owner,
    # a VIP's subnet, ...). HiveNet's own code never reads it.
    external_ids: dict[str, str] = Field(default_factory=dict)

    @field_validator("external_ids")
    @classmethod
    def _bounded_external_ids(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > EXTERNAL_IDS_MAX:
            raise ValueError(f"external_ids: at most {EXTERNAL_IDS_MAX} keys, got {len(value)}")
        for key, text in value.items():
            if not 1 <= len(key) <= 255 or len(text) > EXTERNAL_ID_VALUE_MAX:
                raise ValueError(
                    f"external_ids[{key[:40]!r}]: keys are 1-255 characters, values at most "
                    f"{EXTERNAL_ID_VALUE_MAX}"
                )
        return value

    def references(self) -> list[tuple[str, str, str]]:
        """(field, kind, id) for every id this object points at."""
        out: list[tuple[str, str, str]] = []
        for field_name, kind in self.REFS.items():
            value = getattr(self, field_name)
            if value is None:
                continue
            ids = value if isinstance(value, tuple) else (value,)
            out.extend((field_name, kind, ref) for ref in ids)
        return out


class Bridge(TopologyObject):
    KIND: ClassVar[str] = "bridge"
    REFS: ClassVar[dict[str, str]] = {"inbound_chain_id": "chain", "outbound_chain_id": "chain"}

    admin_state_up: bool = True
    inbound_chain_id: ObjectId | None = None
    outbound_chain_id: ObjectId | None = None
    # Answer ARP requests from the bridge's known IP->MAC entries instead of flooding them.
    arp_proxy: bool = False
    # The MTU its VMs use (DHCP option 26); None: the underlay MTU less the VXLAN overhead
    # (`hivenet.model.subnet.overlay_mtu`), which each agent knows for its own underlay.
    mtu: int | None = Field(default=None, ge=68, le=65535)
    # Every project may reference it (attach its own ports, as to an external network); only
    # its own project may change it. Set by the cluster admin only (the API refuses tenants).
    shared: bool = False


# Kinds whose objects may be shared with every project, and the flag field that says so.
SHARED_FLAGS: dict[str, str] = {"bridge": "shared"}


def is_shared(obj: TopologyObject) -> bool:
    """True for an object every project may reference (a bridge flagged `shared`)."""
    flag = SHARED_FLAGS.get(obj.KIND)
    return flag is not None and getattr(obj, flag) is True


def is_shared_data(kind: str, data: Mapping[str, object]) -> bool:
    """`is_shared` of the object whose JSON fields are `data` (no model validation)."""
    flag = SHARED_FLAGS.get(kind)
    return flag is not None and data.get(flag) is True


class Router(TopologyObject):
    KIND: ClassVar[str] = "router"
    REFS: ClassVar[dict[str, str]] = {"inbound_chain_id": "chain", "outbound_chain_id": "chain"}

    admin_state_up: bool = True
    inbound_chain_id: ObjectId | None = None
    outbound_chain_id: ObjectId | None = None


class DeviceKind(enum.StrEnum):
    BRIDGE = "bridge"
    ROUTER = "router"


class Port(TopologyObject):
    """A port of a bridge or router.

    Exterior ports face a VM or the outside world and may be bound to a host interface
    (`host_id` + `interface_name`). Interior ports link two devices: `peer_id` names the other
    end, and the link is symmetric (both ports name each other). Router ports carry their
    addresses with prefix (`addresses`); on bridge ports `addresses` lists the VM's own
    addresses (port security and ARP). `tunnel_key` is allocated by the store, unique.
    `fixed_ips` are the port's addresses on subnets (IPAM): an entry without `ip_address`
    gets the next free pool address from the store, each address is unique in its subnet,
    and the store keeps every fixed IP in `addresses` too (with the subnet's prefix).

    L2 gateway (docs/architecture.md, "L2 gateway"): with `interface_vlan` the bound interface
    carries the port's frames 802.1Q-tagged with that VLAN (the simulation pops the tag at
    ingress, drops other frames, pushes it at egress), unlike `vlan_id`, the access tag of a
    VLAN-aware bridge. A bridge port with `vtep_ip` and
    `vtep_vni` is no host's: it stands for an external VXLAN VTEP, reached by tunnelling
    to `vtep_ip` with VNI `vtep_vni` from every host, and what that VTEP sends with that VNI
    enters the bridge through it. The VNI is taken from the tunnel-key space (the store
    reserves it, so no port gets it as its key and no two VTEP ports share it).
    """

    KIND: ClassVar[str] = "port"
    REFS: ClassVar[dict[str, str]] = {
        "peer_id": "port",
        "host_id": "host",
        "inbound_chain_id": "chain",
        "outbound_chain_id": "chain",
        "port_group_ids": "port_group",
        "security_group_ids": "security_group",
    }

    device_kind: DeviceKind
    device_id: ObjectId
    admin_state_up: bool = True
    mac: MacAddress = Field(default_factory=random_mac)
    addresses: tuple[IpInterface, ...] = ()
    peer_id: ObjectId | None = None
    vlan_id: VlanId | None = None
    inbound_chain_id: ObjectId | None = None
    outbound_chain_id: ObjectId | None = None
    port_group_ids: tuple[ObjectId, ...] = ()
    host_id: ObjectId | None = None
    interface_name: str | None = Field(default=None, min_length=1, max_length=15)
    interface_vlan: VlanId | None = None
    vtep_ip: IpAddress | None = None
    vtep_vni: int | None = Field(default=None, ge=TUNNEL_KEY_MIN, le=TUNNEL_KEY_MAX)
    tunnel_key: int = Field(default=0, ge=0, le=0xEFFFFF)
    # Port security (VM ports): anti-spoofing on what the VM sends (its MAC, `addresses` and
    # the MAC's IPv6 link-local address, plus `allowed_address_pairs`) and, for a port in
    # security groups, the stateful groups. When not given, on for a VM port (an exterior
    # bridge port created with `addresses`, `fixed_ips`, security groups or address pairs), as
    # Neutron does; off for every other port. `false` turns it off explicitly.
    port_security_enabled: bool = False
    security_group_ids: tuple[ObjectId, ...] = ()
    allowed_address_pairs: tuple[AllowedAddressPair, ...] = ()
    fixed_ips: tuple[FixedIp, ...] = ()
    # What the metadata service tells the VM behind this port (None: the defaults).
    metadata: InstanceMetadata | None = None

    def references(self) -> list[tuple[str, str, str]]:
        return [
            ("device_id", self.device_kind.value, self.device_id),
            *super().references(),
            *(("fixed_ips", "subnet", fixed.subnet_id) for fixed in self.fixed_ips),
        ]

    @model_validator(mode="before")
    @classmethod
    def _port_security_default(cls, data: object) -> object:
        """`port_security_enabled` left out: True for a VM port (see the field)."""
        if (
            isinstance(data, dict)
            and "port_security_enabled" not in data
            and str(data.get("device_kind", "")) == DeviceKind.BRIDGE.value
            and data.get("peer_id") is None
            and any(
                data.get(name)
                for name in (
                    "addresses",
                    "fixed_ips",
                    "security_group_ids",
                    "allowed_address_pairs",
                )
            )
        ):
            return {**data, "port_security_enabled": True}
        return data

    @model_validator(mode="after")
    def _check(self) -> Port:
        if self.peer_id is not None and (self.host_id is not None or self.interface_name):
            raise ValueError(
                f"port {self.id}: an interior port (peer_id={self.peer_id}) cannot be bound "
                f"to a host interface (host_id={self.host_id}, interface_name={self.interface_name})"
            )
        if (self.host_id is None) != (self.interface_name is None):
            raise ValueError(
                f"port {self.id}: host_id and interface_name go together "
                f"(host_id={self.host_id}, interface_name={self.interface_name})"
            )
        if self.peer_id == self.id:
            raise ValueError(f"port {self.id}: peer_id cannot name the port itself")
        if self.interface_vlan is not None and self.interface_name is None:
            raise ValueError(
                f"port {self.id}: interface_vlan={self.interface_vlan} needs a host binding "
                "(host_id and interface_name)"
            )
        self._check_vtep()
        if self.device_kind is DeviceKind.ROUTER and self.vlan_id is not None:
            raise ValueError(f"port {self.id}: vlan_id={self.vlan_id} is only for bridge ports")
        if len(set(self.port_group_ids)) != len(self.port_group_ids):
            raise ValueError(f"port {self.id}: duplicate port_group_ids {self.port_group_ids}")
        if len(set(self.security_group_ids)) != len(self.security_group_ids):
            raise ValueError(
                f"port {self.id}: duplicate security_group_ids {self.security_group_ids}"
            )
        if (self.security_group_ids or self.allowed_address_pairs) and not (
            self.port_security_enabled
        ):
            raise ValueError(
                f"port {self.id}: security_group_ids/allowed_address_pairs need "
                "port_security_enabled=True"
            )
        if self.port_security_enabled and (
            self.device_kind is not DeviceKind.BRIDGE or self.peer_id is not None
        ):
            raise ValueError(
                f"port {self.id}: port_security_enabled is only for exterior bridge ports"
            )
        pinned = [f.ip_address for f in self.fixed_ips if f.ip_address is not None]
        if len(set(pinned)) != len(pinned):
            raise ValueError(f"port {self.id}: an address appears twice in fixed_ips {pinned}")
        return self

    def _check_vtep(self) -> None:
        if (self.vtep_ip is None) != (self.vtep_vni is None):
            raise ValueError(
                f"port {self.id}: vtep_ip and vtep_vni go together "
                f"(vtep_ip={self.vtep_ip}, vtep_vni={self.vtep_vni})"
            )
        if self.vtep_ip is None:
            return
        where = f"port {self.id}: a VTEP port (vtep_ip={self.vtep_ip})"
        if self.device_kind is not DeviceKind.BRIDGE:
            raise ValueError(f"{where} is only for bridge ports")
        if self.peer_id is not None:
            raise ValueError(f"{where} cannot be an interior port (peer_id={self.peer_id})")
        if self.host_id is not None:
            raise ValueError(f"{where} is bound to no host (host_id={self.host_id})")
        if self.vtep_ip.version != 4:
            raise ValueError(f"{where}: vtep_ip must be IPv4 (the underlay is IPv4)")
        if self.port_security_enabled:
            raise ValueError(f"{where} takes no port_security_enabled (that is for VM ports)")

    @property
    def is_vtep(self) -> bool:
        return self.vtep_ip is not None


class RouteType(enum.StrEnum):
    NORMAL = "normal"
    BLACKHOLE = "blackhole"
    REJECT = "reject"


class Route(TopologyObject):
    """A router's route. LPM over `dst_prefix`, then `src_prefix`; equal-cost routes (same
    prefixes, same weight) share traffic by consistent hashing. Lower weight wins."""

    KIND: ClassVar[str] = "route"
    REFS: ClassVar[dict[str, str]] = {
        "router_id": "router",
        "next_hop_port_id": "port",
        "learned_from": "bgp_peer",
    }

    router_id: ObjectId
    dst_prefix: IpNetwork
    src_prefix: IpNetwork | None = None
    type: RouteType = RouteType.NORMAL
    next_hop_port_id: ObjectId | None = None
    next_hop_gateway: IpAddress | None = None
    weight: Weight = 100
    # The bgp_peer whose session learned this route (agent/bgp.py writes and withdraws it);
    # None: a static route. A learned route is used only while its next hop port's host is up.
    learned_from: ObjectId | None = None

    @model_validator(mode="after")
    def _check(self) -> Route:
        version = self.dst_prefix.version
        if self.src_prefix is not None and self.src_prefix.version != version:
            raise ValueError(
                f"route src_prefix {self.src_prefix} and dst_prefix {self.dst_prefix} "
                "are of different IP versions"
            )
        if self.next_hop_gateway is not None and self.next_hop_gateway.version != version:
            raise ValueError(
                f"route next_hop_gateway {self.next_hop_gateway} is not IPv{version} "
                f"like dst_prefix {self.dst_prefix}"
            )
        if self.type is RouteType.NORMAL and self.next_hop_port_id is None:
            raise ValueError("a normal route needs next_hop_port_id")
        if self.type is not RouteType.NORMAL and (
            self.next_hop_port_id is not None or self.next_hop_gateway is not None
        ):
            raise ValueError(f"a {self.type.value} route takes no next hop")
        return self


class Chain(TopologyObject):
    KIND: ClassVar[str] = "chain"


class RuleAction(enum.StrEnum):
    ACCEPT = "accept"
    DROP = "drop"
    REJECT = "reject"
    RETURN = "return"
    JUMP = "jump"
    CONTINUE = "continue"
    DNAT = "dnat"
    SNAT = "snat"
    REV_DNAT = "rev_dnat"
    REV_SNAT = "rev_snat"


class FragmentPolicy(enum.StrEnum):
    ANY = "any"  # match every packet
    HEADER = "header"  # unfragmented packets and first fragments
    NONHEADER = "nonheader"  # later fragments only
    UNFRAGMENTED = "unfragmented"  # no fragments at all


class Rule(TopologyObject):
    """One rule of a chain. Every condition left at None (or empty) matches anything; each
    condition has an `inv_*` flag that negates it. Rules of a chain run in `position` order
    (ties broken by id). `match_forward_flow`/`match_return_flow` test connection tracking."""

    KIND: ClassVar[str] = "rule"
    REFS: ClassVar[dict[str, str]] = {
        "chain_id": "chain",
        "jump_chain_id": "chain",
        "in_port_ids": "port",
        "out_port_ids": "port",
        "port_group_id": "port_group",
        "ip_addr_group_src_id": "ip_addr_group",
        "ip_addr_group_dst_id": "ip_addr_group",
    }

    chain_id: ObjectId
    position: int = Field(default=100, ge=0)
    action: RuleAction
    jump_chain_id: ObjectId | None = None
    nat_targets: tuple[NatTarget, ...] = ()

    in_port_ids: tuple[ObjectId, ...] = ()
    inv_in_port: bool = False
    out_port_ids: tuple[ObjectId, ...] = ()
    inv_out_port: bool = False
    port_group_id: ObjectId | None = None
    inv_port_group: bool = False
    ip_addr_group_src_id: ObjectId | None = None
    inv_ip_addr_group_src: bool = False
    ip_addr_group_dst_id: ObjectId | None = None
    inv_ip_addr_group_dst: bool = False
    dl_src: MacAddress | None = None
    dl_src_mask: MacAddress | None = None
    inv_dl_src: bool = False
    dl_dst: MacAddress | None = None
    dl_dst_mask: MacAddress | None = None
    inv_dl_dst: bool = False
    dl_type: int | None = Field(default=None, ge=0x600, le=0xFFFF)
    inv_dl_type: bool = False
    vlan_id: VlanId | None = None
    inv_vlan: bool = False
    nw_src: IpNetwork | None = None
    inv_nw_src: bool = False
    nw_dst: IpNetwork | None = None
    inv_nw_dst: bool = False
    nw_proto: int | None = Field(default=None, ge=0, le=255)
    inv_nw_proto: bool = False
    nw_tos: int | None = Field(default=None, ge=0, le=255)
    inv_nw_tos: bool = False
    tp_src: PortRange | None = None
    inv_tp_src: bool = False
    tp_dst: PortRange | None = None
    inv_tp_dst: bool = False
    icmp_type: int | None = Field(default=None, ge=0, le=255)
    icmp_code: int | None = Field(default=None, ge=0, le=255)
    inv_icmp: bool = False
    fragment_policy: FragmentPolicy = FragmentPolicy.ANY
    match_forward_flow: bool = False
    match_return_flow: bool = False

    @model_validator(mode="after")
    def _check(self) -> Rule:
        if (self.action is RuleAction.JUMP) != (self.jump_chain_id is not None):
            raise ValueError(
                f"rule action {self.action.value!r} with jump_chain_id={self.jump_chain_id}: "
                "jump_chain_id is required for 'jump' and only allowed there"
            )
        if self.jump_chain_id is not None and self.jump_chain_id == self.chain_id:
            raise ValueError(f"rule jumps to its own chain {self.chain_id}")
        nat = self.action in (RuleAction.DNAT, RuleAction.SNAT)
        if nat and not self.nat_targets:
            raise ValueError(
                f"rule action {self.action.value!r} needs at least one nat_targets entry"
            )
        if not nat and self.nat_targets:
            raise ValueError(f"nat_targets are only for dnat/snat, not {self.action.value!r}")
        if self.match_forward_flow and self.match_return_flow:
            raise ValueError("match_forward_flow and match_return_flow are mutually exclusive")
        if self.dl_src_mask is not None and self.dl_src is None:
            raise ValueError("dl_src_mask needs dl_src")
        if self.dl_dst_mask is not None and self.dl_dst is None:
            raise ValueError("dl_dst_mask needs dl_dst")
        if self.icmp_code is not None and self.icmp_type is None:
            raise ValueError("icmp_code needs icmp_type")
        if (
            self.nw_src is not None
            and self.nw_dst is not None
            and self.nw_src.version != self.nw_dst.version
        ):
            raise ValueError(f"nw_src {self.nw_src} and nw_dst {self.nw_dst} mix IP versions")
        return self


class PortGroup(TopologyObject):
    """A set of ports (members name the group in `Port.port_group_ids`). A stateful group
    shares its members' connection state with every host that binds one of them."""

    KIND: ClassVar[str] = "port_group"

    stateful: bool = False


class IpAddrGroup(TopologyObject):
    KIND: ClassVar[str] = "ip_addr_group"

    addresses: tuple[IpAddress, ...] = ()


class Host(TopologyObject):
    """A hypervisor/gateway running an agent. Liveness is not stored here (it is the host's
    lease under /hivenet/v1/state/<host>/...)."""

    KIND: ClassVar[str] = "host"


class TunnelZoneMember(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    host_id: ObjectId
    underlay_ip: IpAddress


class TunnelZone(TopologyObject):
    KIND: ClassVar[str] = "tunnel_zone"
    REFS: ClassVar[dict[str, str]] = {}

    type: Literal["vxlan"] = "vxlan"
    vxlan_port: int = Field(default=4789, ge=1, le=65535)
    members: tuple[TunnelZoneMember, ...] = ()

    @model_validator(mode="after")
    def _check(self) -> TunnelZone:
        hosts = [m.host_id for m in self.members]
        if len(set(hosts)) != len(hosts):
            raise ValueError(f"tunnel zone {self.id}: a host appears twice in members")
        return self

    def references(self) -> list[tuple[str, str, str]]:
        return [("members", "host", m.host_id) for m in self.members]


# The load-balancer kinds live in their own module, which needs TopologyObject from this one.
from hivenet.model.bgp import BGP_KINDS  # noqa: E402
from hivenet.model.loadbalancer import LB_KINDS  # noqa: E402
from hivenet.model.security import SECURITY_KINDS  # noqa: E402
from hivenet.model.subnet import SUBNET_KINDS  # noqa: E402

KINDS: dict[str, type[TopologyObject]] = {
    cls.KIND: cls
    for cls in (
        Bridge,
        Router,
        Port,
        Route,
        Chain,
        Rule,
        PortGroup,
        IpAddrGroup,
        Host,
        TunnelZone,
    )
}
KINDS.update({cls.KIND: cls for cls in LB_KINDS})
KINDS.update({cls.KIND: cls for cls in SECURITY_KINDS})
KINDS.update({cls.KIND: cls for cls in SUBNET_KINDS})
KINDS.update({cls.KIND: cls for cls in BGP_KINDS})


def topology_key(kind: str, object_id: str) -> str:
    return f"/hivenet/v1/topology/{kind}/{object_id}"


TOPOLOGY_PREFIX = "/hivenet/v1/topology/"


_PREFIX_LEN = len(TOPOLOGY_PREFIX)


def parse_topology_key(key: str) -> tuple[str, str]:
    """(kind, id) from a topology key; ValueError for anything else."""
    if key.startswith(TOPOLOGY_PREFIX):
        kind, _, object_id = key[_PREFIX_LEN:].partition("/")
        if object_id and kind in KINDS:
            return kind, object_id
    raise ValueError(f"not a topology key: {key!r}")


def encode(obj: TopologyObject) -> bytes:
    return obj.model_dump_json().encode()


def decode(kind: str, data: bytes) -> TopologyObject:
    return KINDS[kind].model_validate_json(data)


def peek_id(data: bytes, field: str) -> str | None:
    """The id in string field `field` of a stored value, read without decoding it, or None
    when that cannot be certain (then decode the value instead).

    Certain when the value looks as `encode` writes it: the quoted name occurs exactly once
    (inside a JSON string a quote is escaped, so a string cannot hold it; a string equal to
    the name makes two occurrences) and is followed by `:"` and a valid id up to the next
    quote. A value that does not decode is still rejected when it is decoded: this only says
    which parent (a rule's chain) the value names, for an index."""
    quoted, pattern = _peek_patterns(field)
    if data.count(quoted) != 1:
        return None
    # The only occurrence of the name: the first `"name":"` is that one.
    match = pattern.search(data)
    return None if match is None else match.group(1).decode("ascii")


@functools.cache
def _peek_patterns(field: str) -> tuple[bytes, re.Pattern[bytes]]:
    """`peek_id`'s quoted name and `"name":"<id>"` (an id as `_ID_RE` allows, then the quote)."""
    quoted = f'"{field}"'.encode()
    return quoted, re.compile(re.escape(quoted) + rb':"([A-Za-z0-9][A-Za-z0-9_.-]{0,63})"')
