"""Subnets and the pure part of IP address management: `Subnet`, its pools and host routes,
the overlay MTU, and which address of a subnet a port may hold or be given.

A subnet lives on a bridge (`bridge_id`); ports hold addresses of it in `Port.fixed_ips`. As in
Neutron, a create that leaves out `gateway_ip` gets the first host address (send null for no
gateway) and one that leaves out `allocation_pools` gets every host address but the gateway
(send [] for no automatic allocation). The DHCP responder (`sim/dhcp.py`) answers from the
subnet and the port; the store (`store/topology.py`) keeps each address unique per subnet.

The MTU a VM should use lives on the bridge (`Bridge.mtu`); when unset it is the underlay MTU
less the VXLAN encapsulation (`overlay_mtu`), which only the agent knows.

Must not touch the store, the clock or any I/O.
"""

from __future__ import annotations

import ipaddress
import itertools
import re
from collections.abc import Iterator, Set
from typing import Any, ClassVar

from pydantic import Field, ValidationInfo, field_validator, model_validator

from hivenet.model.topology import TopologyObject
from hivenet.model.types import IpAddress, IpNetwork, ObjectId, _Value

# Outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8 (the inner Ethernet header is not part of
# the inner MTU).
VXLAN_OVERHEAD = 50
DEFAULT_UNDERLAY_MTU = 1500
MIN_MTU = 68  # RFC 791: every IPv4 host must take 68-byte datagrams
MAX_MTU = 65535
DEFAULT_LEASE_TIME = 86400
MIN_LEASE_TIME = 60
MAX_LEASE_TIME = 0xFFFFFFFE  # 0xFFFFFFFF means "infinite" in DHCP; we always renew
_DOMAIN_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def overlay_mtu(bridge_mtu: int | None, underlay_mtu: int = DEFAULT_UNDERLAY_MTU) -> int:
    """The MTU a VM on a bridge should use: the bridge's own, else what fits in one VXLAN
    packet on the underlay."""
    if bridge_mtu is not None:
        return bridge_mtu
    return max(MIN_MTU, underlay_mtu - VXLAN_OVERHEAD)


class AllocationPool(_Value):
    """An inclusive range of addresses the store may hand out."""

    start: IpAddress
    end: IpAddress

    @model_validator(mode="after")
    def _ordered(self) -> AllocationPool:
        if self.start.version != self.end.version:
            raise ValueError(f"allocation pool {self.start}-{self.end} mixes IP versions")
        if int(self.start) > int(self.end):
            raise ValueError(f"allocation pool start {self.start} is greater than end {self.end}")
        return self

    def contains(self, address: IpAddress) -> bool:
        return address.version == self.start.version and (
            int(self.start) <= int(address) <= int(self.end)
        )

    def __str__(self) -> str:
        return f"{self.start}-{self.end}"


class HostRoute(_Value):
    """A static route DHCP hands to the VMs (option 121)."""

    destination: IpNetwork
    nexthop: IpAddress

    @model_validator(mode="after")
    def _same_version(self) -> HostRoute:
        if self.destination.version != self.nexthop.version:
            raise ValueError(f"host route {self.destination} via {self.nexthop} mixes IP versions")
        return self


def reserved_addresses(cidr: IpNetwork) -> frozenset[int]:
    """Addresses of `cidr` no port may hold: the network and broadcast addresses of an IPv4
    subnet of /30 or wider, the subnet-router anycast (network) address of an IPv6 one."""
    if cidr.version == 4:
        if cidr.prefixlen >= 31:
            return frozenset()
        return frozenset({int(cidr.network_address), int(cidr.broadcast_address)})
    return frozenset({int(cidr.network_address)})


def _host_range(cidr: IpNetwork) -> tuple[int, int]:
    """(first, last) host address of `cidr` as integers."""
    first, last = int(cidr.network_address), int(cidr.broadcast_address)
    reserved = reserved_addresses(cidr)
    while first in reserved and first < last:
        first += 1
    while last in reserved and last > first:
        last -= 1
    return first, last


def _address(version: int, value: int) -> IpAddress:
    return ipaddress.IPv4Address(value) if version == 4 else ipaddress.IPv6Address(value)


def _default_pools(cidr: IpNetwork, gateway: IpAddress | None) -> list[dict[str, str]]:
    """Every host address of `cidr` except the gateway, as pool dicts."""
    first, last = _host_range(cidr)
    if first in reserved_addresses(cidr):
        return []
    spans = [(first, last)]
    if gateway is not None and first <= int(gateway) <= last:
        at = int(gateway)
        spans = [(first, at - 1), (at + 1, last)]
    version = cidr.version
    return [
        {"start": str(_address(version, lo)), "end": str(_address(version, hi))}
        for lo, hi in spans
        if lo <= hi
    ]


class Subnet(TopologyObject):
    """An IP subnet of a bridge: what IPAM hands out and what DHCP tells the VMs.

    `allocation_pools`: the ranges automatic allocation draws from (explicit addresses may
    lie outside them). `dns_nameservers`, `host_routes`, `domain_name`, `lease_time`
    (seconds) go to the VMs by DHCP when `enable_dhcp`. `cidr` and `bridge_id` are fixed
    once created."""

    KIND: ClassVar[str] = "subnet"
    REFS: ClassVar[dict[str, str]] = {"bridge_id": "bridge"}

    bridge_id: ObjectId
    cidr: IpNetwork
    gateway_ip: IpAddress | None = None
    allocation_pools: tuple[AllocationPool, ...] = ()
    dns_nameservers: tuple[IpAddress, ...] = ()
    host_routes: tuple[HostRoute, ...] = ()
    enable_dhcp: bool = True
    lease_time: int = Field(default=DEFAULT_LEASE_TIME, ge=MIN_LEASE_TIME, le=MAX_LEASE_TIME)
    domain_name: str | None = Field(default=None, min_length=1, max_length=253)

    @property
    def ip_version(self) -> int:
        return self.cidr.version

    @model_validator(mode="before")
    @classmethod
    def _neutron_defaults(cls, data: Any) -> Any:
        """Fill a left-out gateway (first host) and left-out pools (all hosts but the
        gateway), as Neutron does; an explicit null/[] stays."""
        if not isinstance(data, dict) or "cidr" not in data:
            return data
        try:
            cidr = ipaddress.ip_network(str(data["cidr"]), strict=True)
        except ValueError:
            return data  # the field validator reports it
        filled = dict(data)
        if "gateway_ip" not in filled:
            first, _last = _host_range(cidr)
            filled["gateway_ip"] = (
                None if first in reserved_addresses(cidr) else str(_address(cidr.version, first))
            )
        if "allocation_pools" not in filled:
            gateway = filled["gateway_ip"]
            try:
                gateway_address = None if gateway is None else ipaddress.ip_address(str(gateway))
            except ValueError:
                return filled  # the field validator reports it
            filled["allocation_pools"] = _default_pools(cidr, gateway_address)
        return filled

    # Field validators (not one model validator) so each refusal names its field; fields are
    # validated in declaration order, so `cidr` (and `gateway_ip`) are known when present.

    @field_validator("gateway_ip")
    @classmethod
    def _check_gateway(cls, gateway: IpAddress | None, info: ValidationInfo) -> IpAddress | None:
        cidr: IpNetwork | None = info.data.get("cidr")
        if gateway is None or cidr is None:
            return gateway
        if gateway.version != cidr.version or gateway not in cidr:
            raise ValueError(f"gateway_ip {gateway} is outside the cidr {cidr}")
        if int(gateway) in reserved_addresses(cidr):
            raise ValueError(f"gateway_ip {gateway} is the network or broadcast address of {cidr}")
        return gateway

    @field_validator("allocation_pools")
    @classmethod
    def _check_pools(
        cls, pools: tuple[AllocationPool, ...], info: ValidationInfo
    ) -> tuple[AllocationPool, ...]:
        cidr: IpNetwork | None = info.data.get("cidr")
        if cidr is None:
            return pools
        reserved = reserved_addresses(cidr)
        gateway: IpAddress | None = info.data.get("gateway_ip")
        for pool in pools:
            if pool.start.version != cidr.version:
                raise ValueError(f"allocation pool {pool} is not IPv{cidr.version} like {cidr}")
            if pool.start not in cidr or pool.end not in cidr:
                raise ValueError(f"allocation pool {pool} is outside the cidr {cidr}")
            if any(int(pool.start) <= r <= int(pool.end) for r in reserved):
                raise ValueError(
                    f"allocation pool {pool} includes the network or broadcast address of {cidr}"
                )
            if gateway is not None and pool.contains(gateway):
                raise ValueError(f"allocation pool {pool} includes the gateway_ip {gateway}")
        ordered = sorted(pools, key=lambda p: int(p.start))
        for before, after in itertools.pairwise(ordered):
            if int(after.start) <= int(before.end):
                raise ValueError(f"allocation pools {before} and {after} overlap")
        return pools

    @field_validator("dns_nameservers")
    @classmethod
    def _check_dns(
        cls, servers: tuple[IpAddress, ...], info: ValidationInfo
    ) -> tuple[IpAddress, ...]:
        cidr: IpNetwork | None = info.data.get("cidr")
        for server in servers:
            if cidr is not None and server.version != cidr.version:
                raise ValueError(f"name server {server} is not IPv{cidr.version} like {cidr}")
        return servers

    @field_validator("host_routes")
    @classmethod
    def _check_routes(
        cls, routes: tuple[HostRoute, ...], info: ValidationInfo
    ) -> tuple[HostRoute, ...]:
        cidr: IpNetwork | None = info.data.get("cidr")
        for route in routes:
            if cidr is not None and route.destination.version != cidr.version:
                raise ValueError(
                    f"host route {route.destination} is not IPv{cidr.version} like {cidr}"
                )
        return routes

    @field_validator("domain_name")
    @classmethod
    def _check_domain(cls, domain: str | None) -> str | None:
        if domain is not None:
            labels = domain.removesuffix(".").split(".")
            if not all(_DOMAIN_LABEL.match(label) for label in labels):
                raise ValueError(
                    f"domain_name {domain!r} is not a DNS name (labels of letters, digits "
                    "and inner hyphens, 1-63 characters each)"
                )
        return domain

    def address_problem(self, address: IpAddress) -> str | None:
        """Why `address` cannot be a port's fixed IP on this subnet (None: it can)."""
        if address.version != self.cidr.version or address not in self.cidr:
            return f"is outside subnet {self.id} ({self.cidr})"
        if int(address) in reserved_addresses(self.cidr):
            return f"is the network or broadcast address of subnet {self.id} ({self.cidr})"
        return None

    def pool_addresses(self, start_after: int | None = None) -> Iterator[IpAddress]:
        """Every pool address once, in order, beginning after `start_after` and wrapping
        around (so allocation continues where it left off and finds freed holes later)."""
        spans = sorted((int(p.start), int(p.end)) for p in self.allocation_pools)
        version = self.cidr.version
        pivot = -1 if start_after is None else start_after
        for lo, hi in spans:  # the part after the pivot
            for value in range(max(lo, pivot + 1), hi + 1):
                yield _address(version, value)
        for lo, hi in spans:  # then from the start up to the pivot
            for value in range(lo, min(hi, pivot) + 1):
                yield _address(version, value)

    def first_free(self, used: Set[int], start_after: int | None = None) -> IpAddress | None:
        """The first pool address (see `pool_addresses`) not in `used`; None when full."""
        for address in self.pool_addresses(start_after):
            if int(address) not in used:
                return address
        return None


SUBNET_KINDS: tuple[type[TopologyObject], ...] = (Subnet,)
